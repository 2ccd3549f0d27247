"""vLLM as a peer row in ``parallm bench throughput|latency --compare-vllm``.

vLLM gets exactly parallm's requests (the same token ids, greedy, EOS ignored, no detokenizing)
on the same model shape with the same dummy-weight loading, dtype and context limit, in one or
both of two configurations: vLLM's own defaults, and vLLM held to parallm's scheduler and
memory limits (``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``,
``gpu_memory_utilization``, prefix caching, chunked prefill, eager mode).

Each configuration runs in a child process (``python -m parallm.bench.vllm_peer JOB RESULT``),
started after the bench has freed parallm's engine: vLLM sizes its KV cache from the GPU memory
it finds free and starts its own engine-core process, so it must find the GPU as parallm did,
not beside parallm's leftovers, and whatever it leaves (processes, CUDA graphs, memory) ends
with the child. A ``vllm`` module already imported in this process is used in-process instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from parallm.config import EngineConfig

VLLM_VERSION = "0.26.0"  # the version benchmarks/peers carries to the GPU machine
CONFIGS = ("stock", "parallm-limits")
INSTALL_HINT = (
    f"install vLLM (pip install vllm=={VLLM_VERSION}, which needs a CUDA build of torch); on a "
    "machine without network, benchmarks/peers/README.md carries its wheels"
)


class VllmUnavailable(ValueError):
    """vLLM cannot be imported, so ``--compare-vllm`` cannot run (a ValueError: the command
    line reports it as an error in the flags given, before any engine starts)."""


# ---- flags ------------------------------------------------------------------------------------


def vllm_configs(text: str) -> tuple[str, ...]:
    """``"stock,parallm-limits"`` -> the configurations, each one of ``CONFIGS``."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected configurations separated by commas from {', '.join(CONFIGS)}; got {text!r}"
        )
    return names


def add_args(p: argparse.ArgumentParser, default_configs: str) -> None:
    """``--compare-vllm``, ``--vllm-configs`` and ``--plot`` of a bench command."""
    p.add_argument(
        "--compare-vllm",
        action="store_true",
        help="after parallm, run vLLM on the same requests and GPU (needs vllm importable; it "
        "runs in a child process once parallm's engine is freed) and add its rows",
    )
    p.add_argument(
        "--vllm-configs",
        type=vllm_configs,
        default=default_configs,
        help="with --compare-vllm: vLLM configurations to run, separated by commas: stock "
        "(vLLM's own scheduler limits) and parallm-limits (parallm's max_num_seqs, "
        "max_num_batched_tokens, block_size, gpu_memory_utilization, prefix caching, chunked "
        "prefill, eager mode)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write a chart of the rows to this PNG")


# ---- is vLLM there ----------------------------------------------------------------------------


def require_vllm() -> str:
    """vLLM's version, or ``VllmUnavailable`` naming what to install. Cheap next to an engine
    start: a child imports vllm and its engine core (which imports its optional-looking needs,
    llguidance and xgrammar), so a half-installed vLLM fails here rather than after parallm ran.
    A ``vllm`` already imported in this process is taken as it is."""
    loaded = sys.modules.get("vllm")
    if loaded is not None:
        return str(getattr(loaded, "__version__", "unknown"))
    if importlib.util.find_spec("vllm") is None:
        raise VllmUnavailable(f"--compare-vllm: no module named 'vllm'; {INSTALL_HINT}")
    probe = "import vllm, vllm.v1.engine.core; print(vllm.__version__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=child_env())  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-3:])
        raise VllmUnavailable(f"--compare-vllm: vllm is installed but does not import:\n{tail}\n"
                              f"{INSTALL_HINT}")  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def check_comparable(args: argparse.Namespace) -> None:
    """Refuse engine flags whose parallm run vLLM would not mirror (it gets the model, dtype,
    context limit and scheduler limits only), before anything starts."""
    differing = {
        "--quantization": getattr(args, "quantization", None),
        "--kv-cache-dtype": None if getattr(args, "kv_cache_dtype", "auto") == "auto" else args.kv_cache_dtype,
        "--speculative-config": getattr(args, "speculative_config", None),
        "--tensor-parallel-size": None if getattr(args, "tensor_parallel_size", 1) == 1 else args.tensor_parallel_size,
        "--data-parallel-size": None if getattr(args, "data_parallel_size", 1) == 1 else args.data_parallel_size,
    }  # fmt: skip
    given = [f"{flag} {value}" for flag, value in differing.items() if value is not None]
    if given:
        raise ValueError(f"--compare-vllm compares plain runs of one model on one GPU; vLLM would "
                         f"not get {', '.join(given)}: drop it, or run without --compare-vllm")  # fmt: skip


