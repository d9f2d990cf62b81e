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
import json
import os
import re
import uuid
from typing import Any, AsyncIterator, Mapping

from pydantic import ConfigDict, Field

from ..errors import BackendError, SpecError
from . import base
from .base import OPENAI_SAMPLING, BackendSettings, Context, Delta, GenParams, GpuRule, Messages


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
    load_format: str = Field(default="auto", description="how weights load: auto, safetensors, ..., dummy (random)")
    kv_cache_memory_bytes: int | None = Field(
        default=None, gt=0, description="KV cache size in bytes; on a CPU worker default: a quarter of free memory"
    )
    tool_call_parser: str | None = Field(
        default=None, description="vLLM's tool parser for the model's tool-call format (hermes, llama3_json, "
                                  "mistral, ...), as `vllm serve --tool-call-parser` names it; unset: no tools"
    )


_NOT_ENGINE_ARGS = {"tool_call_parser"}
"""Settings the backend itself reads; the rest go to AsyncEngineArgs."""


_ERROR_LINE = re.compile(r"^(?:\([^)]*\)\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("Engine core initialization failed", "Engine process failed to start")
_CPU_KV_CAP = 4 << 30


def _stderr_file() -> str | None:
    """The file this process's stderr goes to, when it is one (a Ray worker's log)."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def engine_root_cause(path: str | None, since: int) -> str | None:
    """The last error an engine process wrote to the shared stderr file after offset `since`.

    vLLM's engine core runs in a child process that inherits the worker's
    stderr; when it cannot start, the frontend only says "Engine core
    initialization failed. See root cause above", and the cause (not enough
    memory, a max_model_len the KV cache cannot hold, a bad dtype) is the last
    exception line the child logged there.
    """
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read()[-400_000:].decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        found = _ERROR_LINE.match(line.strip())
        if found and not found.group(2).startswith(_WRAPPERS):
            return f"{found.group(1)}: {found.group(2)}"
    return None


def _cpu_kv_cache_bytes() -> int:
    """A KV cache that fits a CPU worker: a quarter of the memory free now, at most 4 GiB."""
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(256 << 20, min(_CPU_KV_CAP, free // 4))


def _structured_outputs(response_format: dict | None) -> Any:
    """OpenAI's response_format as vLLM's StructuredOutputsParams (the engine's grammar backend enforces it).

    Whitespace inside the JSON is the engine's setting (structured outputs'
    disable_any_whitespace, not a per-request one in this vLLM).
    """
    kind = (response_format or {}).get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    schema = (response_format.get("json_schema") or {}).get("schema") or {}
    return StructuredOutputsParams(json=schema)


def _forced_schema(request: Any) -> Any:
    """StructuredOutputsParams for a named or `required` tool choice (vLLM's own schema for it), else None."""
    from vllm.sampling_params import StructuredOutputsParams
    from vllm.tool_parsers.utils import get_json_schema_from_tools

    schema = get_json_schema_from_tools(tool_choice=request.tool_choice, tools=request.tools,
                                        parallel_tool_calls=request.parallel_tool_calls)
    return None if schema is None else StructuredOutputsParams(json=schema)


def _tool_calls(text: str, request: Any, parser: Any) -> tuple[tuple[dict[str, Any], ...], str]:
    """The calls in a whole answer, and what is left as content, by vLLM's serving layer's rules.

    Without a parser the answer was forced: a named choice's text is the
    arguments, `required`'s is a JSON list of {name, parameters}.
    """
    found: list[tuple[str, str]] = []
    content = text
    choice = request.tool_choice
    if parser is None and choice == "required":
        try:
            found = [(c["name"], json.dumps(c.get("parameters", {}))) for c in json.loads(text)]
        except (ValueError, TypeError, KeyError):
            found = []
        content = ""
    elif parser is None:
        name = choice["function"]["name"] if isinstance(choice, dict) else choice.function.name
        found, content = ([(name, text)] if text.strip() else []), ""
    elif choice != "none":
        info = parser.extract_tool_calls(text, request=request)
        if info.tools_called:
            found = [(c.function.name, c.function.arguments) for c in info.tool_calls]
            content = info.content or ""
    calls = tuple({"index": i, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                   "function": {"name": name, "arguments": arguments}} for i, (name, arguments) in enumerate(found))
    return calls, content


class Backend(base.Backend):
    """An AsyncLLM engine; Serve lets it take `worker_concurrency` requests at once."""

    name = "vllm"
    Settings = Settings
    library = "vllm"
    extra = "vllm"
    gpu_rule = GpuRule(whole_above_one=True)
    capabilities = dataclasses.replace(OPENAI_SAMPLING, ignore_eos=True)

    def __init__(self, settings: Settings, context: Context):
        super().__init__(settings, context)
        self._settings = settings
        self._model_path = context.model_path
        self._gpus = context.gpus
        self._engine: Any = None
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}
        self._ids = itertools.count()

    @classmethod
    def default_concurrency(cls, settings: BackendSettings) -> int:
        """vLLM batches what it is given: as many as backend.max_num_seqs, else 256."""
        return getattr(settings, "max_num_seqs", None) or 256

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        stderr = _stderr_file()
        since = os.path.getsize(stderr) if stderr else 0
        try:
            # The API server's defaults (larger prefill batches), as `vllm serve` has: a worker serves many callers.
            args = AsyncEngineArgs(model=self._model_path, **self.engine_args())
            self._engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
            tokenizer = self._engine.get_tokenizer()
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
            self._defaults = self._engine.model_config.get_diff_sampling_param()
        except Exception as exc:  # noqa: BLE001 - any failure to start fails the deploy, with its cause
            cause = engine_root_cause(stderr, since) or f"{type(exc).__name__}: {exc}"
            raise BackendError("vllm", None, f"cannot start the engine on {self._model_path}: {cause}") from None

    def engine_args(self) -> dict[str, Any]:
        """Engine arguments: the settings, tensor parallelism from the worker's GPUs, a KV cache that fits a CPU.

        A worker given a share of a GPU (--gpus_per_worker 0.5) takes that
        share of its memory unless backend.gpu_memory_utilization says otherwise.
        """
        args = self._settings.model_dump(exclude_none=True, exclude=_NOT_ENGINE_ARGS)
        if self._gpus > 1:
            args.setdefault("tensor_parallel_size", int(self._gpus))
            # Multiprocessing, never Ray's executor: the worker already holds its GPUs, and under Ray's executor
            # vLLM's engine process (spawned, outside the replica's placement group when there is one) asks Ray for
            # GPUs the replica holds, and waits for them forever. Its shards are local processes here either way.
            args.setdefault("distributed_executor_backend", "mp")
        given = self._settings.model_fields_set | set(self._settings.model_extra or {})
        if 0 < self._gpus < 1 and "gpu_memory_utilization" not in given:
            args["gpu_memory_utilization"] = round(0.9 * self._gpus, 3)
        if self._gpus == 0 and not given & {"gpu_memory_utilization", "kv_cache_memory_bytes"}:
            args["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes()
        if "kv_cache_memory_bytes" in args and "gpu_memory_utilization" not in given:
            args.pop("gpu_memory_utilization", None)
        return args

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        if gen.tools:
            return self._with_tools(messages, gen)
        prompt = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._generate(prompt, gen, True, _structured_outputs(gen.response_format))

    async def _with_tools(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        """Tool calls as `vllm serve` makes them, from the whole answer.

        A named or `required` tool choice is forced with structured output
        built by vLLM's own get_json_schema_from_tools, and read as vLLM's
        serving layer reads it; `auto` lets the model answer in its own format
        and vLLM's tool parser (backend.tool_call_parser) finds the calls.
        """
        request, parser = self._tool_request(messages, gen)
        prompt = self._tokenizer.apply_chat_template(messages, tools=gen.tools, tokenize=False,
                                                     add_generation_prompt=True)
        forced = _forced_schema(request)
        deltas = [d async for d in self._generate(prompt, gen, True, forced)]
        text = "".join(d.text for d in deltas)
        last = deltas[-1] if deltas else Delta("", "stop")
        calls, content = _tool_calls(text, request, parser if forced is None else None)
        finish = "tool_calls" if calls else last.finish_reason
        yield Delta(content, finish, last.usage, tuple(t for d in deltas for t in d.token_ids), calls)

    def _tool_request(self, messages: Messages, gen: GenParams) -> tuple[Any, Any]:
        """vLLM's own ChatCompletionRequest and tool parser for this chat, so its serving layer's rules apply."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        name = self._settings.tool_call_parser
        if not name:
            raise SpecError(f"tools: {self.context.deployment!r} (vllm) takes tools only when deployed with "
                            f"backend.tool_call_parser=NAME (the model's format, e.g. hermes or llama3_json)")
        try:
            parser_class = ToolParserManager.get_tool_parser(name)
        except KeyError:
            raise SpecError(f"backend.tool_call_parser={name}: vLLM has no such tool parser") from None
        request = ChatCompletionRequest(model=self.context.deployment, messages=messages, tools=gen.tools,
                                        tool_choice=gen.tool_choice or "auto",
                                        parallel_tool_calls=gen.parallel_tool_calls is not False)
        return request, parser_class(self._tokenizer, request.tools)

    def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        return self._generate(prompt, gen, False, _structured_outputs(gen.response_format))

    def _sampling(self, prompt: str, gen: GenParams, chat: bool, structured: Any = None) -> Any:
        """vLLM's SamplingParams; max_tokens is what is left of the context, at most what was asked."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        defaults = self._defaults
        return SamplingParams(
            temperature=defaults.get("temperature", 1.0) if gen.temperature is None else gen.temperature,
            top_p=defaults.get("top_p", 1.0) if gen.top_p is None else gen.top_p,
            max_tokens=self.answer_budget(len(self._tokenizer.encode(prompt)), gen, chat),
            seed=gen.seed,
            stop=list(gen.stop) or None,
            ignore_eos=gen.ignore_eos,
            presence_penalty=gen.presence_penalty or 0.0,
            frequency_penalty=gen.frequency_penalty or 0.0,
            logit_bias=gen.logit_bias or None,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured,
        )

    async def _generate(self, prompt: str, gen: GenParams, chat: bool, structured: Any = None) -> AsyncIterator[Delta]:
        params = self._sampling(prompt, gen, chat, structured)
        request_id = f"byzer-{next(self._ids)}"
        try:
            held: tuple[int, ...] = ()
            generated = 0
            async for out in self._engine.generate(prompt, params, request_id):
                piece = out.outputs[0]
                generated += len(piece.token_ids)
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

    def count_tokens(self, messages: Messages) -> int | None:
        """The prompt `chat` would send: the chat template applied, then tokenized as vLLM does."""
        prompt = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self._tokenizer.encode(prompt))

    def context_length(self) -> int | None:
        return self._engine.model_config.max_model_len if self._engine is not None else None

    def vocab_size(self) -> int | None:
        return self._engine.model_config.get_vocab_size() if self._engine is not None else None

    async def health(self) -> None:
        await self._engine.check_health()

    def stats(self) -> dict[str, Any]:
        processor = getattr(self._engine, "output_processor", None)
        running = processor.get_num_unfinished_requests() if processor is not None else None
        return {"running": running}

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
