"""`byzerllm deploy` flags (cell text, argv or YAML) -> a validated DeploySpec.

One parser serves the cell magic and the command line, so a spec that works
in one works in the other. Each flag's type, default and range come from
`options.DeployFlags`; this module adds the rules that tie flags together (the
backend a model type means, whether it takes --model_path, its GPU rule and
default concurrency, all read from the backend's class) and checks
`infer_params` against the backend's settings. Only what a deploy needs from the
machine (the model file, the library) is checked later, by `deploy.preflight`.
Every message masks secrets.
"""
from __future__ import annotations

import dataclasses

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError

from .. import backends
from ..serving import scaling
from ..backends import EMBEDDING_TYPES
from ..backends.base import Backend, BackendSettings, Context
from ..errors import SpecError, redact
from .flags import (
    SECRET_KEY, Flags, did_you_mean, read_flags, secret_references, secrets_in, secrets_in_env, split_cell,
)
from .option_args import default_of, validated
from .options import DeployFlags


@dataclass(frozen=True)
class DeploySpec:
    """Everything needed to start a deployment; its repr never shows a secret."""

    name: str
    pretrained_model_type: str
    backend: str
    params: BackendSettings
    provider: str | None = None
    model_path: str | None = None
    num_workers: int = default_of(DeployFlags, "num_workers")
    worker_concurrency: int = 1
    cpus_per_worker: float = default_of(DeployFlags, "cpus_per_worker")
    gpus_per_worker: float = default_of(DeployFlags, "gpus_per_worker")
    ray_address: str | None = None
    force: bool = default_of(DeployFlags, "force")
    deploy_timeout: float = default_of(DeployFlags, "deploy_timeout")
    max_queued_requests: int = default_of(DeployFlags, "max_queued_requests")
    secret_refs: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """Secret infer_params given by reference (`${VAR}`), as written: what `records` may keep of a secret."""
    min_workers: int | None = None
    max_workers: int | None = None
    """A range for Serve's autoscaler; None: `num_workers` is a fixed count."""
    target_ongoing_requests: float | None = None
    upscale_delay_s: float = default_of(DeployFlags, "upscale_delay_s")
    downscale_delay_s: float = default_of(DeployFlags, "downscale_delay_s")
    max_workers_per_node: int | None = None
    resources: Mapping[str, float] = field(default_factory=dict)

    @property
    def autoscaling(self) -> bool:
        return self.max_workers is not None

    @property
    def backend_class(self) -> type[Backend]:
        """Found by name in each process that asks, so a worker finds a plugin installed on its node."""
        return backends.find(self.backend)

    @property
    def task(self) -> str:
        """"chat", or "embed" for an embedding model type; decides what the worker answers."""
        return task_of(self.pretrained_model_type)

    @property
    def base_url(self) -> str | None:
        """The endpoint the worker calls, for backends that call one (saas.base_url, else the provider's)."""
        return self.backend_class.endpoint(self.params, self.provider)

    def context(self) -> Context:
        """What the backend is told about this deployment besides its settings."""
        return Context(self.name, self.model_path, self.gpus_per_worker, self.provider, self.base_url, self.task)

    def _values(self) -> dict[str, Any]:
        return {**self.params.__dict__, **(self.params.model_extra or {})}

    def secrets(self) -> list[str]:
        """Secret values in this spec (typed secrets, secret-named keys, passwords in URLs), for redacting text."""
        found = []
        for key, value in self._values().items():
            if isinstance(value, SecretStr):
                found.append(value.get_secret_value())
            elif isinstance(value, str) and SECRET_KEY.search(key):
                found.append(value)
            elif isinstance(value, str) and (password := urlsplit(value).password if "://" in value else None):
                found.append(password)
        return [value for value in found if value]

    def public_params(self) -> dict[str, Any]:
        """infer_params as the user wrote them, every secret-looking value shown as ***."""
        prefix = self.backend_class.prefix
        return {
            f"{prefix}{key}": _masked(key, value)
            for key, value in self._values().items()
            if key in self.params.model_fields_set or key in (self.params.model_extra or {})
        }

    def describe(self) -> dict[str, Any]:
        """A JSON-safe, secret-free summary: what a card or `%byzer_list` shows."""
        model = getattr(self.params, "model", None) or self.model_path
        return {
            "name": self.name,
            "pretrained_model_type": self.pretrained_model_type,
            "backend": self.backend,
            "provider": self.provider,
            "model": model,
            "task": self.task,
            "base_url": _masked("base_url", self.base_url),
            "num_workers": self.num_workers,
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "max_workers_per_node": self.max_workers_per_node,
            "resources": dict(self.resources),
            "worker_concurrency": self.worker_concurrency,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "infer_params": self.public_params(),
            "capabilities": dataclasses.asdict(self.backend_class.capabilities),
        }

    def __repr__(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.public_params().items())
        return (
            f"DeploySpec(name={self.name!r}, type={self.pretrained_model_type!r}, "
            f"backend={self.backend!r}, model_path={self.model_path!r}, "
            f"workers={self.workers_text()}, worker_concurrency={self.worker_concurrency}, "
            f"cpus_per_worker={self.cpus_per_worker:g}, gpus_per_worker={self.gpus_per_worker:g}, "
            f"infer_params=[{params}])"
        )

    __str__ = __repr__

    def workers_text(self) -> str:
        """`2`, or `1..4` for an autoscaling range."""
        return f"{self.min_workers}..{self.max_workers}" if self.autoscaling else str(self.num_workers)


