"""Rounds of concurrent streams, some clients leaving early, leave the server's memory where it was.

Measured without reading RSS (which allocators and the OS make noisy): the resident pages of the
KV cache tensors (``mincore``), the engine's and the async engine's per-request state, and the
number of live objects of each parallm type after a full garbage collection.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import torch
from server_support import API_KEY, MODEL_NAME, metrics, running_server, wait_until_idle

from parallm.server.launcher import ServerThread

NUM_CLIENTS = 48
LEAVE_EVERY = 6  # these clients drop the connection after LEAVE_AFTER_EVENTS events
LEAVE_AFTER_EVENTS = 3
MAX_TOKENS = 32
ROUNDS = 4
# Far more blocks than the rounds use (so a lazily committed cache would grow every round),
# and tensors large enough that the allocator maps fresh pages for them.
KV_CACHE_BYTES = 96 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with running_server(kv_cache_memory=KV_CACHE_BYTES, max_model_len=512, multiprocess=False) as s:
        yield s


def _resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(resident, total) pages of a CPU tensor's memory, from mincore(2)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr() // page * page
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    num_pages = -(-(end - start) // page)
    vec = (ctypes.c_ubyte * num_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(start, end - start, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec), num_pages


def _kv_cache_pages(server: ServerThread) -> tuple[int, int]:
    pages = [_resident_pages(t) for t in server.app.state.ctx.engine.engine.runner.kv_caches]
    return sum(p[0] for p in pages), sum(p[1] for p in pages)


def _per_request_state(server: ServerThread) -> dict[str, int]:
    """Sizes of every per-request container of the async engine and the engine."""
    async_engine = server.app.state.ctx.engine
    engine = async_engine.engine
    out = engine.outputs
    return {
        "async_engine.tracked": len(async_engine._tracked),
        "engine.requests": len(engine.requests),
        "scheduler.running": len(engine.scheduler.running),
        "scheduler.waiting": len(engine.scheduler.waiting),
        "outputs.streaming": len(out.streaming),
        "outputs.detokenizers": len(out.detokenizers),
        "outputs.num_sent": len(out.num_sent),
        "outputs.errors": len(out.errors),
    }


def _grown_types(before: Counter[str], settle_s: float = 5.0) -> dict[str, tuple[int, int]]:
    """Types with more live objects than ``before`` (given a moment for handlers to finish)."""
    deadline = time.monotonic() + settle_s
    while True:
        now = _live_parallm_objects()
        grown = {t: (before[t], n) for t, n in now.items() if n > before[t]}
        if not grown or time.monotonic() > deadline:
            return grown
        time.sleep(0.05)


def _live_parallm_objects() -> Counter[str]:
    gc.collect()
    names = (f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    return Counter(name for name in names if name.startswith("parallm."))


async def _stream(client: httpx.AsyncClient, i: int) -> str:
    body = {
        "model": MODEL_NAME, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"Write function number {i}."}],
    }  # fmt: skip
    leaves = i % LEAVE_EVERY == 0
    events = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leaves and events == LEAVE_AFTER_EVENTS:
                return "left"  # closes the connection mid-stream
            if line == "data: [DONE]":
                return "done"
    return "cut"


async def _round(server: ServerThread) -> Counter[str]:
    limits = httpx.Limits(max_connections=NUM_CLIENTS)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(
        base_url=server.url, headers=headers, limits=limits, timeout=60
    ) as client:
        return Counter(await asyncio.gather(*(_stream(client, i) for i in range(NUM_CLIENTS))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as Linux has it")
def test_rounds_of_concurrent_streams_with_disconnects_do_not_grow_memory(
    server: ServerThread,
) -> None:
    resident_at_start, num_pages = _kv_cache_pages(server)
    assert resident_at_start == num_pages, "the KV cache's memory is not all committed at start"
    aborted_before = metrics(server)["parallm:request_aborted_total"]
    objects_after_warm_up: Counter[str] | None = None
    for round_index in range(ROUNDS):
        outcomes = asyncio.run(_round(server))
        leavers = len(range(0, NUM_CLIENTS, LEAVE_EVERY))
        assert outcomes == {"done": NUM_CLIENTS - leavers, "left": leavers}
        wait_until_idle(server)
        # Nothing per request outlives its request, whether it finished or its client left.
        state = _per_request_state(server)
        assert state == dict.fromkeys(state, 0)
        # Serving never grows the KV cache's memory (with swap it could only shrink).
        assert _kv_cache_pages(server)[0] <= resident_at_start
        if round_index == 1:
            objects_after_warm_up = _live_parallm_objects()
    aborted = metrics(server)["parallm:request_aborted_total"] - aborted_before
    assert aborted > 0, "no stream was aborted, so the rounds did not test disconnects"
    # After a warm-up round, no parallm type gains live objects round over round.
    grown = _grown_types(objects_after_warm_up)
    assert not grown, f"live objects (after round 2, after round {ROUNDS}): {grown}"
