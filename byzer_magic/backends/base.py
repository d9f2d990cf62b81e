"""The one contract every backend implements, and the types it speaks.

A backend is plain Python: it never imports Ray or IPython, and it imports its
own library (openai, llama_cpp, vllm, ...) only when it is constructed, so the
parser can read its settings on a machine that lacks the library. Everything
the rest of the package needs to know about a backend (its name, settings,
model path, GPUs, concurrency, tasks, library) is declared on its class, so
that no module outside `backends/` names one.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict

from ..errors import FieldError, WrongTaskError


class BackendSettings(BaseModel):
    """Typed `--infer_params` of one backend; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @classmethod
    def open_keys(cls) -> Mapping[str, Any] | None:
        """Keys accepted beyond the typed fields, with their type hints.

        A backend that passes keys on to its library (vLLM's engine arguments)
        reads them from the installed library; None means it is not installed,
        so they cannot be checked here. Most backends accept only their fields.
        """
        return {}


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer; the last one carries finish_reason and usage.

    `token_ids` are the ids behind `text`, from backends whose library reports
    them (vLLM, transformers); they let engines be compared token by token.
    """

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    token_ids: tuple[int, ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()
    """Pieces of tool calls in OpenAI's streamed form ({index, id, type, function: {name, arguments}})."""


