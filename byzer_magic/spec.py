"""`byzerllm deploy` flags (cell text, argv or YAML) -> a validated DeploySpec.

One parser serves the cell magic and the command line, so a spec that works
in one works in the other. Each flag's type, default and range come from
`options.DeployFlags`; this module adds the rules that tie flags together (the
backend a model type means, what it needs of --model_path and GPUs) and checks
`infer_params` against the backend's settings. Only what a deploy needs from the
machine (the model file, the library) is checked later, by `deploy.preflight`.
Every message masks secrets.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr, ValidationError

from .backends import BACKENDS, EMBEDDING_TYPES, LOCAL_BACKENDS, BackendInfo
from .backends.base import BackendSettings
from .backends.providers import PROVIDER_BASE_URLS
from .errors import SpecError, redact
from .flags import SECRET_KEY, Flags, did_you_mean, read_flags, secrets_in, secrets_in_env, split_cell
from .option_args import default_of, validated
from .options import MAX_WORKERS, DeployFlags  # noqa: F401 - deploy.scale bounds workers by MAX_WORKERS too


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

    @property
    def info(self) -> BackendInfo:
        return BACKENDS[self.backend]

    @property
    def task(self) -> str:
        """"chat", or "embed" for an embedding model type; decides what the worker answers."""
        return "chat" if self.backend == "saas" else task_of(self.pretrained_model_type)

    @property
    def base_url(self) -> str | None:
        """The endpoint a SaaS worker calls: saas.base_url, else the provider's."""
        return getattr(self.params, "base_url", None) or PROVIDER_BASE_URLS.get(self.provider or "")

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
        prefix = self.info.prefix
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
            "base_url": _masked("base_url", self.base_url) if self.backend == "saas" else None,
            "num_workers": self.num_workers,
            "worker_concurrency": self.worker_concurrency,
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "infer_params": self.public_params(),
        }

    def __repr__(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.public_params().items())
        return (
            f"DeploySpec(name={self.name!r}, type={self.pretrained_model_type!r}, "
            f"backend={self.backend!r}, model_path={self.model_path!r}, "
            f"num_workers={self.num_workers}, worker_concurrency={self.worker_concurrency}, "
            f"cpus_per_worker={self.cpus_per_worker:g}, gpus_per_worker={self.gpus_per_worker:g}, "
            f"infer_params=[{params}])"
        )

    __str__ = __repr__


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
        return _build(flags)
    except SpecError as exc:
        raise SpecError(redact(str(exc), secrets + secrets_in_env(argv, env))) from None


def _build(flags: Flags) -> DeploySpec:
    f = validated(DeployFlags, {**flags.values, "infer_params": flags.infer_params})
    model_type = f.pretrained_model_type.strip() or default_of(DeployFlags, "pretrained_model_type")
    backend, provider = _backend_for(model_type, f.infer_backend)
    params = _settings(BACKENDS[backend], model_type, f.infer_params)
    _check_model_path(backend, f.model_path)
    _check_gpus(backend, f.gpus_per_worker)
    concurrency = f.worker_concurrency
    return DeploySpec(
        name=f.model,
        pretrained_model_type=model_type,
        backend=backend,
        provider=provider,
        params=params,
        model_path=f.model_path or None,
        num_workers=f.num_workers,
        worker_concurrency=_default_concurrency(backend, params) if concurrency is None else concurrency,
        cpus_per_worker=f.cpus_per_worker,
        gpus_per_worker=f.gpus_per_worker,
        ray_address=f.ray_address or None,
        force=f.force,
        deploy_timeout=f.deploy_timeout,
        max_queued_requests=f.max_queued_requests,
    )


def _check_model_path(backend: str, model_path: str | None) -> None:
    if backend != "saas" and not model_path:
        raise SpecError(f"--model_path is required for --infer_backend {backend}: " + (
            "the .gguf file to load" if backend == "llama_cpp" else "the model's directory"))
    if backend == "saas" and model_path:
        raise SpecError("--model_path does not apply to saas/* models; the endpoint holds the model")