def _masked(key: str, value: Any) -> Any:
    """*** for a secret, or for a secret-named key; a URL keeps everything but its password."""
    if isinstance(value, SecretStr) or (isinstance(value, str) and value and SECRET_KEY.search(key)):
        return "***"
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password:
            return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
    return value


def parse_spec(text: str, env: Mapping[str, str] | None = None) -> DeploySpec:
    """Parse the body of a `%%byzer_deploy` cell (or a pasted `byzerllm deploy` line).

    Lines may end in a backslash, `#` starts a comment, and a leading
    `byzerllm deploy` is dropped, so the guide's commands paste as they are.
    """
    return parse_args(split_cell(text), env)


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> DeploySpec:
    """Parse flags already split into words (the command line's argv)."""
    env = os.environ if env is None else env
    argv = list(argv)
    secrets = secrets_in(argv)
    try:
        if not argv:
            raise SpecError("no flags given: at least --model NAME and --pretrained_model_type are needed")
        flags = read_flags(argv, env)
        return replace(_build(flags), secret_refs=tuple(secret_references(argv).items()))
    except SpecError as exc:
        raise SpecError(redact(str(exc), secrets + secrets_in_env(argv, env))) from None


def _build(flags: Flags) -> DeploySpec:
    f = validated(DeployFlags, {**flags.values, "infer_params": flags.infer_params})
    model_type = f.pretrained_model_type.strip() or default_of(DeployFlags, "pretrained_model_type")
    kind, provider = _backend_for(model_type, f.infer_backend)
    params = _settings(kind, model_type, f.infer_params)
    _check_model_path(kind, model_type, f.model_path)
    gpu_problem = kind.gpu_rule.problem(kind.name, f.gpus_per_worker)
    if gpu_problem:
        raise SpecError(gpu_problem)
    concurrency = f.worker_concurrency
    low, high = scaling.check_flags(f)
    scaling.check_resources(f.resources)
    return DeploySpec(
        name=f.model,
        pretrained_model_type=model_type,
        backend=kind.name,
        provider=provider,
        params=params,
        model_path=f.model_path or None,
        num_workers=f.num_workers,
        worker_concurrency=kind.default_concurrency(params) if concurrency is None else concurrency,
        cpus_per_worker=f.cpus_per_worker,
        gpus_per_worker=f.gpus_per_worker,
        ray_address=f.ray_address or None,
        force=f.force,
        deploy_timeout=f.deploy_timeout,
        max_queued_requests=f.max_queued_requests,
        min_workers=low,
        max_workers=high,
        target_ongoing_requests=f.target_ongoing_requests,
        upscale_delay_s=f.upscale_delay_s,
        downscale_delay_s=f.downscale_delay_s,
        max_workers_per_node=f.max_workers_per_node,
        resources=dict(f.resources),
    )


def _check_model_path(kind: type[Backend], model_type: str, model_path: str | None) -> None:
    if kind.model_path_help and not model_path:
        raise SpecError(f"--model_path is required for --infer_backend {kind.name}: {kind.model_path_help}")
    if kind.model_path_help is None and model_path:
        raise SpecError(f"--model_path does not apply to {model_type}; {kind.no_model_path_why or 'remove it'}")


def task_of(model_type: str) -> str:
    """"embed" for the embedding model types (`custom/bge`, `m3e`, ...), else "chat"."""
    bare = model_type[len("custom/"):] if model_type.startswith("custom/") else model_type
    return "embed" if bare.lower() in EMBEDDING_TYPES else "chat"


