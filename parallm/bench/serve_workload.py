"""What ``parallm bench serve`` sends: arrival times, token counts and prompts.

Arrivals come from a trace (``TIMESTAMP,ContextTokens,GeneratedTokens``, as in the Azure LLM
inference traces) or from a gamma process (Poisson at burstiness 1, as vLLM's). Prompts are
synthesised to each request's input length (random token ids, or sonnet text) or taken from
ShareGPT conversations.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CHARS_PER_TOKEN = 4  # the usual English estimate, used when no tokenizer is given
RANDOM_ID_LOW = 10  # low ids are often special tokens in real vocabularies
DEFAULT_RANDOM_VOCAB = 256  # without a tokenizer: ids every byte-level or byte-fallback vocab has

Prompt = str | list[int]


@dataclass(frozen=True)
class TraceRow:
    """One trace request: seconds after the trace's first request, and its token counts."""

    offset_s: float
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class Shape:
    """When a request arrives (seconds after the start) and how many tokens it has."""

    arrival_s: float
    input_len: int
    output_len: int | None  # None: take it from the prompt data (ShareGPT's reply)


@dataclass(frozen=True)
class RequestSpec:
    """A request ready to send."""

    index: int
    arrival_s: float
    prompt: Prompt
    input_len: int  # intended prompt tokens (exact for token ids, estimated for text)
    output_len: int


# ---- arrivals -------------------------------------------------------------------------------


def load_trace(
    path: Path, offset_s: float = 0.0, duration_s: float | None = None
) -> list[TraceRow]:
    """Rows of a trace CSV in time order, within ``[offset_s, offset_s + duration_s)`` of its
    first timestamp. Offsets stay relative to the trace's first row."""
    with open(path, newline="") as f:
        raw = [_parse_row(row) for row in csv.DictReader(f)]
    if not raw:
        raise ValueError(f"trace {path} has no rows")
    raw.sort(key=lambda r: r[0])
    first = raw[0][0]
    end = math.inf if duration_s is None else offset_s + duration_s
    rows = [TraceRow((t - first).total_seconds(), c, g) for t, c, g in raw]
    return [r for r in rows if offset_s <= r.offset_s < end]


def _parse_row(row: dict[str, str]) -> tuple[datetime, int, int]:
    try:
        stamp = datetime.fromisoformat(row["TIMESTAMP"].strip())
        return stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"trace row {row}: expected TIMESTAMP,ContextTokens,GeneratedTokens ({e})"
        ) from None


def trace_shapes(rows: list[TraceRow], time_scale: float) -> list[Shape]:
    """Replay times relative to the first row, ``time_scale`` times faster than recorded."""
    if time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    if not rows:
        return []
    start = rows[0].offset_s
    return [
        Shape((r.offset_s - start) / time_scale, r.context_tokens, r.generated_tokens) for r in rows
    ]


