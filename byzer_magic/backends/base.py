"""The one protocol every backend implements, and the settings base they share.

A backend is plain Python: it never imports Ray or IPython, and it imports its
own library (openai, llama_cpp, vllm, ...) only when it is constructed, so the
parser can read its settings on a machine that lacks the library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol

from pydantic import BaseModel, ConfigDict


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


@dataclass(frozen=True)
class Embeddings:
    """Vectors in the order of the texts, and the tokens read, which OpenAI's usage reports."""

    vectors: list[list[float]]
    prompt_tokens: int = 0


Messages = list[dict[str, Any]]


class Backend(Protocol):
    """What a worker hosts. `start` may fail the deploy; `health` must stay cheap."""

    async def start(self) -> None: ...

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]: ...

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """Continue a raw prompt, for OpenAI's /v1/completions; no chat template."""
        ...

    async def health(self) -> None: ...

    # Embedding backends also define `async def embed(texts: list[str]) -> Embeddings`.

    def stats(self) -> dict[str, Any]: ...

    async def shutdown(self) -> None: ...
