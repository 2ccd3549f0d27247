"""Profile the engine's steps on demand: ``torch.profiler`` from ``start`` to ``stop``.

vLLM's form: ``--profiler-config '{"profiler": "torch", "torch_profiler_dir": DIR}'`` turns it
on, and the server's ``POST /start_profile`` and ``POST /stop_profile`` (or
``LLM.start_profile()`` / ``stop_profile()``) bracket the steps to record. Why: a serving gap
that no single step shows (a device idle between steps, steps of shapes no microbenchmark
builds) only shows in a profile taken under the load itself, and vLLM can take one of its own.

``stop`` writes, under ``torch_profiler_dir``, the Chrome trace
(``parallm-core-<pid>.<ns>.pt.trace.json[.gz]``, named as vLLM's ``tensorboard_trace_handler``
names its own, so that one reader takes both) and beside it ``parallm-core-<pid>.<ns>.txt``,
the table of ops and kernels by device time (by host time without CUDA). Each data-parallel
replica writes its own; with tensor parallelism only the driver's process (rank 0) records.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parallm.config_json import config_fields

if TYPE_CHECKING:
    from parallm.engine.scheduler import ScheduledBatch

PROFILERS = ("torch",)


@dataclass(frozen=True)
class ProfilerConfig:
    """vLLM's ``profiler_config`` keys that parallm implements; off unless ``profiler`` is set."""

    profiler: str | None = None  # "torch", or None: no profiling
    torch_profiler_dir: str = ""  # where traces go (made if missing)
    torch_profiler_record_shapes: bool = False
    # Off by default (vLLM's is on): Python stacks make every op cost more on the host, and the
    # host's pace is part of what a serving profile measures.
    torch_profiler_with_stack: bool = False
    torch_profiler_use_gzip: bool = True

    def __post_init__(self) -> None:
        if self.profiler is not None and self.profiler not in PROFILERS:
            raise ValueError(
                f"profiler_config.profiler must be one of {list(PROFILERS)} or null, "
                f"got {self.profiler!r}"
            )
        if self.profiler is not None and not self.torch_profiler_dir:
            raise ValueError(
                "profiler_config.torch_profiler_dir is required with profiler 'torch': the "
                "folder the traces go to"
            )
        for name in ("torch_profiler_record_shapes", "torch_profiler_with_stack",
                     "torch_profiler_use_gzip"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"profiler_config.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.profiler is not None

    @classmethod
    def from_value(cls, value: Any) -> ProfilerConfig | None:
        """Accept None, a dict, a JSON object string (the CLI's form) or an instance."""
        if isinstance(value, cls):
            return value
        example = '\'{"profiler": "torch", "torch_profiler_dir": "DIR"}\''
        fields = config_fields(value, cls, "profiler_config", example)
        return None if fields is None else cls(**fields)


class ProfilerMisuse(RuntimeError):
    """A profiler command that cannot apply now (the caller's mistake, HTTP 400)."""


class ProfilerOff(ProfilerMisuse):
    """A profile was asked of an engine built without ``profiler_config``."""

    def __init__(self) -> None:
        super().__init__(
            "profiling is off: build the engine with profiler_config (parallm serve "
            '--profiler-config \'{"profiler": "torch", "torch_profiler_dir": "DIR"}\')'
        )


class EngineProfiler:
    """One ``torch.profiler`` session at a time over whatever the process runs meanwhile."""

    def __init__(self, config: ProfilerConfig) -> None:
        self.config = config
        self.name = f"parallm-core-{os.getpid()}"
        self._profile: torch.profiler.profile | None = None

    @property
    def running(self) -> bool:
        return self._profile is not None

    def start(self) -> None:
        if self._profile is not None:
            raise ProfilerMisuse("a profile is already running: stop it first")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        c = self.config
        profile = torch.profiler.profile(
            activities=activities, record_shapes=c.torch_profiler_record_shapes,
            with_stack=c.torch_profiler_with_stack,
        )  # fmt: skip
        profile.start()
        self._profile = profile

    def stop(self) -> str:
        """End the profile; returns the trace's path (the table is beside it)."""
        profile, self._profile = self._profile, None
        if profile is None:
            raise ProfilerMisuse("no profile is running: start one first")
        if torch.cuda.is_available():  # the steps in flight finish inside the profile
            torch.cuda.synchronize()
        profile.stop()
        folder = Path(self.config.torch_profiler_dir)
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / f"{self.name}.{time.time_ns()}.pt.trace.json"
        profile.export_chrome_trace(str(trace))
        if self.config.torch_profiler_use_gzip:
            with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            trace.unlink()
            trace = Path(f"{trace}.gz")
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profile.key_averages().table(sort_by=sort, row_limit=100)
        table_path(trace).write_text(table + "\n")
        return str(trace)


def step_label(batch: ScheduledBatch) -> str:
    """A step's name in a profile, vLLM's: ``execute_context_C(T)_generation_G(U)``, C
    sequences computing prompt tokens (T of them) and G decoding (U tokens, drafts included).
    The device time of each such range in either engine's trace is one step of that shape."""
    ctx = ctx_tokens = gen = gen_tokens = 0
    for item in batch.seqs:
        if item.start < item.seq.num_prompt_tokens:
            ctx, ctx_tokens = ctx + 1, ctx_tokens + item.num_scheduled_tokens
        else:
            gen, gen_tokens = gen + 1, gen_tokens + item.num_scheduled_tokens
    return f"execute_context_{ctx}({ctx_tokens})_generation_{gen}({gen_tokens})"


def table_path(trace: str | Path) -> Path:
    """The table written beside a trace: its name with ``.txt`` for ``.pt.trace.json[.gz]``."""
    name = Path(trace).name.removesuffix(".gz").removesuffix(".json").removesuffix(".pt.trace")
    return Path(trace).with_name(name + ".txt")
