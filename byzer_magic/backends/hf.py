"""A Hugging Face transformers model in the worker: chat, or embeddings.

`--pretrained_model_type` decides the task: an embedding type (`custom/bge`,
`m3e`, ...) loads `AutoModel` and pools its hidden states; any other loads
`AutoModelForCausalLM` and chats with the model's own chat template.
`generate()` is synchronous, so it runs in a thread, one request at a time,
and `TextIteratorStreamer` hands its text back to the event loop as it comes.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from typing import Any, AsyncIterator, Literal

from pydantic import Field

from ..errors import BackendError, WrongTaskError
from . import base
from .base import BackendSettings, Capabilities, Context, Delta, Embeddings, GenParams, Messages


_UNKNOWN_CONTEXT_ANSWER = 1024
"""Answer length for a model whose config gives no context length (no max_position_embeddings) and a chat that gives none."""


class Settings(BackendSettings):
    """`backend.*` keys for transformers."""

    device: str | None = Field(
        default=None,
        description="cpu, cuda, cuda:N, or auto (device_map=auto); default: cuda with --gpus_per_worker, else cpu",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="weights dtype; auto takes the model's"
    )
    trust_remote_code: bool = Field(default=False, description="run the model repository's own code")
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="default answer length limit; default: what is left of the context"
    )
    num_threads: int | None = Field(default=None, gt=0, description="torch CPU threads; default: Ray's share")
    pooling: Literal["mean", "cls"] = Field(default="mean", description="embeddings: how tokens become one vector")
    normalize: bool = Field(default=True, description="embeddings: scale vectors to unit length")
    max_length: int = Field(default=512, gt=0, description="embeddings: tokens kept per text")


def _streamer_class() -> type:
    from transformers import TextIteratorStreamer

    class IdStreamer(TextIteratorStreamer):
        """TextIteratorStreamer that also hands over the token ids behind each piece of text."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.pending: list[int] = []
            self.generated = 0

        def put(self, value: Any) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                ids = value.reshape(-1).tolist()
                self.pending.extend(ids)
                self.generated += len(ids)
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text or (stream_end and self.pending):
                self.text_queue.put((text, tuple(self.pending)), timeout=self.timeout)
                self.pending = []
            if stream_end:
                self.text_queue.put(self.stop_signal, timeout=self.timeout)

    return IdStreamer


