"""``parallm serve --data-parallel-size 2`` as a process: the death of one replica fails its
streams with a 503 naming it and stops the server (exit 1); SIGTERM drains the requests of
both replicas (exit 0); with ``--tensor-parallel-size 2`` it runs four engine processes and
answers as one engine does. Nothing is left behind: no process, no socket folder."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from process_checks import descendants, process_gone
from serve_process import (
    CONTEXT,
    HEADERS,
    StreamReader,
    core_pids,
    serve_command,
    serve_processes,
    spawned,
)
from server_support import MODEL_NAME, tiny_model_path

from parallm import LLM, SamplingParams


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Starts ``parallm serve --data-parallel-size 2`` (plus flags) with a private TMPDIR;
    kills whatever is left at the end."""
    with serve_processes({"TMPDIR": str(tmp_path)}) as start:
        yield lambda *flags: start(
            "--model", str(tiny_model_path()), "--data-parallel-size", "2", *flags
        )


def _stream(url: str, prompt: list[int], max_tokens: int) -> StreamReader:
    return StreamReader(url, {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                              "ignore_eos": True, "temperature": 0})  # fmt: skip


def _no_socket_folders(tmp: Path) -> bool:
    return not list(tmp.glob("parallm-core-*"))


def test_killing_one_replica_fails_its_streams_and_stops_the_server(serve, tmp_path) -> None:
    proc, url, stderr = serve("--drain-timeout", "1")
    processes = descendants(proc.pid)
    cores = core_pids(proc.pid)
    assert len(cores) == 2
    # The first stream goes to replica 0; the second, while it runs, to replica 1.
    readers = [_stream(url, [30 + i, 40 + i], CONTEXT - 16) for i in range(2)]
    for reader in readers:
        reader.start()
        assert reader.started.wait(60)
    killed = cores[1]
    os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    for reader in readers:
        reader.join(30)
        assert reader.events[-1] == "[DONE]"
    failed = [i for i, r in enumerate(readers) if "error" in json.loads(r.events[-2])]
    assert len(failed) == 1, [r.events[-2] for r in readers]
    (replica,) = failed  # stream i runs on replica i
    message = f"data-parallel replica {replica}: the engine core process (pid {killed}) died"
    error = json.loads(readers[replica].events[-2])["error"]
    assert message in error["message"] and error["code"] == "503"
    # The other replica's stream was not failed: the server drained it (aborted at the
    # deadline).
    assert readers[1 - replica].finish_reason() in ("length", "abort")
    assert f"parallm serve: error: {message}" in "".join(stderr)
    assert all(process_gone(pid) for pid in processes)
    assert _no_socket_folders(tmp_path)


def test_sigterm_drains_the_requests_of_both_replicas(serve, tmp_path) -> None:
    proc, url, stderr = serve("--drain-timeout", "120")
    processes = descendants(proc.pid)
    assert len(core_pids(proc.pid)) == 2
    readers = [_stream(url, [50 + i, 60 + i], 200) for i in range(2)]
    for reader in readers:
        reader.start()
        assert reader.started.wait(60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(stderr)
    for reader in readers:
        reader.join(30)
        assert reader.events[-1] == "[DONE]" and reader.finish_reason() == "length"
    assert all(process_gone(pid) for pid in processes)
    assert _no_socket_folders(tmp_path)


def test_two_replicas_of_two_tensor_parallel_ranks(serve, tmp_path) -> None:
    proc, url, stderr = serve("--tensor-parallel-size", "2", "--drain-timeout", "5")
    processes = descendants(proc.pid)
    assert len(core_pids(proc.pid)) == 2 and len(spawned(processes)) == 4
    prompts = [[70, 71, 72], [80, 81, 82, 83]]
    body = {"model": MODEL_NAME, "prompt": prompts, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    out = httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=120)
    assert out.status_code == 200, out.text
    texts = [c["text"] for c in sorted(out.json()["choices"], key=lambda c: c["index"])]
    llm = LLM(model=str(tiny_model_path()), device="cpu", kv_cache_memory=4 << 20,
              max_model_len=CONTEXT)  # fmt: skip
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]  # fmt: skip
    llm.close()
    assert texts == expected
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(stderr)
    assert all(process_gone(pid) for pid in processes)
    assert _no_socket_folders(tmp_path)


def test_a_replica_that_cannot_start_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc = serve_command("--model", str(broken), "-dp", "2", env={"TMPDIR": str(tmp_path)})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert re.search(r"parallm serve: error: data-parallel replica [01]: the engine core failed "
                     r"to start: JSONDecodeError", err), err  # fmt: skip
    # (The resource tracker may outlive the server by a moment; it must exit.)
    assert all(process_gone(pid) for pid in _session_processes(proc.pid))
    assert _no_socket_folders(tmp_path)


def _session_processes(session: int) -> list[int]:
    """The live processes of a session (the server's own, started with a new session)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == session and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_each_replica_runs_on_its_own_gpu(serve) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    free_before = [torch.cuda.mem_get_info(i)[0] for i in range(2)]
    proc, url, stderr = serve("--device", "cuda", "--drain-timeout", "5")
    body = {"model": MODEL_NAME, "prompt": [[70, 71], [80, 81]], "max_tokens": 4,
            "ignore_eos": True}  # fmt: skip
    out = httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=120)
    assert out.status_code == 200, out.text
    # Each replica's engine (its CUDA context, weights and KV cache) took memory on its own GPU.
    used = [before - torch.cuda.mem_get_info(i)[0] for i, before in enumerate(free_before)]
    assert all(u > 64 << 20 for u in used), used
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "".join(stderr)
