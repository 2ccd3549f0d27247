"""Where a serving run's long inter-token gaps come from, read from `parallm bench serve
--save-detailed` JSONs (any server, parallm or a peer).

ITL p90 and p99 are set by the few steps that run long (a step that carries a long prompt
stalls every request decoding beside it), not by the typical decode step. Each request's
token times follow from its send time, TTFT and gaps; a gap of at least ``--long-ms`` is a
stall, and stalls of different requests that end within ``--join-ms`` of each other are one
event (one long step seen by every request in it). Per file: the gaps by band, and the
events: how many, how long, how many requests each held up. Two servers under the same trace,
side by side, say whether one stalls more often or for longer:

    python benchmarks/serve_gaps.py serve_parallm_x4.json serve_vllm_x4.json \
        [--bands-ms 15,25,50,100] [--long-ms 25] [--join-ms 2] [--out gaps.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def gaps(path: Path, payload: dict[str, Any] | None = None) -> np.ndarray:
    """Rows ``(end s, gap s)``: every inter-token gap of the file's completed requests, on the
    run's clock (a gap ends when its token arrives). ``payload``: the file already loaded."""
    payload = json.loads(path.read_text()) if payload is None else payload
    records = payload.get("requests") or []
    ok = [r for r in records if r.get("status") == "ok" and r.get("ttft_s") is not None]
    if ok and not any("itl_s" in r for r in ok):
        raise ValueError(f"{path}: no itl_s in its requests (run bench serve --save-detailed)")
    if not ok:
        raise ValueError(f"{path}: no completed requests (a `parallm bench serve --out` JSON?)")
    rows = []
    for r in ok:
        itl = np.asarray(r.get("itl_s", []), dtype=np.float64)
        ends = r["send_s"] + r["ttft_s"] + np.cumsum(itl)
        rows.append(np.stack([ends, itl], axis=1))
    return np.concatenate(rows)  # ``ok`` is not empty: one block a request


def stall_events(rows: np.ndarray, long_s: float, join_s: float) -> list[np.ndarray]:
    """The gaps of at least ``long_s``, grouped: sorted by end time, a gap ending within
    ``join_s`` of the previous one joins its event."""
    stalls = rows[rows[:, 1] >= long_s]
    if not len(stalls):
        return []
    stalls = stalls[np.argsort(stalls[:, 0])]
    cuts = np.nonzero(np.diff(stalls[:, 0]) > join_s)[0] + 1
    return np.split(stalls, cuts)


def summarize(
    path: Path, bands_ms: list[float], long_ms: float, join_ms: float,
    payload: dict[str, Any] | None = None,
) -> dict:  # fmt: skip
    rows = gaps(path, payload)
    ms = rows[:, 1] * 1e3
    edges = [0.0, *bands_ms, float("inf")]
    total = float(ms.sum()) or 1.0
    bands = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        inside = (ms >= lo) & (ms < hi)
        top = None if hi == float("inf") else hi  # JSON has no infinity
        bands.append({"band_ms": [lo, top], "gaps": int(inside.sum()),
                      "time_share": float(ms[inside].sum()) / total})  # fmt: skip
    events = stall_events(rows, long_ms / 1e3, join_ms / 1e3)
    span = float(rows[:, 0].max() - rows[:, 0].min()) if len(rows) > 1 else 0.0
    lengths = np.array([np.median(e[:, 1]) * 1e3 for e in events])
    held = np.array([len(e) for e in events])
    return {
        "file": str(path),
        "gaps": len(rows),
        "itl_ms_p50": float(np.median(ms)) if len(ms) else None,
        "bands": bands,
        "events": len(events),
        "events_per_s": len(events) / span if span else 0.0,
        "event_ms_p50": float(np.median(lengths)) if len(events) else None,
        "event_ms_p90": float(np.percentile(lengths, 90)) if len(events) else None,
        "requests_per_event": float(held.mean()) if len(events) else None,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(results: list[dict[str, Any]], long_ms: float) -> str:
    """Rows of figures, one column a file."""
    head = "| | " + " | ".join(Path(r["file"]).stem for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("gaps", [str(r["gaps"]) for r in results])
    row("ITL p50 ms", [_ms(r["itl_ms_p50"]) for r in results])
    for i, band in enumerate(results[0]["bands"]):
        lo, hi = band["band_ms"]
        label = f"gaps {lo:g}-{hi:g} ms" if hi is not None else f"gaps >= {lo:g} ms"
        row(f"{label} (share of ITL time)",
            [f"{r['bands'][i]['gaps']} ({r['bands'][i]['time_share']:.0%})" for r in results])  # fmt: skip
    row(f"stall events (gaps >= {long_ms:g} ms)", [str(r["events"]) for r in results])
    row("events a second", [f"{r['events_per_s']:.2f}" for r in results])
    row("event gap p50 / p90 ms",
        [f"{_ms(r['event_ms_p50'])} / {_ms(r['event_ms_p90'])}" for r in results])  # fmt: skip
    row("requests held up an event", [_ms(r["requests_per_event"]) for r in results])
    return "\n".join(lines)


def _positive_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(
            f"--bands-ms: increasing positive numbers separated by commas, e.g. 15,25,50,100; "
            f"got {text!r}"
        )
    return values


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of ms, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("files", nargs="+", type=Path,
                   help="`parallm bench serve --save-detailed --out` JSONs")  # fmt: skip
    p.add_argument("--bands-ms", type=_positive_list, default=_positive_list("15,25,50,100"),
                   help="edges of the gap bands in ms, separated by commas")  # fmt: skip
    p.add_argument("--long-ms", type=_positive, default=25.0,
                   help="a gap this long or longer is a stall")  # fmt: skip
    p.add_argument("--join-ms", type=_positive, default=2.0,
                   help="stalls of different requests ending this close are one event")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = [summarize(f, args.bands_ms, args.long_ms, args.join_ms) for f in args.files]
    except (OSError, ValueError, KeyError) as exc:
        print(f"serve_gaps: {exc}", file=sys.stderr)
        return 2
    print(table(results, args.long_ms))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
