"""Flag text -> raw values: split a cell, merge --file YAML under argv, expand ${VAR}.

Everything here is about reading what the user wrote. Which flags exist, their
types, defaults and ranges are declared in `options`; rules that tie one flag
to another (a backend and its model path) are `spec`'s.
"""
from __future__ import annotations

import argparse
import difflib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

from ..errors import SpecError
from .option_args import add_arguments, validated
from .options import DeployFlags, ServeFlags

_ENV_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
SECRET_KEY = re.compile(r"(?:^|[_.-])(?:api_?key|key|token|secret|password|passwd)$", re.IGNORECASE)
"""A name that ends in key, token, secret or password (api_key, hf_token, --api_key), not max_tokens."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises SpecError instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise SpecError(message)


@dataclass
class Flags:
    """Flag values after YAML and argv are merged; None means 'not given'."""

    values: dict[str, Any] = field(default_factory=dict)
    infer_params: dict[str, Any] = field(default_factory=dict)


def build_parser(prog: str = "byzer-magic deploy") -> argparse.ArgumentParser:
    """The one parser for `%%byzer_deploy` and `byzer-magic deploy`, made from `DeployFlags`."""
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        add_help=False,
        description="Deploy a model onto Ray as a set of workers; the flags are those of `byzerllm deploy`.",
    )
    add_arguments(parser, DeployFlags)
    return parser


def split_cell(text: str) -> list[str]:
    """A cell's words: backslash continuations joined, `#` comments and a leading `byzerllm deploy` dropped."""
    joined = re.sub(r"\\[ \t]*\r?\n", " ", text)
    try:
        tokens = shlex.split(joined, comments=True)
    except ValueError as exc:
        raise SpecError(f"cannot split the cell into flags: {exc} (an unclosed quote?)") from None
    if tokens[:2] == ["byzerllm", "deploy"]:
        tokens = tokens[2:]
    return tokens


def secrets_in(tokens: Sequence[str]) -> list[str]:
    """Literal secrets in argv: values of secret-looking keys (api_key=..., --api_key K), to redact."""
    found = []
    for before, token in zip(["", *tokens], tokens):
        key, sep, value = token.partition("=")
        if sep and SECRET_KEY.search(key) and value and not _ENV_VAR.fullmatch(value):
            found.append(value)
        elif before.startswith("--") and SECRET_KEY.search(before) and "=" not in before and token:
            found.append(token)
    return found


