"""Checks run through clients nobody here wrote: the official openai client and LangChain's ChatOpenAI.

Each takes the endpoint's URL, key and a deployment name, so the test modules
that already have deployments behind an endpoint run them without deploying
more. The tiny model is random: only a grammar makes its JSON valid, so a
reply that validates shows the schema was enforced, not that the model obliged.

LiteLLM is not among them: its releases require boto3, whose botocore pins
python-dateutil below 3, a downgrade of what this environment has.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

HELLO = [{"role": "user", "content": "Hello there, what is ray?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
    },
    "required": ["colour", "name", "ok"],
    "additionalProperties": False,
}
"""Bounded (enums, short strings) so that a random model's constrained JSON ends well within max_tokens."""
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                       "required": ["city"], "additionalProperties": False},
    },
}
CALL_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def clients(base_url: str, key: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    return (openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120),
            openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120))


def schema_replies(client: openai.OpenAI, model: str, count: int = 50) -> list[dict]:
    """`count` answers asked for with SCHEMA, four at a time; each must parse and validate (else this raises)."""

    def one(i: int) -> dict:
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"pick {i}"}],
                                                response_format=JSON_SCHEMA, max_tokens=80, temperature=1.0, seed=i)
        value = json.loads(answer.choices[0].message.content)
        jsonschema.validate(value, SCHEMA)
        return value

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(count)))


def text_everywhere(base_url: str, key: str, model: str) -> dict[str, object]:
    """The same greedy answer from the openai client (sync, streamed, async, responses) and LangChain.

    Returns what each reported for tokens, so the caller can compare counts.
    """
    from langchain_openai import ChatOpenAI

    sync, async_client = clients(base_url, key)
    ask = dict(model=model, messages=HELLO, temperature=0, max_tokens=12)
    whole = sync.chat.completions.create(**ask)
    text = whole.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in sync.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == text, (streamed, text)

    async def async_answers() -> tuple[str, str]:
        async with async_client:
            one = await async_client.chat.completions.create(**ask)
            pieces = [c.choices[0].delta.content or "" async for c in await async_client.chat.completions.create(
                **ask, stream=True) if c.choices]
        return one.choices[0].message.content, "".join(pieces)

    assert asyncio.run(async_answers()) == (text, text)
    reply = sync.responses.create(model=model, input=HELLO[0]["content"], temperature=0, max_output_tokens=12)
    assert reply.output_text == text and reply.status in ("completed", "incomplete")
    events = list(sync.responses.create(model=model, input=HELLO[0]["content"], temperature=0, max_output_tokens=12,
                                        stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text

    lc = ChatOpenAI(model=model, base_url=base_url, api_key=key, temperature=0, max_tokens=12, max_retries=0)
    message = lc.invoke(HELLO[0]["content"])
    assert message.content == text
    assert "".join(str(c.content) for c in lc.stream(HELLO[0]["content"])) == text
    return {"openai": whole.usage, "responses": reply.usage, "langchain": message.usage_metadata}


def tool_calls_everywhere(base_url: str, key: str, model: str) -> None:
    """A forced tool call, whole and streamed, through the openai client and LangChain's bind_tools.

    Greedy, so whole and streamed must be the same call; its arguments must fit the tool's schema.
    """
    from langchain_openai import ChatOpenAI

    sync, _ = clients(base_url, key)
    ask = dict(model=model, messages=[{"role": "user", "content": "weather in Paris?"}], tools=[WEATHER],
               tool_choice=CALL_WEATHER, temperature=0, max_tokens=60)
    whole = sync.chat.completions.create(**ask)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    with sync.chat.completions.stream(**ask) as stream:
        chunks = [e.chunk for e in stream if e.type == "chunk"]
        final = stream.get_final_completion()
    pieces = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert pieces and pieces[0].id and pieces[0].function.name == "get_weather"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)

    lc = ChatOpenAI(model=model, base_url=base_url, api_key=key, temperature=0, max_tokens=60, max_retries=0)
    bound = lc.bind_tools([WEATHER], tool_choice="get_weather")
    [lc_call] = bound.invoke("weather in Paris?").tool_calls
    assert lc_call["name"] == "get_weather" and lc_call["args"] == json.loads(call.function.arguments)


def structured_through_langchain(base_url: str, key: str, model: str) -> dict:
    """LangChain's with_structured_output(method='json_schema') gets a dict that validates."""
    from langchain_openai import ChatOpenAI

    lc = ChatOpenAI(model=model, base_url=base_url, api_key=key, temperature=0, max_tokens=80, max_retries=0)
    value = lc.with_structured_output({"title": "pick", **SCHEMA}, method="json_schema", strict=True).invoke("pick")
    jsonschema.validate(value, SCHEMA)
    return value
