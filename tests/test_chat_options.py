"""One declaration of the chat options serves the magic, the command line and the endpoint; no Ray here.

Every refusal below happens before a cluster is asked anything, so these run
without one: a bad value must never reach a provider (a non-positive
max_tokens was taken as "no limit" and talked for minutes).
"""
from __future__ import annotations

import pytest

from byzer_magic.frontends.chat_line import split_chat_line
from byzer_magic.frontends.cli import main
from byzer_magic.errors import SpecError
from byzer_magic.spec.options import ChatOptions, Sampling

BAD = [
    ("--max_tokens -5", "--max_tokens must be 1 or more, got -5"),
    ("--max_tokens 0", "--max_tokens must be 1 or more, got 0"),
    ("--max_tokens lots", "--max_tokens must be a whole number (1 or more), got 'lots'"),
    ("--temperature -1", "--temperature must be from 0 to 2, got -1"),
    ("--temperature 2.5", "--temperature must be from 0 to 2, got 2.5"),
    ("--temperature hot", "--temperature must be a number from 0 to 2, got 'hot'"),
    ("--top_p 0", "--top_p must be more than 0 and at most 1, got 0"),
]


def run(shell, capfd, cell: str) -> str:
    capfd.readouterr()
    shell.run_cell(cell)
    out, err = capfd.readouterr()
    return out + err


@pytest.mark.parametrize("option,message", BAD)
def test_the_magic_refuses_a_bad_chat_option_in_one_sentence(shell, capfd, option, message):
    text = run(shell, capfd, f"%byzer_chat {option} not_deployed hi")
    assert f"UsageError: {message}" in text and "Traceback" not in text, text
    text = run(shell, capfd, f"%%byzer_chat not_deployed {option}\nhi")
    assert f"UsageError: {message}" in text, text


@pytest.mark.parametrize("option,message", BAD)
def test_the_command_line_refuses_the_same_values_with_exit_2(capsys, option, message):
    flag, value = option.split()
    assert main(["chat", "not_deployed", flag, value, "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"byzer-magic chat: {message}"


def test_a_bad_default_in_config_is_refused_with_the_same_range(shell, capfd):
    magics = shell.find_magic("byzer_chat").__self__
    from traitlets import TraitError

    with pytest.raises(TraitError, match="ByzerMagics.temperature must be from 0 to 2, got 5"):
        magics.temperature = 5
    with pytest.raises(TraitError, match="ByzerMagics.max_tokens must be 1 or more, got 0"):
        magics.max_tokens = 0
    magics.max_tokens = 6
    magics.max_tokens = None
    assert "ByzerMagics.max_tokens" in run(shell, capfd, "%config ByzerMagics")


def test_the_magics_help_lists_each_option_with_its_range(shell, capfd):
    text = run(shell, capfd, "%byzer_chat?")
    for name in ChatOptions.model_fields:
        assert f"--{name}" in text, name
    assert "(1 or more)" in text and "(from 0 to 2)" in text and "%byzer_chat my_chat What is Ray?" in text


def test_the_command_lines_help_has_the_shell_options_only(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["chat", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert "--max_tokens" in text and "--temperature" in text and "(from 0 to 2)" in text
    assert "--output" not in text and "--no_stream" not in text


def test_the_endpoint_bounds_the_same_fields():
    from pydantic import ValidationError

    from byzer_magic.openai.routes import ChatRequest, CompletionRequest

    messages = [{"role": "user", "content": "hi"}]
    for model in (ChatRequest, CompletionRequest):
        for name in Sampling.model_fields:
            assert model.model_fields[name].metadata == Sampling.model_fields[name].metadata, name
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"temperature": 2.5}, {"max_completion_tokens": -5}):
        with pytest.raises(ValidationError):
            ChatRequest(model="m", messages=messages, **bad)
    request = ChatRequest(model="m", messages=messages, max_completion_tokens=9, temperature=0, seed=3)
    assert (request.gen().max_tokens, request.gen().temperature, request.gen().seed) == (9, 0, 3)


@pytest.mark.parametrize("line,options,prompt", [
    ("my_chat What's Ray? -- it's \"fast\"", ["my_chat"], "What's Ray? -- it's \"fast\""),
    ("--max_tokens -5 my_chat hi", ["--max_tokens", "-5", "my_chat"], "hi"),
    ("-o answer --system 'one line' c Why -x?", ["-o", "answer", "--system", "one line", "c"], "Why -x?"),
    ("--top_p=0.5 --seed 7 --no_stream c q", ["--top_p=0.5", "--seed", "7", "--no_stream", "c"], "q"),
    ("c", ["c"], ""),
])
def test_the_chat_line_splits_options_from_a_verbatim_question(line, options, prompt):
    assert split_chat_line(line) == (options, prompt)


def test_an_unclosed_quote_in_the_options_is_bad_input():
    with pytest.raises(SpecError, match="in the options"):
        split_chat_line("--system 'unclosed c hi")
