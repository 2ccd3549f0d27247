"""The server runs on uvloop and httptools when they are importable (uvicorn's loop="auto" and
http="auto"), as vLLM's does, and on asyncio's loop and h11 when they are not."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_SERVE_ONCE = textwrap.dedent(
    """
    import asyncio, json, sys, threading, time, urllib.request
    for name in sys.argv[1:]:
        sys.modules[name] = None  # makes `import name` raise ImportError
    from fastapi import FastAPI
    from parallm.server.launcher import DrainingServer, bind_socket

    app = FastAPI()

    @app.get("/loop")
    async def loop():
        return {"loop": type(asyncio.get_running_loop()).__module__}

    server = DrainingServer(app, drain_timeout_s=1.0, log_level="warning", access_log=False)
    sock = bind_socket("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/loop"
    try:
        loop = json.load(urllib.request.urlopen(url, timeout=10))["loop"]
    finally:
        server.should_exit = True
        thread.join(30)
    print(json.dumps({"loop": loop, "http": server.config.http_protocol_class.__name__}))
    """
)


def _serve_once(*blocked: str) -> dict[str, str]:
    """The event loop module and HTTP protocol class a server used, in a fresh interpreter
    where the ``blocked`` modules cannot be imported."""
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE_ONCE, *blocked],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    sys.platform in ("win32", "cygwin") or sys.implementation.name != "cpython",
    reason="uvloop is a dependency only on CPython outside Windows",
)
def test_server_uses_uvloop_and_httptools() -> None:
    assert _serve_once() == {"loop": "uvloop", "http": "HttpToolsProtocol"}


def test_server_works_without_uvloop_and_httptools() -> None:
    used = _serve_once("uvloop", "httptools")
    assert used == {"loop": "asyncio.unix_events", "http": "H11Protocol"}
