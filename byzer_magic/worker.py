"""The Ray Serve replica class: hosts one backend, never branches on its kind.

Serve owns routing, queueing (max_ongoing_requests = worker concurrency),
health checks and restarts; this class only adapts a backend to them.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

from .backends.base import Delta, GenParams, Messages
from .spec import DeploySpec

WORKER_NAME = "ByzerWorker"


def _merge(first: Delta | None, second: Delta) -> Delta:
    if first is None:
        return second
    usage = {**(first.usage or {}), **(second.usage or {})} or None
    return Delta("", second.finish_reason or first.finish_reason, usage)


class Worker:
    """One worker of one deployment."""

    async def __init__(self, spec: DeploySpec):
        self._spec = spec
        self._backend = spec.info.load().Backend(
            spec.params,
            provider=spec.provider,
            base_url=spec.base_url,
            model_path=spec.model_path,
            gpus=int(spec.gpus_per_worker),
        )
        await self._backend.start()
        self._in_flight = 0
        self._peak = 0

    async def chat(self, messages: Messages | str, gen: GenParams) -> AsyncIterator[Delta]:
        """Stream an answer; Serve calls this with stream=True.

        A list is a conversation; a str is a raw prompt to continue (OpenAI's
        /v1/completions). Text goes out as it comes; the text-less tail
        (finish reason, usage) is folded into one last message, since each
        message costs a hop.
        """
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        tail: Delta | None = None
        try:
            if isinstance(messages, str):
                answer = self._backend.generate(messages, gen)
            else:
                answer = self._backend.chat(messages, gen)
            async for delta in answer:
                if delta.text:
                    if tail is not None:
                        yield tail
                        tail = None
                    yield delta
                else:
                    tail = _merge(tail, delta)
            if tail is not None:
                yield tail
        finally:
            self._in_flight -= 1

    async def complete(self, messages: Messages | str, gen: GenParams) -> list[Delta]:
        """The whole answer in one reply, for callers that do not stream."""
        return [delta async for delta in self.chat(messages, gen)]

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self._in_flight, "peak_in_flight": self._peak, **self._backend.stats()}

    async def check_health(self) -> None:
        await self._backend.health()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config holds the deployment's public description, for listing only."""

    async def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.shutdown()