def child_env() -> dict[str, str]:
    """The environment of vLLM's process: this one's, plus what a run without flashinfer needs
    (vLLM's sampler imports flashinfer unless told not to) and no usage reports."""
    env = dict(os.environ)
    if importlib.util.find_spec("flashinfer") is None:
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


# ---- what vLLM is asked to run ----------------------------------------------------------------


@dataclass(frozen=True)
class PeerModel:
    """The model and limits of parallm's run, as vLLM needs them."""

    model: str  # a config.json (dummy weights), a checkpoint directory or a Hub id
    load_format: str  # "dummy" or "auto"
    dtype: str  # resolved, e.g. "bfloat16"
    max_model_len: int
    seed: int
    limits: dict[str, Any] = field(default_factory=dict)  # parallm's, by vLLM's names


def vllm_limits(cfg: EngineConfig, max_model_len: int) -> dict[str, Any]:
    """parallm's scheduler and memory limits under ``cfg`` by vLLM's names (``LLM`` keyword
    arguments; ``vllm serve`` takes them as flags with dashes): what "vLLM with parallm's
    limits" means in every peer run."""
    from parallm.config import resolve_device

    sched = cfg.scheduler_config(max_model_len, resolve_device(cfg.device))
    return {
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "block_size": cfg.block_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "enable_chunked_prefill": cfg.enable_chunked_prefill,
        "enforce_eager": cfg.enforce_eager,
    }


def peer_model(engine: Any, args: argparse.Namespace) -> PeerModel:
    """vLLM's view of a bench's parallm engine: the model the flags named (a --config file
    stays a file: the engine keeps only its shape), the dtype and context limit the engine
    resolved, and its scheduler and memory limits."""
    cfg = engine.config
    limits = vllm_limits(cfg, engine.max_model_len)
    model = args.config or cfg.model or args.model
    if model is None:
        raise ValueError("--compare-vllm needs --config or --model (the bundled model has none)")
    dtype = str(engine.dtype).removeprefix("torch.")
    load_format = "dummy" if args.config or cfg.load_format == "dummy" else "auto"
    return PeerModel(str(model), load_format, dtype, engine.max_model_len, cfg.seed, limits)


def model_dir(model: PeerModel, scratch: Path) -> str:
    """What vLLM loads: a config.json alone becomes a directory holding only it (vLLM takes a
    directory; with dummy weights it reads nothing else); anything else is passed as is."""
    path = Path(model.model)
    if not path.is_file():
        return model.model
    folder = scratch / "model"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, folder / "config.json")
    return str(folder)


def llm_kwargs(model: PeerModel, folder: str, config: str) -> dict[str, Any]:
    """``vllm.LLM(**kwargs)`` for one configuration of ``CONFIGS``."""
    kwargs: dict[str, Any] = {
        "model": folder, "load_format": model.load_format, "dtype": model.dtype,
        "max_model_len": model.max_model_len, "seed": model.seed, "skip_tokenizer_init": True,
    }  # fmt: skip
    if config == "parallm-limits":
        kwargs.update(model.limits)
    elif config != "stock":
        raise ValueError(f"unknown vLLM configuration {config!r}; expected one of {CONFIGS}")
    return kwargs


def engine_label(config: str, version: str = VLLM_VERSION) -> str:
    return f"vllm {version} ({config})"


# ---- runs (in vLLM's process) -----------------------------------------------------------------


def _sampling(vllm: Any, max_tokens: int) -> Any:
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                               detokenize=False)  # fmt: skip


def _token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


