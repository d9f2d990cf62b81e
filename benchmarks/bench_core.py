"""Deploy time, added chat latency and worker scaling, each against a baseline of the same run.

    python benchmarks/bench_core.py [--requests 200] [--delay 0.1]

1. deploy -> ready for a 2-worker SaaS deployment on a running cluster,
   beside the time Ray takes to start one bare actor and answer a ping;
2. latency a chat through the deployment adds over calling the same
   llama.cpp server directly with the openai client (median, p99), both
   streamed, from async code on the client loop and from sync code;
3. throughput of 1, 2 and 4 SaaS workers against a server that takes a
   fixed time per request, as a ratio to one worker, and the most requests
   the server ever saw at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzer_magic import chat, deploy  # noqa: E402
from byzer_magic.backends.base import GenParams  # noqa: E402
from byzer_magic.cluster import connect  # noqa: E402
from byzer_magic.spec import parse_spec  # noqa: E402
from byzer_magic.tinymodel import build  # noqa: E402
from tests.conftest import start_openai_server  # noqa: E402

SHORT = GenParams(temperature=0, max_tokens=1)
MESSAGES = [{"role": "user", "content": "hi"}]


def spec(server, name: str, workers: int, concurrency: int = 1):
    return parse_spec(
        f"--pretrained_model_type saas/openai --infer_params saas.api_key=bench saas.model=tiny "
        f"saas.base_url={server.base_url} --num_workers {workers} --worker_concurrency {concurrency} --model {name}"
    )


@contextlib.contextmanager
def tiny_server() -> Iterator:
    """llama.cpp's server on 127.0.0.1 with the tiny model, and this process on the running cluster."""
    server = start_openai_server(build(ROOT / ".cache" / "tinymodel").gguf)
    try:
        connect()
        yield server
    finally:
        server.proc.terminate()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bare_actor_seconds() -> float:
    import ray

    @ray.remote(num_cpus=0.001)
    class Ping:
        def ping(self) -> int:
            return 1

    start = time.perf_counter()
    actor = Ping.remote()
    ray.get(actor.ping.remote())
    took = time.perf_counter() - start
    ray.kill(actor)
    return took


def bench_deploy(server, rounds: int = 3) -> None:
    times, first_answer, bare = [], [], []
    for i in range(rounds):
        bare.append(bare_actor_seconds())
        start = time.perf_counter()
        deploy.deploy(spec(server, f"bench_deploy{i}", 2))
        times.append(time.perf_counter() - start)
        chat.chat(f"bench_deploy{i}", "hi", SHORT)
        first_answer.append(time.perf_counter() - start)
        deploy.undeploy(f"bench_deploy{i}")
    d, f, b = statistics.median(times), statistics.median(first_answer), statistics.median(bare)
    print(f"deploy -> ready (2 SaaS workers), median of {rounds}: {d:.2f} s; to first answer {f:.2f} s")
    print(f"  baseline, one bare Ray actor created and pinged: {b:.2f} s; ratio {d / b:.1f}x")


async def _direct_once(client) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, stream=True,
                                                  temperature=0, max_tokens=1)
    async for _ in stream:
        pass
    return time.perf_counter() - start


async def _deployed_once(name: str) -> float:
    start = time.perf_counter()
    async for _ in chat.astream(name, MESSAGES, SHORT):
        pass
    return time.perf_counter() - start


async def _whole_once(name: str) -> float:
    start = time.perf_counter()
    await chat.acomplete(name, MESSAGES, SHORT)
    return time.perf_counter() - start


async def _latency_rounds(server, name: str, n: int) -> tuple[list[float], list[float], list[float]]:
    """Direct, streamed-through and whole-through calls, interleaved so noise hits all three."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="bench", max_retries=0)
    direct, streamed, whole = [], [], []
    for _ in range(20):
        await _direct_once(client)
        await _deployed_once(name)
        await _whole_once(name)
    for _ in range(n):
        direct.append(await _direct_once(client))
        streamed.append(await _deployed_once(name))
        whole.append(await _whole_once(name))
    await client.close()
    return direct, streamed, whole


def _sync_deployed(name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        for _ in chat.stream(name, MESSAGES, SHORT):
            pass
        out.append(time.perf_counter() - start)
    return out


def report(label: str, base: list[float], ours: list[float]) -> None:
    bm, om = statistics.median(base) * 1e3, statistics.median(ours) * 1e3
    b99, o99 = pct(base, 0.99) * 1e3, pct(ours, 0.99) * 1e3
    print(f"  {label}: median {om:.2f} ms vs direct {bm:.2f} ms -> +{om - bm:.2f} ms ({om / bm:.2f}x); "
          f"p99 {o99:.2f} vs {b99:.2f} ms -> +{o99 - b99:.2f} ms")


def bench_latency(server, n: int) -> None:
    server.control(delay=0, short_circuit=False)
    deploy.deploy(spec(server, "bench_latency", 1))
    try:
        direct, streamed, whole = chat.run_on_client_loop(_latency_rounds(server, "bench_latency", n))
        print(f"latency added by a deployment, {n} short chats each (1 token), interleaved; direct = openai client streaming:")
        report("async streamed, on the client loop", direct, streamed)
        report("async whole answer (acomplete), on the client loop", direct, whole)
        sync = _sync_deployed("bench_latency", n)
        report("sync (magic / script path)", direct, sync)
    finally:
        deploy.undeploy("bench_latency")


async def load(call: Callable[[], Awaitable], total: int, clients: int) -> float:
    """Requests per second when `clients` callers share `total` calls of `call`."""
    left = [total]

    async def one_client() -> None:
        while left[0] > 0:
            left[0] -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return total / (time.perf_counter() - start)


def bench_throughput(server, delay: float) -> None:
    server.control(delay=delay, short_circuit=True)
    results = {}
    for workers in (1, 2, 4):
        name = f"bench_tp{workers}"
        deploy.deploy(spec(server, name, workers))
        try:
            call = functools.partial(chat.acomplete, name, MESSAGES, SHORT)
            chat.run_on_client_loop(load(call, 2 * workers, 2 * workers))
            server.control(reset=True)
            rate = chat.run_on_client_loop(load(call, int(20 * workers), 3 * workers))
            results[workers] = (rate, server.stats()["max_in_flight"])
        finally:
            deploy.undeploy(name)
    one = results[1][0]
    print(f"throughput, server taking {delay * 1e3:.0f} ms per request, 3 clients per worker:")
    for workers, (rate, peak) in results.items():
        print(f"  {workers} workers: {rate:.2f} req/s = {rate / one:.2f}x one worker "
              f"(goal >= {0.9 * workers:.1f}x); most at once on the server: {peak} (limit {workers})")
    server.control(delay=0, short_circuit=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1)
    args = parser.parse_args()
    with tiny_server() as server:
        bench_deploy(server)
        bench_latency(server, args.requests)
        bench_throughput(server, args.delay)


if __name__ == "__main__":
    main()
