"""What the OpenAI endpoint adds, each against baselines measured in the same run.

    python benchmarks/bench_gateway.py [--requests 500] [--clients 64]

1. latency of a short streamed chat (1 token) through the endpoint with the
   openai client, beside the same chat through the deployment's Serve handle
   and beside the openai client calling the llama.cpp server directly
   (median and p99, interleaved so noise hits all three);
2. requests per second with N concurrent streaming clients against a fast
   backend (the server answers a canned stream), through the endpoint and
   through handles, on a 4-worker deployment that takes 16 at once per worker.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_core import (  # noqa: E402
    MESSAGES, _deployed_once, _direct_once, load, pct, spec, tiny_server,
)
from byzer_magic import chat, deploy, gateway  # noqa: E402
from tests.conftest import free_port  # noqa: E402


async def _endpoint_once(client, name: str) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(model=name, messages=MESSAGES, stream=True, temperature=0, max_tokens=1)
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def _latency(server, url: str, name: str, n: int) -> dict[str, list[float]]:
    import openai

    direct_client = openai.AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
    endpoint_client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0)
    out: dict[str, list[float]] = {"direct": [], "handle": [], "endpoint": []}
    for i in range(20 + n):
        times = (await _direct_once(direct_client), await _deployed_once(name), await _endpoint_once(endpoint_client, name))
        if i >= 20:
            for key, took in zip(out, times):
                out[key].append(took)
    await direct_client.close()
    await endpoint_client.close()
    return out


def _line(label: str, ours: list[float], base: list[float], goal: str = "") -> str:
    om, bm = statistics.median(ours) * 1e3, statistics.median(base) * 1e3
    o99, b99 = pct(ours, 0.99) * 1e3, pct(base, 0.99) * 1e3
    return (f"  {label}: median +{om - bm:.2f} ms ({om:.2f} vs {bm:.2f} ms, {om / bm:.2f}x){goal}; "
            f"p99 +{o99 - b99:.2f} ms ({o99:.2f} vs {b99:.2f} ms)")


async def _throughput(url: str, name: str, clients: int, total: int) -> tuple[float, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=120)

    async def via_endpoint() -> None:
        await _endpoint_once(client, name)

    async def via_handle() -> None:
        await _deployed_once(name)

    await load(via_endpoint, clients, clients)
    await load(via_handle, clients, clients)
    handle_rate = await load(via_handle, total, clients)
    endpoint_rate = await load(via_endpoint, total, clients)
    await client.close()
    return endpoint_rate, handle_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    with tiny_server() as server:
        up = gateway.start("127.0.0.1", free_port(), "bench")
        deploy.deploy(spec(server, "bench_gw", 1))
        try:
            found = chat.run_on_client_loop(_latency(server, up.url, "bench_gw", args.requests))
        finally:
            deploy.undeploy("bench_gw")
        print(f"latency, {args.requests} short streamed chats each (1 token), interleaved:")
        print(_line("endpoint over the Serve handle", found["endpoint"], found["handle"], " (goal < 3 ms)"))
        print(_line("endpoint over the server called directly", found["endpoint"], found["direct"]))
        print(_line("handle over the server called directly", found["handle"], found["direct"]))

        server.control(short_circuit=True)
        deploy.deploy(spec(server, "bench_gw_load", 4, 16))
        try:
            total = max(args.clients * 10, 500)
            endpoint_rate, handle_rate = chat.run_on_client_loop(_throughput(up.url, "bench_gw_load", args.clients, total))
        finally:
            deploy.undeploy("bench_gw_load")
            server.control(short_circuit=False)
        print(f"throughput, {args.clients} concurrent streaming clients, {total} chats, fast backend, 4 workers x 16:")
        print(f"  through the endpoint {endpoint_rate:.0f} req/s; through handles {handle_rate:.0f} req/s "
              f"-> {endpoint_rate / handle_rate:.2f}x")
        gateway.stop()


if __name__ == "__main__":
    main()
