"""The OpenAI HTTP API over every deployment: request models, routes, auth, errors, metrics.

Requests are read into small pydantic models of the fields a chat uses;
unknown fields are ignored, as vLLM's and llama.cpp's servers do, so clients
that send more (LangChain, IDE plugins) still work. Answers are the openai
package's own response types, so what goes out is what its client parses.
Deployments are reached only through `Deployments`, so no Ray code lives here.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, ClassVar, Literal, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, CreateEmbeddingResponse, Embedding, Model
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..backends.base import Delta, Embeddings, GenParams, Messages, joined_tool_pieces, whole_tool_calls
from ..errors import BackendError, ByzerError, FieldError, NotDeployedError, WrongTaskError
from .tools import ToolChecks
from ..spec.options import Sampling


class Deployments(Protocol):
    """What the API needs from the cluster; the gateway implements it with Serve handles."""

    async def models(self) -> list[dict[str, Any]]:
        """One dict per deployment: name, backend, model, deployed_at."""
        ...

    def stream(self, name: str, request: Messages | str, gen: GenParams) -> AsyncIterator[Delta]: ...

    async def complete(self, name: str, request: Messages | str, gen: GenParams) -> list[Delta]: ...

    async def embed(self, name: str, texts: list[str]) -> Embeddings: ...


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        text = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Generation(Sampling, _Lenient):
    """The fields both text routes take; request_fields decides, per backend, those beyond sampling."""

    model: str = Field(min_length=1, max_length=64, description="a deployment's name, as %byzer_list shows it")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens regardless of EOS")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) to a bias from -100 to 100")
    n: int | None = Field(None, ge=1, description="choices to generate; every deployment gives one")
    logprobs: bool | int | None = None
    top_logprobs: int | None = Field(None, ge=0)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def gen(self) -> GenParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenParams(self.temperature, self._max_tokens(), self.top_p, self.seed, tuple(stop), self.ignore_eos,
                         presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                         logit_bias=self._logit_bias(), provider_fields=self._provider_fields(), **self._chat_fields())

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's {"token id": bias}, with ids as numbers; anything else is a 400 naming logit_bias."""
        if not self.logit_bias:
            return None
        try:
            bias = {int(token): float(value) for token, value in self.logit_bias.items()}
        except ValueError:
            raise ApiError(400, "logit_bias: keys are token ids (whole numbers as strings)",
                           "invalid_request_error", "logit_bias") from None
        if any(not -100 <= value <= 100 for value in bias.values()):
            raise ApiError(400, "logit_bias: biases are from -100 to 100", "invalid_request_error", "logit_bias")
        return bias

    def _provider_fields(self) -> dict[str, Any]:
        """The fields sent beyond sampling, as sent, for request_fields to honour, forward or refuse."""
        return {name: getattr(self, name) for name in self._OTHER if name in self.model_fields_set}

    _OTHER: ClassVar[tuple[str, ...]] = (
        "n", "logprobs", "top_logprobs", "user", "metadata", "store", "service_tier", "best_of", "echo", "suffix",
        "prediction", "reasoning_effort", "modalities", "audio", "web_search_options", "functions", "function_call",
    )

    def _chat_fields(self) -> dict[str, Any]:
        """GenParams fields only chat requests carry (tools, response_format)."""
        return {}

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(ToolChecks, _Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Sampling.model_fields["max_tokens"]

    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def _chat_fields(self) -> dict[str, Any]:
        return {"response_format": self.response_format, "tools": self.tools, "tool_choice": self.tool_choice,
                "parallel_tool_calls": self.parallel_tool_calls}


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(description="one prompt; a list must hold exactly one")
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    suffix: str | None = None


class EmbeddingRequest(_Lenient):
    model: str = Field(min_length=1, max_length=64)
    input: str | list[str] = Field(description="a text, or a list of at most 2048 texts")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    dimensions: int | None = Field(None, ge=1)
    tools: Any = None

    def refusal(self) -> ApiError | None:
        """Fields an embedding deployment cannot honour: a shortened vector, tools (clients that send chat fields)."""
        if self.dimensions is not None:
            return ApiError(400, f"dimensions: {self.model!r} returns its model's whole vectors; leave dimensions out",
                            "invalid_request_error", "dimensions")
        if self.tools is not None:
            return ApiError(400, f"tools: embeddings take no tools; leave tools out", "invalid_request_error", "tools")
        return None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error envelope, declared so the published schema lists every status."""

    error: ErrorDetail


_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody, "description": "missing or wrong API key"}}
_MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    **_AUTH_ERRORS,
    400: {"model": ErrorBody, "description": "a field is missing or invalid; param names it"},
    404: {"model": ErrorBody, "description": "no deployment by that name; the message lists those deployed"},
    429: {"model": ErrorBody, "description": "the provider is rate limiting"},
    502: {"model": ErrorBody, "description": "the backend failed; the message is its own"},
    503: {"model": ErrorBody, "description": "the provider is overloaded"},
}


class ApiError(Exception):
    """An answer in OpenAI's error format: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _api_error(exc: BaseException) -> ApiError:
    """The HTTP status a client can act on: 404 names what exists, 429/503 say retry later."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NotDeployedError):
        return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, FieldError):
        return ApiError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, WrongTaskError):
        return ApiError(400, str(exc), "invalid_request_error", "model", "wrong_model_task")
    if isinstance(exc, BackendError):
        if exc.status_code == 429:
            return ApiError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded")
        if exc.status_code == 503:
            return ApiError(503, str(exc), "overloaded_error", code="overloaded")
        return ApiError(502, str(exc), "api_error", code="backend_error")
    if isinstance(exc, ByzerError):
        return ApiError(400, str(exc), "invalid_request_error")
    return ApiError(500, f"internal error ({type(exc).__name__}); the gateway's log has the details", "api_error")


_CHAT_FINISH = {"stop", "length", "tool_calls", "content_filter", "function_call"}
_TEXT_FINISH = {"stop", "length", "content_filter"}


def _usage(deltas: list[Delta]) -> CompletionUsage:
    """The backend's token counts; zeros where it reported none (a provider that does not), as clients read it blindly."""
    merged: dict[str, int] = {}
    for delta in deltas:
        merged.update(delta.usage or {})
    prompt, completion = merged.get("prompt_tokens", 0), merged.get("completion_tokens", 0)
    total = merged.get("total_tokens", prompt + completion)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _chat_delta(delta: Delta) -> ChoiceDelta:
    """A streamed chat piece: text, or tool-call pieces as OpenAI streams them (one entry per call index)."""
    if not delta.tool_calls:
        return ChoiceDelta(content=delta.text)
    calls = [ChoiceDeltaToolCall.model_validate(piece) for piece in joined_tool_pieces(delta.tool_calls)]
    return ChoiceDelta(content=delta.text, tool_calls=calls) if delta.text else ChoiceDelta(tool_calls=calls)


def _finish(deltas: list[Delta], allowed: set[str]) -> str:
    reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None) or "stop"
    return reason if reason in allowed else "stop"


