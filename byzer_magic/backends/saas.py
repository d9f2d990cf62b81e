"""Any OpenAI-compatible endpoint, through the official openai client.

The client already retries 408/409/429/5xx and connection errors with
exponential backoff and jitter; this module bounds a whole request by
saas.timeout (a drip-fed stream included, never retried once timed out) and
maps failures onto a BackendError the notebook can show.
"""
from __future__ import annotations

import asyncio
import dataclasses
import difflib
import os
from typing import Any, AsyncIterator

from pydantic import Field, SecretStr

from ..errors import BackendError, SpecError, redact
from . import base
from .base import OPENAI_SAMPLING, BackendSettings, Context, Delta, GenParams, Messages
from .providers import PROVIDER_BASE_URLS
from ..serving.request_fields import forwarded


class Settings(BackendSettings):
    """`saas.*` keys: an OpenAI-compatible endpoint and how to call it."""

    api_key: SecretStr = Field(description="API key sent as a Bearer token; never shown; node-env:NAME reads it "
                                           "from NAME on the worker's own node")
    model: str = Field(description="model name the provider knows, e.g. gpt-4o-mini or qwen-max")
    base_url: str | None = Field(
        default=None, description="endpoint root ending in /v1; default: the provider's"
    )
    timeout: float = Field(default=60.0, gt=0, description="seconds a whole request may take, streamed answer "
                                                            "included, before it is abandoned (never retried)")
    max_retries: int = Field(
        default=2, ge=0, le=10, description="retries on 408/409/429/5xx and connection errors"
    )
    check_on_start: bool = Field(
        default=True, description="ask the endpoint for its models at deploy, so a bad key fails the deploy"
    )
    temperature: float | None = Field(default=None, ge=0, description="default sampling temperature")
    top_p: float | None = Field(default=None, gt=0, le=1, description="default nucleus sampling")
    max_tokens: int | None = Field(default=None, gt=0, description="default answer length limit")


NODE_ENV = "node-env:"


def _node_key(key: str) -> str:
    """`saas.api_key=node-env:NAME` is read here, from the environment of the node this worker runs on.

    The key then never passes through the kernel, the spec or Ray's control
    plane: export NAME where each node's `ray start` runs.
    """
    if not key.startswith(NODE_ENV):
        return key
    name = key[len(NODE_ENV):]
    found = os.environ.get(name, "")
    if not found.strip():
        raise BackendError("saas", None, f"saas.api_key={NODE_ENV}{name}: {name} is not set where this worker runs "
                                         f"(export it before `ray start` on every node)")
    return found


def _first_names_only(pieces: Any, named: set[int]) -> tuple[dict[str, Any], ...]:
    """Tool-call pieces as OpenAI streams them: id, type and name on a call's first piece only.

    Some servers (llama.cpp's) repeat them on every piece, which clients that
    join the pieces (openai's, LangChain's) would glue into one long name.
    """
    out = []
    for piece in pieces:
        data = piece.model_dump(exclude_none=True)
        index = data.get("index", 0)
        if index in named:
            data = {"index": index, "function": {"arguments": (data.get("function") or {}).get("arguments", "")}}
        named.add(index)
        out.append(data)
    return tuple(out)


