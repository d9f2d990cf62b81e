"""Every option a user sets, declared once: its type, default, range and help.

`DeployFlags` are `%%byzer_deploy`'s and `byzer-magic deploy`'s flags and the
keys of a `--file` YAML; `ServeFlags` are `%byzer_serve`'s and `byzer-magic
serve`'s; `ChatOptions` are `%byzer_chat`'s and `byzer-magic chat`'s, and its
`Sampling` part also bounds the OpenAI endpoint's requests. Parsers, `?` and
`--help` texts, the YAML key check, defaults and the one-sentence errors are
all read from these models (`option_args`), as llama-cpp-python's server reads
its `Settings`: no other module writes a flag's default or range.

Cross-flag rules (a backend that needs whole GPUs, `--model_path` for local
backends) depend on the backend and stay in `spec`.
"""
from __future__ import annotations

import keyword
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import backends
from ..backends.base import GenParams

MAX_WORKERS = 256
RESERVED_NAME = "byzer_openai"
"""The Serve application of the OpenAI endpoint; no deployment may take (and so replace) it."""
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_FLAGS = ConfigDict(extra="forbid", protected_namespaces=(), coerce_numbers_to_str=True, allow_inf_nan=False)


class DeployFlags(BaseModel):
    """The flags of `byzerllm deploy`, typed; `infer_params` are checked by the backend's own model."""

    model_config = _FLAGS

    model: str = Field(description="the deployment's name, which chat, scale and undeploy take", examples=["my_chat"])
    pretrained_model_type: str = Field(
        "custom/auto",
        description="saas/<provider>; custom/auto with --infer_backend; or a transformers model type: "
                    "custom/bge, m3e, ... embed, any other name chats",
    )
    infer_backend: str | None = Field(None, description=backends.infer_backend_help())
    model_path: str | None = Field(None, description=backends.model_path_help())
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="workers, i.e. Ray Serve replicas")
    min_workers: int | None = Field(
        None, ge=0, le=MAX_WORKERS, description="fewest workers when autoscaling (with --max_workers); 0 frees every "
                                                "CPU and GPU when idle, and the next request waits for a worker to start")
    max_workers: int | None = Field(
        None, ge=1, le=MAX_WORKERS, description="most workers when autoscaling: Serve adds workers under load up to "
                                                "this and removes them when idle (--min_workers defaults to 1)")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="requests per worker that autoscaling aims for; default: --worker_concurrency "
                                "(80% of it above 1)")
    upscale_delay_s: float = Field(30.0, ge=0, description="seconds the load must stay high before autoscaling adds "
                                                           "a worker (Serve's default)", json_schema_extra={"unit": "seconds"})
    downscale_delay_s: float = Field(600.0, ge=0, description="seconds the load must stay low before autoscaling "
                                                              "removes a worker (Serve's default)",
                                     json_schema_extra={"unit": "seconds"})
    max_workers_per_node: int | None = Field(
        None, ge=1, description="most workers of this deployment on one Ray node (Serve's max_replicas_per_node): "
                                "1 spreads them so one node's death costs one worker")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each worker asks for (an accelerator type, a node "
                                          "label), name=amount; workers land only on nodes that have them")
    worker_concurrency: int | None = Field(
        None, ge=1, description="requests one worker takes at once; default: the backend's (1, more for a batching engine)")
    max_queued_requests: int = Field(
        1024, ge=-1, description="requests a caller may queue for this deployment beyond what its workers hold; "
                                 "past it a request is refused at once (503); -1: no limit")
    cpus_per_worker: float = Field(0.001, ge=0, description="Ray CPUs per worker, fractions allowed")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per worker")
    infer_params: dict[str, Any] = Field(
        default_factory=dict,
        description=backends.infer_params_help(),
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to use; default RAY_ADDRESS, else the running one, else a local one")
    file: str | None = Field(None, description="YAML file with the same keys; flags given here override it")
    force: bool = Field(False, description="replace a deployment that already has this name")
    deploy_timeout: float = Field(300.0, gt=0, description="seconds to wait for every worker to be ready",
                                  json_schema_extra={"unit": "seconds"})

    @field_validator("model")
    @classmethod
    def _a_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError("is not a valid name: use letters, digits, '_', '-' or '.', "
                             "start with a letter or digit, at most 64 characters")
        if value == RESERVED_NAME:
            raise ValueError("is the name of the OpenAI endpoint (%byzer_serve): pick another name")
        return value


class ServeFlags(BaseModel):
    """Where the OpenAI-compatible endpoint listens and who may call it."""

    model_config = _FLAGS

    host: str = Field("127.0.0.1", description="address to listen on; 127.0.0.1 is this machine only, "
                                               "0.0.0.0 opens it to the network")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    api_key: str | None = Field(None, description="the key every route but /health requires (`Authorization: Bearer "
                                                  "KEY`); ${VAR} reads it from the environment; default: a key made "
                                                  "once and kept in ~/.byzer_magic/endpoint_key")
    allowed_hosts: str | None = Field(None, description="comma-separated Host header values to accept besides this "
                                                        "machine's loopback names (for a proxy or a DNS name)")
    force: bool = Field(False, description="replace a running endpoint even where the new one is less protected")
    max_body_mb: float = Field(16.0, gt=0, le=1024, description="largest request body, in MiB; a larger one gets 413 "
                                                                "before it is read")
    processes: int | None = Field(None, ge=1, le=32, description="server processes sharing the port; default: half "
                                                                  "this machine's cores, 2 to 4")
    stop: bool = Field(False, description="stop the endpoint (the deployments keep running)")
    ray_address: str | None = Field(None, description="Ray cluster to use; default RAY_ADDRESS, else the running one")

    @field_validator("api_key")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty (a shell may have expanded an unset variable): give the key, or leave "
                             "--api_key out to use the one kept in ~/.byzer_magic/endpoint_key")
        return value


