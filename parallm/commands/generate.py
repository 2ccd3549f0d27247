"""``parallm generate``: stream one completion, or run a file of prompts with a progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from parallm.commands.engine_args import add_engine_args, engine_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt or a file of prompts",
        description="Stream a completion of PROMPT to the terminal (with --n above 1, each "
        "sample, labelled, as it finishes), or, with --prompts-file or --output, generate for "
        "every prompt (continuous batching, progress bar) and write JSON lines holding every "
        "sample.",
    )
    p.add_argument("prompt", nargs="?", help="the prompt text (omit with --prompts-file)")
    p.add_argument(
        "--prompts-file", type=Path, help="one prompt per line, or JSON lines with a 'prompt' field"
    )
    p.add_argument(
        "--output",
        type=Path,
        help="write JSON lines (every sample of every prompt) here (unset: stdout)",
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x top prob")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]")
    s.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    add_engine_args(p)
    p.set_defaults(func=run)


def _sampling_params(args: argparse.Namespace) -> Any:
    from parallm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed, stop=args.stop, n=args.n, ignore_eos=args.ignore_eos,
    )  # fmt: skip


def read_prompts(path: Path) -> list[str]:
    """Prompts from a text file (one per line) or JSON lines with a 'prompt' field."""
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            record = json.loads(line)
            if "prompt" not in record:
                raise ValueError(f"{path}:{i}: JSON line has no 'prompt' field")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"--prompts-file {path} has no prompts")
    return prompts


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give either a PROMPT or --prompts-file, not both or neither")
    params = _sampling_params(args)
    from parallm import LLM

    llm = LLM(**engine_kwargs(args))
    print(llm.engine.summary(), file=sys.stderr)
    if args.prompts_file is not None:
        return _run_file(llm, read_prompts(args.prompts_file), params, args.output)
    prompt = _chat_prompt(llm, args.prompt) if args.chat else args.prompt
    if args.output is not None:
        return _run_file(llm, [prompt], params, args.output)
    if params.n == 1:
        _stream(llm, prompt, params, echo=not args.chat)
    else:
        _stream_samples(llm, prompt, params, echo=not args.chat)
    return 0


def _chat_prompt(llm: Any, text: str) -> dict[str, Any]:
    tok = llm.get_tokenizer()
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    return {"prompt_token_ids": ids, "prompt": rendered}


def _stream(llm: Any, prompt: Any, params: Any, echo: bool) -> None:
    """One sample, token by token, after the prompt (``echo``)."""
    if echo:
        sys.stdout.write(prompt)
    for out in llm.stream(prompt, params):
        sys.stdout.write(out.outputs[0].text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _stream_samples(llm: Any, prompt: Any, params: Any, echo: bool) -> None:
    """Several samples: each printed whole, under a label, as soon as it finishes (their
    tokens arrive interleaved, which a terminal cannot show side by side)."""
    texts: dict[int, list[str]] = {}
    for out in llm.stream(prompt, params):
        for sample in out.outputs:
            texts.setdefault(sample.index, []).append(sample.text)
            if sample.finished:
                label = f"sample {sample.index + 1} of {params.n}"
                print(f"--- {label} (finish_reason: {sample.finish_reason}) ---")
                print((prompt if echo else "") + "".join(texts[sample.index]), flush=True)


def _run_file(llm: Any, prompts: list[Any], params: Any, output: Path | None) -> int:
    outs = llm.generate(prompts, params, use_tqdm=True)
    sink = output.open("w") if output else sys.stdout
    try:
        for out in outs:
            record = {
                "prompt": out.prompt,
                "completions": [
                    {
                        "index": c.index,
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "num_tokens": len(c.token_ids),
                    }
                    for c in out.outputs
                ],
            }
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if output:
            sink.close()
    return 0