def arrival_times(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """``num`` arrival times from 0 with gamma-distributed gaps of mean ``1 / rate``: shape
    ``burstiness`` (1 is a Poisson process; lower is burstier, higher more even), as vLLM draws
    them. An infinite rate sends everything at 0."""
    if rate <= 0:
        raise ValueError("--request-rate must be positive (inf sends everything at once)")
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    t, times = 0.0, []
    for _ in range(num):
        times.append(t)
        if math.isfinite(rate):
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def random_lengths(num: int, length: int, range_ratio: float, rng: random.Random) -> list[int]:
    """``num`` lengths drawn uniformly from ``[length * (1 - r), length * (1 + r)]`` (vLLM's
    ``--random-range-ratio``), at least 1; all ``length`` when ``r`` is 0."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


def synthetic_shapes(
    num: int,
    rate: float,
    input_len: int,
    output_len: int | None,
    rng: random.Random,
    burstiness: float = 1.0,
    range_ratio: float = 0.0,
) -> list[Shape]:
    """``num`` requests arriving at ``rate`` per second with lengths around ``input_len`` and
    ``output_len`` (None: the prompt data decides)."""
    for flag, value in (("--random-input-len", input_len), ("--random-output-len", output_len)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    times = arrival_times(num, rate, burstiness, rng)
    inputs = random_lengths(num, input_len, range_ratio, rng)
    outputs = random_lengths(num, output_len, range_ratio, rng) if output_len else [None] * num
    return [Shape(*shape) for shape in zip(times, inputs, outputs, strict=True)]


# ---- prompts --------------------------------------------------------------------------------


class PromptMaker:
    """Prompts of a given token length, from one source.

    With a tokenizer, lengths are counted in its tokens; without one, random prompts are token
    ids below ``random_vocab`` (exact for /v1/completions, which takes id lists) and text is
    sized at ``CHARS_PER_TOKEN`` characters a token.
    """

    def __init__(
        self,
        kind: str,
        endpoint: str,
        rng: random.Random,
        tokenizer: Any | None = None,
        prompts_file: Path | None = None,
        random_vocab: int | None = None,
    ) -> None:
        if kind == "random" and endpoint == "chat" and tokenizer is None:
            raise ValueError(
                "random prompts for --endpoint chat need --tokenizer: chat takes text, which "
                "is decoded from the random ids"
            )
        if kind != "random" and prompts_file is None:
            raise ValueError(f"{kind} prompts need their file (--dataset-path)")
        self.kind, self.endpoint, self.rng, self.tokenizer = kind, endpoint, rng, tokenizer
        self._vocab = random_vocab or (len(tokenizer) if tokenizer else DEFAULT_RANDOM_VOCAB)
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        if kind == "random":
            return
        if kind == "sonnet":
            self._text = prompts_file.read_text()
            if not self._text.strip():
                raise ValueError(f"sonnet text {prompts_file} is empty")
            self._ids = self.encode(self._text) if tokenizer else None
        else:
            self._pairs = load_sharegpt(prompts_file, rng)
            self._next = 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count(self, text: str) -> int:
        """Tokens in ``text``: counted with the tokenizer, else estimated."""
        if self.tokenizer is not None:
            return len(self.encode(text))
        return max(1, round(len(text) / CHARS_PER_TOKEN))

    def make(self, input_len: int, max_input: int | None) -> tuple[Prompt, int, int | None]:
        """(prompt, its token count, output length from the data or None)."""
        if self.kind == "sharegpt":
            return self._sharegpt(max_input)
        n = max(1, min(input_len, max_input or input_len))
        if self.kind == "random":
            return self._random(n), n, None
        return self._sonnet(n), n, None

    def _random(self, n: int) -> Prompt:
        ids: list[int] = []
        while len(ids) < n:
            i = self.rng.randrange(min(RANDOM_ID_LOW, self._vocab - 1), self._vocab)
            if i not in self._special:
                ids.append(i)
        # Chat takes text only; decoding then re-encoding keeps the length roughly.
        return self.tokenizer.decode(ids) if self.endpoint == "chat" else ids

    def _sonnet(self, n: int) -> str:
        # Start at a random place so requests share little prefix (a prefix cache would hide
        # most of the prefill otherwise), wrapping round the poem as often as needed.
        if self._ids is not None:
            start = self.rng.randrange(len(self._ids))
            ids = [self._ids[(start + k) % len(self._ids)] for k in range(n)]
            return self.tokenizer.decode(ids)
        lines = self._text.splitlines(keepends=True)
        start = sum(len(line) for line in lines[: self.rng.randrange(len(lines))])
        chars = n * CHARS_PER_TOKEN
        return "".join(self._text[(start + k) % len(self._text)] for k in range(chars))

    def _sharegpt(self, max_input: int | None) -> tuple[Prompt, int, int | None]:
        prompt, reply = self._pairs[self._next % len(self._pairs)]
        self._next += 1
        n = self.count(prompt)
        if max_input is not None and n > max_input:
            prompt, n = self._truncate(prompt, max_input), max_input
        return prompt, n, self.count(reply) if reply else None

    def _truncate(self, text: str, n: int) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(self.encode(text)[:n])
        return text[: n * CHARS_PER_TOKEN]


def load_sharegpt(path: Path, rng: random.Random) -> list[tuple[str, str | None]]:
    """(first turn, the reply to it or None) of each conversation, in a seeded random order.

    Filtered ShareGPT files may hold the prompts alone; then output lengths come from the
    trace or ``--output-len``."""
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations (ShareGPT's format)")
    pairs = []
    for conv in data:
        turns = conv.get("conversations", []) if isinstance(conv, dict) else []
        if turns and turns[0].get("value"):
            reply = turns[1].get("value") if len(turns) > 1 else None
            pairs.append((turns[0]["value"], reply or None))
    if not pairs:
        raise ValueError(f"{path}: no conversation with a prompt")
    rng.shuffle(pairs)
    return pairs


def build_requests(
    shapes: list[Shape],
    maker: PromptMaker,
    default_output_len: int,
    max_input: int | None = None,
    max_output: int | None = None,
) -> list[RequestSpec]:
    """Attach a prompt to each shape; lengths capped at ``max_input``/``max_output``."""
    specs = []
    for i, shape in enumerate(shapes):
        prompt, input_len, data_output = maker.make(shape.input_len, max_input)
        output_len = shape.output_len or data_output or default_output_len
        output_len = max(1, min(output_len, max_output or output_len))
        specs.append(RequestSpec(i, shape.arrival_s, prompt, input_len, output_len))
    return specs
