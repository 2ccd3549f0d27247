"""TPOT against load, read from `parallm bench serve` JSONs (any server, parallm or a peer).

A serving run's TPOT percentiles mix requests that decoded alone with requests that decoded
among hundreds. This splits them: for each request, the mean number of requests that were
decoding (between their first and last token) while it decoded, then the median TPOT of the
requests in each band of that number. Two servers loaded by the same trace, side by side,
show whether one's decode step slows down with load and from which concurrency:

    python benchmarks/serve_concurrency.py serve_parallm_x16.json serve_vllm_x16.json \
        [--bands 0,50,100,150,200,260] [--plot tpot_by_load.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

GRID_S = 0.002  # time resolution of the concurrency count (a decode step is >= 1 ms)


def decode_intervals(path: Path) -> np.ndarray:
    """Rows ``(first token s, last token s, tpot s)`` of the file's completed requests with at
    least two output tokens (TPOT is undefined below), on the run's clock."""
    records = json.loads(path.read_text()).get("requests")
    if not records:
        raise ValueError(f"{path}: no per-request records (a `parallm bench serve --out` JSON?)")
    rows = [
        (r["send_s"] + r["ttft_s"], r["send_s"] + r["e2e_s"], r["tpot_s"])
        for r in records
        if r.get("status") == "ok" and r.get("tpot_s") and r["e2e_s"] > r["ttft_s"]
    ]
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def mean_concurrency(intervals: np.ndarray) -> np.ndarray:
    """Each interval's mean count of intervals open during it (itself included)."""
    if not len(intervals):
        return np.zeros(0)
    starts, ends = np.sort(intervals[:, 0]), np.sort(intervals[:, 1])
    grid = np.arange(intervals[:, 0].min(), intervals[:, 1].max() + GRID_S, GRID_S)
    active = np.searchsorted(starts, grid, "right") - np.searchsorted(ends, grid, "right")
    total = np.concatenate([[0.0], np.cumsum(active)])
    lo = np.searchsorted(grid, intervals[:, 0], "left")
    hi = np.maximum(np.searchsorted(grid, intervals[:, 1], "left"), lo + 1)
    return (total[hi] - total[lo]) / (hi - lo)


def tpot_by_band(path: Path, bands: list[int]) -> dict[str, Any]:
    """Median TPOT (ms) and request count per concurrency band ``[bands[i], bands[i+1])``."""
    intervals = decode_intervals(path)
    load = mean_concurrency(intervals)
    rows = []
    for lo, hi in zip(bands, bands[1:], strict=False):
        inside = (load >= lo) & (load < hi)
        median = float(np.median(intervals[inside, 2])) * 1e3 if inside.any() else None
        rows.append({"band": [lo, hi], "requests": int(inside.sum()), "tpot_ms_p50": median})
    peak = int(np.round(load.max())) if len(load) else 0
    return {"file": str(path), "requests": len(intervals), "peak_mean_load": peak, "bands": rows,
            "load": load.tolist(), "tpot_ms": (intervals[:, 2] * 1e3).tolist()}  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    """One markdown row a file: its median TPOT per band (requests in parentheses)."""
    bands = results[0]["bands"]
    head = "| file | " + " | ".join(f"{b['band'][0]}-{b['band'][1]}" for b in bands) + " |"
    lines = [head, "|---|" + "---:|" * len(bands)]
    for result in results:
        cells = [
            "-" if b["tpot_ms_p50"] is None else f"{b['tpot_ms_p50']:.1f} ({b['requests']})"
            for b in result["bands"]
        ]
        lines.append(f"| {Path(result['file']).stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        ax.scatter(result["load"], result["tpot_ms"], s=6, alpha=0.5,
                   label=Path(result["file"]).stem)  # fmt: skip
    ax.set_xlabel("requests decoding alongside (mean over the request's decode)")
    ax.set_ylabel("TPOT, ms")
    ax.set_title("TPOT against load")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _bands(text: str) -> list[int]:
    try:
        bands = [int(x) for x in text.split(",")]
    except ValueError:
        bands = []
    if len(bands) < 2 or any(b < 0 for b in bands) or bands != sorted(set(bands)):
        raise argparse.ArgumentTypeError(
            f"--bands: at least two increasing non-negative integers separated by commas, "
            f"e.g. 0,50,100; got {text!r}"
        )
    return bands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, help="`parallm bench serve --out` JSONs")
    p.add_argument("--bands", type=_bands, default=_bands("0,50,100,150,200,260,1000"),
                   help="edges of the concurrency bands, separated by commas")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="write a TPOT-against-load PNG here")
    p.add_argument("--out", type=Path, default=None, help="write the bands as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = [tpot_by_band(path, args.bands) for path in args.files]
    except (OSError, ValueError, KeyError) as exc:
        print(f"serve_concurrency: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.out:
        bands = [
            {k: r[k] for k in ("file", "requests", "peak_mean_load", "bands")} for r in results
        ]
        args.out.write_text(json.dumps(bands, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
