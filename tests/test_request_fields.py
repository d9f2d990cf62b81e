"""Which OpenAI request fields each backend honours, and the 400 for the rest: pure logic, no Ray.

The endpoint reads a request into GenParams (every field the client sent),
and the worker asks `request_fields.refusal` before its backend sees it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from byzer_magic import backends

from byzer_magic.serving import request_fields
from byzer_magic.backends.base import Capabilities, GenParams
from byzer_magic.openai.routes import ChatRequest, CompletionRequest
from byzer_magic.serving.request_fields import bad_token, forwarded, refusal

NOTHING = Capabilities()
EVERYTHING = Capabilities(**{f.name: True for f in dataclasses.fields(Capabilities)})
WHO = "'d' (plain)"


def chat(**fields) -> GenParams:
    return ChatRequest(model="d", messages=[{"role": "user", "content": "hi"}], **fields).gen()


@pytest.mark.parametrize("fields, param", [
    ({"n": 3}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"seed": 1}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"store": True}, "store"),
    ({"metadata": {"k": "v"}}, "metadata"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"ignore_eos": True}, "ignore_eos"),
])
def test_a_field_the_backend_does_not_declare_is_refused_naming_it_and_the_backend(fields, param):
    problem = refusal(chat(**fields), NOTHING, WHO)
    assert problem is not None and problem.param == param
    assert str(problem).startswith(f"{param}: {WHO} ")


def test_a_tool_choice_without_tools_is_refused_by_the_request_naming_it():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        chat(tool_choice="required")
    assert caught.value.errors()[0]["loc"] == ("tool_choice",)


@pytest.mark.parametrize("fields", [
    {"n": 1}, {"logprobs": False}, {"top_logprobs": 0}, {"modalities": ["text"]}, {"store": False},
    {"service_tier": "auto"}, {"user": "alice"}, {"presence_penalty": 0}, {"logit_bias": {}},
    {"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"parallel_tool_calls": False},
    {"stream_options": {"include_usage": True}}, {"max_completion_tokens": 5}, {"stop": ["\n"]},
])
def test_asking_for_nothing_needs_no_support(fields):
    assert refusal(chat(**fields), NOTHING, WHO) is None


def test_declared_capabilities_are_honoured_and_provider_fields_forwarded_as_sent():
    gen = chat(seed=3, presence_penalty=0.5, logit_bias={"7": -100}, user="u", store=True, reasoning_effort="low",
               tools=[{"type": "function", "function": {"name": "f"}}], response_format={"type": "json_object"})
    assert refusal(gen, EVERYTHING, WHO) is None
    assert gen.logit_bias == {7: -100.0}
    assert forwarded(gen) == {"user": "u", "store": True, "reasoning_effort": "low"}
    assert refusal(chat(n=2), EVERYTHING, WHO).param == "n", "no backend gives several choices"


def test_completion_only_fields_are_decided_too():
    gen = CompletionRequest(model="d", prompt="p", echo=True, best_of=1, suffix="x").gen()
    assert refusal(gen, NOTHING, WHO).param == "echo"
    assert refusal(dataclasses.replace(gen, provider_fields={"suffix": "x"}), NOTHING, WHO).param == "suffix"
    assert refusal(dataclasses.replace(gen, provider_fields={"suffix": "x"}), EVERYTHING, WHO) is None


def test_tools_sent_to_an_embedder_say_it_embeds():
    gen = chat(tools=[{"type": "function", "function": {"name": "f"}}])
    problem = refusal(gen, EVERYTHING, WHO, task="embed")
    assert problem.param == "tools" and "embedding model" in str(problem)


def test_a_logit_bias_outside_the_vocabulary_names_the_token_and_the_range():
    problem = bad_token(chat(logit_bias={"3": 1, "600": 5}), 512, WHO)
    assert problem.param == "logit_bias"
    assert str(problem) == f"logit_bias: token 600 is not in {WHO}'s vocabulary (token ids 0 to 511)"
    assert bad_token(chat(logit_bias={"511": 1}), 512, WHO) is None
    assert bad_token(chat(logit_bias={"99999": 1}), None, WHO) is None, "a provider checks its own"


def test_every_backend_declares_its_capabilities_and_the_readme_table_is_theirs():
    for kind in backends.every():
        assert isinstance(kind.capabilities, Capabilities), kind.name
    from byzer_magic.backends import _BUILT_IN, find

    written = request_fields.table([(name, find(name).capabilities) for name in _BUILT_IN])
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert written in readme, "README's field table is stale: paste `python -m byzer_magic.serving.request_fields` into it"
