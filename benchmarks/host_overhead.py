"""Host (Python) time of one engine step with the model replaced by a stub.

With async scheduling (the CUDA default, and this script's) the GPU overlaps it with the next
step's work only while it stays shorter than that step. Run it on any machine:

    python benchmarks/host_overhead.py --batch-sizes 1,32,256 --steps 200

With ``--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'`` the stub's
next token follows a cycle of ``CYCLE`` tokens that the prompt already holds, so prompt lookup
drafts every token right: the host time of a verify step that accepts all its drafts, the
serial part of a speculative step (its next drafts need this step's tokens, so nothing
overlaps it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from parallm import LLM, SamplingParams
from parallm.commands.tiny_model import make_tiny_model
from parallm.engine.runner import ModelRunner

CYCLE = 50  # the speculative stub's tokens: 5, 6, ..., 54, 5, 6, ...


def _stub_forward(vocab_size: int):  # noqa: ANN202 - a method
    def forward_logits(self: ModelRunner, inputs, device_ids=None) -> torch.Tensor:  # noqa: ANN001
        return torch.rand(len(inputs.sample_indices), vocab_size)

    return forward_logits


def _cycle_forward(vocab_size: int):  # noqa: ANN202 - a method
    """Logits whose argmax is the token after each row's input in the cycle."""

    def forward_logits(self: ModelRunner, inputs, device_ids=None) -> torch.Tensor:  # noqa: ANN001
        rows = torch.from_numpy(inputs.input_ids[inputs.sample_indices]).long()
        logits = torch.rand(len(rows), vocab_size)
        logits[torch.arange(len(rows)), 5 + (rows - 5 + 1) % CYCLE] = 2.0
        return logits

    return forward_logits


PARAMS = {
    "greedy": lambda steps: SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True),
    # What `parallm bench serve` asks of a server: OpenAI's default temperature, fixed lengths.
    "serve": lambda steps: SamplingParams(max_tokens=steps, min_tokens=steps, ignore_eos=True),
}


def measure(llm: LLM, batch: int, steps: int, kind: str = "greedy") -> tuple[float, float]:
    """Milliseconds of host work per decode step at ``batch`` running sequences, and the
    tokens each sequence gained a step."""
    params = PARAMS[kind](steps)
    if llm.engine.drafter is None:
        prompts = [{"prompt_token_ids": [5 + i % 50] * 64} for i in range(batch)]
    else:  # two turns of the cycle, from a different point for each sequence
        prompts = [{"prompt_token_ids": [5 + (i + j) % CYCLE for j in range(2 * CYCLE)]}
                   for i in range(batch)]  # fmt: skip
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    first_step, first_tokens = llm.engine.num_steps, llm.engine.num_generated_tokens
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    num_steps = llm.engine.num_steps - first_step
    tokens = (llm.engine.num_generated_tokens - first_tokens) / batch
    return (time.perf_counter() - start) / num_steps * 1e3, tokens / num_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,32,256", help="running sequences per step")
    ap.add_argument("--steps", type=int, default=200, help="tokens per sequence a measurement")
    ap.add_argument(
        "--repeats", type=int, default=5, help="measurements per batch size; the fastest counts"
    )
    ap.add_argument(
        "--params", choices=sorted(PARAMS), default="greedy", help="sampling parameters per request"
    )
    ap.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's continuation path, as on CUDA (default), or synchronous steps",
    )
    ap.add_argument(
        "--speculative-config",
        type=json.loads,
        default=None,
        help="JSON speculative_config (module docstring); unset: plain decoding",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        make_tiny_model(path, hidden_size=64, num_layers=1, vocab_size=512, seed=0)
        llm = LLM(str(path), device="cpu", max_model_len=1024, max_num_seqs=256,
                  async_scheduling=args.async_scheduling,
                  speculative_config=args.speculative_config)  # fmt: skip
        vocab = llm.engine.model_config.vocab_size
        stub = _stub_forward if args.speculative_config is None else _cycle_forward
        ModelRunner.forward_logits = stub(vocab)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            ms, tokens = min(
                measure(llm, batch, args.steps, args.params) for _ in range(args.repeats)
            )
            print(
                f"batch {batch:4d}: {ms:.3f} ms host time per step ({ms / batch * 1e3:.1f} us/seq), "
                f"{tokens:.2f} tokens per sequence a step ({ms / (tokens * batch) * 1e3:.1f} us/token)"
            )


if __name__ == "__main__":
    main()
