"""Statistics, table and plot of a ``parallm bench serve`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from parallm.bench.common import print_table
from parallm.bench.serve_client import RequestResult

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2e")
# The names vLLM's --percentile-metrics and --goodput use for them.
METRIC_ALIASES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2e", "e2e": "e2e"}
MAX_ERRORS = 5  # distinct error messages kept in the report


def percentile_key(p: float) -> str:
    """``p50``, ``p99.9``: the key of a percentile in the report."""
    return f"p{p:g}"


def distribution_ms(
    values_s: list[float], percentiles: tuple[float, ...] = PERCENTILES
) -> dict[str, float | None]:
    """Mean and percentiles (linear interpolation) in milliseconds; None when empty."""
    keys = ["mean", *(percentile_key(p) for p in percentiles)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=float) * 1e3
    stats = {"mean": float(ms.mean())}
    stats.update({percentile_key(p): float(np.percentile(ms, p)) for p in percentiles})
    return stats


def metric_values(results: list[RequestResult]) -> dict[str, list[float]]:
    """Seconds per metric over completed requests; ITL pools every gap of every request."""
    ok = [r for r in results if r.status == "ok"]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok if r.e2e_s is not None],
    }


def meets_slo(
    r: RequestResult,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    slo_e2e_ms: float | None = None,
) -> bool:
    """Completed within every SLO (an unset SLO always holds; a 1-token output has no TPOT)."""
    if r.status != "ok":
        return False
    if slo_ttft_ms is not None and (r.ttft_s is None or r.ttft_s * 1e3 > slo_ttft_ms):
        return False
    if slo_e2e_ms is not None and (r.e2e_s is None or r.e2e_s * 1e3 > slo_e2e_ms):
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms


def summarize(
    results: list[RequestResult],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    slo_e2e_ms: float | None = None,
    metrics: tuple[str, ...] = METRICS,
    percentiles: tuple[float, ...] = PERCENTILES,
) -> dict[str, Any]:
    """The report: counts, rates, goodput, and the distributions of ``metrics`` (mean and
    ``percentiles``)."""
    ok = [r for r in results if r.status == "ok"]
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.input_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration_s, 1e-9)
    has_slo = any(slo is not None for slo in (slo_ttft_ms, slo_tpot_ms, slo_e2e_ms))
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms, slo_e2e_ms) for r in ok)
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": sum(r.status == "failed" for r in results),
        "cancelled": sum(r.status == "cancelled" for r in results),
        # A server that ignores ignore_eos/min_tokens stops early: say so, it skews the rates.
        "short_outputs": sum(r.output_tokens < r.expected_output_tokens for r in ok),
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "slo_e2e_ms": slo_e2e_ms,
        "goodput": good / duration if has_slo else None,
        "slo_attainment": good / len(results) if has_slo and results else None,
        "errors": _first_errors(results),
        "percentiles": list(percentiles),
    }
    values = metric_values(results)
    for name in metrics:
        summary[f"{name}_ms"] = distribution_ms(values[name], percentiles)
    return summary


def _first_errors(results: list[RequestResult]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r.error and r.error not in seen and len(seen) < MAX_ERRORS:
            seen.append(r.error)
    return seen


def print_report(summary: dict[str, Any]) -> None:
    keys = [percentile_key(p) for p in summary["percentiles"]]
    rows = [
        {"metric": name.upper(), **summary[f"{name}_ms"]}
        for name in METRICS
        if f"{name}_ms" in summary
    ]
    print_table(
        rows,
        [("metric", "latency (ms)", "s"), ("mean", "mean", ".1f"), *((k, k, ".1f") for k in keys)],
    )
    s = summary
    print(
        f"requests: {s['completed']} completed, {s['failed']} failed, "
        f"{s['cancelled']} cancelled of {s['requests']} in {s['duration_s']:.2f} s"
    )
    print(
        f"throughput: {s['request_throughput']:.2f} req/s, "
        f"{s['output_token_throughput']:.1f} output tok/s, "
        f"{s['total_token_throughput']:.1f} total tok/s"
    )
    if s["goodput"] is not None:
        limits = ", ".join(
            f"{name.upper()} <= {s[f'slo_{name}_ms']:g} ms"
            for name in ("ttft", "tpot", "e2e")
            if s[f"slo_{name}_ms"] is not None
        )
        print(
            f"goodput: {s['goodput']:.2f} req/s meeting {limits} "
            f"({100 * s['slo_attainment']:.1f}% of requests)"
        )
    if s["short_outputs"]:
        print(
            f"warning: {s['short_outputs']} outputs were shorter than requested "
            "(does the server honour ignore_eos/min_tokens?)"
        )
    for error in s["errors"]:
        print(f"error: {error}")


def per_request(results: list[RequestResult], detailed: bool = False) -> list[dict[str, Any]]:
    """One JSON row a request; ``detailed`` (``--save-detailed``) adds its inter-token gaps
    (``itl_s``, seconds, in order), from which its every token's time follows."""
    rows = [
        {
            "index": r.index,
            "status": r.status,
            "send_s": r.send_s,
            "ttft_s": r.ttft_s,
            "tpot_s": r.tpot_s,
            "e2e_s": r.e2e_s,
            "prompt_tokens": r.prompt_tokens,
            "input_len": r.input_len,
            "output_tokens": r.output_tokens,
            "expected_output_tokens": r.expected_output_tokens,
            "error": r.error,
        }  # fmt: skip
        for r in results
    ]
    if detailed:
        for row, r in zip(rows, results, strict=True):
            row["itl_s"] = [round(gap, 6) for gap in r.itl_s]  # µs: the JSON stays small
    return rows


def plot(results: list[RequestResult], path: Path, title: str) -> None:
    """One PNG: TTFT and TPOT per request against send time (failures marked), and the CDFs
    of TTFT, TPOT, ITL and end-to-end latency."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark box
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    _over_time(fig.add_subplot(grid[0, 0]), results, "ttft", "TTFT (ms)")
    _over_time(fig.add_subplot(grid[0, 1]), results, "tpot", "TPOT (ms)")
    _cdfs(fig.add_subplot(grid[1, :]), metric_values(results))
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def _over_time(ax: Any, results: list[RequestResult], metric: str, label: str) -> None:
    ok = [r for r in results if r.status == "ok" and getattr(r, f"{metric}_s") is not None]
    ax.scatter([r.send_s for r in ok], [getattr(r, f"{metric}_s") * 1e3 for r in ok], s=8,
               label="completed")  # fmt: skip
    failed = [r for r in results if r.status == "failed" and r.send_s is not None]
    if failed:
        ax.scatter([r.send_s for r in failed], [0] * len(failed), marker="x", color="red",
                   label="failed")  # fmt: skip
    ax.set_xlabel("send time (s)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")


def _cdfs(ax: Any, values: dict[str, list[float]]) -> None:
    for name in METRICS:
        # Chunks read together have zero gaps, which a log axis cannot show: draw them at 1 us.
        ms = np.sort(np.maximum(np.asarray(values[name], dtype=float) * 1e3, 1e-3))
        if len(ms):
            ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=name.upper())
    if any(values.values()):
        ax.set_xscale("log")  # TTFT and ITL differ by orders of magnitude
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests (ITL: of gaps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
