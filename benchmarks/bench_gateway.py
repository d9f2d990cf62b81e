"""What the OpenAI endpoint adds, each against baselines measured in the same run.

    python benchmarks/bench_gateway.py [--requests 500] [--clients 64]

1. latency of a short streamed chat (1 token) through the endpoint with the
   openai client, beside the same chat through the deployment's Serve handle,
   beside the openai client calling the llama.cpp server directly, and beside
   the openai client calling a server that answers a canned stream at once
   (HTTP and SSE alone: the endpoint's floor over the handle) (median and
   p99, interleaved so noise hits all four);
2. requests per second with N concurrent streaming clients against a fast
   backend (the server answers a canned stream), through the endpoint and
   through handles, on a 4-worker deployment that takes 16 at once per worker,
   alternating for several rounds, with one endpoint process and with the
   default number; beside each rate, the CPU milliseconds per request that the
   clients, the endpoint's processes and the workers spent, which says what a
   machine with more cores would get.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_core import (  # noqa: E402
    MESSAGES, _deployed_once, _direct_once, load, pct, spec, tiny_server,
)
from byzer_magic.serving import chat, deploy
from byzer_magic.openai import gateway  # noqa: E402
from byzer_magic.tinymodel import build  # noqa: E402
from tests.conftest import free_port, start_openai_server  # noqa: E402


async def _endpoint_once(client, name: str) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(model=name, messages=MESSAGES, stream=True, temperature=0, max_tokens=1)
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def _latency(server, canned, url: str, name: str, n: int) -> dict[str, list[float]]:
    """Each call kind in turn, so noise hits all; `canned` answers at once, so calling it costs HTTP and SSE alone."""
    import openai

    clients = [openai.AsyncOpenAI(base_url=base, api_key="bench", max_retries=0)
               for base in (server.base_url, url, canned.base_url)]
    direct_client, endpoint_client, canned_client = clients
    out: dict[str, list[float]] = {"direct": [], "handle": [], "endpoint": [], "http": []}
    for i in range(20 + n):
        times = (await _direct_once(direct_client), await _deployed_once(name),
                 await _endpoint_once(endpoint_client, name), await _direct_once(canned_client))
        if i >= 20:
            for key, took in zip(out, times):
                out[key].append(took)
    for client in clients:
        await client.close()
    return out


def _line(label: str, ours: list[float], base: list[float], goal: str = "") -> str:
    om, bm = statistics.median(ours) * 1e3, statistics.median(base) * 1e3
    o99, b99 = pct(ours, 0.99) * 1e3, pct(base, 0.99) * 1e3
    return (f"  {label}: median +{om - bm:.2f} ms ({om:.2f} vs {bm:.2f} ms, {om / bm:.2f}x){goal}; "
            f"p99 +{o99 - b99:.2f} ms ({o99:.2f} vs {b99:.2f} ms)")


def _cpu_by_role(app: str) -> dict[str, float]:
    """CPU seconds used so far by this process (the clients), the endpoint's replicas and the app's workers."""
    import os

    import psutil

    out = {"clients": 0.0, "endpoint": 0.0, "workers": 0.0}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        line = " ".join(proc.info["cmdline"] or [])
        role = ("clients" if proc.pid == os.getpid() else "endpoint" if f"ServeReplica:{gateway.GATEWAY_APP}" in line
                else "workers" if f"ServeReplica:{app}:" in line else None)
        if role and proc.info["cpu_times"]:
            out[role] += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return out


async def _rate(call, total: int, clients: int, app: str) -> tuple[float, dict[str, float]]:
    """Requests per second, and the CPU milliseconds each role spent per request meanwhile."""
    before = _cpu_by_role(app)
    rate = await load(call, total, clients)
    after = _cpu_by_role(app)
    return rate, {role: (after[role] - before[role]) * 1e3 / total for role in after}


async def _throughput(url: str, name: str, clients: int, total: int, rounds: int) -> list[tuple]:
    """Handles, then the endpoint, `rounds` times; each endpoint round with a fresh client, warmed first.

    A fresh client per round: the server closes keep-alive connections idle
    for 5 s (uvicorn's timeout_keep_alive), and a pooled connection reused
    just as it closes is a ReadError that max_retries=0 would not retry.
    """
    import openai

    async def via_handle() -> None:
        await _deployed_once(name)

    out = []
    for _ in range(rounds):
        client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=120)

        async def via_endpoint() -> None:
            await _endpoint_once(client, name)

        await load(via_handle, clients, clients)
        handle = await _rate(via_handle, total, clients, name)
        await load(via_endpoint, clients, clients)
        endpoint = await _rate(via_endpoint, total, clients, name)
        await client.close()
        out.append((endpoint, handle))
    return out


def _report_throughput(label: str, rounds: list[tuple]) -> None:
    """The round of the median ratio, and every round's ratio."""
    ratios = [e[0] / h[0] for e, h in rounds]
    (erate, ecpu), (hrate, hcpu) = sorted(rounds, key=lambda r: r[0][0] / r[1][0])[len(rounds) // 2]
    print(f"  {label}: endpoint {erate:.0f} req/s, handles {hrate:.0f} req/s -> {erate / hrate:.2f}x at the median "
          f"(goal >= 0.9x); each round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    print(f"    CPU ms per request, endpoint path: clients {ecpu['clients']:.2f}, endpoint {ecpu['endpoint']:.2f}, "
          f"workers {ecpu['workers']:.2f}; handle path: clients {hcpu['clients']:.2f}, workers {hcpu['workers']:.2f}")
    cores = os.cpu_count() or 1
    here_e, here_h = cores * 1e3 / sum(ecpu.values()), cores * 1e3 / sum(hcpu.values())
    print(f"    what the CPU allows: on these {cores} cores, endpoint path {here_e:.0f} req/s, handle path {here_h:.0f} "
          f"req/s ({here_e / here_h:.2f}x); with a core each, one endpoint process {1e3 / ecpu['endpoint']:.0f} req/s, "
          f"one openai-client process {1e3 / ecpu['clients']:.0f} req/s, one handle-caller process "
          f"{1e3 / hcpu['clients']:.0f} req/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=str, default=f"1,{gateway.default_processes()}",
                        help="endpoint server processes to measure, comma-separated")
    args = parser.parse_args()
    counts = [int(p) for p in args.processes.split(",")]
    port = free_port()
    with tiny_server() as server:
        up = gateway.start("127.0.0.1", port, "bench", processes=counts[-1])
        deploy.deploy(spec(server, "bench_gw", 1))
        canned = start_openai_server(build(ROOT / ".cache" / "tinymodel").gguf)
        canned.control(short_circuit=True)
        try:
            found = chat.run_on_client_loop(_latency(server, canned, up.url, "bench_gw", args.requests))
        finally:
            deploy.undeploy("bench_gw")
            canned.proc.terminate()
        print(f"latency, {args.requests} short streamed chats each (1 token), interleaved, "
              f"{counts[-1]} endpoint processes:")
        print(_line("endpoint over the Serve handle", found["endpoint"], found["handle"], " (goal <= 2 ms)"))
        print(_line("endpoint over the server called directly", found["endpoint"], found["direct"]))
        print(_line("handle over the server called directly", found["handle"], found["direct"]))
        http = statistics.median(found["http"]) * 1e3
        print(f"  HTTP and SSE alone, the openai client and a uvicorn server that answers at once (no Ray, no model): "
              f"median {http:.2f} ms, p99 {pct(found['http'], 0.99) * 1e3:.2f} ms; the endpoint adds this hop to "
              f"the handle's path, so this is its floor over the handle")

        server.control(short_circuit=True)
        deploy.deploy(spec(server, "bench_gw_load", 4, 16))
        total = max(args.clients * 10, 500)
        print(f"throughput, {args.clients} concurrent streaming clients, {total} chats a round, fast backend, "
              f"4 workers x 16, {os.cpu_count()} cores here:")
        try:
            for count in counts:
                up = gateway.start("127.0.0.1", port, "bench", processes=count, force=True)
                rounds = chat.run_on_client_loop(_throughput(up.url, "bench_gw_load", args.clients, total, args.rounds))
                _report_throughput(f"{count} endpoint process{'es' if count > 1 else ''}", rounds)
        finally:
            deploy.undeploy("bench_gw_load")
            server.control(short_circuit=False)
        gateway.stop()


if __name__ == "__main__":
    main()