def _backend_for(model_type: str, infer_backend: str | None) -> tuple[type[Backend], str | None]:
    """The backend a model type and --infer_backend mean, and the provider a `saas/...`-like type names."""
    if infer_backend is not None and backends.chosen(infer_backend) is None:
        local = backends.local()
        hint = did_you_mean(str(infer_backend), local)
        raise SpecError(f"--infer_backend {infer_backend!r} is not a backend.{hint} Valid: {', '.join(local)}")
    every = backends.every()
    local = [b.name for b in every if b.model_type_prefix is None]
    for kind in every:
        if kind.model_type_prefix and model_type.startswith(kind.model_type_prefix):
            provider = kind.provider_of(model_type)
            if infer_backend:
                raise SpecError(f"--infer_backend does not apply to {model_type}; remove it")
            return kind, provider
    if model_type == "custom/auto":
        if infer_backend:
            return backends.find(infer_backend), None
        raise SpecError(f"--pretrained_model_type custom/auto needs --infer_backend, one of: {', '.join(local)}")
    _check_model_type(model_type, every)
    task = task_of(model_type)
    if infer_backend:
        kind = backends.find(infer_backend)
    else:
        kind = next(b for b in every if b.serves_model_types and task in b.tasks)
    if task not in kind.tasks:
        able = " or ".join(b.name for b in every if task in b.tasks and b.model_type_prefix is None)
        raise SpecError(
            f"--pretrained_model_type {model_type} is an embedding model: it deploys with "
            f"--infer_backend {able}, not {infer_backend}"
        )
    return kind, None


def _check_model_type(model_type: str, every: list[type[Backend]]) -> None:
    """A bare transformers model type must look like one; a near miss of custom/auto is named."""
    if difflib.get_close_matches(model_type, ["custom/auto"], n=1, cutoff=0.8):
        raise SpecError(f"--pretrained_model_type {model_type!r}: did you mean custom/auto?")
    if not re.fullmatch(r"(custom/)?[A-Za-z0-9][A-Za-z0-9_.-]*", model_type):
        picked = ", ".join(f"{b.model_type_prefix}<provider>" for b in every if b.model_type_prefix)
        local = ", ".join(b.name for b in every if b.model_type_prefix is None)
        raise SpecError(
            f"--pretrained_model_type {model_type!r}: use {picked}, custom/auto with "
            f"--infer_backend ({local}), or a transformers model type such as custom/bge or llama2"
        )


def _settings(info: type[Backend], model_type: str, raw: dict[str, Any]) -> BackendSettings:
    model = info.Settings
    valid = [f"{info.prefix}{k}" for k in model.model_fields]
    values: dict[str, Any] = {}
    open_keys: Mapping[str, Any] | None = {}
    for key, value in raw.items():
        if SECRET_KEY.search(key) and isinstance(value, str) and not value.strip():
            raise SpecError(
                f"--infer_params {key} is empty: a shell may have expanded an unset variable (write '${{VAR}}' in "
                f"single quotes, or set VAR first); give the secret itself or ${{VAR}}"
            )
        bare = key[len(info.prefix):] if key.startswith(info.prefix) else None
        if bare in model.model_fields:
            values[bare] = value
            continue
        if bare and open_keys == {}:
            open_keys = model.open_keys()
        if bare and open_keys and bare in open_keys:
            values[bare] = _open_value(key, open_keys[bare], value)
            continue
        names = valid + [f"{info.prefix}{k}" for k in (open_keys or {})]
        hint = did_you_mean(key, names)
        more = ""
        if open_keys is None:
            more = f" ({info.library} is not installed here, so its other arguments cannot be checked.)"
        elif open_keys:
            more = f" ...and the other {len(open_keys)} arguments of the installed {info.library}."
        raise SpecError(
            f"--infer_params {key}: not a key for {model_type} ({info.name}).{hint} "
            f"Valid keys: {', '.join(valid)}{more}"
        )
    try:
        return model(**values)
    except ValidationError as exc:
        raise SpecError(_explain(exc, info, model_type)) from None


def _open_value(key: str, annotation: Any, value: Any) -> Any:
    """Check a value against the library's own type hint, when pydantic can read the hint."""
    from pydantic import TypeAdapter
    from pydantic.errors import PydanticSchemaGenerationError

    try:
        adapter = TypeAdapter(annotation)
    except (PydanticSchemaGenerationError, TypeError, NameError):
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        raise SpecError(
            f"--infer_params {key}={value!r}: expected {expected} ({exc.errors()[0]['msg'].lower()})"
        ) from None


def _explain(exc: ValidationError, info: type[Backend], model_type: str) -> str:
    parts = []
    for err in exc.errors():
        key = f"{info.prefix}{'.'.join(str(p) for p in err['loc'])}"
        field_info = info.Settings.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        about = f" ({field_info.description})" if field_info and field_info.description else ""
        if err["type"] == "missing":
            parts.append(f"--infer_params {key}=... is required for {model_type}{about}")
        else:
            parts.append(f"--infer_params {key}: {err['msg'].lower()}{about}")
    return "; ".join(parts)


def settings_help() -> str:
    """Every backend's infer_params with type, default and meaning, for `?` and --help."""
    lines = []
    for info in backends.every():
        lines.append(f"{info.name} infer_params:")
        for key, f in info.Settings.model_fields.items():
            default = "required" if f.is_required() else f"default {f.default!r}"
            lines.append(f"  {info.prefix}{key}: {f.description} ({default})")
    return "\n".join(lines)
