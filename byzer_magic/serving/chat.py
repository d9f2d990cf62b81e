"""Talk to a deployment through its Serve handle, from sync or async code.

Every handle call runs on one long-lived event loop in a background thread.
A notebook's own loop is already running while a cell executes, which makes
Serve's sync `.result()` refuse, and Serve's router binds to the first loop
that uses it; one private loop satisfies both. Async callers already on that
loop (`run_on_client_loop`) skip the thread hop entirely.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import queue
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TextIO, TypeVar

from . import metrics
from ..backends.base import Delta, Embeddings, GenParams, Messages, whole_tool_calls
from .cluster import connect
from ..errors import BackendError, ByzerError, NotDeployedError
from .raydoor import over_ray_client
from .worker import WORKER_NAME

T = TypeVar("T")
_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()
_handles: dict[str, Any] = {}
_stream_handles: dict[str, Any] = {}
_outstanding: collections.Counter[str] = collections.Counter()
_publishers: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
"""One publisher per loop while that loop has requests outstanding; each removes itself when it ends."""
_CALLER = f"{socket.gethostname()}-{os.getpid()}"


def client_loop() -> asyncio.AbstractEventLoop:
    """The process-wide loop every Serve handle call runs on (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="byzer-magic-client", daemon=True).start()
        return _loop


def run_on_client_loop(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run a coroutine on the client loop from any thread and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coro, client_loop())
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


def _streaming(name: str) -> Any:
    """The handle that streams `chat`, made once per deployment: each `.options()` builds a new handle."""
    handle = _stream_handles.get(name)
    if handle is None:
        handle = _stream_handles[name] = _handle(name).options(stream=True, method_name="chat")
    return handle


def _handle(name: str) -> Any:
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    handle = _handles.get(name)
    if handle is None:
        if not ray.is_initialized():
            connect(embedded_ok=False)
        try:
            handle = serve.get_app_handle(name)
        except RayServeException:
            handle = None
        if handle is None or handle.deployment_name != WORKER_NAME:
            raise NotDeployedError(f"no deployment named {name!r}: deploy it with %%byzer_deploy, see %byzer_list")
        _handles[name] = handle
    return handle


def forget(name: str) -> None:
    """Drop a cached handle, e.g. after its deployment was removed."""
    _handles.pop(name, None)
    _stream_handles.pop(name, None)


def _unwrap(name: str, exc: BaseException) -> BaseException:
    """Turn what Ray raises into the readable error the worker meant."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return BackendError("queue", 503, f"{name!r} has a full queue (its --max_queued_requests); try again shortly")
    if isinstance(exc, DeploymentUnavailableError):
        forget(name)
        return NotDeployedError(f"{name!r} is no longer deployed (it was removed, perhaps from another kernel)")

    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    if isinstance(cause, ByzerError):
        return cause
    if isinstance(exc, RayActorError):
        return BackendError("worker", None, f"the worker died while answering: {getattr(exc, 'error_msg', exc)}")
    if isinstance(exc, RayTaskError):
        return BackendError("worker", None, str(cause or exc).strip().splitlines()[-1])
    return exc


def _ray_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    return (RayError, RayServeException)


async def _publish_outstanding() -> None:
    """Every second, this process's outstanding requests per deployment, for the cards' "queued".

    It ends once nothing is outstanding and the zeros are published, so an idle
    process keeps no task (and a finished loop is not held); the next request starts another.
    """
    sent: dict[str, int] = {}
    while True:
        await asyncio.sleep(1.0)
        now = dict(_outstanding)
        due = {name: now.get(name, 0) for name in {*now, *sent}}
        if due:
            try:
                await asyncio.to_thread(metrics.publish_outstanding, _CALLER, due)
            except Exception as exc:  # noqa: BLE001 - figures are best effort; chats must go on
                logging.getLogger(__name__).debug("could not publish outstanding requests: %s", exc)
        sent = now
        if not any(_outstanding.values()) and not any(sent.values()):
            return


def _ensure_publisher(loop: asyncio.AbstractEventLoop) -> None:
    """Start this loop's publisher unless one runs; it drops out of `_publishers` when it ends."""
    task = _publishers.get(loop)
    if task is not None and not task.done():
        return
    task = loop.create_task(_publish_outstanding())
    _publishers[loop] = task
    task.add_done_callback(lambda done: _publishers.pop(loop, None) if _publishers.get(loop) is done else None)


@contextlib.contextmanager
def _counted(name: str):
    """Count a request as outstanding while it is queued or answered."""
    _ensure_publisher(asyncio.get_running_loop())
    _outstanding[name] += 1
    try:
        yield
    finally:
        _outstanding[name] -= 1
        if not _outstanding[name]:
            del _outstanding[name]  # names asked for once (unknown ones too) must not stay for good


