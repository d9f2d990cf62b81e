"""Which backends exist: the entry-point group `byzer_magic.backends`.

Each entry point names a `Backend` subclass (`vllm = "byzer_magic.backends.vllm:Backend"`);
the built-in ones are declared in byzer-magic's own pyproject.toml, and any
installed package can add one the same way. The built-ins are also listed
here, so a checkout whose package metadata is not installed still finds them.
Modules are imported when a backend is asked for, and their heavy libraries
only when a backend is constructed, so listing never costs a torch import.
"""
from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

from ..errors import SpecError
from .base import Backend

GROUP = "byzer_magic.backends"

_BUILT_IN = {
    "saas": "byzer_magic.backends.saas:Backend",
    "vllm": "byzer_magic.backends.vllm:Backend",
    "transformers": "byzer_magic.backends.hf:Backend",
    "deepspeed": "byzer_magic.backends.deepspeed:Backend",
    "llama_cpp": "byzer_magic.backends.llama_cpp:Backend",
}
"""The built-ins in the order messages list them (the guide's); the fallback for a checkout without metadata."""

EMBEDDING_TYPES = ("bge", "bge_m3", "m3e", "embedding", "sentence_transformers")
"""`--pretrained_model_type` names (bare or after `custom/`) of models that embed rather than chat."""

_targets: dict[str, str] | None = None


def _scan() -> dict[str, str]:
    found = dict(_BUILT_IN)
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        found.setdefault(point.name, point.value)
    return found


def _known(refresh: bool = False) -> dict[str, str]:
    global _targets
    if _targets is None or refresh:
        importlib.invalidate_caches()
        _targets = _scan()
    return _targets


def names() -> list[str]:
    """Every backend's name: the built-ins first, then installed plugins by name."""
    return list(_known())


def find(name: str) -> type[Backend]:
    """The backend class of that name; looks again once for plugins installed since the last look."""
    target = _known().get(name) or _known(refresh=True).get(name)
    if target is None:
        raise KeyError(name)
    module, _, attr = target.partition(":")
    found = getattr(importlib.import_module(module), attr)
    if not (isinstance(found, type) and issubclass(found, Backend)) or found.name != name:
        raise SpecError(f"the entry point {name} = {target!r} in {GROUP} is not a Backend subclass named {name!r}")
    return found


def every() -> list[type[Backend]]:
    """Every backend class, imported (cheap: a backend's library loads only when it is constructed).

    A plugin that cannot be imported (uninstalled since it was listed, or
    broken) is left out with a warning, so it cannot stop the built-ins.
    """
    found = []
    for name in names():
        try:
            found.append(find(name))
        except (ImportError, AttributeError, SpecError) as exc:
            if name in _BUILT_IN:
                raise
            warnings.warn(f"byzer_magic: backend {name!r} left out: {exc}", stacklevel=2)
    return found


def chosen(name: str) -> type[Backend] | None:
    """The backend `--infer_backend name` picks, or None: looks again for a plugin installed since the last look."""
    try:
        kind = find(name)
    except (KeyError, ImportError):
        return None
    return kind if kind.model_type_prefix is None else None


def local() -> list[str]:
    """Backends that `--infer_backend` picks (those not picked by their model type, as saas/* is)."""
    return [b.name for b in every() if b.model_type_prefix is None]


def infer_backend_help() -> str:
    """--infer_backend's help, from the backends installed."""
    default = next((b.name for b in every() if b.serves_model_types), None)
    return f"local backend: {', '.join(local())}" + (f" (a model type defaults to {default})" if default else "")


def model_path_help() -> str:
    """--model_path's help: what each backend that takes one wants."""
    return "local weights: " + "; ".join(f"{what} for {names}" for what, names in _grouped("model_path_help").items() if what)


def infer_params_help() -> str:
    """--infer_params' help: how each backend's keys begin."""
    parts = [f"{p}* for {names}" if p else f"plain keys for {names}" for p, names in _grouped("prefix").items()]
    return "key=value settings: " + ", ".join(parts)


def _grouped(attribute: str) -> dict:
    """Backend names by the value of one class attribute, for help texts."""
    found: dict = {}
    for b in every():
        found.setdefault(getattr(b, attribute), []).append(b.name)
    return {value: "/".join(names) for value, names in found.items()}
