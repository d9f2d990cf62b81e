"""What a deployment is asked to be: the typed flags, their argparse form and the validated deploy spec."""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The deploy spec's names (`from byzer_magic.spec import parse_spec`), as when spec was one module."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.deploy_spec"), name)
