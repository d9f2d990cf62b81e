"""A GGUF file served in-process by llama-cpp-python.

`Llama` is synchronous and not thread-safe, so generation runs in a thread,
one request at a time, and the worker's event loop stays free for health
checks and queue bookkeeping.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from pydantic import Field

from ..errors import BackendError, SpecError
from . import base
from .base import OPENAI_SAMPLING, BackendSettings, Context, Delta, GenParams, Messages, context_exceeded


class Settings(BackendSettings):
    """llama.cpp keys, written plainly as in the deployment guide (`n_ctx=2048`)."""

    n_ctx: int = Field(default=2048, ge=0, description="context window in tokens; 0 takes the model's")
    n_gpu_layers: int = Field(default=0, ge=-1, description="layers offloaded to the GPU; -1 for all")
    n_threads: int | None = Field(default=None, gt=0, description="CPU threads for generation")
    n_batch: int = Field(default=512, gt=0, description="prompt tokens evaluated per batch")
    seed: int | None = Field(default=None, description="sampling seed; None lets llama.cpp pick")
    chat_format: str | None = Field(
        default=None, description="llama-cpp-python chat format; default: the GGUF's own chat template"
    )
    use_mmap: bool = Field(default=True, description="map the file instead of reading it")
    verbose: bool = Field(default=False, description="llama.cpp's load and timing logs in the worker log")
    temperature: float | None = Field(default=None, ge=0, description="default sampling temperature")
    max_tokens: int | None = Field(default=None, gt=0, description="default answer length limit")


_OVER_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
"""llama.cpp's own refusal of a prompt that fills its context, read for its two numbers."""


class _Counter:
    """A logits processor: counts llama.cpp's tokens, applies logit_bias, and ends an answer at the context's end.

    llama-cpp-python's streams carry no usage. It calls this once per sampled
    token with the ids so far: the first call's length is the prompt, the
    longest is the prompt and all but the last sampled token. It applies
    logit_bias itself because llama-cpp-python drops both its own logit_bias
    and any processor passed beside it (it keeps the None list.extend returns).
    And once the context is full it makes end-of-sequence the only choice:
    llama-cpp-python's stream, holding back a split UTF-8 character, samples
    past max_tokens, and the token after the context's last slot fails
    ("llama_decode returned 1").
    """

    def __init__(self, bias: dict[int, float] | None, limit: int, eos: int):
        self.first = 0
        self.longest = 0
        self.bias = sorted((bias or {}).items())
        self.limit, self.eos = limit, eos
        self.ended = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.first = self.first or len(input_ids)
        self.longest = max(self.longest, len(input_ids))
        for token, value in self.bias:
            scores[token] += value
        if len(input_ids) >= self.limit:
            self.ended = True
            scores[:] = -1e30
            scores[self.eos] = 0.0
        return scores

    def usage(self) -> dict[str, int]:
        completion = self.longest - self.first + 1 - int(self.ended) if self.first else 0
        return {"prompt_tokens": self.first, "completion_tokens": completion, "total_tokens": self.first + completion}


TOOL_FORMATS = frozenset({"chatml-function-calling"})
"""llama-cpp-python chat formats whose handler answers with OpenAI tool calls, `auto` choice included."""


_LOOSE_CHARS = r'[^"\\]'
_JSON_CHARS = r'[^"\\\x7F\x00-\x1F]'


def strict_json_strings() -> None:
    """llama-cpp-python's schema grammars keep raw control characters out of JSON strings, as JSON requires.

    Its schema converter (used for response_format and by the
    chatml-function-calling handler for tool arguments) lets a string hold
    them, so a model that samples one (the tiny random model often does)
    answers with JSON no client parses; its own plain-JSON grammar excludes
    them. This gives the converter's string rule the same exclusion, once per process.
    """
    from llama_cpp import llama_grammar

    rule = llama_grammar.PRIMITIVE_RULES["char"]
    if _JSON_CHARS not in rule.content:
        fixed = rule.content.replace(_LOOSE_CHARS, _JSON_CHARS, 1)
        llama_grammar.PRIMITIVE_RULES["char"] = llama_grammar.BuiltinRule(fixed, rule.deps)


