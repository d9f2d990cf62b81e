"""Tools and structured output without Ray: the endpoint's checks, the tool-call pieces, llama.cpp's grammars.

The endpoint runs in-process (FastAPI's TestClient) over a Deployments that
records what reaches it, so a refused request is seen never to arrive; the
llama_cpp backend runs the tiny GGUF in-process, as a worker would.
"""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from byzer_magic.backends.base import Context, Delta, GenParams, joined_tool_pieces, whole_tool_calls
from byzer_magic.openai.routes import build_app

from .support import clients

PIECES = (
    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
)


class Recorded:
    """Deployments that answer one tool call in pieces, and remember every request that reached them."""

    def __init__(self) -> None:
        self.requests: list[GenParams] = []

    async def models(self) -> list[dict]:
        return [{"name": "m", "backend": "saas"}]

    def _answer(self, gen: GenParams) -> list[Delta]:
        self.requests.append(gen)
        if gen.tools:
            return [Delta("", None, tool_calls=PIECES[:2]), Delta("", "tool_calls", tool_calls=PIECES[2:])]
        return [Delta("hel"), Delta("lo", "stop", {"prompt_tokens": 3, "completion_tokens": 2})]

    async def stream(self, name, request, gen):
        for delta in self._answer(gen):
            yield delta

    async def complete(self, name, request, gen):
        return self._answer(gen)


@pytest.fixture
def endpoint():
    recorded = Recorded()
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=TestClient(build_app(recorded)))
    return client, recorded


def test_pieces_join_into_whole_calls_by_index():
    deltas = [Delta("", tool_calls=PIECES[:2]), Delta("", tool_calls=PIECES[2:])]
    calls = whole_tool_calls(deltas)
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]
    joined = joined_tool_pieces(PIECES)
    assert [p["index"] for p in joined] == [0, 1] and joined[0]["function"]["arguments"] == '{"city": "Paris"}'


def test_tool_calls_reach_the_openai_client_whole_and_streamed(endpoint):
    client, recorded = endpoint
    ask = dict(model="m", messages=[{"role": "user", "content": "hi"}], tools=[clients.WEATHER])
    whole = client.chat.completions.create(**ask)
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    for answer in (whole, final):
        calls = answer.choices[0].message.tool_calls
        assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
            ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}")]
    assert recorded.requests[0].tools == [clients.WEATHER] and recorded.requests[0].tool_choice is None


def test_plain_text_format_and_tool_fields_without_tools_reach_backends_as_none(endpoint):
    client, recorded = endpoint
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                   response_format={"type": "text"}, tool_choice="auto", parallel_tool_calls=True)
    gen = recorded.requests[-1]
    assert (gen.response_format, gen.tools, gen.tool_choice, gen.parallel_tool_calls) == (None, None, None, None)


@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools", "item 0.function.parameters: not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ["a"]}}},
     "response_format", "json_schema.schema: must be a JSON object"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs json_schema"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
])
def test_bad_fields_never_reach_a_deployment(endpoint, extra, param, words):
    client, recorded = endpoint
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], **extra)
    error = caught.value.body
    assert error["param"] == param and words in error["message"] and recorded.requests == []


def test_responses_bridge_text_and_refuse_what_they_cannot_carry(endpoint):
    client, recorded = endpoint
    reply = client.responses.create(model="m", input="hi", instructions="be brief", max_output_tokens=5)
    assert reply.output_text == "hello" and reply.usage.input_tokens == 3 and reply.usage.output_tokens == 2
    kinds = [e.type for e in client.responses.create(model="m", input="hi", stream=True)]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 2
    before = len(recorded.requests)
    with pytest.raises(openai.BadRequestError, match="previous_response_id") as caught:
        client.responses.create(model="m", input="hi", previous_response_id="resp_1")
    assert caught.value.body["param"] == "previous_response_id" and len(recorded.requests) == before
    with pytest.raises(openai.BadRequestError, match="item 0 is input_image") as caught:
        client.responses.create(model="m", input=[{"type": "input_image", "image_url": "http://x/y.png"}])
    assert caught.value.body["param"] == "input" and len(recorded.requests) == before


def test_fifty_llama_cpp_schema_answers_parse_and_validate(tiny_model):
    """The random tiny model, held to the schema by the grammar: every answer is JSON json.loads takes, and valid."""
    from byzer_magic.backends.llama_cpp import Backend, Settings

    async def answers() -> list[str]:
        backend = Backend(Settings(n_ctx=512), Context("t", model_path=str(tiny_model.gguf)))
        await backend.start()
        try:
            gen = GenParams(max_tokens=80, temperature=1.0, response_format=clients.JSON_SCHEMA)
            return ["".join([d.text async for d in backend.chat([{"role": "user", "content": f"pick {i}"}],
                                                                   GenParams(**{**gen.__dict__, "seed": i}))])
                    for i in range(50)]
        finally:
            await backend.shutdown()

    texts = asyncio.run(answers())
    for text in texts:
        jsonschema.validate(json.loads(text), clients.SCHEMA)
    assert len(set(texts)) > 1
