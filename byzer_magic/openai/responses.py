"""OpenAI's /v1/responses for text in and text out, bridged onto a deployment's chat.

`input` (a string, or messages of text), `instructions`, `max_output_tokens`,
`temperature`, `top_p`, `text.format` (plain text or a JSON schema, which
becomes the chat's response_format) and `stream` are carried. Nothing is
stored, so there is no previous_response_id; tools, reasoning, images and the
rest are a 400 naming the field rather than dropped. Answers and stream events
are the openai package's own types, so its client parses them.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from openai.types.responses import (
    Response as ResponseObject,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseErrorEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..backends.base import Delta, GenParams, Messages
from .routes import _MODEL_ERRORS, ApiError, Served, _api_error, _dump, _usage, event_stream, served
from .tools import ToolChecks

_HARMLESS = {"store": (False, None), "truncation": ("disabled", None), "parallel_tool_calls": (None, False, True),
             "user": None, "safety_identifier": None, "prompt_cache_key": None, "service_tier": ("auto", "default", None)}
"""Fields accepted though they change nothing here: values that ask for nothing this endpoint would skip."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "output_text", "text"]
    text: str


class _InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[_Part]

    def as_dict(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: dict[str, Any] | None = None


class ResponsesRequest(BaseModel):
    """What /v1/responses carries; every other field is checked by `refused_field`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=64, description="a deployment's name, as %byzer_list shows it")
    input: str | list[_InputMessage] = Field(description="text, or messages whose content is text")
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    text: _TextFormat | None = None
    metadata: dict[str, str] | None = None

    def refused_field(self) -> str | None:
        """The first field sent that this bridge cannot carry, or None."""
        for name, value in (self.model_extra or {}).items():
            allowed = _HARMLESS.get(name, ()) if name in _HARMLESS else ()
            if name in _HARMLESS and (allowed is None or value in allowed):
                continue
            if value not in (None, [], {}):
                return name
        return None

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, given: Any) -> Any:
        """An item that is not a message of text (an image, a file, a tool output) is named, not mis-parsed."""
        for i, item in enumerate(given if isinstance(given, list) else ()):
            kind = item.get("type", "message") if isinstance(item, dict) else type(item).__name__
            if kind != "message":
                raise PydanticCustomError("text_only", "item {i} is {kind}; /v1/responses here takes text messages only",
                                          {"i": i, "kind": kind})
        return given

    @field_validator("text")
    @classmethod
    def _format(cls, text: _TextFormat | None) -> _TextFormat | None:
        """`text.format` as a chat's response_format (Responses puts name and schema beside the type), checked."""
        fmt = dict((text.format if text else None) or {"type": "text"})
        if fmt.get("type") == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
        checked = ToolChecks.checked_format(fmt)
        return _TextFormat(format=checked)

    def response_format(self) -> dict[str, Any] | None:
        return self.text.format if self.text else None

    def messages(self) -> Messages:
        given = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else \
            [m.as_dict() for m in self.input]
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + given

    def gen(self) -> GenParams:
        return GenParams(temperature=self.temperature, max_tokens=self.max_output_tokens, top_p=self.top_p,
                         response_format=self.response_format())


def _none_of(details: type[BaseModel]) -> BaseModel:
    """A token-details object of zeros (no cached or reasoning tokens), whatever counts this openai version lists."""
    return details(**{name: 0 for name, f in details.model_fields.items() if f.is_required()})


class _Answer:
    """One response's ids and the Response object at each stage, built with openai's types."""

    def __init__(self, body: ResponsesRequest):
        self.body = body
        self.id, self.item = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = time.time()
        self.sequence = 0

    def message(self, text: str, status: str) -> ResponseOutputMessage:
        part = ResponseOutputText(type="output_text", text=text, annotations=[])
        return ResponseOutputMessage(id=self.item, type="message", role="assistant", status=status,
                                     content=[part] if status == "completed" or text else [])

    def response(self, deltas: list[Delta] | None) -> ResponseObject:
        b = self.body
        fields: dict[str, Any] = dict(
            id=self.id, object="response", created_at=self.created, model=b.model, parallel_tool_calls=False,
            tool_choice="none", tools=[], instructions=b.instructions, max_output_tokens=b.max_output_tokens,
            temperature=b.temperature, top_p=b.top_p, metadata=b.metadata, output=[], status="in_progress",
        )
        if deltas is not None:
            reason = next((d.finish_reason for d in reversed(deltas) if d.finish_reason), "stop")
            fields["output"] = [self.message("".join(d.text for d in deltas), "completed")]
            fields["status"] = "incomplete" if reason == "length" else "completed"
            if reason == "length":
                fields["incomplete_details"] = {"reason": "max_output_tokens"}
            usage = _usage(deltas)
            if usage is not None:
                fields["usage"] = ResponseUsage(
                    input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens, input_tokens_details=_none_of(InputTokensDetails),
                    output_tokens_details=_none_of(OutputTokensDetails))
        return ResponseObject(**fields)

    def event(self, kind: type[BaseModel], **fields: Any) -> bytes:
        """One server-sent event, numbered as OpenAI numbers them."""
        event = kind(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return f"event: {event.type}\ndata: {_dump(event)}\n\n".encode()


async def _events(answer: _Answer, stream: AsyncIterator[Delta], first: Delta | None,
                  done: Any) -> AsyncIterator[bytes]:
    """created, in_progress, the message item and its text part opened, text deltas, each closed, completed."""
    seen: list[Delta] = []
    error: ApiError | None = None
    where = dict(item_id=answer.item, output_index=0, content_index=0)
    try:
        yield answer.event(ResponseCreatedEvent, type="response.created", response=answer.response(None))
        yield answer.event(ResponseInProgressEvent, type="response.in_progress", response=answer.response(None))
        yield answer.event(ResponseOutputItemAddedEvent, type="response.output_item.added", output_index=0,
                           item=answer.message("", "in_progress"))
        empty = ResponseOutputText(type="output_text", text="", annotations=[])
        yield answer.event(ResponseContentPartAddedEvent, type="response.content_part.added", part=empty, **where)
        delta = first
        while delta is not None:
            seen.append(delta)
            if delta.text:
                yield answer.event(ResponseTextDeltaEvent, type="response.output_text.delta", delta=delta.text,
                                   logprobs=[], **where)
            delta = await anext(stream, None)
        text = "".join(d.text for d in seen)
        yield answer.event(ResponseTextDoneEvent, type="response.output_text.done", text=text, logprobs=[], **where)
        part = ResponseOutputText(type="output_text", text=text, annotations=[])
        yield answer.event(ResponseContentPartDoneEvent, type="response.content_part.done", part=part, **where)
        yield answer.event(ResponseOutputItemDoneEvent, type="response.output_item.done", output_index=0,
                           item=answer.message(text, "completed"))
        yield answer.event(ResponseCompletedEvent, type="response.completed", response=answer.response(seen))
    except Exception as exc:
        error = _api_error(exc)
        yield answer.event(ResponseErrorEvent, type="error", message=error.message, code=error.code,
                           param=error.param)
    finally:
        done(error, seen)


router = APIRouter()


@router.post("/v1/responses", responses=_MODEL_ERRORS)
async def create_response(body: ResponsesRequest, http: Request, state: Served = Depends(served)) -> Response:
    """POST /v1/responses, answered through the app's deployments and counted in its metrics."""
    started = time.perf_counter()
    refused = body.refused_field()
    if refused is not None:
        error = ApiError(400, f"{refused}: /v1/responses here carries text in and text out, without stored "
                              f"state or tools; {refused} is not supported (use /v1/chat/completions)",
                         "invalid_request_error", refused, "unsupported_parameter")
        state.metrics.observe(body.model, "responses", 400, started, [], error)
        return error.response()
    answer = _Answer(body)
    begun = await state.begin(http, "responses", body.model, body.messages(), body.gen(), body.stream, started,
                              answer.response)
    if isinstance(begun, Response):
        return begun

    def done(error: ApiError | None, seen: list[Delta]) -> None:
        state.metrics.observe(body.model, "responses", error.status if error else 200, started, seen, error)

    return event_stream(_events(answer, *begun, done))