def _dump(model: BaseModel) -> str:
    """Fields set explicitly, nulls included: a streamed choice's finish_reason is null until the end."""
    return model.model_dump_json(exclude_unset=True, warnings=False)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """OpenAI's base64 form is the little-endian float32 bytes; the openai client asks for it by default."""
    if encoding == "float":
        return vector
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _json(model: BaseModel) -> Response:
    return Response(_dump(model), media_type="application/json")


def _event(payload: BaseModel | dict[str, Any] | str) -> bytes:
    if isinstance(payload, BaseModel):
        data = _dump(payload)
    elif isinstance(payload, dict):
        data = json.dumps(payload)
    else:
        data = payload
    return f"data: {data}\n\n".encode()


class _Metrics:
    """Prometheus series per deployment, in a registry of the gateway's own.

    Where PROMETHEUS_MULTIPROC_DIR is set (the gateway's replicas share one
    port), prometheus_client keeps the values in files there and `exposed`
    reads every process's.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exposed = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
        self.requests = Counter("byzer_requests", "requests answered", ["model", "route", "status"], registry=self.registry)
        self.errors = Counter("byzer_request_errors", "requests that failed", ["model", "route", "type"], registry=self.registry)
        self.latency = Histogram(
            "byzer_request_seconds", "time to the last byte of the answer", ["model", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tokens = Counter("byzer_tokens", "tokens, as the backend counted them", ["model", "kind"], registry=self.registry)

    def observe(self, model: str, route: str, status: int, started: float, deltas: list[Delta], error: ApiError | None) -> None:
        label = model if status not in (400, 401, 404) else "-"
        self.requests.labels(label, route, str(status)).inc()
        if error is not None:
            self.errors.labels(label, route, error.kind).inc()
        self.latency.labels(label, route).observe(time.perf_counter() - started)
        usage = _usage(deltas)
        if deltas:
            self.tokens.labels(label, "prompt").inc(usage.prompt_tokens)
            self.tokens.labels(label, "completion").inc(usage.completion_tokens)


class BearerAuth:
    """Every route but /health needs `Authorization: Bearer KEY`.

    Only the key's SHA-256 is held, and presented keys are compared by digest
    in constant time, so the key itself never reaches the cluster or its logs.
    """

    def __init__(self, app: Any, key_digest: str | None):
        self.app = app
        self.digest = bytes.fromhex(key_digest) if key_digest else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.digest is not None and scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            given = hashlib.sha256(token.strip()).digest()
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given, self.digest):
                error = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                                 "authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """A request body over the limit is answered 413 before it is read (Content-Length) or as soon as it is."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        mib = self.max_bytes / 2**20
        error = ApiError(413, f"the request body is over {mib:g} MiB (the endpoint's --max_body_mb)",
                         "invalid_request_error", code="request_too_large")
        await error.response()(scope, receive, send)


