"""What the streaming path costs a batching engine, measured on a CPU machine.

    python benchmarks/bench_stream.py [--streams 1,16,64,256] [--tokens 128] [--step_ms 21] [--cpu_us 0]

A paced engine (benchmarks/paced_engine.py: one token to every running request
each step, no compute) stands in for vLLM on a GPU. In one run it is measured
alone in this process (the limit), then hosted by a real byzer_magic worker on
the running Ray cluster and read through the deployment's handle, as the
magics read it. Printed per level: output tokens/s and time to first token
p50, and the deployment's tokens/s as a ratio to the engine alone, plus how
many messages crossed Serve per token. Needs a running cluster (`ray start --head`).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from byzer_magic.serving import chat

from byzer_magic.serving import deploy  # noqa: E402
from byzer_magic.backends.base import GenParams  # noqa: E402
from byzer_magic.serving.cluster import connect  # noqa: E402
from byzer_magic.spec.deploy_spec import parse_spec  # noqa: E402
from byzer_magic.serving.worker import WORKER_NAME, Worker  # noqa: E402
from paced_engine import PacedBackend  # noqa: E402

NAME = "bench_stream"


class PacedWorker(Worker):
    """A real worker hosting the paced engine instead of a model."""

    step_s = 0.021
    cpu_per_token_s = 0.0

    def _build_backend(self, spec: Any) -> PacedBackend:  # type: ignore[override]
        return PacedBackend(self.step_s, self.cpu_per_token_s)


async def _level(streams: int, tokens: int, one: Callable[[int], AsyncIterator[Any]]) -> dict[str, float]:
    async def run(i: int) -> tuple[int, float, int]:
        start, first, made, messages = time.perf_counter(), 0.0, 0, 0
        async for ids in one(i):
            if not first and ids:
                first = time.perf_counter() - start
            made += len(ids)
            messages += 1
        return made, first, messages

    started = time.perf_counter()
    results = await asyncio.gather(*(run(i) for i in range(streams)))
    took = time.perf_counter() - started
    made = sum(r[0] for r in results)
    assert made == streams * tokens, f"{made} tokens, expected {streams * tokens}"
    return {
        "tok_s": made / took,
        "ttft_ms": statistics.median(r[1] for r in results) * 1e3,
        "msgs_per_token": sum(r[2] for r in results) / made,
    }


async def _best(streams: int, tokens: int, one: Callable[[int], AsyncIterator[Any]], rounds: int) -> dict[str, float]:
    await _level(streams, tokens, one)
    runs = [await _level(streams, tokens, one) for _ in range(rounds)]
    return max(runs, key=lambda r: r["tok_s"])


def alone(levels: list[int], tokens: int, rounds: int) -> dict[int, dict[str, float]]:
    backend = PacedBackend(PacedWorker.step_s, PacedWorker.cpu_per_token_s)
    gen = GenParams(max_tokens=tokens)

    async def one(i: int) -> AsyncIterator[tuple[int, ...]]:
        async for delta in backend.generate(str(i), gen):
            yield delta.token_ids

    async def main() -> dict[int, dict[str, float]]:
        return {n: await _best(n, tokens, one, rounds) for n in levels}

    return asyncio.run(main())


def through_handle(levels: list[int], tokens: int, rounds: int) -> dict[int, dict[str, float]]:
    from ray import serve

    spec = parse_spec(f"--pretrained_model_type saas/openai --infer_params saas.api_key=x saas.model=m "
                      f"--worker_concurrency 1024 --cpus_per_worker 1 --model {NAME} --force")
    connect()
    if deploy.status(NAME).state != "stopped":
        serve.delete(NAME)
    app = serve.deployment(PacedWorker, name=WORKER_NAME).options(**deploy.worker_options(spec)).bind(spec)
    serve.run(app, name=NAME, route_prefix=None, blocking=False)
    deploy._wait(NAME, 1, time.monotonic() + 120, None, "--deploy_timeout")
    gen = GenParams(max_tokens=tokens)

    async def one(i: int) -> AsyncIterator[tuple[int, ...]]:
        async for delta in chat.astream(NAME, [{"role": "user", "content": str(i)}], gen):
            yield delta.token_ids

    async def main() -> dict[int, dict[str, float]]:
        return {n: await _best(n, tokens, one, rounds) for n in levels}

    try:
        return chat.run_on_client_loop(main(), timeout=1200)
    finally:
        serve.delete(NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,16,64,256")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--step_ms", type=float, default=21.0)
    parser.add_argument("--cpu_us", type=float, default=0.0, help="CPU burnt per token in the worker")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    PacedWorker.step_s, PacedWorker.cpu_per_token_s = args.step_ms / 1e3, args.cpu_us / 1e6
    base = alone(levels, args.tokens, args.rounds)
    dep = through_handle(levels, args.tokens, args.rounds)
    print(f"paced engine: step {args.step_ms:g} ms, {args.tokens} tokens a stream, {args.cpu_us:g} us CPU per token")
    print(f"{'streams':>7} {'alone tok/s':>12} {'handle tok/s':>13} {'ratio':>6} {'ttft alone':>11} {'ttft handle':>12} {'msgs/token':>10}")
    for n in levels:
        a, d = base[n], dep[n]
        print(f"{n:>7} {a['tok_s']:>12.0f} {d['tok_s']:>13.0f} {d['tok_s'] / a['tok_s']:>6.2f} "
              f"{a['ttft_ms']:>9.1f}ms {d['ttft_ms']:>10.1f}ms {d['msgs_per_token']:>10.2f}")


if __name__ == "__main__":
    main()