class Backend(base.Backend):
    """One model; requests take turns on it, and an abandoned stream stops its generation."""

    name = "transformers"
    Settings = Settings
    library = "transformers"
    extra = "transformers"
    tasks = frozenset({"chat", "embed"})
    serves_model_types = True
    capabilities = Capabilities(
        tools=False,
        structured_output=False,
        seed=True,
        penalties=False,
        logit_bias=True,
    )

    def __init__(self, settings: Settings, context: Context):
        super().__init__(settings, context)
        self._settings = settings
        self._model_path = context.model_path
        self._gpus = context.gpus
        self._task = context.task
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._turn = asyncio.Lock()

    def _fail(self, message: str) -> BackendError:
        return BackendError(self.library, None, message)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except (ValueError, RuntimeError, OSError, ImportError) as exc:
            raise self._fail(f"cannot load {self._model_path}: {exc}") from None

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        s = self._settings
        if s.num_threads:
            torch.set_num_threads(s.num_threads)
        device = s.device or ("cuda" if self._gpus and torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"backend.device={device}, but this worker sees no CUDA GPU; use backend.device=cpu")
        kwargs: dict[str, Any] = {"dtype": s.dtype, "trust_remote_code": s.trust_remote_code}
        if device == "auto":
            kwargs["device_map"] = "auto"
        loader = AutoModel if self._task == "embed" else AutoModelForCausalLM
        self._tokenizer = AutoTokenizer.from_pretrained(self._model_path, trust_remote_code=s.trust_remote_code)
        model = loader.from_pretrained(self._model_path, **kwargs)
        if device != "auto":
            model = model.to(device)
        self._device = str(model.device)
        self._model = self._prepare(model.eval())
        if self._task == "chat":
            self._warm_up()

    def _warm_up(self) -> None:
        """Generate one token now, so a model that loads but cannot generate fails the deploy, not the first chat."""
        import torch

        inputs = self._tokenizer("hello", return_tensors="pt").to(self._device)
        try:
            with torch.inference_mode():
                self._model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                     pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id)
        except Exception as exc:
            raise RuntimeError(f"the model loaded but cannot generate: {type(exc).__name__}: {exc}") from None

    def _prepare(self, model: Any) -> Any:
        """Hook for wrappers of the loaded model (DeepSpeed); plain transformers uses it as is."""
        return model

    def _refuse_chat(self) -> None:
        if self._task == "embed":
            raise WrongTaskError(
                f"{self.context.deployment!r} is deployed as an embedding model: it embeds text and does not chat; "
                f"use %byzer_embed, byzer_magic.serving.chat.embed or /v1/embeddings"
            )

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        self._refuse_chat()
        if not getattr(self._tokenizer, "chat_template", None):
            raise self._fail(f"{self._model_path} has no chat template; send a raw prompt to /v1/completions")
        inputs = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return self._stream(inputs, gen, True)

    def count_tokens(self, messages: Messages) -> int | None:
        """The ids `chat` would feed the model: its chat template applied, generation prompt included."""
        if self._task != "chat" or not getattr(self._tokenizer, "chat_template", None):
            return None
        ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        return len(ids)

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """A raw prompt, continued as it is (no chat template)."""
        self._refuse_chat()
        return self._stream(self._tokenizer(prompt, return_tensors="pt"), gen, False)

    def _generation_kwargs(self, gen: GenParams, prompt_tokens: int, chat: bool) -> dict[str, Any]:
        """generate()'s arguments; max_new_tokens is what is left of the context, at most what was asked."""
        asked = dataclasses.replace(gen, max_tokens=gen.max_tokens or self._settings.max_new_tokens)
        budget = self.answer_budget(prompt_tokens, asked, chat) or _UNKNOWN_CONTEXT_ANSWER
        kwargs: dict[str, Any] = {"max_new_tokens": budget}
        if gen.logit_bias:
            kwargs["sequence_bias"] = [[[token], bias] for token, bias in sorted(gen.logit_bias.items())]
        if gen.temperature is not None:
            kwargs["do_sample"] = gen.temperature > 0
            if gen.temperature > 0:
                kwargs["temperature"] = gen.temperature
        if gen.top_p is not None and kwargs.get("do_sample", True):
            kwargs["top_p"] = gen.top_p
        if gen.stop:
            kwargs["stop_strings"] = list(gen.stop)
            kwargs["tokenizer"] = self._tokenizer
        if self._tokenizer.pad_token_id is None:
            kwargs["pad_token_id"] = self._tokenizer.eos_token_id
        return kwargs

    async def _stream(self, inputs: Any, gen: GenParams, chat: bool) -> AsyncIterator[Delta]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        abandoned = threading.Event()

        class Abandoned(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool, device=input_ids.device)

        prompt_tokens = int(inputs["input_ids"].shape[-1])
        kwargs = self._generation_kwargs(gen, prompt_tokens, chat)
        async with self._turn:
            streamer = _streamer_class()(self._tokenizer, skip_prompt=True, skip_special_tokens=True)

            def run() -> None:
                try:
                    if gen.seed is not None:
                        torch.manual_seed(gen.seed)
                    with torch.inference_mode():
                        self._model.generate(
                            **inputs.to(self._device),
                            **kwargs,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([Abandoned()]),
                        )
                except BaseException:
                    streamer.text_queue.put(streamer.stop_signal)
                    raise

            worker = asyncio.ensure_future(asyncio.to_thread(run))
            try:
                while (item := await asyncio.to_thread(streamer.text_queue.get)) is not streamer.stop_signal:
                    text, ids = item
                    yield Delta(text, token_ids=ids)
                await worker
            except Exception as exc:
                raise self._fail(f"generation failed: {exc}") from None
            finally:
                abandoned.set()
                with contextlib.suppress(Exception):
                    await asyncio.shield(worker)
        finish = "length" if streamer.generated >= kwargs["max_new_tokens"] else "stop"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": streamer.generated,
            "total_tokens": prompt_tokens + streamer.generated,
        }
        yield Delta("", finish, usage)

    async def embed(self, texts: list[str]) -> Embeddings:
        """One vector per text, in order; the batch is padded and pooled as `backend.pooling` says."""
        if self._task != "embed":
            return await super().embed(texts)
        async with self._turn:
            try:
                return await asyncio.to_thread(self._embed, texts)
            except (ValueError, RuntimeError) as exc:
                raise self._fail(str(exc)) from None

    def _embed(self, texts: list[str]) -> Embeddings:
        import torch

        s = self._settings
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token or self._tokenizer.unk_token
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=s.max_length, return_tensors="pt"
        ).to(self._device)
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        if s.pooling == "cls":
            vectors = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if s.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        tokens = int(batch["attention_mask"].sum())
        return Embeddings(vectors.float().cpu().tolist(), tokens)

    def context_length(self) -> int | None:
        return getattr(getattr(self._model, "config", None), "max_position_embeddings", None)

    def vocab_size(self) -> int | None:
        return getattr(getattr(self._model, "config", None), "vocab_size", None)

    async def health(self) -> None:
        if self._model is None:
            raise self._fail("model not loaded")

    def stats(self) -> dict[str, Any]:
        return {"device": self._device, "running": int(self._turn.locked())}

    async def shutdown(self) -> None:
        self._model = None
