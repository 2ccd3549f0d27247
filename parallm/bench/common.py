"""Shared pieces of the benchmarks: device roofline, byte counts, tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def copy_bandwidth_gbps(
    device: torch.device, nbytes: int = 1 << 30, iters: int = 20
) -> float | None:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / times[len(times) // 2] / 1e9


def cuda_ms_per_call(fn: Callable[[], object], iters: int) -> float:
    """Device milliseconds per call of ``fn`` over ``iters`` calls launched back to back,
    timed with CUDA events on the current stream (no host sync between the calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: all matrices, but only a few embedding rows."""
    total = 0
    embed = model.model.embed_tokens.weight
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p is embed and not model.config.tie_word_embeddings:
            continue  # an untied embedding is gathered, not streamed
        total += p.numel() * p.element_size()
    return total


def environment() -> dict[str, Any]:
    """Where and on what the numbers were taken."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _git_commit() -> str | None:
    # The device machine gets the working tree without .git (and a `git rev-parse` there can
    # answer for another tree): the launcher passes the commit, or leaves it in .commit.
    if os.environ.get("PARALLM_COMMIT"):
        return os.environ["PARALLM_COMMIT"]
    marker = Path(__file__).resolve().parents[2] / ".commit"
    if marker.is_file():
        return marker.read_text().strip() or None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` given as (key, header, format)."""
    headers = [h for _, h, _ in columns]
    cells = [
        [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def random_prompts(num: int, lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (kept clear of the low ids where special tokens usually sit)."""
    g = torch.Generator().manual_seed(seed)
    low = min(10, vocab_size - 1)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths[:num]]
