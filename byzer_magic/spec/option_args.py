"""What a front end needs from an options model (`options`): arguments, help lines, checked values.

Each field becomes a `--name` argument whose help is the field's description
and its default; values arrive as text and the model types and bounds them.
A value the model refuses becomes one sentence naming the option and what is
valid, whichever front end (`--` for flags, `ByzerMagics.` for settings) asked.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from typing import Any, Mapping, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ..errors import SpecError

M = TypeVar("M", bound=BaseModel)
_SECRET = re.compile(r"(key|token|secret|password)$", re.IGNORECASE)
_NOUNS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def kind_of(field: FieldInfo) -> type:
    """The field's value type without `| None`: bool, int, float, str, dict or list."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def fields(model: type[BaseModel], *, notebook: bool = True) -> dict[str, FieldInfo]:
    """The model's options a front end offers: the shell leaves out `notebook_only` ones, a notebook `shell_only` ones."""
    hidden = "shell_only" if notebook else "notebook_only"
    return {name: f for name, f in model.model_fields.items() if not _extra(f).get(hidden)}


def default_of(model: type[BaseModel], name: str) -> Any:
    """A field's declared default, for signatures and dataclasses that must agree with the flag."""
    return model.model_fields[name].get_default(call_default_factory=True)


def help_text(field: FieldInfo) -> str:
    """The description, then its range and default (or "required") in parentheses."""
    notes = [bounds(field)]
    default = field.get_default(call_default_factory=True)
    if field.is_required():
        notes.append("required")
    elif default is not None and default is not False and default != {}:
        notes.append(f"default {_number(default)}")
    notes = [note for note in notes if note]
    return f"{field.description} ({'; '.join(notes)})" if notes else str(field.description)


def help_lines(model: type[BaseModel], *, notebook: bool = True) -> str:
    """`  --name: help` for each option, the flag list of a magic's `?`."""
    return "\n".join(f"  {', '.join(names)}: {keywords['help'].replace('%%', '%')}"
                     for names, keywords in arguments(model, notebook=notebook))


def arguments(model: type[BaseModel], *, notebook: bool = True) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """`add_argument` calls, as (names, keywords), for argparse or IPython's `@argument`.

    Every value is read as text (None when not given), so that the model, not
    argparse, types it and words the error.
    """
    out = []
    for name, field in fields(model, notebook=notebook).items():
        extra, kind = _extra(field), kind_of(field)
        names = (extra["short"], f"--{name}") if "short" in extra else (f"--{name}",)
        keywords: dict[str, Any] = {"dest": name, "default": None, "help": help_text(field).replace("%", "%%")}
        if kind is bool:
            keywords["action"] = "store_true"
        elif kind in (dict, list):
            keywords.update(nargs="+", action="extend", metavar="KEY=VALUE")
        else:
            keywords["metavar"] = extra.get("metavar", name.upper())
        out.append((names, keywords))
    return out


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *, notebook: bool = True) -> None:
    for names, keywords in arguments(model, notebook=notebook):
        parser.add_argument(*names, **keywords)


def value_flags(model: type[BaseModel]) -> set[str]:
    """Option names that take a value (every form, `-o` too), for splitters that must know."""
    return {name for names, keywords in arguments(model) if keywords.get("action") != "store_true" for name in names}


def validated(model: type[M], values: Mapping[str, Any], *, prefix: str = "--") -> M:
    """The model built from the given values (None = not given), or SpecError in one sentence."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise SpecError(explain(exc, model, prefix)) from None


def check(model: type[BaseModel], name: str, value: Any, *, prefix: str = "--") -> Any:
    """One option's value, typed and bounded by its field, or SpecError naming it as prefix+name."""
    if value is None:
        return None
    try:
        return getattr(model.__pydantic_validator__.validate_assignment(model.model_construct(), name, value), name)
    except ValidationError as exc:
        raise SpecError(explain(exc, model, prefix)) from None


def explain(exc: ValidationError, model: type[BaseModel], prefix: str = "--") -> str:
    """The first error as one sentence: the option, what is valid, and what was given (secrets masked)."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    field = model.model_fields.get(name)
    flag = f"{prefix}{name}"
    if field is None:
        return f"{prefix}{name}: {error['msg'].lower()}"
    if error["type"] == "missing":
        example = f", e.g. {flag} {field.examples[0]}" if field.examples else ""
        return f"{flag} is required: {field.description}{example}"
    given = error.get("input")
    shown = "'***'" if str(given or '').strip() and _SECRET.search(name) else repr(given)
    if error["type"] == "value_error":
        return f"{flag} {shown} {error['ctx']['error']}"
    if error["type"] in _RANGE_ERRORS:
        return f"{flag} must be {bounds(field)}, got {given}"
    return f"{flag} must be {valid(field)}, got {shown}"


def valid(field: FieldInfo) -> str:
    """What a field takes, in words: "a whole number from 1 to 256", "a number of seconds (more than 0)"."""
    kind = kind_of(field)
    noun = _NOUNS.get(kind, kind.__name__)
    unit = _extra(field).get("unit")
    if unit:
        noun = f"{noun} of {unit}"
    limits = bounds(field, with_unit=False)
    if not limits:
        return noun
    return f"{noun} {limits}" if limits.startswith("from") else f"{noun} ({limits})"


def bounds(field: FieldInfo, *, with_unit: bool = True) -> str:
    """The field's range in words: "from 0 to 2", "1 or more", "more than 0 seconds"; '' when unbounded."""
    low = high = None
    for rule in field.metadata:
        if isinstance(rule, Ge):
            low = ("", rule.ge)
        elif isinstance(rule, Gt):
            low = ("more than ", rule.gt)
        elif isinstance(rule, Le):
            high = ("", rule.le)
        elif isinstance(rule, Lt):
            high = ("less than ", rule.lt)
    unit = f" {_extra(field)['unit']}" if with_unit and _extra(field).get("unit") else ""
    if low and high and not low[0] and not high[0]:
        return f"from {_number(low[1])} to {_number(high[1])}{unit}"
    parts = []
    if low:
        parts.append(f"more than {_number(low[1])}" if low[0] else f"{_number(low[1])} or more")
    if high:
        parts.append(f"less than {_number(high[1])}" if high[0] else f"at most {_number(high[1])}")
    return " and ".join(parts) + unit if parts else ""

