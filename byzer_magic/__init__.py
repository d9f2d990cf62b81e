"""Deploy LLMs onto Ray from a notebook cell, chat with them, scale and stop them.

`%load_ext byzer_magic` registers the magics. Scripts use the same core:
`byzer_magic.spec.parse_spec`, `byzer_magic.serving.deploy.deploy/scale/undeploy`,
`byzer_magic.serving.chat.chat/stream`. Importing the package imports nothing heavy.
The modules that once sat flat here (`from byzer_magic import chat, deploy`)
are still found under their old names, through `__getattr__` below.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_MOVED = {
    "magics": "frontends.magics", "cli": "frontends.cli", "widgets": "frontends.widgets",
    "chat_line": "frontends.chat_line", "wording": "frontends.wording", "bench_figure": "frontends.bench_figure",
    "deploy": "serving.deploy", "worker": "serving.worker", "chat": "serving.chat", "cluster": "serving.cluster",
    "raydoor": "serving.raydoor", "reaper": "serving.reaper", "status": "serving.status", "metrics": "serving.metrics",
    "request_fields": "serving.request_fields", "records": "serving.records", "restore": "serving.restore",
    "scaling": "serving.scaling", "placement": "serving.placement", "serve_status": "serving.serve_status",
    "sessions": "serving.sessions", "bench": "serving.bench",
    "openai_api": "openai.routes", "gateway": "openai.gateway", "key_store": "openai.key_store",
    "openai_responses": "openai.responses", "openai_tools": "openai.tools",
    "options": "spec.options", "option_args": "spec.option_args", "flags": "spec.flags",
}
"""Each module's old flat name and where it lives now, so `from byzer_magic import chat` keeps working."""


def __getattr__(name: str) -> Any:
    """A moved module by its old name, imported on first use (importing the package stays light)."""
    if name in _MOVED:
        return importlib.import_module(f"{__name__}.{_MOVED[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def endpoint_key() -> str:
    """The key `%byzer_serve` made for this user when none was given (see byzer_magic.openai.key_store)."""
    from .openai.key_store import endpoint_key as read

    return read()


def load_ipython_extension(ipython: Any) -> None:
    """Called by `%load_ext byzer_magic`."""
    from .frontends.chat_line import keep_question_marks
    from .frontends.magics import ByzerMagics

    magics = ByzerMagics(shell=ipython)
    ipython.register_magics(magics)
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, ByzerMagics)] + [magics]
    if keep_question_marks not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(keep_question_marks)