def whole_tool_calls(deltas: "list[Delta]") -> list[dict[str, Any]]:
    """Streamed tool-call pieces joined by index into whole calls, as a non-streamed OpenAI answer has them.

    The first piece of a call carries its id and name; later ones add pieces of its arguments.
    """
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.get("index", 0), {"id": "", "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
            call["id"] = piece.get("id") or call["id"]
            function = piece.get("function") or {}
            call["function"]["name"] = call["function"]["name"] or function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def joined_tool_pieces(pieces: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """Tool-call pieces that arrived together, one per call index (arguments joined), in order of first arrival."""
    joined: dict[int, dict[str, Any]] = {}
    for piece in pieces:
        index = piece.get("index", 0)
        if index not in joined:
            joined[index] = {**piece, "function": dict(piece.get("function") or {})}
            continue
        function = joined[index].setdefault("function", {})
        arguments = (piece.get("function") or {}).get("arguments")
        if arguments:
            function["arguments"] = (function.get("arguments") or "") + arguments
    return list(joined.values())


_DEFAULTED = ("temperature", "top_p", "max_tokens")
"""GenParams a deployment may set defaults for in its settings (saas.temperature=0.2)."""


@dataclass(frozen=True)
class GenParams:
    """Per-chat generation settings; None means the backend's or model's default."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    """Generate max_tokens whatever the model says (vLLM's extension, for load tests); vLLM honours it."""
    response_format: dict[str, Any] | None = None
    """OpenAI's response_format as sent; only backends with `capabilities.structured_output` get one."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI's tools as sent; only backends with `capabilities.tools` get them (with tool_choice, parallel_tool_calls)."""
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    """Token id to bias, checked against the model's vocabulary before it reaches a backend."""
    provider_fields: dict[str, Any] = field(default_factory=dict)
    """OpenAI fields a provider takes as they are (user, metadata, service_tier, ...), for backends that forward them."""

    def over(self, settings: BaseModel) -> GenParams:
        """These values, with the deployment's defaults where the chat left one unset.

        Settings fields named like a GenParams field (`temperature`, `top_p`,
        `max_tokens`) are the defaults; a chat's own value always wins.
        """
        found = {
            name: getattr(settings, name) for name in _DEFAULTED
            if getattr(self, name) is None and getattr(settings, name, None) is not None
        }
        return dataclasses.replace(self, **found)

    def sampling(self) -> dict[str, Any]:
        """The sampling fields this chat set, as OpenAI's API and llama-cpp-python both name them."""
        found: dict[str, Any] = {name: getattr(self, name) for name in ("temperature", "top_p", "max_tokens", "seed")
                                 if getattr(self, name) is not None}
        if self.stop:
            found["stop"] = list(self.stop)
        found.update({name: getattr(self, name) for name in ("presence_penalty", "frequency_penalty")
                      if getattr(self, name)})
        return found


@dataclass(frozen=True)
class Capabilities:
    """What a backend honours beyond the fields every backend must (temperature, top_p, max_tokens, stop).

    The endpoint and the worker refuse a request that asks for something its
    backend does not declare here, with a 400 naming the field and the backend,
    so nothing a client sends is silently dropped.
    """

    tools: bool = False
    """tools, tool_choice and parallel_tool_calls; answers may carry tool calls."""
    structured_output: bool = False
    """response_format json_object and json_schema."""
    seed: bool = False
    penalties: bool = False
    """presence_penalty and frequency_penalty, as OpenAI defines them."""
    logit_bias: bool = False
    provider_fields: bool = False
    """Passes GenParams.provider_fields on to the provider as given (SaaS)."""
    ignore_eos: bool = False


OPENAI_SAMPLING = Capabilities(tools=True, structured_output=True, seed=True, penalties=True, logit_bias=True)
"""What an engine with OpenAI's sampling, tool calls and grammars honours: llama.cpp and vLLM do; SaaS passes it on."""


def context_exceeded(deployment: str, prompt_tokens: int, limit: int, chat: bool = True) -> FieldError:
    """OpenAI's context_length_exceeded, as one sentence with both numbers."""
    return FieldError(
        "messages" if chat else "prompt",
        f"the prompt is {prompt_tokens} tokens, and {deployment!r} holds {limit} tokens in its context, answer "
        f"included; shorten the prompt", "context_length_exceeded",
    )


@dataclass(frozen=True)
class Embeddings:
    """Vectors in the order of the texts, and the tokens read, which OpenAI's usage reports."""

    vectors: list[list[float]]
    prompt_tokens: int = 0


Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class Context:
    """What a backend is told about the deployment it serves, besides its settings."""

    deployment: str
    model_path: str | None = None
    gpus: float = 0.0
    provider: str | None = None
    base_url: str | None = None
    task: str = "chat"


@dataclass(frozen=True)
class GpuRule:
    """How many GPUs one worker of a backend may have: shares below 1 always; above 1, as said here."""

    whole_above_one: bool = False
    """Above 1 GPU, whole GPUs only (the backend shards over them)."""
    most: float | None = None
    why_most: str = ""

    def problem(self, backend: str, gpus: float) -> str | None:
        """What is wrong with `--gpus_per_worker gpus` for this backend, or None."""
        if self.most is not None and gpus > self.most:
            return f"--gpus_per_worker {gpus:g}: {self.why_most}"
        if self.whole_above_one and gpus > 1 and gpus != int(gpus):
            return (f"--gpus_per_worker {gpus:g}: above 1, {backend} needs whole GPUs (it shards over them with "
                    f"tensor parallelism); use 2, 3, ..., or a share below 1 to put several workers on one GPU")
        return None


class Backend(abc.ABC):
    """What a worker hosts, and what the parser and the deploy need to know about it.

    Class attributes describe the backend; an instance serves one worker.
    `start` may fail the deploy; `health` must stay cheap; `chat` and
    `generate` are async iterators of Delta; `embed` refuses unless the
    backend embeds.
    """

    name: ClassVar[str]
    """The `--infer_backend` value, and the entry point's name in `byzer_magic.backends`."""
    Settings: ClassVar[type[BackendSettings]]
    prefix: ClassVar[str] = "backend."
    """How its `--infer_params` keys begin."""
    library: ClassVar[str]
    """The module it needs installed."""
    extra: ClassVar[str] = ""
    """byzer-magic's extra that installs the library; empty: `pip install <library>`."""
    tasks: ClassVar[frozenset[str]] = frozenset({"chat"})
    model_type_prefix: ClassVar[str | None] = None
    """A backend picked by its model type (`saas/...`), not by --infer_backend."""
    serves_model_types: ClassVar[bool] = False
    """The backend a bare transformers model type (`llama2`, `custom/bge`) deploys with."""
    model_path_help: ClassVar[str | None] = "the model's directory"
    """What --model_path must name; None: the backend takes no model path."""
    no_model_path_why: ClassVar[str] = ""
    gpu_rule: ClassVar[GpuRule] = GpuRule()
    preload: ClassVar[tuple[str, ...]] = ()
    """Modules a worker's process imports in the background as soon as it starts, while Serve is still setting
    the replica up, so the constructor finds them imported: only small pure-Python ones whose import is most of
    a worker's start (openai's), never an engine's (vLLM and torch start threads and processes)."""
    capabilities: ClassVar[Capabilities] = Capabilities()
    """The request fields it honours; the rest are refused before they reach it."""

    def __init__(self, settings: BackendSettings, context: Context):
        self.settings = settings
        self.context = context

    @classmethod
    def default_concurrency(cls, settings: BackendSettings) -> int:
        """Requests one worker takes at once unless --worker_concurrency says: one at a time."""
        return 1

    @classmethod
    def longest_request_s(cls, settings: BackendSettings) -> float | None:
        """The most seconds one request can take, where the backend bounds it (a provider's timeout); None: unbounded.

        A worker being removed by a scale-down is given this long to finish what it holds.
        """
        return None

    @classmethod
    def check_model_path(cls, path: Path) -> str | None:
        """What is wrong with an existing --model_path for this backend, or None: a directory with config.json."""
        if not (path / "config.json").is_file():
            return f"{cls.name} needs a model directory with config.json"
        return None

    @classmethod
    def provider_of(cls, model_type: str) -> str | None:
        """The provider a `model_type_prefix` model type names, checked; None for other backends."""
        return None

    @classmethod
    def endpoint(cls, settings: BackendSettings, provider: str | None) -> str | None:
        """The URL a worker calls, for backends that call one."""
        return None

    @classmethod
    def library_installed(cls) -> bool:
        return importlib.util.find_spec(cls.library) is not None

    async def start(self) -> None:
        """Load or connect; a failure fails the deploy with its reason."""

    @abc.abstractmethod
    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]: ...

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """Continue a raw prompt, for OpenAI's /v1/completions; no chat template."""
        raise WrongTaskError(f"{self.context.deployment!r} ({self.name}) does not continue raw prompts; use chat")

    async def embed(self, texts: list[str]) -> Embeddings:
        """One vector per text; a backend that does not embed refuses with this one message."""
        raise WrongTaskError(
            f"{self.context.deployment!r} is a chat model ({self.name}); it does not embed text: deploy an "
            f"embedding model type (e.g. --pretrained_model_type custom/bge) for embeddings"
        )

    async def health(self) -> None:
        """Cheap; raising makes Serve replace the worker."""

    def context_length(self) -> int | None:
        """The most tokens one request may hold once started; None where the backend cannot tell (a provider)."""
        return None

    def vocab_size(self) -> int | None:
        """How many token ids the model has, to check logit_bias; None where unknown (a provider checks its own)."""
        return None

    def answer_budget(self, prompt_tokens: int, gen: GenParams, chat: bool = True) -> int:
        """The most tokens an answer to this prompt may take: what is left of the context, at most max_tokens.

        A prompt that leaves no room is refused with both numbers; a max_tokens
        past the context's end is cut there (the answer ends with "length").
        """
        limit = self.context_length()
        if not limit:
            return gen.max_tokens or 0
        if prompt_tokens >= limit:
            raise context_exceeded(self.context.deployment, prompt_tokens, limit, chat)
        return min(gen.max_tokens or limit, limit - prompt_tokens)

    def count_tokens(self, messages: Messages) -> int | None:
        """Tokens a chat of these messages takes before its answer (template included); None where unknown.

        Sessions use it with `context_length` to trim a long conversation from
        its oldest turn; a backend that cannot tell (a provider) is not trimmed.
        """
        return None

    def stats(self) -> dict[str, Any]:
        """Figures only the backend knows (its device, requests running in its engine); the worker counts requests."""
        return {}

    async def shutdown(self) -> None:
        """Free the model or connection."""