def run_throughput(vllm: Any, kwargs: dict[str, Any], prompts: list[list[int]],
                   out_lens: list[int]) -> dict[str, Any]:  # fmt: skip
    """``bench throughput``'s run on vLLM: the same warm-up (the first 8 requests), prefix
    cache reset, then all requests in one ``generate``."""
    llm = vllm.LLM(**kwargs)
    params = [_sampling(vllm, n) for n in out_lens]
    batch = _token_prompts(prompts)
    llm.generate(batch[:8], params[:8], use_tqdm=False)
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    n, prompt_tokens = len(prompts), sum(map(len, prompts))
    return {
        "requests": n, "seconds": seconds, "requests_per_s": n / seconds,
        "output_tokens": generated, "output_tokens_per_s": generated / seconds,
        "total_tokens_per_s": (prompt_tokens + generated) / seconds,
        "peak_gpu_mem_gib": None,  # vLLM's engine core is another process
    }  # fmt: skip


def run_latency(vllm: Any, kwargs: dict[str, Any], runs: dict[str, list[list[list[int]]]],
                output_len: int) -> list[dict[str, Any]]:  # fmt: skip
    """``bench latency``'s runs on vLLM: per batch size, the first run warms up and the median
    of the others is kept. A step is timed as parallm times it: from the moment every request
    has its first token to the last token, over ``output_len - 1`` steps, read from vLLM's own
    per-request timestamps (its engine core's clock), so no output building is timed."""
    llm = vllm.LLM(**kwargs, disable_log_stats=False)  # the timestamps need its stats
    params = _sampling(vllm, output_len)
    rows = []
    for batch, prompt_sets in runs.items():
        decode, prefill = [], []
        for i, prompts in enumerate(prompt_sets):
            llm.reset_prefix_cache()
            outs = llm.generate(_token_prompts(prompts), params, use_tqdm=False)
            first, last, queued = _timestamps(outs)
            if i:
                decode.append(last - first)
                prefill.append(first - queued if queued else None)
        step_s = max(_median(decode), 1e-9) / (output_len - 1)
        prefill_s = None if None in prefill else _median(prefill)
        rows.append({"batch_size": int(batch), "step_ms": step_s * 1e3, "ms_per_token": step_s * 1e3,
                     "prefill_ms": prefill_s and prefill_s * 1e3, "tokens_per_s": int(batch) / step_s})  # fmt: skip
    return rows


def _timestamps(outs: list[Any]) -> tuple[float, float, float]:
    """(every first token, the last token, the first request queued), engine-core seconds;
    queued is 0 when the engine core sent no queueing events."""
    stats = [o.metrics for o in outs]
    if any(s is None or not s.first_token_ts for s in stats):
        raise RuntimeError("vLLM returned no per-request timestamps (RequestOutput.metrics); "
                           "they need disable_log_stats=False")  # fmt: skip
    return (max(s.first_token_ts for s in stats), max(s.last_token_ts for s in stats),
            min(s.queued_ts for s in stats))  # fmt: skip


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration's run, in whichever process imports vllm."""
    import vllm

    if job["kind"] == "throughput":
        rows = [run_throughput(vllm, job["llm_kwargs"], job["prompts"], job["output_lens"])]
    elif job["kind"] == "latency":
        rows = run_latency(vllm, job["llm_kwargs"], job["runs"], job["output_len"])
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    return {"vllm_version": str(getattr(vllm, "__version__", "unknown")), "rows": rows}


# ---- runs (from the bench's process) ----------------------------------------------------------


