"""The tool and structured-output fields of an OpenAI chat request, checked before anything reaches a deployment.

A tool whose parameters are not a JSON Schema, a tool_choice naming a tool
that was not sent, or a response_format whose schema is not a JSON object is
a 400 naming the field, as OpenAI answers it; the deployment never sees it.
Schemas are checked with jsonschema's own meta-schema validation.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


def checked_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, if it is a valid JSON Schema (its own $schema's draft, else 2020-12)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise PydanticCustomError("json_schema", "not a valid JSON Schema: {why}",
                                  {"why": f"{exc.message}" + (f" (at {where})" if where else "")}) from None
    return schema


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON Schema object")
    strict: bool | None = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> dict[str, Any] | None:
        if value is not None and not isinstance(value, dict):
            raise PydanticCustomError("json_schema", "must be a JSON object (a JSON Schema), not {kind}",
                                      {"kind": type(value).__name__})
        return None if value is None else checked_schema(value)


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: ChosenFunction


class JsonSchemaFormat(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema object")
    strict: bool | None = None

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise PydanticCustomError("json_schema", "must be a JSON object (a JSON Schema), not {kind}",
                                      {"kind": type(value).__name__})
        return checked_schema(value)


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise PydanticCustomError("missing", "type json_schema needs json_schema: {name, schema}")
        return self

    def as_dict(self) -> dict[str, Any] | None:
        """OpenAI's form, for the backend; None for plain text (the default)."""
        if self.type == "text":
            return None
        return self.model_dump(by_alias=True, exclude_none=True)


def _checked(model: type[BaseModel], value: Any, what: str) -> BaseModel:
    """`value` as `model`, or one error that names the exact place inside the field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        inside = ".".join(str(p) for p in first["loc"])
        where = ".".join(part for part in (what, inside) if part)
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise PydanticCustomError("invalid_field", "{message}", {"message": message}) from None


class ToolChecks(BaseModel):
    """Checks and normalises a chat request's tools, tool_choice, parallel_tool_calls and response_format.

    A mixin for the request model that declares those fields as plain JSON:
    each becomes OpenAI's form, checked (schemas included), before the
    request goes on; plain-text response_format and tool fields without
    tools become None, which every backend takes.
    """

    @field_validator("tools", check_fields=False)
    @classmethod
    def _tools(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if not tools:
            return None
        return [_checked(Tool, t, f"item {i}").model_dump(exclude_none=True) for i, t in enumerate(tools)]

    @field_validator("tool_choice", check_fields=False)
    @classmethod
    def _tool_choice(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t["function"]["name"] for t in info.data.get("tools") or ()]
        if choice is None:
            return None
        if isinstance(choice, dict):
            named = _checked(NamedToolChoice, choice, "the choice")
            if named.function.name not in names:
                raise PydanticCustomError("unknown_tool", "names '{name}', which is not among the tools sent ({names})",
                                          {"name": named.function.name, "names": ", ".join(names) or "none"})
            return named.model_dump()
        if choice not in ("none", "auto", "required"):
            raise PydanticCustomError("tool_choice", "'none', 'auto', 'required' or {type: function, function: {name}}")
        if choice == "required" and not names:
            raise PydanticCustomError("no_tools", "'required' needs tools")
        return choice if names else None

    @field_validator("parallel_tool_calls", check_fields=False)
    @classmethod
    def _parallel(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        return value if info.data.get("tools") else None

    @field_validator("response_format", check_fields=False)
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else cls.checked_format(value)

    @staticmethod
    def checked_format(value: Any) -> dict[str, Any] | None:
        """A response_format in OpenAI's chat form, checked; None for plain text."""
        return _checked(ResponseFormat, value, "").as_dict()
