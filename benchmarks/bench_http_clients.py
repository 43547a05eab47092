"""The load generator's HTTP client: CPU per request of aiohttp (what loadtest/openloop.py uses) and httpx.

The load tests run on the cores of the server they measure, so the client's CPU per request is taken
from the server. A stub server (uvicorn + a 3-route Starlette app, in its own process) answers at once;
each client sends the same requests from one asyncio loop, `--concurrency` at a time, through one
keep-alive pool, and the client process's CPU time (user + system) is divided by the request count.

    .venv/bin/python benchmarks/bench_http_clients.py                # ~1 min; needs aiohttp installed
    .venv/bin/python benchmarks/bench_http_clients.py --requests 4000 --repeats 3

Measured once with the project's own HTTP/1.1 client beside them (loadtest/http1.py, `git show
f8d9e43:matryoshka_lora/loadtest/http1.py`), 2000 requests x 3, 16 at once, 2-core EPYC VM, 7 Dec 2026,
client CPU ms per request:

    workload   http1.py   aiohttp   httpx
    json          0.056     0.100   1.695
    refusal       0.057     0.095   1.586
    sse           0.244     0.266   1.825

aiohttp costs 0.02-0.04 ms more than the hand-written client, well inside the 0.5 ms that would matter
beside a request's server time, so the load tests use aiohttp and http1.py is gone.

Workloads: `json` (POST a small JSON body, a 200 JSON answer of ~300 bytes), `refusal` (POST, a 429
JSON answer with Retry-After: what a flooding tenant gets), `sse` (POST, a 20-event text/event-stream
answer read line by line, as the streaming load tests read it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import platform
import socket
import statistics
import time

log = logging.getLogger("bench_http_clients")

BODY = {"prompt": "Reverse this list of letters: a b c", "adapter": "a", "rank": 4, "max_tokens": 16}
ANSWER = {"id": "gen-0", "text": "c b a" * 20, "finish_reason": "length", "rank": 4, "rank_reason": "requested"}
NUM_EVENTS = 20


def stub_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def ok(request):
        await request.body()
        return JSONResponse(ANSWER)

    async def refusal(request):
        await request.body()
        return JSONResponse({"error": {"type": "rate_limited"}}, status_code=429, headers={"retry-after": "1"})

    async def sse(request):
        await request.body()

        async def events():
            for i in range(NUM_EVENTS):
                yield f"data: {json.dumps({'type': 'token', 'text': 'x', 'i': i})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[Route(p, f, methods=["POST"]) for p, f in (("/json", ok), ("/refusal", refusal), ("/sse", sse))]
    )


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(stub_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def run_aiohttp(url: str, path: str, n: int, concurrency: int) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one():
            async with session.post(path, json=BODY) as resp:
                if path == "/sse":
                    async for _ in resp.content:
                        pass
                else:
                    await resp.read()

        await _many(one, n, concurrency)


async def run_httpx(url: str, path: str, n: int, concurrency: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one():
            async with client.stream("POST", path, json=BODY) as resp:
                if path == "/sse":
                    async for _ in resp.aiter_lines():
                        pass
                else:
                    await resp.aread()

        await _many(one, n, concurrency)


async def _many(one, n: int, concurrency: int) -> None:
    queue = iter(range(n))

    async def worker():
        for _ in queue:
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


CLIENTS = {"aiohttp": run_aiohttp, "httpx": run_httpx}
WORKLOADS = {"json": "/json", "refusal": "/refusal", "sse": "/sse"}


def cpu_ms_per_request(client, url: str, path: str, n: int, concurrency: int) -> tuple[float, float]:
    """(client CPU ms per request, wall ms per request) of one run."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(client(url, path, n, concurrency))
    return (time.process_time() - cpu0) * 1e3 / n, (time.perf_counter() - wall0) * 1e3 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per client and workload; the median")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from matryoshka_lora.loadtest.server import free_port

    port = free_port()
    server = multiprocessing.Process(target=serve, args=(port,), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:  # up once it accepts a connection
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or not server.is_alive():
                raise SystemExit("the stub server did not start") from None
            time.sleep(0.1)
    for client in CLIENTS.values():  # warm up each client once (imports, first connections)
        cpu_ms_per_request(client, url, "/json", 200, args.concurrency)
    rows = []
    for workload, path in WORKLOADS.items():
        samples = {name: [] for name in CLIENTS}
        for _ in range(args.repeats):
            for name, client in CLIENTS.items():
                samples[name].append(cpu_ms_per_request(client, url, path, args.requests, args.concurrency))
        for name, runs in samples.items():
            cpu = statistics.median(c for c, _ in runs)
            wall = statistics.median(w for _, w in runs)
            rows.append((workload, name, cpu, wall))
    server.terminate()
    print(
        f"\n{platform.processor() or platform.machine()}, {args.requests} requests x {args.repeats}, "
        f"{args.concurrency} at once, median of runs"
    )
    print(f"{'workload':<10} {'client':<10} {'client CPU ms/req':>18} {'wall ms/req':>12}")
    for workload, name, cpu, wall in rows:
        print(f"{workload:<10} {name:<10} {cpu:>18.3f} {wall:>12.3f}")


if __name__ == "__main__":
    main()
