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
        BackendInfo("transformers", "byzer_magic.backends.hf", "backend.", "transformers", "transformers", False),
        BackendInfo("deepspeed", "byzer_magic.backends.deepspeed", "backend.", "deepspeed", "deepspeed", True),
    )
}

LOCAL_BACKENDS = ("vllm", "transformers", "deepspeed", "llama_cpp")
"""Backends that `custom/auto` accepts, in the guide's order."""

EMBEDDING_TYPES = ("bge", "bge_m3", "m3e", "embedding", "sentence_transformers")
"""`--pretrained_model_type` names (bare or after `custom/`) of models that embed rather than chat."""