def key_digest(api_key: str | None) -> str | None:
    """What the gateway keeps of the key (see BearerAuth)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def trusted_hosts(host: str, extra: str | None = None) -> list[str] | None:
    """Host header values the endpoint answers to; None accepts any.

    Bound to loopback, only this machine's own names: a web page the user opens
    cannot reach it by pointing a DNS name at 127.0.0.1 (DNS rebinding). Bound
    to one address, that address too; bound to every interface, any Host,
    unless --allowed_hosts names them. The key is required either way.
    """
    named = [h.strip() for h in (extra or "").split(",") if h.strip()]
    if host in LOOPBACK_NAMES:
        return [*LOOPBACK_NAMES, *named]
    if host in ("0.0.0.0", "::"):
        return [*LOOPBACK_NAMES, host, *named] if named else None
    return [*LOOPBACK_NAMES, host, *named]


T = TypeVar("T")


class ClientGone(Exception):
    """The caller closed its connection before its answer began."""


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(http: Request, work: Awaitable[T]) -> T:
    """Await work unless the client disconnects first; then cancel it, so a queued request never reaches a backend.

    Starlette notices a disconnect only once a response streams; before that
    (queued behind busy workers, or a whole non-streamed answer) nothing would.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone


class Served:
    """What every route reaches through `app.state.served`: the deployments and the endpoint's metrics."""

    def __init__(self, deployments: Deployments, metrics: "_Metrics"):
        self.deployments = deployments
        self.metrics = metrics

    async def find(self, model: str) -> dict[str, Any]:
        """A deployment's description, or the 404 that lists the deployed names (one listing either way)."""
        infos = await self.deployments.models()
        for info in infos:
            if info["name"] == model:
                return info
        raise _unknown(model, infos)

    async def refused(self, model: str, route: str, started: float, exc: Exception) -> Response:
        """A request the deployment refused, as OpenAI's error (a 404 listing the deployed names), counted."""
        if isinstance(exc, NotDeployedError):
            error = _unknown(model, await self.deployments.models())
        else:
            error = _api_error(exc)
        self.metrics.observe(model, route, error.status, started, [], error)
        return error.response()

    async def begin(self, http: Request, route: str, model: str, request: Messages | str, gen: GenParams,
                    stream: bool, started: float, make: Callable[[list[Delta]], BaseModel],
                    ) -> Response | tuple[AsyncIterator[Delta], Delta | None]:
        """A whole answer (made by `make`, counted), a refusal, or an open stream and its first piece.

        The text routes share this: a client that leaves before its answer
        begins gets nothing sent to a backend (499), and a refusal is counted.
        """
        opened: AsyncIterator[Delta] | None = None
        try:
            if not stream:
                deltas = await _unless_gone(http, self.deployments.complete(model, request, gen))
                self.metrics.observe(model, route, 200, started, deltas, None)
                return _json(make(deltas))
            opened = self.deployments.stream(model, request, gen)
            return opened, await _unless_gone(http, anext(opened, None))
        except ClientGone:
            if opened is not None:
                await opened.aclose()
            return Response(status_code=499)
        except Exception as exc:
            return await self.refused(model, route, started, exc)


