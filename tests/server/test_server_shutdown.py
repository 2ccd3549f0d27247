"""A clean shutdown of the server with its engine core in its own process: the core exits by
itself (code 0) once it has stopped, with no "did not stop" warning and no kill."""

from __future__ import annotations

import logging

import httpx
from server_support import API_KEY, MODEL_NAME, tiny_model_path
from slow_teardown import engine_with_slow_teardown

from parallm.engine.core.client import EngineCoreClient
from parallm.server.app import build_app
from parallm.server.launcher import ServerThread


def test_a_graceful_server_shutdown_ends_the_core_without_killing_it(caplog) -> None:
    kwargs = dict(model=str(tiny_model_path()), device="cpu", kv_cache_memory=4 << 20,
                  max_model_len=256)  # fmt: skip
    core = EngineCoreClient(kwargs, num_threads=1, engine_factory=engine_with_slow_teardown)
    app = build_app(core, MODEL_NAME, api_key=API_KEY, log_stats=False)
    try:
        warnings = caplog.at_level(logging.WARNING, logger="parallm.engine.core")
        with warnings, ServerThread(app, drain_timeout_s=2.0) as server:
            body = {"model": MODEL_NAME, "prompt": "def f():", "max_tokens": 4,
                    "stream": True, "ignore_eos": True}  # fmt: skip
            headers = {"Authorization": f"Bearer {API_KEY}"}
            r = httpx.post(server.url + "/v1/completions", json=body, headers=headers,
                           timeout=60)  # fmt: skip
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        # Leaving the block shut the server down as SIGTERM does; its lifespan stopped the core.
        assert core.process.exitcode == 0  # exited by itself, not killed (-9)
        assert "did not stop" not in caplog.text
    finally:
        core.stop(timeout_s=0)
