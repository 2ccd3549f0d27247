"""The load generator of ``parallm bench serve``: streaming requests to an OpenAI-compatible
server, sent at their arrival times, timed chunk by chunk."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from parallm.bench.serve_workload import RequestSpec

DONE = "[DONE]"


class SSEParser:
    """Incremental ``text/event-stream`` decoder: feed text as it arrives, get the ``data`` of
    each completed event. Handles any chunking, CRLF/CR/LF line ends, comments and multi-line
    data; other fields (``event``, ``id``, ``retry``) are not needed here and are skipped."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        # A CR at the very end may be the first half of a CRLF: wait for the next piece.
        held = self._buffer.endswith("\r")
        body = self._buffer[:-1] if held else self._buffer
        *lines, rest = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = rest + ("\r" if held else "")
        events = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> str | None:
        if not line:  # a blank line ends the event
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if line.startswith(":"):  # a comment, e.g. a keep-alive
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; ``send_s`` is after the benchmark began."""

    index: int
    expected_output_tokens: int
    input_len: int
    status: str = "cancelled"  # until it finishes: "ok" or "failed"
    send_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the server's usage, when it reports it
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for a single-token output)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class ClientConfig:
    """Where and how to send."""

    base_url: str  # ending in /v1
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    vllm_extensions: bool = True  # ignore_eos and min_tokens, to force the output lengths
    temperature: float | None = 0.0  # None: send none, the server's default applies
    max_concurrency: int | None = None
    max_duration_s: float = 600.0

    @property
    def url(self) -> str:
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        return f"{self.base_url}/{path}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


OnDone = Callable[[RequestResult], None]  # called as each request finishes (progress bars)


class RequestFailed(Exception):
    """The server answered with an error (status or error event)."""


def request_body(cfg: ClientConfig, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": cfg.model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
        body["max_completion_tokens"] = spec.output_len
    else:
        body["prompt"] = spec.prompt
        body["max_tokens"] = spec.output_len
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if cfg.vllm_extensions:
        # Stopping at EOS would make output lengths depend on the model, not the workload.
        body["ignore_eos"] = True
        body["min_tokens"] = spec.output_len
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text a completions or chat chunk carries ('' for role/usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if choice.get("text"):
        return choice["text"]
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


class _Timer:
    """Chunk arrival times of one stream -> TTFT and inter-token latencies."""

    def __init__(self, result: RequestResult, start: float) -> None:
        self.result, self.start = result, start
        self.last: float | None = None
        self.chunks = 0

    def on_chunk(self, chunk: dict[str, Any], now: float) -> None:
        if "error" in chunk:  # servers report mid-stream failures as an error event
            error = chunk["error"]
            raise RequestFailed(
                error.get("message", str(error)) if isinstance(error, dict) else str(error)
            )
        usage = chunk.get("usage")
        if usage:
            self.result.output_tokens = usage.get("completion_tokens", 0)
            self.result.prompt_tokens = usage.get("prompt_tokens")
        if not _chunk_text(chunk):
            return
        self.chunks += 1
        if self.last is None:
            self.result.ttft_s = now - self.start
        else:
            self.result.itl_s.append(now - self.last)
        self.last = now


async def stream_one(session: aiohttp.ClientSession, cfg: ClientConfig, spec: RequestSpec,
                     result: RequestResult) -> None:  # fmt: skip
    """Send one streaming request and fill ``result`` (raises on failure)."""
    start = time.perf_counter()
    timer = _Timer(result, start)
    body = request_body(cfg, spec)
    async with session.post(cfg.url, json=body, headers=cfg.headers()) as resp:
        if resp.status != 200:
            text = (await resp.read()).decode(errors="replace")
            raise RequestFailed(f"HTTP {resp.status}: {_error_message(text)}")
        parser = SSEParser()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # pieces split chars
        async for piece in resp.content.iter_any():
            now = time.perf_counter()  # one arrival time for every event in this piece
            for data in parser.feed(decoder.decode(piece)):
                if data.strip() != DONE:
                    timer.on_chunk(json.loads(data), now)
    result.e2e_s = time.perf_counter() - start
    if timer.chunks == 0:
        raise RequestFailed("the stream carried no tokens")
    if result.output_tokens == 0:  # no usage reported: one token a chunk is the best guess
        result.output_tokens = timer.chunks


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        error = json.loads(text)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    return text[:300]


def client_session(cfg: ClientConfig) -> aiohttp.ClientSession:
    """One session for every stream. aiohttp, as vLLM's bench serve: its C HTTP parser keeps
    the client's CPU per chunk low, and a client that falls behind the server measures itself
    (benchmarks/serve_client_bench.py; PERF_NOTES.md has the comparison with httpx)."""
    # No connection limit: a client-side queue would show up as server latency. The session
    # ignores proxy settings from the environment (aiohttp's default): talk to the URL given.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=cfg.max_duration_s, connect=min(30.0, cfg.max_duration_s))
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


async def _scheduled(session: aiohttp.ClientSession, cfg: ClientConfig, spec: RequestSpec,
                     result: RequestResult, start: float, gate: asyncio.Semaphore | None,
                     on_done: OnDone) -> None:  # fmt: skip
    """Wait for the request's arrival time (and a concurrency slot), send it, record it."""
    await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
    async with gate or contextlib.nullcontext():
        result.send_s = time.perf_counter() - start
        try:
            await stream_one(session, cfg, spec, result)
            result.status = "ok"
        except Exception as e:  # any failure of one request is data, not a crash
            result.status = "failed"
            result.error = str(e) if isinstance(e, RequestFailed) else f"{type(e).__name__}: {e}"
    on_done(result)


async def run_requests(
    cfg: ClientConfig, specs: list[RequestSpec], on_done: OnDone = lambda result: None
) -> tuple[list[RequestResult], float]:
    """Send every request at its time; (results in spec order, seconds the run took).

    Requests still pending at ``max_duration_s`` are cancelled and keep status "cancelled".
    """
    results = [RequestResult(s.index, s.output_len, s.input_len) for s in specs]
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    async with client_session(cfg) as session:
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(_scheduled(session, cfg, s, r, start, gate, on_done))
            for s, r in zip(specs, results, strict=True)
        ]
        _, pending = await asyncio.wait(tasks, timeout=cfg.max_duration_s) if tasks else ((), ())
        elapsed = time.perf_counter() - start
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results, elapsed


async def first_model(base_url: str, api_key: str | None) -> str:
    """The first model ``GET /v1/models`` lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{base_url}/models", headers=headers) as resp,
        ):
            status, text = resp.status, await resp.text(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ValueError(f"GET {base_url}/models: {type(e).__name__}: {e}") from None
    if status != 200:
        raise ValueError(f"GET {base_url}/models: HTTP {status}: {text[:200]}")
    models = json.loads(text).get("data") or []
    if not models:
        raise ValueError(f"GET {base_url}/models lists no model; pass --model")
    return models[0]["id"]