class Backend(base.Backend):
    """One Llama instance; requests take turns on it."""

    name = "llama_cpp"
    Settings = Settings
    prefix = ""
    library = "llama_cpp"
    extra = "llama-cpp"
    model_path_help = "the .gguf file to load"
    capabilities = OPENAI_SAMPLING

    def __init__(self, settings: Settings, context: Context):
        super().__init__(settings, context)
        self._settings = settings
        self._model_path = context.model_path
        self._llama: Any = None
        self._turn = asyncio.Lock()
        self._count_lock = threading.Lock()
        self._threads_inside = 0
        self._most_threads_inside = 0

    @classmethod
    def check_model_path(cls, path: Path) -> str | None:
        """A GGUF file, told by its first four bytes."""
        if not path.is_file():
            return "llama_cpp needs a .gguf file, not a directory"
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return "not a GGUF file (it does not start with 'GGUF')"
        return None

    async def start(self) -> None:
        s = self._settings
        try:
            from llama_cpp import Llama

            strict_json_strings()
            kwargs: dict[str, Any] = {
                "model_path": self._model_path,
                "n_ctx": s.n_ctx,
                "n_gpu_layers": s.n_gpu_layers,
                "n_batch": s.n_batch,
                "use_mmap": s.use_mmap,
                "verbose": s.verbose,
                "chat_format": s.chat_format,
            }
            if s.n_threads:
                kwargs["n_threads"] = s.n_threads
            if s.seed is not None:
                kwargs["seed"] = s.seed
            self._llama = await asyncio.to_thread(Llama, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError("llama_cpp", None, f"cannot load {self._model_path}: {exc}") from None

    def _request(self, gen: GenParams) -> dict[str, Any]:
        gen = gen.over(self._settings)
        kwargs: dict[str, Any] = {"stream": True, **gen.sampling()}
        if gen.temperature == 0:
            kwargs["top_k"] = 1
        return kwargs

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        kwargs = {**self._request(gen), **self._structured(gen), "messages": messages}
        if gen.tools:
            return self._with_tools({**kwargs, "tools": gen.tools, "tool_choice": gen.tool_choice or "auto"})
        return self._relay(self._llama.create_chat_completion, kwargs, gen, True)

    def _structured(self, gen: GenParams) -> dict[str, Any]:
        """`response_format` as a llama.cpp grammar, which constrains every sampled token to valid JSON.

        llama-cpp-python's own response_format takes only json_object; OpenAI's
        json_schema form is turned into a grammar here with its own converter.
        """
        fmt = gen.response_format or {}
        if fmt.get("type") not in ("json_object", "json_schema"):
            return {}
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        schema = (fmt.get("json_schema") or {}).get("schema") if fmt["type"] == "json_schema" else None
        try:
            if schema is None:
                return {"grammar": LlamaGrammar.from_string(JSON_GBNF, verbose=False)}
            return {"grammar": LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)}
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SpecError(f"response_format.json_schema.schema: llama.cpp cannot turn it into a grammar ({exc}); "
                            f"use the JSON Schema subset llama.cpp supports") from None

    async def _with_tools(self, kwargs: dict[str, Any]) -> AsyncIterator[Delta]:
        """Tools through llama-cpp-python's chatml-function-calling handler, whole: it cannot stream an `auto` choice.

        The answer then comes as one delta (text or calls), which a streaming
        caller receives as one chunk.
        """
        if self._settings.chat_format not in TOOL_FORMATS:
            raise SpecError(f"tools: {self.context.deployment!r} (llama_cpp) takes tools only when deployed with "
                            f"chat_format=chatml-function-calling; its chat_format is {self._settings.chat_format}")
        async with self._turn:
            step = asyncio.ensure_future(self._inside(self._llama.create_chat_completion, **{**kwargs, "stream": False}))
            try:
                answer = await asyncio.shield(step)
            except (ValueError, RuntimeError) as exc:
                raise BackendError("llama_cpp", None, str(exc)) from None
            finally:
                if not step.done():
                    await asyncio.wait([step])
        choice = answer["choices"][0]
        message = choice["message"]
        calls = tuple({**call, "index": i} for i, call in enumerate(message.get("tool_calls") or ()))
        finish = "tool_calls" if calls else choice.get("finish_reason")
        yield Delta(message.get("content") or "", finish, answer.get("usage"), tool_calls=calls)

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        """A raw prompt, continued as it is (no chat template)."""
        return self._relay(self._llama.create_completion, {**self._request(gen), "prompt": prompt}, gen, False)

    async def _relay(self, call: Any, kwargs: dict[str, Any], gen: GenParams, chat: bool) -> AsyncIterator[Delta]:
        """The answer as deltas, then one carrying usage as llama.cpp's own tokenizer counted it (see _Counter).

        Left without max_tokens, llama.cpp answers up to the context's end; an
        answer the counter had to end there finishes with "length".
        """
        from llama_cpp import LogitsProcessorList

        counter = _Counter(gen.logit_bias, self._llama.n_ctx(), self._llama.token_eos())
        kwargs["logits_processor"] = LogitsProcessorList([counter])
        try:
            async for delta in self._turns(call, kwargs):
                if delta.finish_reason and counter.ended:
                    delta = Delta(delta.text, "length")
                yield delta
        except ValueError as exc:
            found = _OVER_CONTEXT.search(str(exc))
            if found is None:
                raise BackendError("llama_cpp", None, str(exc)) from None
            raise context_exceeded(self.context.deployment, int(found[1]), int(found[2]), chat) from None
        yield Delta("", None, counter.usage())

    async def _turns(self, call: Any, kwargs: dict[str, Any]) -> AsyncIterator[Delta]:
        """One request at a time; the turn passes on only once no thread is inside the model.

        A cancelled await does not stop the thread it waited on: releasing the
        turn then let the next request into the model beside it. So each step's
        thread is shielded and waited for, and the generator is closed (which
        stops llama.cpp) in a thread before the turn is released.
        """
        async with self._turn:
            chunks: Iterator[dict] | None = None
            step: asyncio.Future | None = None
            try:
                step = asyncio.ensure_future(self._inside(call, **kwargs))
                chunks = await asyncio.shield(step)
                while True:
                    step = asyncio.ensure_future(self._inside(next, chunks, None))
                    chunk = await asyncio.shield(step)
                    if chunk is None:
                        break
                    choice = chunk["choices"][0]
                    text = (choice["delta"].get("content") if "delta" in choice else choice.get("text")) or ""
                    if text or choice.get("finish_reason"):
                        yield Delta(text, choice.get("finish_reason"))
            except RuntimeError as exc:
                raise BackendError("llama_cpp", None, str(exc)) from None
            finally:
                if step is not None and not step.done():
                    await asyncio.wait([step])
                if step is not None and chunks is None and step.done() and not step.cancelled() \
                        and step.exception() is None:
                    chunks = step.result()
                if chunks is not None:
                    await self._inside(chunks.close)

    async def _inside(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a call into the model in a thread, counting the threads inside it (at most one, ever)."""

        def counted() -> Any:
            with self._count_lock:
                self._threads_inside += 1
                self._most_threads_inside = max(self._most_threads_inside, self._threads_inside)
            try:
                return call(*args, **kwargs)
            finally:
                with self._count_lock:
                    self._threads_inside -= 1

        return await asyncio.to_thread(counted)

    def stats(self) -> dict[str, Any]:
        return {"most_threads_inside": self._most_threads_inside}

    def context_length(self) -> int | None:
        """The tokens one request may hold: llama.cpp pads a small n_ctx (128 became 256), but llama-cpp-python's
        own token buffer keeps the size asked for, and a prompt past it fails ("could not broadcast ...")."""
        return min(self._llama.n_ctx(), len(self._llama.input_ids)) if self._llama is not None else None

    def count_tokens(self, messages: Messages) -> int | None:
        """The prompt tokens llama-cpp-python would send: the GGUF's chat template (or chat_format's), tokenized.

        As `Llama` itself does: the template gets the vocabulary's BOS and EOS
        text, and the prompt is tokenized with special tokens. None for a chat
        handler that is not a plain template (function calling, images).
        """
        from llama_cpp import llama_chat_format as formats

        llama = self._llama
        template = llama.metadata.get("tokenizer.chat_template")
        if llama.chat_format == "chat_template.default" and template:
            def text(token: int) -> str:
                return llama.detokenize([token], special=True).decode(errors="ignore") if token >= 0 else ""

            formatter = formats.Jinja2ChatFormatter(template, eos_token=text(llama.token_eos()),
                                                    bos_token=text(llama.token_bos()))
        else:
            formatter = formats._CHAT_FORMATS.get(llama.chat_format)  # noqa: SLF001 - the registry has no getter
        if formatter is None:
            return None
        return len(llama.tokenize(formatter(messages=messages).prompt.encode(), special=True))

    def vocab_size(self) -> int | None:
        return self._llama.n_vocab() if self._llama is not None else None

    async def health(self) -> None:
        if self._llama is None:
            raise BackendError("llama_cpp", None, "model not loaded")

    async def shutdown(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None
