"""Which backends exist, where each lives, and what each needs installed.

Each backend is one module holding a `Settings` model (its `--infer_params`)
and a `Backend` class. Modules are imported by name only when asked for, and
their heavy libraries only when a Backend is built, so listing or validating
never costs a torch import.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from .base import BackendSettings


@dataclass(frozen=True)
class BackendInfo:
    """Static facts about one backend: its module, key prefix and requirements."""

    name: str
    module: str
    prefix: str
    library: str
    extra: str
    whole_gpus: bool

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def settings(self) -> type[BackendSettings]:
        return self.load().Settings

    def library_installed(self) -> bool:
        return importlib.util.find_spec(self.library) is not None


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo("saas", "byzer_magic.backends.saas", "saas.", "openai", "", False),
        BackendInfo("llama_cpp", "byzer_magic.backends.llama_cpp", "", "llama_cpp", "llama-cpp", False),
        BackendInfo("vllm", "byzer_magic.backends.vllm", "backend.", "vllm", "vllm", True),
    )
}

LOCAL_BACKENDS = ("vllm", "llama_cpp")
"""Backends that `custom/auto` accepts, in the guide's order."""

PLANNED_BACKENDS = ("transformers", "deepspeed")
"""Backends the guide names that this version cannot host yet."""
