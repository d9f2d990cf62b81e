"""Each deployment's flags, kept outside the cluster so that a new cluster can be given them back.

Ray Serve brings its applications back after a head restart only under
KubeRay; a `ray stop`, a lost head or a new embedded Ray forgets them. So a
deploy also writes one file per deployment under the state folder
(`%config ByzerMagics.state_dir`, else `$BYZER_MAGIC_HOME/deployments`, else
`~/.byzer_magic/deployments`), mode 0600; a scale updates it and an undeploy
removes it. A secret's value is never written: one given as `${VAR}` (or
`node-env:NAME`) is kept as written and read again on restore, and a literal
one is left out and named, so the restore can ask for it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import SecretStr

from ..spec.option_args import default_of
from ..spec.options import DeployFlags
from ..spec.deploy_spec import DeploySpec

_chosen: Path | None = None
_NOT_KEPT = {"model", "pretrained_model_type", "infer_backend", "infer_params", "file", "force", "ray_address"}
"""Flags a record does not take from the spec's same-named fields: written apart, or not wanted on restore."""


def use_state_dir(path: str | None) -> None:
    """Keep records under this folder from now on (None: the default); `%config ByzerMagics.state_dir` calls it."""
    global _chosen
    _chosen = Path(path).expanduser() if path else None


def state_dir() -> Path:
    """Where the records live."""
    if _chosen is not None:
        return _chosen
    return Path(os.environ.get("BYZER_MAGIC_HOME", "~/.byzer_magic")).expanduser() / "deployments"


@dataclass(frozen=True)
class Record:
    """One deployment as it was deployed: its flags (secrets by reference only) and the secrets left out."""

    name: str
    flags: dict[str, Any]
    infer_params: dict[str, Any]
    missing_secrets: tuple[str, ...] = ()
    ray_address: str = ""
    saved_at: float = 0.0

    def argv(self, extra_params: Sequence[str] = ()) -> list[str]:
        """The deploy flags that give this deployment back, with `extra_params` (key=value) over the kept ones."""
        words = ["--model", self.name]
        for flag, value in self.flags.items():
            if value is True:
                words.append(f"--{flag}")
            elif isinstance(value, dict):
                words += [f"--{flag}", *(f"{k}={_word(v)}" for k, v in value.items())]
            elif isinstance(value, list):
                words += [f"--{flag}", *map(_word, value)]
            elif value is not None and value is not False:
                words += [f"--{flag}", _word(value)]
        params = [f"{k}={_word(v)}" for k, v in self.infer_params.items()] + list(extra_params)
        return words + (["--infer_params", *params] if params else [])


def _word(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def record_of(spec: DeploySpec, ray_address: str = "") -> Record:
    """The record of a spec: every flag it was deployed with, secrets only as the references they were given by."""
    flags: dict[str, Any] = {"pretrained_model_type": spec.pretrained_model_type}
    if spec.backend_class.model_type_prefix is None:
        flags["infer_backend"] = spec.backend
    for name in DeployFlags.model_fields:
        value = getattr(spec, name, None)
        if name not in _NOT_KEPT and value is not None and value != default_of(DeployFlags, name):
            flags[name] = list(value) if isinstance(value, tuple) else value
    references = dict(spec.secret_refs)
    values = {**spec.params.__dict__, **(spec.params.model_extra or {})}
    prefix = spec.backend_class.prefix
    kept: dict[str, Any] = {}
    missing = []
    for key, shown in spec.public_params().items():
        real = values.get(key[len(prefix):])
        real = real.get_secret_value() if isinstance(real, SecretStr) else real
        if real == shown:
            kept[key] = shown
        elif key in references:
            kept[key] = references[key]
        else:
            missing.append(key)
    return Record(spec.name, flags, kept, tuple(missing), ray_address, time.time())


def save(spec: DeploySpec, ray_address: str = "") -> Path:
    """Write (or replace) the deployment's record, readable by its owner alone."""
    return _write(record_of(spec, ray_address))


def _write(record: Record) -> Path:
    folder = state_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{record.name}.json"
    partial = folder / f".{record.name}.{os.getpid()}.tmp"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**record.__dict__, "missing_secrets": list(record.missing_secrets)}, f, indent=1, default=str)
    os.replace(partial, path)
    return path


def update(name: str, **flags: Any) -> None:
    """Change flags of a kept record (a scale's new worker count); a deployment with no record is left so."""
    record = load(name)
    if record is not None:
        _write(Record(**{**record.__dict__, "flags": {**record.flags, **flags}, "saved_at": time.time()}))


def remove(name: str) -> None:
    """Forget a deployment (it was undeployed on purpose); a missing record is no error."""
    (state_dir() / f"{name}.json").unlink(missing_ok=True)


def load(name: str) -> Record | None:
    """The record of one deployment, or None (none kept, or unreadable)."""
    try:
        data = json.loads((state_dir() / f"{name}.json").read_text())
        return Record(**{**data, "missing_secrets": tuple(data.get("missing_secrets", ()))})
    except (OSError, ValueError, TypeError):
        return None


def load_all() -> list[Record]:
    """Every kept record, by name."""
    folder = state_dir()
    names = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    return [r for r in map(load, names) if r is not None]