SERVE_DEFAULTS = ServeFlags()
"""Where `%byzer_serve` listens when no flag says otherwise."""


def session_name(value: str | None) -> str | None:
    """A session's name: a deployment-style name, which is also a safe file name for the command line's store."""
    if value is not None and not NAME_PATTERN.match(value):
        raise ValueError("is not a valid session name: use letters, digits, '_', '-' or '.', start with a letter "
                         "or digit, at most 64 characters")
    return value


def python_name(value: str | None) -> str | None:
    """An `-o` variable: a Python name that is not a keyword."""
    if value is not None and (not value.isidentifier() or keyword.iskeyword(value)):
        raise ValueError("is not a Python variable name")
    return value


class Sampling(BaseModel):
    """How one answer is generated, with the ranges OpenAI's API gives; None leaves it to the backend."""

    temperature: float | None = Field(None, ge=0, le=2, description="sampling temperature; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="sample only from the most likely tokens "
                                                              "whose probabilities add up to this")
    max_tokens: int | None = Field(None, ge=1, description="longest answer, in tokens")
    seed: int | None = Field(None, description="seed for sampling, for backends that honour one")

    def gen(self) -> GenParams:
        return GenParams(self.temperature, self.max_tokens, self.top_p, self.seed)


class HistoryOptions(BaseModel):
    """`%byzer_history`'s options: show, empty or hand over one session."""

    model_config = ConfigDict(extra="forbid")

    session: str = Field(description="the session's name, as given to --session", examples=["s"])
    clear: bool = Field(False, description="empty the session")
    output: str | None = Field(None, description="keep the conversation as OpenAI messages in this variable",
                               json_schema_extra={"short": "-o", "metavar": "VAR", "notebook_only": True})

    _a_session = field_validator("session")(lambda cls, value: session_name(value))
    _a_variable = field_validator("output")(lambda cls, value: python_name(value))


class ChatOptions(Sampling):
    """`%byzer_chat`'s and `byzer-magic chat`'s options; `notebook_only` ones are the magic's alone."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    system: str | None = Field(None, description="system prompt placed before the question")
    session: str | None = Field(None, description="keep the conversation in this session: the question and answer "
                                                  "are added to it, and the history goes before the question, "
                                                  "trimmed from the oldest turn to fit the model's context",
                                json_schema_extra={"metavar": "S"})
    output: str | None = Field(None, description="keep the answer (a ChatResult) in this variable",
                               json_schema_extra={"short": "-o", "metavar": "VAR", "notebook_only": True})
    no_stream: bool = Field(False, description="print the answer once it is complete",
                            json_schema_extra={"notebook_only": True})

    @field_validator("output")
    @classmethod
    def _a_variable(cls, value: str | None) -> str | None:
        return python_name(value)

    @field_validator("session")
    @classmethod
    def _a_session(cls, value: str | None) -> str | None:
        return session_name(value)


MAX_CONCURRENCY = 4096
VIAS = ("handle", "endpoint")


class BenchOptions(BaseModel):
    """`%byzer_bench`'s and `byzer-magic bench`'s options: a closed-loop load, one concurrency level after another."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    concurrency: str = Field("1,4,16", description="concurrency levels, run one after another: requests kept in "
                                                  "flight at once, comma-separated", examples=["1,4,16"])
    requests: int = Field(64, ge=1, description="requests sent at each level")
    max_tokens: int = Field(64, ge=1, description="tokens asked of each answer (end-of-sequence is ignored where "
                                                  "the backend can)")
    prompt: str | None = Field(None, description="the prompt every request sends (default: --prompt_tokens words)")
    prompt_tokens: int = Field(64, ge=1, le=100_000, description="a prompt of about this many tokens (that many "
                                                               "common words, different in each request)")
    via: str = Field("handle", description="handle: the Python API, as %byzer_chat calls it; endpoint: the running "
                                           "%byzer_serve endpoint, through the openai client")
    api_key: str | None = Field(None, description="the endpoint's key when it was started with its own --api_key "
                                                  "(${VAR} reads it from the environment); default: the generated one")
    output: str | None = Field(None, description="keep the results (a pandas DataFrame) in this variable",
                               json_schema_extra={"short": "-o", "metavar": "VAR", "notebook_only": True})
    format: str = Field("table", description="how the results print: table, json or csv",
                        json_schema_extra={"shell_only": True})

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, value: str) -> str:
        parts = [part.strip() for part in str(value).split(",")]
        if not all(part.isdigit() and 1 <= int(part) <= MAX_CONCURRENCY for part in parts):
            raise ValueError(f"is not a list of concurrency levels: give whole numbers from 1 to {MAX_CONCURRENCY} "
                             f"separated by commas, e.g. 1,4,16")
        return ",".join(str(int(part)) for part in parts)

    @field_validator("prompt_tokens")
    @classmethod
    def _one_prompt(cls, value: int, info: Any) -> int:
        if info.data.get("prompt") is not None:
            raise ValueError("cannot be given with --prompt: give one of the two")
        return value

    @field_validator("via")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if value not in VIAS:
            raise ValueError(f"is not a way in: use {' or '.join(VIAS)}")
        return value

    @field_validator("format")
    @classmethod
    def _a_format(cls, value: str) -> str:
        if value not in ("table", "json", "csv"):
            raise ValueError("is not a format: use table, json or csv")
        return value

    @field_validator("output")
    @classmethod
    def _a_variable(cls, value: str | None) -> str | None:
        return python_name(value)

    def levels(self) -> list[int]:
        return [int(part) for part in self.concurrency.split(",")]
