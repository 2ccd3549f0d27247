"""Acceptance of a draft model's sampled drafts against its greedy drafts, for sampled requests.

At each temperature the same seeded requests run twice on one ``draft_model`` engine: with the
drafts sampled from the draft's distribution and verified by speculative sampling (what parallm
does for sampled requests), then with the draft's argmax verified by exact match (what it does
for greedy requests, switched on here for the comparison). For each it prints the share of
drafts accepted and the mean tokens a drafted sequence emits per step. A sampled draft ``x`` is
kept with probability ``min(1, p(x) / q(x))``, ``sum_x min(p, q)`` in expectation, an argmax
draft with ``p(argmax q)``: the flatter the target (the higher the temperature), the more
sampling gains.

    python benchmarks/spec_sampled_drafts_bench.py --temperatures 0.3,0.6,1.0,1.5

By default it runs on CPU in a minute or two: the bundled model is the target, and the draft
is the bundled model with Gaussian noise of ``--draft-noise`` x each tensor's standard
deviation added to its weights, a stand-in for a smaller model of the same family (with
``--draft-noise 0`` the ``--draft-model`` is used as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallm import LLM, SamplingParams  # noqa: E402
from parallm.bundled import BUNDLED_MODEL_DIR  # noqa: E402


def noisy_copy(model_dir: str, noise: float, out_dir: Path, seed: int) -> str:
    """``model_dir`` copied to ``out_dir`` with ``noise`` x std Gaussian noise on each weight."""
    shutil.copytree(model_dir, out_dir)
    gen = torch.Generator().manual_seed(seed)
    for path in out_dir.glob("*.safetensors"):
        weights = load_file(path)
        for name, w in weights.items():
            if w.is_floating_point() and w.numel() > 1:
                noise_t = torch.randn(w.shape, generator=gen) * (noise * w.float().std())
                weights[name] = (w.float() + noise_t).to(w.dtype).contiguous()
        save_file(weights, path, metadata={"format": "pt"})
    return str(out_dir)


def source_prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens from the standard library's Python sources."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    rng = random.Random(seed)
    rng.shuffle(files)
    prompts = []
    for path in files:
        ids = tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False)
        if len(ids) <= length:
            continue
        start = rng.randrange(len(ids) - length)
        prompts.append(ids[start : start + length])
        if len(prompts) == count:
            break
    return prompts


def acceptance(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict:
    """Drafts proposed and accepted, and tokens per drafted step, over one run of ``prompts``."""
    stats = llm.engine.spec_stats
    before = stats.copy()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    drafted = stats.draft_tokens - before.draft_tokens
    accepted = stats.accepted_tokens - before.accepted_tokens
    return {"draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance": accepted / drafted if drafted else 0.0,
            "tokens_per_step": stats.mean_since(before)}  # fmt: skip


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        draft = args.draft_model
        if args.draft_noise > 0:
            draft = noisy_copy(draft, args.draft_noise, Path(tmp) / "draft", args.seed)
        spec = {"method": "draft_model", "model": draft,
                "num_speculative_tokens": args.num_speculative_tokens}  # fmt: skip
        llm = LLM(args.target, speculative_config=spec, dtype=args.dtype, device=args.device,
                  max_model_len=args.prompt_len + args.max_tokens + 8)  # fmt: skip
        prompts = source_prompts(llm.get_tokenizer(), args.num_prompts, args.prompt_len,
                                 args.seed)  # fmt: skip
        proposer = llm.engine.draft_model
        rows = []
        for temperature in args.temperatures:
            params = [SamplingParams(temperature=temperature, top_p=args.top_p, seed=i,
                                     max_tokens=args.max_tokens, ignore_eos=True)
                      for i in range(len(prompts))]  # fmt: skip
            for drafts in ("sampled", "greedy"):
                proposer.samples_drafts = drafts == "sampled"
                row = {"temperature": temperature, "drafts": drafts,
                       **acceptance(llm, prompts, params)}  # fmt: skip
                rows.append(row)
                print(f"temperature {temperature:4.2f}  {drafts:<7} drafts: "
                      f"{row['acceptance']:6.1%} accepted, {row['tokens_per_step']:.2f} tok/step "
                      f"({row['accepted_tokens']}/{row['draft_tokens']})", flush=True)  # fmt: skip
        proposer.samples_drafts = True
        llm.close()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    ap.add_argument("--target", default=str(BUNDLED_MODEL_DIR), help="the target model's folder")
    ap.add_argument("--draft-model", default=str(BUNDLED_MODEL_DIR),
                    help="draft_model's model (shares the target's tokenizer)")  # fmt: skip
    ap.add_argument("--draft-noise", type=float, default=0.2,
                    help="noise added to the draft's weights, x each tensor's std (0: none)")  # fmt: skip
    ap.add_argument("--temperatures", type=floats, default=[0.3, 0.6, 1.0, 1.5],
                    help="request temperatures (comma-separated)")  # fmt: skip
    ap.add_argument("--top-p", type=float, default=1.0, help="request top_p")
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="drafts per step")
    ap.add_argument("--num-prompts", type=int, default=16, help="requests per run")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--dtype", default="float32", help="model dtype")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="prompt windows and draft noise")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
