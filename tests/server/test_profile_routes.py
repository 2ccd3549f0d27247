"""vLLM's /start_profile and /stop_profile: the engine core (in its own process) records the
steps between them and /stop_profile answers once the trace is written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
from server_support import MODEL_NAME, client, running_server

from parallm.engine.profiler import table_path


def test_a_profile_of_the_core_under_a_request(tmp_path: Path) -> None:
    config = {"profiler": "torch", "torch_profiler_dir": str(tmp_path)}
    with running_server(profiler_config=config) as server:
        assert httpx.post(server.url + "/start_profile", timeout=60).status_code == 200
        again = httpx.post(server.url + "/start_profile", timeout=60)
        assert again.status_code == 400 and "already running" in again.json()["error"]["message"]
        done = client(server).completions.create(
            model=MODEL_NAME, prompt="def f():", max_tokens=4, temperature=0
        )
        assert done.usage.completion_tokens == 4
        response = httpx.post(server.url + "/stop_profile", timeout=60)
        assert response.status_code == 200, response.text
        (trace,) = response.json()["traces"]
        assert Path(trace).parent == tmp_path and table_path(trace).exists()
        with gzip.open(trace, "rt") as f:
            names = {e.get("name", "") for e in json.load(f)["traceEvents"]}
        assert any(n.startswith("aten::") for n in names)  # the request's steps
        late = httpx.post(server.url + "/stop_profile", timeout=60)
        assert (
            late.status_code == 400 and "no profile is running" in late.json()["error"]["message"]
        )
        # The server serves on after profiling.
        assert (
            client(server)
            .completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
            .usage.completion_tokens
            == 2
        )


def test_profiling_off_says_which_flag_turns_it_on() -> None:
    with running_server() as server:
        for route in ("/start_profile", "/stop_profile"):
            response = httpx.post(server.url + route, timeout=60)
            assert response.status_code == 400
            assert "--profiler-config" in response.json()["error"]["message"]
