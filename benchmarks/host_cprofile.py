"""Where the host's time goes in batch-1 decoding: cProfile over plain and n-gram speculative
passes on code-completion prompts, printing the functions by own time and by cumulative time.

    python benchmarks/host_cprofile.py --target runs/code-model-150m/hf --out host_profile.txt

On a small model a decode step is host-bound (spec_step_profile.py gives the phases); this
names the functions inside them.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_real_bench import add_prompt_args, completion_prompts, timed_run  # noqa: E402

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402


def profile_pass(llm: LLM, prompts: list[list[int]], params: SamplingParams, top: int) -> str:
    """The stats of one pass over ``prompts`` (batch 1), after an untimed one."""
    timed_run(llm, prompts, params, 1)
    llm.reset_prefix_cache()
    prof = cProfile.Profile()
    prof.enable()
    outs, seconds = timed_run(llm, prompts, params, 1)
    prof.disable()
    buf = io.StringIO()
    tokens = sum(map(len, outs))
    print(f"{tokens} tokens in {seconds:.2f} s under the profiler", file=buf)
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--target",
        default=str(BUNDLED_MODEL_DIR),
        help="model directory (default: the bundled model)",
    )
    ap.add_argument(
        "--num-speculative-tokens", type=int, default=8, help="n-gram drafts a step (default: 8)"
    )
    ap.add_argument("--num-prompts", type=int, default=16, help="prompts profiled (default: 16)")
    ap.add_argument("--top", type=int, default=30, help="functions listed per table (default: 30)")
    ap.add_argument("--seed", type=int, default=0, help="prompt choice (default: 0)")
    ap.add_argument("--out", default=None, help="write the report here too (default: none)")
    add_prompt_args(ap, "python", 0.01)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_min": 2, "prompt_lookup_max": 5}  # fmt: skip
    report = []
    for label, extra in (("plain", {}), ("ngram", {"speculative_config": spec})):
        llm = LLM(
            args.target,
            kv_cache_memory=1 << 30,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            **extra,
        )
        prompts = completion_prompts(args.corpus, args.val_fraction, llm.get_tokenizer(),
                                     args.num_prompts, args.prompt_len, args.seed)  # fmt: skip
        report.append(f"===== {label} =====\n" + profile_pass(llm, prompts, params, args.top))
        llm.close()
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
