"""Where a speculative step's host time goes, phase by phase, against a plain step.

A small target's decode step is host work, not weight reads: on a 150M-parameter model a plain
batch-1 step takes about 0.55 ms with async scheduling hiding the host behind the GPU, and a
speculative step cannot run ahead (its next drafts need this step's tokens). This wraps the
engine's phases in wall-clock timers and prints microseconds per engine step for plain decoding
and for each drafter, on code-completion prompts at batch 1 (``--batch``):

    python benchmarks/spec_step_profile.py --methods ngram,layer_skip --out spec_steps.json

Phases are inclusive (``launch`` holds ``prepare``, ``replay``, ``eager`` and ``verify``);
``replay`` launches captured graphs, ``eager`` runs a forward op by op (a step no graph holds,
and a draft model's catch-up forward); ``wait`` is the host blocked on the GPU; ``other`` is the
step's time outside every listed phase. ``calls`` counts each phase's calls per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_real_bench import add_prompt_args, completion_prompts, timed_run  # noqa: E402

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402
from parallm.engine.engine import LLMEngine  # noqa: E402
from parallm.engine.output_processor import OutputProcessor  # noqa: E402
from parallm.engine.runner import ModelRunner, StepHandle  # noqa: E402
from parallm.engine.scheduler import Scheduler  # noqa: E402
from parallm.engine.spec.drafting import Drafter  # noqa: E402
from parallm.engine.spec.verify import DraftVerifier  # noqa: E402

# (label, class, method): the phases timed, outermost first.
PHASES = [
    ("step", LLMEngine, "step"),
    ("propose", Drafter, "propose"),
    ("schedule", Scheduler, "schedule"),
    ("schedule", Scheduler, "schedule_continuation"),
    ("launch", ModelRunner, "launch"),
    ("prepare", ModelRunner, "prepare"),
    ("prepare", ModelRunner, "prepare_decode"),
    ("verify", DraftVerifier, "verify"),
    ("eager", ModelRunner, "_hidden"),
    ("wait", StepHandle, "wait"),
    ("outputs", OutputProcessor, "process"),
    ("outputs", OutputProcessor, "collect"),
]
# Replays, timed when the graph modules load (they import triton): CUDA only.
GRAPH_PHASES = [
    ("replay", "parallm.engine.decode_graph", "DecodeGraphs", "run"),
    ("replay", "parallm.engine.verify_graph", "VerifyGraphs", "run"),
]
TOP_LEVEL = ("propose", "schedule", "launch", "wait", "outputs")

SPECS = {
    "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 5},
    "layer_skip": {"method": "layer_skip"},
    "draft_model": {"method": "draft_model", "model": str(BUNDLED_MODEL_DIR)},
}


@contextmanager
def phase_timers(totals: dict[str, float], counts: dict[str, int], phases: list[tuple]):
    """Wrap each ``(label, cls, name)`` method so that its wall time adds to ``totals[label]``."""
    saved, active = [], set()

    def wrap(label: str, fn):  # noqa: ANN001, ANN202 - any method
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if label in active:  # a call nested in its own phase (prepare -> prepare_decode)
                return fn(*args, **kwargs)
            active.add(label)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                active.discard(label)
                totals[label] += time.perf_counter() - start
                counts[label] += 1

        return timed

    for label, cls, name in phases:
        saved.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, wrap(label, cls.__dict__[name]))
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def graph_phases() -> list[tuple]:
    import importlib

    phases = []
    for label, module, cls, name in GRAPH_PHASES:
        phases.append((label, getattr(importlib.import_module(module), cls), name))
    return phases


def profile(llm: LLM, prompts, params, batch: int, phases: list[tuple]) -> dict:
    """Microseconds per engine step of each phase over ``prompts``, run ``batch`` at a time."""
    timed_run(llm, prompts[:batch], params, batch)  # warm-up
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps_before, stats_before = llm.engine.num_steps, llm.engine.spec_stats.copy()
    with phase_timers(totals, counts, phases):
        outs, seconds = timed_run(llm, prompts, params, batch)
    steps = llm.engine.num_steps - steps_before
    tokens = sum(map(len, outs))
    us = {label: 1e6 * t / steps for label, t in totals.items()}
    us["other"] = us["step"] - sum(us.get(label, 0.0) for label in TOP_LEVEL)
    calls = {label: n / steps for label, n in counts.items()}
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "calls_per_step": calls,
            "tokens_per_step": llm.engine.spec_stats.mean_since(stats_before) if llm.engine.drafter else 1.0,
            "us_per_token": 1e6 * seconds / tokens, "us_per_step": us, "outputs": outs}  # fmt: skip


def print_table(rows: dict[str, dict]) -> None:
    labels = ["step", *TOP_LEVEL[:3], "prepare", "replay", "eager", "verify", *TOP_LEVEL[3:]]
    print(f"{'us per step':<12}" + "".join(f"{name:>16}" for name in rows))
    for label in [*labels, "other"]:
        cells = "".join(
            f"{r['us_per_step'].get(label, 0.0):10.1f} ({r['calls_per_step'].get(label, 0.0):3.1f})"
            for r in rows.values()
        )
        print(f"{label:<12}{cells}")
    print(f"{'tok/step':<12}" + "".join(f"{r['tokens_per_step']:16.2f}" for r in rows.values()))
    print(f"{'us/token':<12}" + "".join(f"{r['us_per_token']:16.1f}" for r in rows.values()))


def run(args: argparse.Namespace) -> dict[str, dict]:
    engine_args = dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                       max_num_seqs=max(8, args.batch), gpu_memory_utilization=0.3)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    configs = {"plain": None}
    for method in args.methods:
        spec = dict(SPECS[method], num_speculative_tokens=args.num_speculative_tokens)
        if method == "layer_skip":
            spec["num_layers"] = args.skip_layers
        configs[method] = spec
    rows: dict[str, dict] = {}
    prompts = None
    for name, spec in configs.items():
        llm = LLM(args.model, speculative_config=spec, **engine_args)
        if prompts is None:
            prompts = completion_prompts(args.corpus, args.val_fraction, llm.get_tokenizer(),
                                         args.num_prompts, args.prompt_len, seed=0)  # fmt: skip
        phases = PHASES + (graph_phases() if llm.engine.runner.graphs is not None else [])
        rows[name] = profile(llm, prompts, params, args.batch, phases)
        llm.close()
        print(f"{name}: {rows[name]['us_per_token']:.1f} us/token", flush=True)
    plain = rows["plain"].pop("outputs")
    for row in rows.values():
        outs = row.pop("outputs", plain)
        same = sum(a == b for a, b in zip(outs, plain, strict=True))
        row["identical_outputs"] = same / len(plain)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--model", default=str(BUNDLED_MODEL_DIR), help="target model folder")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["ngram", "layer_skip"],
                    help=f"drafters to profile after plain decoding, of {sorted(SPECS)}")  # fmt: skip
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="k of each drafter")
    ap.add_argument("--skip-layers", type=int, default=2, help="layer_skip's draft layers")
    add_prompt_args(ap, corpus="stdlib", val_fraction=0.02)  # the bundled model's training split
    ap.add_argument("--num-prompts", type=int, default=16, help="prompts, run --batch at a time")
    ap.add_argument("--batch", type=int, default=1, help="requests run together")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods) - set(SPECS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {sorted(SPECS)}")
    return args


def main() -> None:
    args = parse_args()
    rows = run(args)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
