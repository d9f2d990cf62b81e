"""A stand-in for a batching engine that costs no compute: every `step_s` it emits
one token to every running request, as vLLM's engine does one decode step.

It lets the streaming path (worker -> Serve -> caller) be measured on a CPU
machine with the shape of a GPU's load: 64 streams and a 21 ms step are the
zephyr-7B figures of the H100 (3,050 tokens/s). Like vLLM's output collector,
a request whose consumer lags gets the tokens it missed merged into one piece.
`cpu_per_token_s` burns CPU per token in the worker, like vLLM's detokenizer.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import AsyncIterator

from byzer_magic.backends.base import Backend, BackendSettings, Context, Delta, GenParams, Messages


class _Request:
    def __init__(self, tokens: int):
        self.left = tokens
        self.pending: list[int] = []
        self.ready = asyncio.Event()


class PacedEngine:
    """One decode step for every running request each `step_s`."""

    def __init__(self, step_s: float = 0.021, cpu_per_token_s: float = 0.0):
        self.step_s = step_s
        self.cpu_per_token_s = cpu_per_token_s
        self._running: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._stepper: asyncio.Task | None = None

    async def _run(self) -> None:
        next_step = time.perf_counter()
        while self._running:
            next_step += self.step_s
            for request in list(self._running.values()):
                if request.left <= 0:
                    continue
                request.pending.append(request.left % 1000)
                request.left -= 1
                request.ready.set()
            await asyncio.sleep(max(0.0, next_step - time.perf_counter()))
        self._stepper = None

    async def generate(self, tokens: int) -> AsyncIterator[tuple[list[int], bool]]:
        request = _Request(tokens)
        key = next(self._ids)
        self._running[key] = request
        if self._stepper is None:
            self._stepper = asyncio.get_running_loop().create_task(self._run())
        try:
            while True:
                await request.ready.wait()
                request.ready.clear()
                ids, request.pending = request.pending, []
                if self.cpu_per_token_s:
                    end = time.perf_counter() + self.cpu_per_token_s * len(ids)
                    while time.perf_counter() < end:
                        pass
                done = request.left <= 0
                if done:
                    self._running.pop(key, None)
                yield ids, done
                if done:
                    return
        finally:
            self._running.pop(key, None)


class PacedBackend(Backend):
    """The byzer_magic backend contract over a PacedEngine; built by the benchmark's worker, not by name."""

    name = "paced"
    Settings = BackendSettings
    library = "byzer_magic"
    model_path_help = None

    def __init__(self, step_s: float = 0.021, cpu_per_token_s: float = 0.0):
        super().__init__(BackendSettings(), Context("bench_stream"))
        self.engine = PacedEngine(step_s, cpu_per_token_s)

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        return self.generate(str(messages[-1]["content"]), gen)

    async def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        made = 0
        async for ids, done in self.engine.generate(gen.max_tokens or 16):
            made += len(ids)
            text = " ".join(f"t{i}" for i in ids)
            usage = {"prompt_tokens": 1, "completion_tokens": made, "total_tokens": made + 1} if done else None
            yield Delta(text, "length" if done else None, usage, tuple(ids))
