"""The one protocol every backend implements, and the settings base they share.

A backend is plain Python: it never imports Ray or IPython, and it imports its
own library (openai, llama_cpp, vllm, ...) only when it is constructed, so the
parser can read its settings on a machine that lacks the library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from pydantic import BaseModel, ConfigDict


class BackendSettings(BaseModel):
    """Typed `--infer_params` of one backend; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


@dataclass(frozen=True)
class Delta:
    """One piece of a streamed answer; the last one carries finish_reason and usage."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class GenParams:
    """Per-chat generation settings; None means the backend's or model's default."""

    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


Messages = list[dict[str, Any]]


class Backend(Protocol):
    """What a worker hosts. `start` may fail the deploy; `health` must stay cheap."""

    async def start(self) -> None: ...

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]: ...

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """Continue a raw prompt, for OpenAI's /v1/completions; no chat template."""
        ...

    async def health(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def shutdown(self) -> None: ...