def _check_gpus(backend: str, gpus: float) -> None:
    """Deepspeed's limit first: its worker never shards, so the tensor-parallel advice would not be so."""
    if backend == "deepspeed" and gpus > 1:
        raise SpecError(
            f"--gpus_per_worker {gpus:g}: a deepspeed worker is one process on one GPU, and DeepSpeed's tensor "
            f"parallelism needs one process per GPU; use --gpus_per_worker 1 with more --num_workers, or "
            f"--infer_backend vllm, which shards one model over several GPUs"
        )
    if BACKENDS[backend].whole_gpus and gpus > 1 and gpus != int(gpus):
        raise SpecError(
            f"--gpus_per_worker {gpus:g}: above 1, {backend} needs whole GPUs (it shards over them with "
            f"tensor parallelism); use 2, 3, ..., or a share below 1 to put several workers on one GPU"
        )


def task_of(model_type: str) -> str:
    """"embed" for the embedding model types (`custom/bge`, `m3e`, ...), else "chat"."""
    bare = model_type[len("custom/"):] if model_type.startswith("custom/") else model_type
    return "embed" if bare.lower() in EMBEDDING_TYPES else "chat"


def _backend_for(model_type: str, infer_backend: str | None) -> tuple[str, str | None]:
    known = ", ".join(f"saas/{p}" for p in PROVIDER_BASE_URLS)
    local = ", ".join(LOCAL_BACKENDS)
    if infer_backend is not None and infer_backend not in LOCAL_BACKENDS:
        hint = did_you_mean(str(infer_backend), LOCAL_BACKENDS)
        raise SpecError(f"--infer_backend {infer_backend!r} is not a backend.{hint} Valid: {local}")
    if model_type.startswith("saas/"):
        provider = model_type[5:]
        if provider not in PROVIDER_BASE_URLS:
            hint = did_you_mean(provider, list(PROVIDER_BASE_URLS), prefix="saas/")
            raise SpecError(
                f"--pretrained_model_type {model_type}: unknown provider.{hint} Known: {known}; "
                f"any OpenAI-compatible endpoint works as saas/openai with saas.base_url=..."
            )
        if infer_backend:
            raise SpecError(f"--infer_backend does not apply to {model_type}; remove it")
        return "saas", provider
    if model_type == "custom/auto":
        if infer_backend:
            return str(infer_backend), None
        raise SpecError(f"--pretrained_model_type custom/auto needs --infer_backend, one of: {local}")
    if difflib.get_close_matches(model_type, ["custom/auto"], n=1, cutoff=0.8):
        raise SpecError(f"--pretrained_model_type {model_type!r}: did you mean custom/auto?")
    if not re.fullmatch(r"(custom/)?[A-Za-z0-9][A-Za-z0-9_.-]*", model_type):
        raise SpecError(
            f"--pretrained_model_type {model_type!r}: use saas/<provider> ({known}), custom/auto with "
            f"--infer_backend ({local}), or a transformers model type such as custom/bge or llama2"
        )
    if task_of(model_type) == "embed":
        if infer_backend not in (None, "transformers"):
            raise SpecError(
                f"--pretrained_model_type {model_type} is an embedding model: it deploys with "
                f"--infer_backend transformers, not {infer_backend}"
            )
        return "transformers", None
    return str(infer_backend or "transformers"), None


def _settings(info: BackendInfo, model_type: str, raw: dict[str, Any]) -> BackendSettings:
    model = info.settings
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


def _explain(exc: ValidationError, info: BackendInfo, model_type: str) -> str:
    parts = []
    for err in exc.errors():
        key = f"{info.prefix}{'.'.join(str(p) for p in err['loc'])}"
        field_info = info.settings.model_fields.get(str(err["loc"][0])) if err["loc"] else None
        about = f" ({field_info.description})" if field_info and field_info.description else ""
        if err["type"] == "missing":
            parts.append(f"--infer_params {key}=... is required for {model_type}{about}")
        else:
            parts.append(f"--infer_params {key}: {err['msg'].lower()}{about}")
    return "; ".join(parts)


def _default_concurrency(backend: str, params: BackendSettings) -> int:
    """vLLM batches what it is given; every other backend answers one request at a time."""
    if backend == "vllm":
        return getattr(params, "max_num_seqs", None) or 256
    return 1


def settings_help() -> str:
    """Every backend's infer_params with type, default and meaning, for `?` and --help."""
    lines = []
    for info in BACKENDS.values():
        lines.append(f"{info.name} infer_params:")
        for key, f in info.settings.model_fields.items():
            default = "required" if f.is_required() else f"default {f.default!r}"
            lines.append(f"  {info.prefix}{key}: {f.description} ({default})")
    return "\n".join(lines)
