"""A closed-loop load against one deployment, one concurrency level after another: what it sustains.

At each level, that many requests are kept in flight (each one sent as the
last finished) until `--requests` have been answered, through the
deployment's handle (the Python API, as `%byzer_chat` calls it) or through
the running `%byzer_serve` endpoint with the openai client. Figures follow
vLLM's `vllm bench serve`, so the two can be read side by side: time to
first token is to the first piece of text, inter-token latency is the gap
between pieces of text, throughput is over the level's whole duration, and
percentiles are numpy's; one unmeasured request opens each level, as vLLM's
client sends a test prompt before it measures. Output tokens are the backend's own count where it
reports one (usage, token ids), else the pieces of text received. No IPython
here: the magic and the command line both call `run`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import NotDeployedError, SpecError
from ..spec.options import BenchOptions
from .status import State

_WORDS = ("time year people way day man thing woman life child world school state family student group country "
          "problem hand part place case week company system program question work government number night point "
          "home water room mother area money story fact month lot right study book eye job word business issue "
          "side kind head house service friend father power hour game line end member law car city community "
          "name president team minute idea kid body information back parent face others level office door health "
          "person art war history party result change morning reason research girl guy moment air teacher force "
          "education").split()

Send = Callable[[str, "Sample"], Awaitable[None]]


@dataclass
class Sample:
    """One request's timings (perf_counter seconds) and what it produced."""

    started: float
    first: float | None = None
    ended: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    def piece(self, now: float) -> None:
        """A piece of text arrived: the first sets TTFT, each later one an inter-token gap."""
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self._last)
        self._last = now


def prompt_of(index: int, options: BenchOptions) -> str:
    """The prompt of request `index`: --prompt, or --prompt_tokens common words, different in each request."""
    if options.prompt is not None:
        return options.prompt
    words = [_WORDS[(index * 7 + i * (index % 5 + 1)) % len(_WORDS)] for i in range(options.prompt_tokens)]
    return " ".join(words)


def _text_of(exc: BaseException) -> str:
    """An error as the user should read it: the provider's or worker's own message, one line."""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


async def run_level(send: Send, options: BenchOptions, concurrency: int, on_done: Callable[[], None]) -> tuple[list[Sample], float]:
    """`options.requests` requests, `concurrency` at a time; each worker sends its next as its last one ends."""
    samples: list[Sample] = []
    next_index = iter(range(options.requests))

    async def worker() -> None:
        for index in next_index:
            sample = Sample(time.perf_counter())
            try:
                await send(prompt_of(index, options), sample)
            except Exception as exc:  # noqa: BLE001 - a failed request is a figure of the level, not the end of the run
                sample.error = _text_of(exc)
            sample.ended = time.perf_counter()
            samples.append(sample)
            on_done()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def _percentiles(values: list[float]) -> tuple[float, float]:
    import numpy as np

    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(values) * 1e3, [50, 99])
    return float(p50), float(p99)


def summarize(concurrency: int, samples: list[Sample], duration: float, task: str) -> dict[str, Any]:
    """One row of the results: throughput over the level's duration, latency percentiles of the answered requests."""
    ok = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    row: dict[str, Any] = {"concurrency": concurrency, "requests": len(samples), "errors": len(failed),
                           "first_error": failed[0].error if failed else "", "duration_s": duration,
                           "requests_per_s": len(ok) / duration if duration else float("nan")}
    if task == "embed":
        row["texts_per_s"] = row["requests_per_s"]
    else:
        tokens = sum(s.tokens for s in ok)
        row["output_tokens_per_s"] = tokens / duration if duration else float("nan")
        row["mean_output_tokens"] = tokens / len(ok) if ok else float("nan")
        row["ttft_p50_ms"], row["ttft_p99_ms"] = _percentiles([s.first - s.started for s in ok if s.first])
        row["itl_p50_ms"], row["itl_p99_ms"] = _percentiles([gap for s in ok for gap in s.gaps])
    row["e2e_p50_ms"], row["e2e_p99_ms"] = _percentiles([s.ended - s.started for s in ok])
    return row


def _facts(name: str, ray_address: str | None) -> tuple[str, bool]:
    """The deployment's task, and whether its backend takes ignore_eos (answers of a fixed length where it does)."""
    from .. import backends
    from .deploy import require

    details = require(name, ray_address=ray_address).details
    try:
        takes = backends.find(str(details.get("backend") or "")).capabilities.ignore_eos
    except (KeyError, ImportError):
        takes = False
    return str(details.get("task") or "chat"), takes


