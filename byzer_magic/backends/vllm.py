"""vLLM's async engine: one worker batches many requests at once.

`backend.*` keys become `AsyncEngineArgs`: the common ones are typed fields
with the deployment guide's defaults, and any other engine argument of the
installed vLLM is accepted and checked against vLLM's own type hints.
Closing a chat's stream (an interrupted cell) aborts the request in the engine.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
from typing import Any, AsyncIterator, Mapping

from pydantic import ConfigDict, Field

from ..errors import BackendError
from .base import BackendSettings, Delta, GenParams, Messages


@functools.cache
def _engine_fields() -> Mapping[str, Any] | None:
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return None
    return {f.name: f.type for f in dataclasses.fields(AsyncEngineArgs) if f.name != "model"}


class Settings(BackendSettings):
    """`backend.*` keys: vLLM engine arguments."""

    model_config = ConfigDict(extra="allow")

    @classmethod
    def open_keys(cls) -> Mapping[str, Any] | None:
        return _engine_fields()

    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of GPU memory vLLM may take")
    max_model_len: int | None = Field(default=None, gt=0, description="context length; default: the model's")
    enforce_eager: bool = Field(default=True, description="skip CUDA graphs, saving memory")
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    dtype: str = Field(default="auto", description="weights and activations dtype")
    max_num_seqs: int | None = Field(default=None, gt=0, description="sequences batched at once")
    max_num_batched_tokens: int | None = Field(default=None, gt=0, description="tokens per engine step")
    quantization: str | None = Field(default=None, description="quantization method, e.g. awq, gptq, fp8")
    kv_cache_dtype: str = Field(default="auto", description="KV cache dtype")
    enable_prefix_caching: bool | None = Field(default=None, description="reuse KV cache across shared prefixes")
    seed: int | None = Field(default=None, description="engine seed")
    tokenizer: str | None = Field(default=None, description="tokenizer path; default: the model's")


class Backend:
    """An AsyncLLM engine; Serve lets it take `worker_concurrency` requests at once."""

    def __init__(self, settings: Settings, *, model_path: str, gpus: int = 0, **_: Any):
        self._settings = settings
        self._model_path = model_path
        self._gpus = gpus
        self._engine: Any = None
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}
        self._ids = itertools.count()
        self._served = 0
        self._tokens = 0

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = self._settings.model_dump(exclude_none=True)
        if self._gpus > 1:
            args.setdefault("tensor_parallel_size", self._gpus)
        try:
            self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self._model_path, **args))
            tokenizer = self._engine.get_tokenizer()
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
            self._defaults = self._engine.model_config.get_diff_sampling_param()
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            raise BackendError("vllm", None, f"cannot start the engine on {self._model_path}: {exc}") from None

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        prompt = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.generate(prompt, gen)

    async def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        defaults = self._defaults
        params = SamplingParams(
            temperature=defaults.get("temperature", 1.0) if gen.temperature is None else gen.temperature,
            top_p=defaults.get("top_p", 1.0) if gen.top_p is None else gen.top_p,
            max_tokens=gen.max_tokens or 256,
            seed=gen.seed,
            stop=list(gen.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"byzer-{next(self._ids)}"
        try:
            held: tuple[int, ...] = ()
            generated = 0
            async for out in self._engine.generate(prompt, params, request_id):
                piece = out.outputs[0]
                generated += len(piece.token_ids)
                self._tokens += len(piece.token_ids)
                held += tuple(piece.token_ids)
                usage = None
                if piece.finish_reason:
                    prompt_tokens = len(out.prompt_token_ids or ())
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                             "total_tokens": prompt_tokens + generated}
                if piece.text or piece.finish_reason:
                    yield Delta(piece.text, piece.finish_reason, usage, held)
                    held = ()
        except (ValueError, RuntimeError) as exc:
            raise BackendError("vllm", None, str(exc)) from None
        self._served += 1

    async def health(self) -> None:
        await self._engine.check_health()

    def stats(self) -> dict[str, Any]:
        processor = getattr(self._engine, "output_processor", None)
        running = processor.get_num_unfinished_requests() if processor is not None else None
        return {"served": self._served, "tokens": self._tokens, "running": running}

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
