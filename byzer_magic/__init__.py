"""Deploy LLMs onto Ray from a notebook cell, chat with them, scale and stop them.

`%load_ext byzer_magic` registers the magics. Scripts use the same core:
`byzer_magic.spec.deploy_spec.parse_spec`, `byzer_magic.serving.deploy.deploy/scale/undeploy`,
`byzer_magic.serving.chat.chat/stream`. Importing the package imports nothing heavy.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


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