def run(name: str, options: BenchOptions, *, ray_address: str | None = None, progress: bool = True) -> Any:
    """Bench `name` at each of `options.levels()`; a pandas DataFrame, one row per level.

    Each level shows a progress bar (a widget in a notebook, text on stderr in
    a terminal). An interrupt cancels the requests in flight and raises.
    """
    import pandas as pd

    from .chat import client_loop

    task, ignore_eos = _facts(name, ray_address)
    connection = _via(name, options, task, ray_address)
    connection.ignore_eos = ignore_eos
    rows = []
    for level in options.levels():
        done = [0]
        coro = _level_with(connection, options, level, lambda: done.__setitem__(0, done[0] + 1))
        future = asyncio.run_coroutine_threadsafe(coro, client_loop())
        samples, duration = _wait(future, done, options.requests, f"{name} x{level}", progress)
        rows.append({"deployment": name, "via": options.via, **summarize(level, samples, duration, task)})
    return pd.DataFrame(rows)


async def _level_with(connection: "_Connection", options: BenchOptions, level: int, on_done: Callable[[], None]):
    """One unmeasured request first (connections, handles), as `vllm bench serve` sends a test prompt first."""
    async with connection as send:
        try:
            await send(prompt_of(options.requests, options), Sample(time.perf_counter()))
        except Exception:  # noqa: BLE001 - a failing deployment fails the measured requests too, which report it
            pass
        return await run_level(send, options, level, on_done)


def _wait(future: Any, done: list[int], total: int, label: str, progress: bool) -> Any:
    """Wait for a level on this thread, moving its bar here (widgets want the kernel's thread)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="req", disable=not progress, leave=True)
    try:
        while True:
            try:
                result = future.result(timeout=0.1)
                break
            except concurrent.futures.TimeoutError:
                bar.update(done[0] - bar.n)
        bar.update(done[0] - bar.n)
        return result
    except BaseException:
        future.cancel()
        raise
    finally:
        bar.close()


def _via(name: str, options: BenchOptions, task: str, ray_address: str | None) -> "_Connection":
    if options.via == "handle":
        return _Handle(name, options, task)
    from ..openai import gateway

    found = gateway.endpoint(ray_address=ray_address)
    if found is None or found.state != State.RUNNING:
        raise NotDeployedError("--via endpoint needs the OpenAI endpoint running: start it with %byzer_serve "
                               "(or bench with --via handle)")
    if found.generated_key:
        from ..openai.key_store import endpoint_key

        key = endpoint_key()
    elif options.api_key:
        from ..spec.flags import _expand

        key = _expand(options.api_key, os.environ, "--api_key")
    elif found.auth:
        raise SpecError("--api_key is needed: the running endpoint was started with its own --api_key; give the "
                        "same one (--api_key ${VAR} reads it from the environment)")
    else:
        key = "none"
    host = "127.0.0.1" if found.host in ("0.0.0.0", "::", "") else found.host
    return _Endpoint(f"http://{host}:{found.port}/v1", key, name, options, task)


class _Connection:
    """An async context giving `send(prompt, sample)` for one level, opened and closed on the client loop."""

    ignore_eos = False
    """Asked of backends that take it, so every answer runs to max_tokens; the others are refused it."""

    def __init__(self, name: str, options: BenchOptions, task: str):
        self.name, self.options, self.task = name, options, task

    async def __aenter__(self) -> Send:
        return self.embed if self.task == "embed" else self.chat

    async def __aexit__(self, *exc: Any) -> None:
        return None


class _Handle(_Connection):
    async def chat(self, prompt: str, sample: Sample) -> None:
        from ..backends.base import GenParams
        from .chat import astream

        gen = GenParams(max_tokens=self.options.max_tokens, ignore_eos=self.ignore_eos)
        pieces = ids = reported = 0
        async for delta in astream(self.name, [{"role": "user", "content": prompt}], gen):
            if delta.text:
                sample.piece(time.perf_counter())
                pieces += 1
                ids += len(delta.token_ids)
            reported = (delta.usage or {}).get("completion_tokens") or reported
        sample.tokens = reported or ids or pieces

    async def embed(self, prompt: str, sample: Sample) -> None:
        from .chat import aembed

        await aembed(self.name, [prompt])


class _Endpoint(_Connection):
    def __init__(self, base_url: str, key: str, name: str, options: BenchOptions, task: str):
        super().__init__(name, options, task)
        self._base_url, self._key = base_url, key

    async def __aenter__(self) -> Send:
        import httpx
        from openai import AsyncOpenAI

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._client = AsyncOpenAI(base_url=self._base_url, api_key=self._key, max_retries=0, timeout=600,
                                   http_client=httpx.AsyncClient(limits=limits, timeout=600))
        return await super().__aenter__()

    async def __aexit__(self, *exc: Any) -> None:
        await self._client.close()

    async def chat(self, prompt: str, sample: Sample) -> None:
        stream = await self._client.chat.completions.create(
            model=self.name, messages=[{"role": "user", "content": prompt}], max_tokens=self.options.max_tokens,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True} if self.ignore_eos else None)
        pieces = reported = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sample.piece(time.perf_counter())
                pieces += 1
            if chunk.usage is not None:
                reported = chunk.usage.completion_tokens or reported
        sample.tokens = reported or pieces

    async def embed(self, prompt: str, sample: Sample) -> None:
        await self._client.embeddings.create(model=self.name, input=[prompt])