def served(http: Request) -> Served:
    """The FastAPI dependency that hands a route the app's `Served`."""
    return http.app.state.served


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    """Server-sent events, unbuffered by proxies."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _unknown(model: str, infos: list[dict[str, Any]]) -> ApiError:
    names = [info["name"] for info in infos]
    known = f"deployed now: {', '.join(names)}" if names else "nothing is deployed"
    return ApiError(404, f"no deployment named {model!r} ({known})", "invalid_request_error", "model", "model_not_found")


def _card(info: dict[str, Any]) -> Model:
    """OpenAI's model object, with what clients ask of a deployment before they use it (vLLM's max_model_len)."""
    can = info.get("capabilities") or {}
    task = info.get("task", "chat")
    capabilities = {"chat": task == "chat", "completions": task == "chat", "embeddings": task == "embed",
                    "tools": bool(can.get("tools")), "structured_output": bool(can.get("structured_output"))}
    return Model(
        id=info["name"], object="model", created=int(info.get("deployed_at") or 0), owned_by="byzer_magic",
        backend=info.get("backend"), served_model=info.get("model"), max_model_len=info.get("max_model_len"),
        capabilities=capabilities,
    )


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON", "invalid_request_error").response()
    param = ".".join(loc) or None
    where = f"{param}: " if param else "the body: "
    return ApiError(400, f"{where}{first.get('msg', 'invalid request')}", "invalid_request_error", param).response()


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, message, kind).response()


async def _refused(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return _api_error(exc).response()


router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", responses=_AUTH_ERRORS)
async def prometheus(state: Served = Depends(served)) -> Response:
    return Response(generate_latest(state.metrics.exposed), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", responses=_AUTH_ERRORS)
async def list_models(state: Served = Depends(served)) -> dict[str, Any]:
    cards = [{**_card(info).model_dump(exclude_none=True), "max_model_len": info.get("max_model_len")}
             for info in await state.deployments.models()]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model}", responses=_MODEL_ERRORS)
async def get_model(model: str, state: Served = Depends(served)) -> Response:
    return _json(_card(await state.find(model)))


async def _answer(state: Served, route: str, body: _Generation, request: Messages | str, make: Callable,
                  chunk: Callable, http: Request) -> Response:
    started = time.perf_counter()
    begun = await state.begin(http, route, body.model, request, body.gen(), body.stream, started, make)
    if isinstance(begun, Response):
        return begun
    return event_stream(_events(state, route, body, *begun, chunk, started))


async def _events(state: Served, route: str, body: _Generation, stream: AsyncIterator[Delta], first: Delta | None,
                  chunk: Callable, started: float) -> AsyncIterator[bytes]:
    seen: list[Delta] = []
    error: ApiError | None = None
    try:
        opening = chunk(None, seen)
        if opening is not None:
            yield _event(opening)
        delta = first
        while delta is not None:
            seen.append(delta)
            if delta.text or delta.finish_reason or delta.tool_calls:
                yield _event(chunk(delta, seen))
            delta = await anext(stream, None)
        if body.wants_usage():
            yield _event(chunk(None, seen, usage=_usage(seen)))
        yield _event("[DONE]")
    except Exception as exc:
        error = _api_error(exc)
        yield _event(error.body())
    finally:
        state.metrics.observe(body.model, route, error.status if error else 200, started, seen, error)


class _ChatAnswer:
    """One chat answer's id, whole (`make`) or in pieces (`chunk`), as openai's types."""

    def __init__(self, model: str):
        self.model, self.ident, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def make(self, deltas: list[Delta]) -> ChatCompletion:
        calls = whole_tool_calls(deltas)
        text = "".join(d.text for d in deltas)
        message = ChatCompletionMessage(role="assistant", content=text or (None if calls else ""),
                                        tool_calls=calls or None)
        choice = Choice(index=0, message=message, finish_reason=_finish(deltas, _CHAT_FINISH))
        return ChatCompletion(id=self.ident, object="chat.completion", created=self.created, model=self.model,
                              choices=[choice], usage=_usage(deltas))

    def chunk(self, delta: Delta | None, seen: list[Delta], usage: CompletionUsage | None = None) -> ChatCompletionChunk:
        if usage is not None:
            choices = []
        elif delta is None:
            choices = [ChunkChoice(index=0, delta=ChoiceDelta(role="assistant", content=""))]
        else:
            finish = _finish([delta], _CHAT_FINISH) if delta.finish_reason else None
            choices = [ChunkChoice(index=0, delta=_chat_delta(delta), finish_reason=finish)]
        return ChatCompletionChunk(id=self.ident, object="chat.completion.chunk", created=self.created,
                                   model=self.model, choices=choices, usage=usage)


class _TextAnswer:
    """One text completion's id, whole (`make`) or in pieces (`chunk`), as openai's types."""

    def __init__(self, model: str):
        self.model, self.ident, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def make(self, deltas: list[Delta]) -> Completion:
        text = "".join(d.text for d in deltas)
        choice = CompletionChoice(index=0, text=text, finish_reason=_finish(deltas, _TEXT_FINISH))
        return Completion(id=self.ident, object="text_completion", created=self.created, model=self.model,
                          choices=[choice], usage=_usage(deltas))

    def chunk(self, delta: Delta | None, seen: list[Delta], usage: CompletionUsage | None = None) -> Completion | None:
        if usage is not None:
            return Completion(id=self.ident, object="text_completion", created=self.created, model=self.model,
                              choices=[], usage=usage)
        if delta is None:
            return None
        finish = _finish([delta], _TEXT_FINISH) if delta.finish_reason else None
        choice = CompletionChoice.model_construct(index=0, text=delta.text, finish_reason=finish, logprobs=None)
        return Completion.model_construct(id=self.ident, object="text_completion", created=self.created,
                                          model=self.model, choices=[choice])


@router.post("/v1/chat/completions", responses=_MODEL_ERRORS)
async def chat_completions(body: ChatRequest, http: Request, state: Served = Depends(served)) -> Response:
    made = _ChatAnswer(body.model)
    return await _answer(state, "chat", body, [m.as_dict() for m in body.messages], made.make, made.chunk, http)


@router.post("/v1/completions", responses=_MODEL_ERRORS)
async def completions(body: CompletionRequest, http: Request, state: Served = Depends(served)) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        return ApiError(400, "prompt: send one prompt per request", "invalid_request_error", "prompt").response()
    made = _TextAnswer(body.model)
    return await _answer(state, "completions", body, prompts[0], made.make, made.chunk, http)


@router.post("/v1/embeddings", responses=_MODEL_ERRORS)
async def embeddings(body: EmbeddingRequest, state: Served = Depends(served)) -> Response:
    started = time.perf_counter()
    texts = body.texts()
    if not 1 <= len(texts) <= 2048:
        return ApiError(400, "input: send 1 to 2048 texts", "invalid_request_error", "input").response()
    if (refused := body.refusal()) is not None:
        return refused.response()
    try:
        found = await state.deployments.embed(body.model, texts)
    except Exception as exc:
        return await state.refused(body.model, "embeddings", started, exc)
    data = [
        Embedding.model_construct(object="embedding", index=i, embedding=_encode(vector, body.encoding_format))
        for i, vector in enumerate(found.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=found.prompt_tokens, total_tokens=found.prompt_tokens)
    counted = [Delta("", None, {"prompt_tokens": found.prompt_tokens, "completion_tokens": 0})]
    state.metrics.observe(body.model, "embeddings", 200, started, counted, None)
    return _json(CreateEmbeddingResponse.model_construct(object="list", model=body.model, data=data, usage=usage))


def build_app(deployments: Deployments, *, key_digest: str | None = None, allowed_hosts: list[str] | None = None,
              max_body_bytes: int = 16 << 20) -> Any:
    """The ASGI app: FastAPI routes behind Starlette's Host header check, the bearer check and a body limit."""
    from .responses import router as responses_router

    app = FastAPI(title="byzer_magic OpenAI-compatible API", version="1", docs_url=None, redoc_url=None)
    app.state.served = Served(deployments, _Metrics())
    for kind, handler in ((RequestValidationError, _invalid), (HTTPException, _http), (ApiError, _refused),
                          (Exception, _crash)):
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    app.include_router(responses_router)
    if allowed_hosts is not None:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return BodyLimit(BearerAuth(app, key_digest), max_body_bytes)