class Backend(base.Backend):
    """One worker's connection to the provider; Serve keeps it to one request at a time."""

    name = "saas"
    Settings = Settings
    prefix = "saas."
    library = "openai"
    preload = ("openai",)
    model_type_prefix = "saas/"
    model_path_help = None
    no_model_path_why = "the endpoint holds the model"
    capabilities = dataclasses.replace(OPENAI_SAMPLING, provider_fields=True)

    def __init__(self, settings: Settings, context: Context):
        super().__init__(settings, context)
        import openai

        self._openai = openai
        self._settings = settings
        self._provider = context.provider or "openai"
        self._key = _node_key(settings.api_key.get_secret_value())
        # saas.timeout bounds the whole request (see _relay); the client's own timeout is set past it, so the
        # client never times out first and retries a request the provider may still be answering.
        self._client = openai.AsyncOpenAI(
            api_key=self._key,
            base_url=context.base_url,
            timeout=settings.timeout + 1.0,
            max_retries=settings.max_retries,
        )

    @classmethod
    def provider_of(cls, model_type: str) -> str:
        """`saas/<provider>`, for a provider this backend knows; any other endpoint is saas/openai."""
        provider = model_type[len(cls.model_type_prefix or ""):]
        if provider not in PROVIDER_BASE_URLS:
            close = difflib.get_close_matches(provider, list(PROVIDER_BASE_URLS), n=1)
            hint = f" Did you mean saas/{close[0]}?" if close else ""
            known = ", ".join(f"saas/{p}" for p in PROVIDER_BASE_URLS)
            raise SpecError(
                f"--pretrained_model_type {model_type}: unknown provider.{hint} Known: {known}; "
                f"any OpenAI-compatible endpoint works as saas/openai with saas.base_url=..."
            )
        return provider

    @classmethod
    def longest_request_s(cls, settings: BackendSettings) -> float | None:
        """saas.timeout bounds a whole request, retries and a drip-fed stream included."""
        return float(getattr(settings, "timeout", 0)) or None

    @classmethod
    def endpoint(cls, settings: BackendSettings, provider: str | None) -> str | None:
        """saas.base_url, else the provider's."""
        return getattr(settings, "base_url", None) or PROVIDER_BASE_URLS.get(provider or "")

    async def start(self) -> None:
        if not self._settings.check_on_start:
            return
        try:
            await self._client.models.list()
        except self._openai.NotFoundError:
            return
        except (self._openai.OpenAIError, asyncio.TimeoutError) as exc:
            raise self._readable(exc) from None

    def _request(self, gen: GenParams) -> dict[str, Any]:
        """The call's settings: per-chat values first, then the deployment's defaults."""
        gen = gen.over(self._settings)
        kwargs: dict[str, Any] = {"model": self._settings.model, "stream": True, "stream_options": {"include_usage": True},
                                  **gen.sampling()}
        if gen.logit_bias:
            kwargs["logit_bias"] = {str(token): bias for token, bias in gen.logit_bias.items()}
        kwargs.update(forwarded(gen))
        for name in ("response_format", "tools", "tool_choice", "parallel_tool_calls"):
            if getattr(gen, name) is not None:
                kwargs[name] = getattr(gen, name)
        return kwargs

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        return self._relay(self._client.chat.completions.create, {**self._request(gen), "messages": messages})

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """A raw prompt, through the provider's /completions (not every provider has it)."""
        return self._relay(self._client.completions.create, {**self._request(gen), "prompt": prompt})

    async def _relay(self, create: Any, kwargs: dict[str, Any]) -> AsyncIterator[Delta]:
        """The provider's stream as deltas, all of it within saas.timeout (a drip-fed answer included)."""
        finished = False
        named: set[int] = set()
        deadline = asyncio.get_running_loop().time() + self._settings.timeout

        async def within(step: Any) -> Any:
            return await asyncio.wait_for(step, max(0.0, deadline - asyncio.get_running_loop().time()))

        try:
            stream = await within(create(**kwargs))
            async with stream:
                chunks = stream.__aiter__()
                while (chunk := await within(anext(chunks, None))) is not None:
                    for choice in chunk.choices:
                        delta = getattr(choice, "delta", None)
                        text = (delta.content if delta is not None else choice.text) or ""
                        calls = _first_names_only(getattr(delta, "tool_calls", None) or (), named)
                        finished = finished or bool(choice.finish_reason)
                        if text or calls or choice.finish_reason:
                            yield Delta(text, choice.finish_reason, tool_calls=calls)
                    if chunk.usage:
                        usage = chunk.usage.model_dump()
                        yield Delta("", None, {k: v for k, v in usage.items() if isinstance(v, int)})
        except (self._openai.OpenAIError, asyncio.TimeoutError) as exc:
            raise self._readable(exc) from None
        if not finished:
            raise BackendError(self._provider, None, "the stream ended before the answer was finished (no finish_reason)")

    async def health(self) -> None:
        """Local only: a provider's bad minute must not make Serve kill workers."""

    async def shutdown(self) -> None:
        await self._client.close()

    def _readable(self, exc: Exception) -> BackendError:
        status = getattr(exc, "status_code", None)
        message = getattr(exc, "message", None) or str(exc)
        body = getattr(exc, "body", None)
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and inner.get("message"):
                message = str(inner["message"])
        if isinstance(exc, (self._openai.APITimeoutError, asyncio.TimeoutError)):
            message = f"no answer within {self._settings.timeout:g} s (saas.timeout)"
        elif isinstance(exc, self._openai.APIConnectionError):
            message = f"cannot reach {self._client.base_url}: {exc.__cause__ or message}"
        return BackendError(self._provider, status, redact(message, [self._key]))
