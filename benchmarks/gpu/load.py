"""One closed-loop load, the same for every path the GPU benchmark compares.

A level runs `concurrency` streams until `requests` answers are done; each
answer is `tokens` new tokens after a prompt of about `prompt_tokens`. A path
is an async function that streams one answer and calls `tick(n)` when n
tokens arrive, so every path is timed by the same code.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any, Awaitable, Callable

Tick = Callable[[int], None]
Path = Callable[[int, Tick], Awaitable[None]]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def level(path: Path, concurrency: int, requests: int) -> dict[str, float]:
    """Tokens/s, time to first token p50/p99 and inter-token latency p50 of one level."""
    ttfts: list[float] = []
    itls: list[float] = []
    made = 0
    todo = iter(range(requests))

    async def one(i: int) -> None:
        nonlocal made
        start = time.perf_counter()
        arrivals: list[tuple[float, int]] = []
        await path(i, lambda n: arrivals.append((time.perf_counter(), n)) if n else None)
        if not arrivals:
            raise RuntimeError(f"request {i} got no tokens")
        count = sum(n for _, n in arrivals)
        made += count
        ttfts.append(arrivals[0][0] - start)
        if count > 1:
            itls.append((arrivals[-1][0] - arrivals[0][0]) / (count - arrivals[0][1]))

    async def stream() -> None:
        for i in todo:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    took = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "tok_s": made / took,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttfts, 0.99) * 1e3,
        "itl_p50_ms": statistics.median(itls) * 1e3 if itls else float("nan"),
    }


async def levels(path: Path, concurrencies: list[int], warm: int = 4) -> list[dict[str, float]]:
    """Every level after a short warm-up; requests per level = max(8, 2 x concurrency)."""
    await level(path, min(warm, max(concurrencies)), warm)
    return [await level(path, c, max(8, 2 * c)) for c in concurrencies]


def http_path(base_url: str, model: str, prompt_of: Callable[[int], str], tokens: int,
              api_key: str | None = None) -> tuple[Path, Callable[[], Awaitable[None]]]:
    """A streamed /v1/chat/completions path over aiohttp, and a function that closes its session.

    Tokens are counted from each content chunk (one token a chunk for vLLM's
    server and the endpoint when the engine sends one at a time) and checked
    against the usage the final chunk reports.
    """
    import aiohttp

    session: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def path(i: int, tick: Tick) -> None:
        if "s" not in session:
            session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=600))
        body = {"model": model, "messages": [{"role": "user", "content": prompt_of(i)}], "stream": True,
                "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        seen = 0
        async with session["s"].post(f"{base_url}/chat/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    seen += 1
                    tick(1)
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens", seen) > seen:
                    tick(usage["completion_tokens"] - seen)

    async def close() -> None:
        if "s" in session:
            await session["s"].close()

    return path, close
