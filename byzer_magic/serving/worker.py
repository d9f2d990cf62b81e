"""The Ray Serve replica class: hosts one backend, never branches on its kind.

Serve owns routing, queueing (max_ongoing_requests = worker concurrency),
health checks and restarts; this class only adapts a backend to them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, AsyncIterator

from . import metrics
from ..backends.base import Backend, Delta, Embeddings, GenParams, Messages
from ..errors import FieldError
from .metrics import RequestLog
from .request_fields import bad_token, refusal
from ..spec.deploy_spec import DeploySpec

WORKER_NAME = "ByzerWorker"
PRELOAD_ENV = "BYZER_MAGIC_PRELOAD"


def preload() -> None:
    """The workers' process setup hook (raydoor.setup_hook_env): start importing the backend's `preload` modules.

    It runs when the worker's process starts, before Serve creates the replica
    and long before the constructor, which then finds the import done or under
    way (Python's import lock makes it wait for the rest, never import twice).
    Any failure is left for the constructor to report as it always has.
    """
    import importlib
    import threading

    def load() -> None:
        for module in filter(None, os.environ.get(PRELOAD_ENV, "").split(",")):
            with contextlib.suppress(Exception):
                importlib.import_module(module)

    threading.Thread(target=load, name="byzer-magic-preload", daemon=True).start()


STREAMS_PER_TOKEN = 16
"""Up to this many streams a worker sends every piece as it comes; past it, pieces per message grow with the load.

Each message through Serve costs the worker and the caller CPU of their own,
the same for one token as for ten. A batching engine with 64 streams makes 64
pieces a step, and sending each alone made the replica, not the GPU, the
limit. So a stream's first piece always goes at once (time to first token is
untouched), and later ones go in messages of in_flight // 16 pieces: one
each up to 31 streams, 4 at 64, 16 at 256. It counts pieces, never waits on
a clock, and the last piece (finish reason, usage) always flushes.
"""


def hide_gpus_unless_given(gpus: float) -> None:
    """A worker given no GPU sees none, so no CUDA library in it takes memory on a GPU others were given.

    Ray sets CUDA_VISIBLE_DEVICES only for workers that ask for GPUs; one that
    asks for none sees them all. llama.cpp's CUDA build run on the CPU
    (n_gpu_layers=0) then made a context on every GPU of the machine: 1.1 GiB
    on two H200s, measured in benchmarks/gpu.
    """
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _merge(first: Delta | None, second: Delta) -> Delta:
    if first is None:
        return second
    usage = {**(first.usage or {}), **(second.usage or {})} or None
    return Delta(first.text + second.text, second.finish_reason or first.finish_reason, usage,
                 first.token_ids + second.token_ids, first.tool_calls + second.tool_calls)


class Worker:
    """One worker of one deployment."""

    async def __init__(self, spec: DeploySpec):
        started = time.time()
        hide_gpus_unless_given(spec.gpus_per_worker)
        self._backend = self._build_backend(spec)
        self._task = spec.task
        await self._backend.start()
        from ray import serve

        self._log = RequestLog()
        context = serve.get_replica_context()
        self._where = (context.app_name, context.replica_id.unique_id)
        self._init_span = (started, time.time())
        try:
            metrics.publish_context(context.app_name, self._backend.context_length())
        except Exception as exc:  # noqa: BLE001 - /v1/models then shows no context length; chats are unaffected
            logging.getLogger("ray.serve").warning("byzer_magic: could not publish the context length: %s", exc)

    @staticmethod
    def _build_backend(spec: DeploySpec) -> Backend:
        """The backend this worker hosts; a subclass may host another (the streaming benchmark's paced engine)."""
        return spec.backend_class(spec.params, spec.context())

    async def chat(self, messages: Messages | str, gen: GenParams) -> AsyncIterator[Delta]:
        """Stream an answer; Serve calls this with stream=True.

        A list is a conversation; a str is a raw prompt to continue (OpenAI's
        /v1/completions). Text goes out as it comes while the worker is not
        busy, in fewer, larger messages when it is (STREAMS_PER_TOKEN); the
        text-less tail (finish reason, usage) is folded into the last message.
        Every finished answer carries usage, zeros where the backend counted
        none (a provider that reports none), so every front end shows the same.
        """
        gen = self._admit(gen)
        held: Delta | None = None
        pieces, first, usage = 0, True, None
        with self._log.request() as tally:
            if isinstance(messages, str):
                answer = self._backend.generate(messages, gen)
            else:
                answer = self._backend.chat(messages, gen)
            async for delta in answer:
                if delta.text:
                    tally.tokens += len(delta.token_ids) or 1
                    pieces += 1
                usage = {**(usage or {}), **delta.usage} if delta.usage else usage
                held = _merge(held, delta)
                if (held.text or held.tool_calls) and (first or pieces >= self._log.in_flight // STREAMS_PER_TOKEN):
                    yield held
                    held, pieces, first = None, 0, False
            if usage is None:
                held = _merge(held, Delta("", None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}))
            else:
                tally.tokens = usage.get("completion_tokens", tally.tokens)  # the count the endpoint and -o report
            if held is not None:
                yield held

    def _admit(self, gen: GenParams) -> GenParams:
        """Refuse, before the backend sees it, what it cannot honour; then apply the deployment's defaults.

        Fields the backend does not declare (request_fields), a logit_bias on
        a token the model lacks and a max_tokens past the context are each a
        FieldError/SpecError (a 400 at the endpoint), and nothing ran.
        """
        backend = self._backend
        who = f"{self._where[0]!r} ({backend.name})"
        problem = refusal(gen, backend.capabilities, who, backend.context.task)
        problem = problem or bad_token(gen, backend.vocab_size(), who)
        if problem is not None:
            raise problem
        gen = gen.over(backend.settings)
        self._within_context(gen)
        return gen

    def _within_context(self, gen: GenParams) -> None:
        """A max_tokens the model's context cannot hold is refused at once (a 400 at the endpoint)."""
        limit = self._backend.context_length()
        if limit and gen.max_tokens and gen.max_tokens > limit:
            raise FieldError("max_tokens", f"max_tokens {gen.max_tokens} is more than {self._where[0]!r} can hold: "
                                           f"its context is {limit} tokens, prompt included; ask for fewer")

    async def complete(self, messages: Messages | str, gen: GenParams) -> list[Delta]:
        """The whole answer in one reply, for callers that do not stream."""
        return [delta async for delta in self.chat(messages, gen)]

    async def measure(self, conversations: list[Messages]) -> dict[str, Any]:
        """For sessions: this deployment's task, its context, and each conversation's prompt tokens (None: unknown)."""
        if self._task != "chat":
            return {"task": self._task, "context_length": None, "prompt_tokens": []}
        counts = [self._backend.count_tokens(messages) for messages in conversations]
        return {"task": self._task, "context_length": self._backend.context_length(), "prompt_tokens": counts}

    async def embed(self, texts: list[str]) -> Embeddings:
        """One vector per text, from backends that embed; the others refuse (Backend.embed)."""
        with self._log.request():
            return await self._backend.embed([str(text) for text in texts])

    @staticmethod
    def _rss() -> int:
        """This worker's resident memory with its child processes (a vLLM engine's), for sizing a scale-up."""
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return total

    def stats(self) -> dict[str, Any]:
        """The backend's and the request log's figures, with when this worker's constructor ran (wall clock)."""
        started, ready = self._init_span
        return {**self._backend.stats(), **self._log.summary(), "pid": os.getpid(), "init_started_at": started,
                "init_s": ready - started}

    async def check_health(self) -> None:
        """Serve calls this every 2 s; it also hands the card this worker's figures.

        Publishing is best effort: a failed health check makes Serve replace the
        worker, and a hiccup of the key-value store must not cost a loaded model.
        """
        await self._backend.health()
        try:
            metrics.publish(*self._where, {**self._log.summary(), "rss_bytes": self._rss()})
        except Exception as exc:  # noqa: BLE001 - see the docstring
            logging.getLogger("ray.serve").warning("byzer_magic: could not publish worker figures: %s", exc)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config holds the deployment's public description, for listing only."""

    async def __del__(self) -> None:
        if hasattr(self, "_where"):
            metrics.forget(*self._where)
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.shutdown()
