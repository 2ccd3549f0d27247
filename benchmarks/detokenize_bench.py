"""Per-token cost of incremental detokenization in the API process, on CPU.

Replays what the server's output-delivery thread does for a streamed request: one
``OutputDetokenizer.apply`` per step on a one-token ``RequestOutput`` (no stop strings: those
requests are decoded in the engine core). Each tokenizer is timed with tokenizers'
``DecodeStream`` (the default for fast tokenizers) and with the window decoding that remains
the fallback, alternated over rounds; the best round of each is reported.

    python benchmarks/detokenize_bench.py --rounds 5 --tokens 4000
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import parallm.detokenizer as detokenizer
from parallm.engine.core.detokenize import OutputDetokenizer
from parallm.outputs import CompletionOutput, RequestOutput
from parallm.sampling_params import SamplingParams

TEXT_SOURCE = Path(__file__).resolve().parent.parent / "README.md"


def tokenizers() -> dict[str, Any]:
    """The offline tokenizers: the id tokenizer (api_server_bench's), the bundled model's."""
    from transformers import AutoTokenizer

    from parallm.bundled import BUNDLED_MODEL_DIR
    from parallm.tokenizer import id_tokenizer

    toks = {"id (128k WordLevel)": id_tokenizer(128256)}
    if (BUNDLED_MODEL_DIR / "tokenizer.json").exists():
        toks["bundled (byte-level BPE)"] = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    return toks


def token_ids(name: str, tok: Any, n: int) -> list[int]:
    if name.startswith("id"):
        rng = random.Random(0)
        return [rng.randrange(len(tok)) for _ in range(n)]
    text = TEXT_SOURCE.read_text()
    ids = tok.encode(text, add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


def us_per_token(tok: Any, ids: list[int], prompt_len: int) -> float:
    """Microseconds per token of applying one-token outputs to one registered request."""
    prompt, output = ids[:prompt_len], ids[prompt_len:]
    decoder = OutputDetokenizer(tok)
    decoder.register("r", prompt, SamplingParams(max_tokens=len(output)))
    outs = [RequestOutput("r", None, [], [CompletionOutput(0, "", [t])]) for t in output]
    start = time.perf_counter()
    for out in outs:
        decoder.apply(out)
    return (time.perf_counter() - start) / len(outs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds per path")
    parser.add_argument("--tokens", type=int, default=4000, help="output tokens per round")
    parser.add_argument("--prompt-len", type=int, default=50, help="prompt tokens")
    args = parser.parse_args()
    stream_class = getattr(detokenizer, "_DECODE_STREAM", None)  # absent before DecodeStream
    paths = {"DecodeStream": stream_class, "window decode": None}
    if stream_class is None:
        del paths["DecodeStream"]
    for name, tok in tokenizers().items():
        ids = token_ids(name, tok, args.prompt_len + args.tokens)
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(args.rounds):
            for path, cls in paths.items():
                detokenizer._DECODE_STREAM = cls
                best[path] = min(best[path], us_per_token(tok, ids, args.prompt_len))
        detokenizer._DECODE_STREAM = stream_class
        row = ", ".join(f"{path} {us:.2f} us/token" for path, us in best.items())
        print(f"{name}: {row}")


if __name__ == "__main__":
    main()