async def astream(name: str, messages: Messages | str, gen: GenParams | None = None) -> AsyncIterator[Delta]:
    """Stream deltas; must run on the client loop (see `run_on_client_loop`) or a replica's.

    `messages` is a conversation, or a str: a raw prompt to continue.
    """
    if over_ray_client():
        # Serve refuses streaming handles over Ray Client: the answer comes whole, then is handed on.
        for delta in await acomplete(name, messages, gen):
            yield delta
        return
    handle = _streaming(name)
    with _counted(name):
        response = handle.remote(messages, gen or GenParams())
        finished = False
        try:
            async for delta in response:
                yield delta
            finished = True
        except _ray_errors() as exc:
            finished = True
            raise _unwrap(name, exc) from None
        finally:
            if not finished:
                # A caller that left (a closed stream, a cancelled task) cancels the request, queued or running.
                response.cancel()


async def acomplete(name: str, messages: Messages | str, gen: GenParams | None = None) -> list[Delta]:
    """The whole answer as deltas, in one round trip; must run on the client loop."""
    with _counted(name):
        response = _handle(name).complete.remote(messages, gen or GenParams())
        try:
            return await response
        except _ray_errors() as exc:
            raise _unwrap(name, exc) from None
        except asyncio.CancelledError:
            response.cancel()
            raise


async def aembed(name: str, texts: list[str]) -> Embeddings:
    """Vectors for texts from an embedding deployment; must run on the client loop."""
    with _counted(name):
        try:
            return await _handle(name).embed.remote(list(texts))
        except _ray_errors() as exc:
            raise _unwrap(name, exc) from None


async def ameasure(name: str, conversations: list[Messages]) -> dict[str, Any]:
    """The deployment's task, context length and each conversation's prompt tokens (`Worker.measure`)."""
    try:
        return await _handle(name).measure.remote(conversations)
    except _ray_errors() as exc:
        raise _unwrap(name, exc) from None


def embed(name: str, texts: str | list[str]) -> list[list[float]]:
    """One vector per text (a str is one text), from a deployment of an embedding model type."""
    batch = [texts] if isinstance(texts, str) else list(texts)
    if not batch:
        return []
    return run_on_client_loop(aembed(name, batch)).vectors


@dataclass
class ChatResult:
    """A finished answer; prints as its text."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """Whole tool calls ({id, type, function: {name, arguments}}) where the model called tools."""

    def __str__(self) -> str:
        return self.text

    @classmethod
    def of(cls, deltas: list[Delta]) -> "ChatResult":
        result = cls("".join(d.text for d in deltas))
        for d in deltas:
            result.finish_reason = d.finish_reason or result.finish_reason
            result.usage.update(d.usage or {})
        result.tool_calls = whole_tool_calls(deltas)
        return result


def messages_for(prompt: str | Messages, system: str | None = None) -> Messages:
    """A prompt string becomes one user message, after an optional system one."""
    if isinstance(prompt, str):
        messages: Messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def stream(name: str, messages: Messages, gen: GenParams | None = None, *,
           on_slow_start: Callable[[], None] | None = None) -> Iterator[Delta]:
    """Sync streaming: deltas arrive as the worker produces them.

    Stopping early (break, KeyboardInterrupt) cancels the request, which the
    worker passes on to its backend. `on_slow_start` is called once if the
    first delta takes longer than SLOW_START_S (a worker may be starting).
    """
    out: queue.SimpleQueue = queue.SimpleQueue()  # C-level: it wakes the waiting thread sooner than queue.Queue
    done = object()

    async def pump() -> None:
        try:
            async for delta in astream(name, messages, gen):
                out.put(delta)
            out.put(done)
        except BaseException as exc:
            out.put(exc)
            raise

    task: concurrent.futures.Future = asyncio.run_coroutine_threadsafe(pump(), client_loop())
    try:
        waiting = on_slow_start
        while True:
            try:
                item = out.get(timeout=SLOW_START_S) if waiting else out.get()
            except queue.Empty:
                waiting()  # type: ignore[misc]
                item = out.get()
            waiting = None
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()


def chat(name: str, prompt: str | Messages, gen: GenParams | None = None, *, system: str | None = None) -> ChatResult:
    """Ask and wait for the whole answer."""
    messages = messages_for(prompt, system)
    return ChatResult.of(run_on_client_loop(acomplete(name, messages, gen)))


def echo(name: str, messages: Messages, gen: GenParams | None = None, out: TextIO | None = None) -> ChatResult:
    """Stream an answer onto `out` (stdout) as it comes, then a newline; the whole answer is returned.

    The one print-as-it-streams loop of the cell magic and the command line.
    """
    out = out or sys.stdout
    deltas = []
    for delta in stream(name, messages, gen, on_slow_start=lambda: _say_if_waking(name, out)):
        deltas.append(delta)
        out.write(delta.text)
        out.flush()
    out.write("\n")
    return ChatResult.of(deltas)


SLOW_START_S = 1.0


def _say_if_waking(name: str, out: TextIO) -> None:
    """A deployment autoscaled to zero answers once a worker starts: say so instead of looking hung."""
    from .deploy import status

    try:
        now = status(name)
    except ByzerError:
        return
    if now.max_workers is not None and now.workers_ready == 0:
        out.write(f"(waking a worker of {name!r}: autoscaling had stopped them all while it was idle; "
                  f"the answer follows once it is up)\n")
        out.flush()
