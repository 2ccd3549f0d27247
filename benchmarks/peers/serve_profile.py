"""Profile a server under load: a few seconds of the same trace replay, recorded by the
server itself, and what the device did in them.

Both servers take the same flag, ``--profiler-config`` (vLLM's; parallm's since the
twenty-fifth session), and the same routes, ``POST /start_profile`` and ``POST /stop_profile``;
both write ``torch.profiler`` Chrome traces. Why: the 8B's serving gap at x4 is not in one
step's kernels (the mixed-step profile costs the same in both engines, RESULTS twenty-fifth
session), so it must be between steps (the device idle while the host works) or in steps of
shapes no microbenchmark builds; a profile taken under the load shows both.

``kernel_summary`` reads a trace: the device's busy time (the union of its kernels, copies
and sets) over the span from its first to its last, the idle time between them by gap length
(short gaps are launch latency; long ones are a host that did not keep up), and the kernels
by total time.

    python benchmarks/peers/serve_profile.py TRACE.pt.trace.json.gz [--steps N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# The device time of a host range: both engines name each step's range by its shape (vLLM's
# execute_context_C(T)_generation_G(U); parallm.engine.profiler.step_label).
RANGE_CATEGORY = "gpu_user_annotation"
STEP_NAME = re.compile(r"execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
# Bands of the step tables: decode steps by sequences, steps with prompt tokens by those.
DECODE_BAND = 16
PROMPT_BANDS = (256, 1024, 2048, 4096, 8192, float("inf"))
# Upper ends (µs) of the idle-gap bands: launch latency, short host work, a stalled host.
GAP_BANDS_US = (10.0, 100.0, 1000.0, float("inf"))


def profiler_flags(folder: Path, vllm: bool) -> list[str]:
    """The flag that lets either server profile its engine into ``folder``. No stacks: they
    slow the host, whose pace is part of what is measured; for vLLM, no profile of its API
    process either (``ignore_frontend``; parallm's API process is never profiled)."""
    config = {"profiler": "torch", "torch_profiler_dir": str(folder),
              "torch_profiler_with_stack": False}  # fmt: skip
    if vllm:
        config["ignore_frontend"] = True
    return ["--profiler-config", json.dumps(config)]


def profiled_load(load: list[str], port: int, start_after_s: float, seconds: float, log: Path,
                  scrape: Callable[[], Any]) -> tuple[bool, Any, Any]:  # fmt: skip
    """Run the load ``load`` (a ``parallm bench serve`` command) and profile the server on
    ``port`` from ``start_after_s`` seconds into it for ``seconds``: whether all went well,
    and ``scrape()`` (the server's counters) just before the start and just after the stop.
    Both engines step no further while they write the trace, so the two scrapes bound the
    profiled steps."""
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(load, stdout=out, stderr=subprocess.STDOUT)
        began = time.monotonic()
        try:
            time.sleep(start_after_s)
            before = scrape()
            asked = time.monotonic()
            ok = _post(base + "/start_profile")
            started = time.monotonic()
            time.sleep(seconds)
            ok &= _post(base + "/stop_profile")
            stopped = time.monotonic()
            after = scrape()
        finally:
            ok_load = proc.wait() == 0
    # Where the window fell in the load: a slow start moves it later, into another phase.
    print(
        f"   profiled from {started - began:.1f} s into the load (/start_profile took "
        f"{started - asked:.2f} s) for {stopped - started:.1f} s (/stop_profile included)"
    )
    return ok and ok_load, before, after


def _post(url: str) -> bool:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status == 200
    except OSError as exc:
        print(f"   {url}: {exc}")
        return False


def device_events(trace: Path) -> list[dict[str, Any]]:
    """The trace's device activity (kernels, copies, sets) and the device spans of its host
    ranges (``RANGE_CATEGORY``), in start order."""
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    wanted = (*DEVICE_CATEGORIES, RANGE_CATEGORY)
    found = [e for e in events if e.get("cat") in wanted and "dur" in e]
    return sorted(found, key=lambda e: float(e["ts"]))


def kernel_summary(events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Busy and idle time of the device over the events' span, idle gaps by length, and the
    ``top`` kernels by total time (µs throughout). Ranges are not device work: skipped."""
    events = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not events:
        return {"span_us": 0.0, "busy_us": 0.0, "busy_share": 0.0, "idle_us_by_gap": {},
                "num_events": 0, "kernels": []}  # fmt: skip
    busy, idle = 0.0, dict.fromkeys(_band_names(), 0.0)
    start, end = float(events[0]["ts"]), float(events[0]["ts"]) + float(events[0]["dur"])
    first = start
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        ts, dur = float(e["ts"]), float(e["dur"])
        entry = by_name[e.get("name", "?")]
        entry[0] += dur
        entry[1] += 1
        if ts > end:  # a gap: the busy interval so far is closed
            busy += end - start
            idle[_band(ts - end)] += ts - end
            start, end = ts, ts + dur
        else:
            end = max(end, ts + dur)
    busy += end - start
    span = end - first
    kernels = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "span_us": span, "busy_us": busy, "busy_share": busy / span if span else 0.0,
        "idle_us_by_gap": idle, "num_events": len(events),
        "kernels": [{"name": n, "total_us": t, "count": int(c)} for n, (t, c) in kernels],
    }  # fmt: skip


def step_shapes(events: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The device time of the steps in ``events`` by shape: pure decode steps by sequences
    (bands of ``DECODE_BAND``) and steps with prompt tokens by those (``PROMPT_BANDS``), each
    band's step count, mean device ms and mean sequences decoding."""
    groups: dict[str, dict[str, list[tuple[float, int]]]] = {"decode": defaultdict(list),
                                                 "prompt": defaultdict(list)}  # fmt: skip
    for e in events:
        m = STEP_NAME.fullmatch(e.get("name", "")) if e.get("cat") == RANGE_CATEGORY else None
        if m is None:
            continue
        ctx_tokens, gen = int(m[2]), int(m[3])
        if int(m[1]) == 0:
            low = (gen - 1) // DECODE_BAND * DECODE_BAND
            key, group = f"{low + 1}-{low + DECODE_BAND}", "decode"
        else:
            bound = next(b for b in PROMPT_BANDS if ctx_tokens <= b)
            key, group = ("<=" + f"{bound:g}") if bound != float("inf") else "more", "prompt"
        groups[group][key].append((float(e["dur"]), gen))
    return {group: {key: {"steps": len(v), "ms": sum(d for d, _ in v) / len(v) / 1e3,
                          "decoding": sum(g for _, g in v) / len(v)}
                    for key, v in sorted(found.items(), key=lambda kv: _band_order(kv[0]))}
            for group, found in groups.items()}  # fmt: skip


def _band_order(key: str) -> float:
    if key == "more":
        return float("inf")
    return float(key.removeprefix("<=").split("-")[0])


def step_shape_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: per band of step shapes, each server's steps and mean device ms a step (and
    for steps with prompt tokens, the sequences decoding beside them)."""
    names = [n for n, row in rows.items() if row.get("step_shapes")]
    if not names:
        return ""
    lines = []
    for group, title in (("decode", "decode steps, sequences"),
                         ("prompt", "steps with prompt tokens, prompt tokens")):  # fmt: skip
        keys = {k for n in names for k in rows[n]["step_shapes"][group]}
        lines += ["", f"| {title} | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]  # fmt: skip
        for key in sorted(keys, key=_band_order):
            cells = []
            for n in names:
                b = rows[n]["step_shapes"][group].get(key)
                extra = f", {b['decoding']:.0f} decoding" if b and group == "prompt" else ""
                cells.append(f"{b['steps']} x {b['ms']:.2f} ms{extra}" if b else "-")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _band_names() -> list[str]:
    names, low = [], 0.0
    for high in GAP_BANDS_US:
        names.append(f"{low:g}-{high:g}us" if high != float("inf") else f">{low:g}us")
        low = high
    return names


def _band(gap_us: float) -> str:
    for name, high in zip(_band_names(), GAP_BANDS_US, strict=True):
        if gap_us <= high:
            return name
    raise AssertionError("the last band is unbounded")


def device_trace(folder: Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """The trace in ``folder`` with the most device activity (vLLM also writes its API
    process's, which has none) and that activity, each trace read once; None if none has any."""
    best = None
    for trace in sorted(folder.glob("*.pt.trace.json*")):
        events = device_events(trace)
        if events and (best is None or len(events) > len(best[1])):
            best = (trace, events)
    return best


def per_step_table(rows: dict[str, dict[str, Any]], top: int = 8) -> str:
    """Markdown: per server, the profiled window's steps, their tokens a step and device time
    a step."""
    lines = ["| server | window s | steps | tokens a step | device busy | kernels ms a step | "
             "idle ms a step (gaps > 100 µs) |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, row in rows.items():
        s, steps = row["summary"], max(1, row.get("steps") or 1)
        long_idle = sum(
            v for k, v in s["idle_us_by_gap"].items() if not k.startswith(("0-", "10-"))
        )
        idle = sum(s["idle_us_by_gap"].values())
        tokens = row.get("tokens_per_step")
        tokens = "-" if tokens is None else f"{tokens:.1f}"
        lines.append(f"| {name} | {s['span_us'] / 1e6:.2f} | {row.get('steps') or '-'} | {tokens} | "
                     f"{100 * s['busy_share']:.1f}% | {s['busy_us'] / steps / 1e3:.2f} | "
                     f"{idle / steps / 1e3:.2f} ({long_idle / steps / 1e3:.2f}) |")  # fmt: skip
    for name, row in rows.items():
        steps = max(1, row.get("steps") or 1)
        lines += ["", f"{name}: ms a step by kernel"]
        for k in row["summary"]["kernels"][:top]:
            lines.append(f"  {k['total_us'] / steps / 1e3:8.3f}  {k['count'] / steps:6.1f}x  "
                         f"{k['name'][:90]}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("traces", nargs="+", type=Path, help="torch.profiler Chrome traces")
    p.add_argument("--steps", type=int, default=None,
                   help="engine steps in the profiled window (per-step figures; unset: totals)")  # fmt: skip
    args = p.parse_args(argv)
    rows = {}
    for t in args.traces:
        events = device_events(t)
        rows[t.name] = {"summary": kernel_summary(events), "steps": args.steps,
                        "step_shapes": step_shapes(events)}  # fmt: skip
    print(per_step_table(rows))
    print(step_shape_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