def launch(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run ``job`` in a child process (see the module's docstring), or in this one when vllm
    is already imported here."""
    if "vllm" in sys.modules:
        return run_job(job)
    _print_free_gpu_memory()  # vLLM sizes its cache from this: a failure to start shows why
    job_file, result_file = scratch / "job.json", scratch / "result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "parallm.bench.vllm_peer", str(job_file), str(result_file)]
    code = subprocess.run(cmd, env=child_env()).returncode
    if code != 0 or not result_file.is_file():
        raise RuntimeError(f"the vLLM run failed (exit status {code}); its output is above")
    return json.loads(result_file.read_text())


def _print_free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"GPU memory free before vLLM starts: {free / 2**30:.1f} of {total / 2**30:.1f} GiB")


def compare(kind: str, model: PeerModel, configs: tuple[str, ...],
            payload: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """vLLM's rows for each configuration: ``payload`` (the requests) plus its LLM kwargs.
    Each row carries ``engine``, ``vllm_config`` and the kwargs vLLM got."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="parallm-vllm-") as tmp:
        scratch = Path(tmp)
        folder = model_dir(model, scratch)
        for config in configs:
            kwargs = llm_kwargs(model, folder, config)
            result = launch({"kind": kind, "llm_kwargs": kwargs, **payload}, scratch)
            shown = kwargs | {"model": model.model}  # the temporary folder means nothing later
            for row in result["rows"]:
                rows.append({"engine": engine_label(config, result["vllm_version"]),
                             "vllm_config": config, **row, "vllm_kwargs": shown})  # fmt: skip
    return rows


def throughput_rows(model: PeerModel, configs: tuple[str, ...], prompts: list[list[int]],
                    out_lens: list[int]) -> list[dict[str, Any]]:  # fmt: skip
    return compare("throughput", model, configs, {"prompts": prompts, "output_lens": out_lens})


def latency_rows(model: PeerModel, configs: tuple[str, ...],
                 runs: dict[int, list[list[list[int]]]], output_len: int) -> list[dict[str, Any]]:  # fmt: skip
    payload = {"runs": {str(b): sets for b, sets in runs.items()}, "output_len": output_len}
    return compare("latency", model, configs, payload)


# ---- merging and plotting ---------------------------------------------------------------------


def add_speedups(rows: list[dict[str, Any]], key: str, higher_is_better: bool,
                 match: str | None = None) -> None:  # fmt: skip
    """Give every vLLM row ``parallm_speedup``: how many times parallm's figure beats it (> 1:
    parallm is faster), against the parallm row with the same ``match`` value (batch size)."""
    ours = {r.get(match): r for r in rows if r.get("engine") == "parallm"}
    for row in rows:
        base = ours.get(row.get(match))
        if "vllm_config" not in row or base is None or not row.get(key) or not base.get(key):
            continue
        ratio = base[key] / row[key]
        row["parallm_speedup"] = ratio if higher_is_better else 1 / ratio


def plot_throughput(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of output tokens/s, one per engine row."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["engine"] for r in rows]
    values = [r["output_tokens_per_s"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=[_color(r) for r in rows])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(top=max(values) * 1.12)  # room for the labels
    ax.set_title(title)
    _save(fig, path)


def plot_latency(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """ms per token against batch size, one line per engine."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["batch_size"])
        ax.plot([r["batch_size"] for r in mine], [r["ms_per_token"] for r in mine], marker="o",
                label=engine, color=_color(mine[0]))  # fmt: skip
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, max(r["ms_per_token"] for r in rows) * 1.1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode ms per step")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def _color(row: dict[str, Any]) -> str:
    return {"stock": "tab:orange", "parallm-limits": "tab:red"}.get(
        row.get("vllm_config", ""), "tab:blue" if row.get("engine") == "parallm" else "tab:gray"
    )


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {path}")


def model_name(args: argparse.Namespace) -> str:
    """A short name of the bench's model for titles: the config file's name (its folder's for
    a config.json), else --model."""
    if getattr(args, "config", None):
        path = Path(args.config)
        return path.parent.name if path.stem == "config" else path.stem
    return args.model or "the bundled model"


def describe(model: PeerModel) -> dict[str, Any]:
    """The peer's settings for the bench JSON, with the VLLM_* variables it ran under."""
    env = {k: v for k, v in child_env().items() if k.startswith("VLLM_")}
    return {"version_expected": VLLM_VERSION, "model": asdict(model), "env": env}


def main(argv: list[str] | None = None) -> int:
    """``python -m parallm.bench.vllm_peer JOB RESULT``: run a job file, write the result."""
    job_file, result_file = (argv if argv is not None else sys.argv[1:])[:2]
    result = run_job(json.loads(Path(job_file).read_text()))
    Path(result_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