def secrets_in_env(tokens: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """Values of the environment variables named in secret-looking tokens."""
    found = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and SECRET_KEY.search(key):
            found.extend(env.get(a or b, "") for a, b in _ENV_VAR.findall(value))
    return [v for v in found if v]


class _AsWritten(dict):
    """An environment that answers every variable with its own reference, so reading flags keeps `${VAR}` as is."""

    def __contains__(self, name: object) -> bool:
        return True

    def __getitem__(self, name: str) -> str:
        return "${" + name + "}"


def secret_references(argv: Sequence[str]) -> dict[str, str]:
    """Secret infer_params given wholly by reference, as written: `${VAR}`, `node-env:NAME`, a URL's `${VAR}` password.

    These can be kept (a restore reads them again); a literal secret cannot.
    """
    written = read_flags(list(argv), _AsWritten()).infer_params
    return {key: value for key, value in written.items() if isinstance(value, str) and _by_reference(key, value)}


def _by_reference(key: str, value: str) -> bool:
    if SECRET_KEY.search(key):
        return bool(_ENV_VAR.fullmatch(value)) or value.startswith("node-env:")
    password = urlsplit(value).password if "://" in value else None
    return password is not None and bool(_ENV_VAR.fullmatch(password))


def read_flags(argv: list[str], env: Mapping[str, str]) -> Flags:
    """argv over --file YAML, with ${VAR} expanded; unknown flags refused with a suggestion."""
    parser = build_parser()
    known, extra = parser.parse_known_args(argv)
    if extra:
        raise SpecError(_unknown_flag_message(extra[0]))
    given = {k: v for k, v in vars(known).items() if v is not None}
    flags = Flags()
    if "file" in given:
        flags = _read_yaml(given.pop("file"), env)
    for token in given.pop("infer_params", []):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise SpecError(f"--infer_params takes key=value pairs, got {token!r}")
        flags.infer_params[key.strip()] = _expand(value, env, f"--infer_params {key}")
    if "resources" in given:
        flags.values["resources"] = {**flags.values.get("resources", {}), **_resources(given.pop("resources"))}
    for key, value in given.items():
        flags.values[key] = _expand(value, env, f"--{key}") if isinstance(value, str) else value
    return flags


def _resources(tokens: list[str]) -> dict[str, float]:
    """`--resources name=amount ...` as a mapping; each amount a number."""
    found = {}
    for token in tokens:
        name, sep, amount = token.partition("=")
        try:
            found[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise SpecError(f"--resources takes name=amount pairs with a number, e.g. --resources accel_a10=1; "
                            f"got {token!r}")
    return found


def _unknown_flag_message(token: str, names: Iterable[str] = tuple(DeployFlags.model_fields)) -> str:
    valid = [f"--{name}" for name in names]
    flag = token.split("=", 1)[0]
    if not flag.startswith("-"):
        return (
            f"unexpected word {token!r}: every value must follow a flag "
            f"(is a flag missing before it, or a space inside a value that needs quotes?)"
        )
    hint = did_you_mean(flag.replace("-", "_").lstrip("_"), [v[2:] for v in valid], prefix="--")
    return f"unknown flag {flag}.{hint} Valid flags: {', '.join(valid)}."


def did_you_mean(word: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """' Did you mean X?' naming the closest choice, or '' when none is close: every misspelling gets one."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {prefix}{close[0]}?" if close else ""


_YAML_KEYS = [name for name in DeployFlags.model_fields if name != "file"]


def _read_yaml(path: str, env: Mapping[str, str]) -> Flags:
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise SpecError(f"--file {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"--file {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SpecError(f"--file {path}: expected a mapping of flag names to values")
    flags = Flags()
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        where = f"{key} in {path}"
        if key == "infer_params":
            flags.infer_params.update(_yaml_params(value, env, path))
        elif key in _YAML_KEYS:
            flags.values[key] = _expand(value, env, where) if isinstance(value, str) else value
        else:
            hint = did_you_mean(key, _YAML_KEYS)
            raise SpecError(f"--file {path}: unknown key {key!r}.{hint} Valid keys: {', '.join(_YAML_KEYS)}.")
    return flags


def _yaml_params(value: Any, env: Mapping[str, str], path: str) -> dict[str, Any]:
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [tuple(str(v).partition("=")[::2]) for v in value]
    elif isinstance(value, str):
        items = [tuple(v.partition("=")[::2]) for v in value.split()]
    else:
        raise SpecError(f"--file {path}: infer_params must be a mapping or a list of key=value")
    return {k: _expand(v, env, f"infer_params {k} in {path}") if isinstance(v, str) else v for k, v in items}


def _expand(value: str, env: Mapping[str, str], where: str) -> str:
    """Replace ${VAR} and $VAR from the environment; an unset one is an error."""

    def lookup(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise SpecError(
                f"{where}: environment variable ${name} is not set (export it where Jupyter or the shell starts, or, "
                f"leaving no trace in the notebook, run os.environ[{name!r}] = getpass.getpass() in a cell)"
            )
        return env[name]

    return _ENV_VAR.sub(lookup, value)


def build_serve_parser(prog: str) -> argparse.ArgumentParser:
    """The one parser for `%byzer_serve` and `byzer-magic serve`, made from `ServeFlags`."""
    parser = _Parser(prog=prog, allow_abbrev=False, add_help=False, description="one OpenAI-compatible endpoint for every deployment")
    add_arguments(parser, ServeFlags)
    return parser


def read_serve_flags(argv: list[str], env: Mapping[str, str], prog: str = "%byzer_serve") -> ServeFlags:
    """Serve flags, typed and bounded by `ServeFlags`, with ${VAR} expanded in the key."""
    known, extra = build_serve_parser(prog).parse_known_args(argv)
    if extra:
        raise SpecError(_unknown_flag_message(extra[0], ServeFlags.model_fields))
    values = vars(known)
    if values["api_key"] is not None:
        values["api_key"] = _expand(values["api_key"], env, "--api_key")
    return validated(ServeFlags, values)
