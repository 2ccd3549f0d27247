"""The cost of ``parallm bench serve``'s own client, on CPU: can it keep up with a fast server?

A bare asyncio HTTP server in a child process streams every request ``--output-len`` SSE
completion chunks of one token each, one chunk every ``--chunk-ms`` per stream (a decode step's
pace), so ``--streams`` streams at once ask the client for ``streams / chunk_ms`` chunks a
second. The client is bench serve's (``run_requests``, the same parser and timers). Reported:
tokens/s received against that pace, the client's CPU microseconds per chunk, and TPOT/ITL
p99 (a client that stalls its event loop shows there). If the client falls behind, a serving
benchmark measures the client, not the server.

    python benchmarks/serve_client_bench.py --streams 256 --output-len 500 --chunk-ms 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import socket
import statistics
import time

from parallm.bench.serve_client import ClientConfig, run_requests
from parallm.bench.serve_workload import RequestSpec


def _event(payload: dict | str) -> bytes:
    """One SSE event as one HTTP chunk."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    data = b"data: " + text.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(sock: socket.socket, output_len: int, chunk_s: float) -> None:
    token = _event({"object": "text_completion", "model": "m",
                    "choices": [{"index": 0, "text": " tok", "finish_reason": None}]})  # fmt: skip
    usage = {"prompt_tokens": 3, "completion_tokens": output_len}
    tail = _event({"object": "text_completion", "model": "m", "choices": [], "usage": usage})
    tail += _event("[DONE]") + b"0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: one request after another on this connection
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
            for _ in range(output_len):
                writer.write(token)
                await writer.drain()
                await asyncio.sleep(chunk_s)
            writer.write(tail)
            await writer.drain()

    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        await server.serve_forever()


def _server_process(sock: socket.socket, output_len: int, chunk_s: float) -> None:
    asyncio.run(_serve(sock, output_len, chunk_s))


def run(args: argparse.Namespace) -> dict:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    server = mp.get_context("fork").Process(
        target=_server_process, args=(sock, args.output_len, args.chunk_ms / 1e3), daemon=True
    )
    server.start()
    try:
        cfg = ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m")
        specs = [RequestSpec(i, 0.0, [1, 2, 3], 3, args.output_len) for i in range(args.streams)]
        before = resource.getrusage(resource.RUSAGE_SELF)
        results, elapsed = asyncio.run(run_requests(cfg, specs))
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        server.kill()
        server.join()
    cpu_s = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    ok = [r for r in results if r.status == "ok"]
    if len(ok) < 2:
        raise SystemExit(f"{len(ok)} of {len(results)} streams ended well: {results[0].error}")
    chunks = sum(len(r.itl_s) + 1 for r in ok)
    pace = args.streams / (args.chunk_ms / 1e3)
    itl = sorted(x for r in ok for x in r.itl_s)
    return {
        "streams": args.streams, "ok": len(ok), "elapsed_s": elapsed,
        "tok_s": sum(r.output_tokens for r in ok) / elapsed, "pace_tok_s": pace,
        "client_cpu_us_per_chunk": cpu_s / max(chunks, 1) * 1e6,
        "tpot_ms_p99": 1e3 * statistics.quantiles([r.tpot_s for r in ok], n=100)[98],
        "itl_ms_p99": 1e3 * itl[int(0.99 * (len(itl) - 1))] if itl else None,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--streams", type=int, default=256, help="requests streaming at once")
    p.add_argument("--output-len", type=int, default=500, help="chunks (tokens) per request")
    p.add_argument("--chunk-ms", type=float, default=6.0, help="the server's pace per stream")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args()
    start = time.perf_counter()
    report = run(args)
    for key, value in report.items():
        print(f"{key:26s} {value:,.3f}" if isinstance(value, float) else f"{key:26s} {value}")
    print(f"(ran {time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
