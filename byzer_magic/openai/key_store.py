"""The OpenAI endpoint's key when the user gave none: made once, kept in a file only they can read.

A plain `%byzer_serve` must not open every deployment to whoever can reach
the port, and a key printed into a cell would be saved with the notebook.
So the key goes to `~/.byzer_magic/endpoint_key` (mode 0600; the folder from
BYZER_MAGIC_HOME if set), where the user's own code reads it back, and every
later plain `%byzer_serve` reuses it.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def key_file() -> Path:
    """Where the generated key lives."""
    return Path(os.environ.get("BYZER_MAGIC_HOME", "~/.byzer_magic")).expanduser() / "endpoint_key"


def endpoint_key() -> str:
    """The endpoint's generated key, made on first use: `OpenAI(api_key=endpoint_key(), ...)`."""
    path = key_file()
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
