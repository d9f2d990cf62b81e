"""`--session`: a conversation over cells, trimmed to the model's context, carried to another deployment.

Two llama.cpp deployments of the tiny GGUF: one with a context of 128 tokens,
so that a few turns overflow it, and one of 512.
"""
from __future__ import annotations

import pytest

from byzer_magic.serving import chat, deploy
from byzer_magic.backends.base import GenParams
from byzer_magic.frontends.cli import main
from byzer_magic.errors import BackendError

from .conftest import alive_replicas
from .test_llama_cpp import llama_spec

SMALL, BIG = "sess_small", "sess_big"
QUESTION = "tell me about ray serve and its replicas and its router and its queue"
SHORT = GenParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def pair(ray_head, tiny_model):
    deploy.deploy(llama_spec(tiny_model.gguf, SMALL, "n_ctx=128"))
    deploy.deploy(llama_spec(tiny_model.gguf, BIG))
    yield
    for name in (SMALL, BIG):
        deploy.undeploy(name)
        assert alive_replicas(name) == []


def run(shell, capfd, cell: str) -> str:
    capfd.readouterr()
    shell.run_cell(cell)
    out, err = capfd.readouterr()
    return out + err


def test_history_goes_with_each_question_trimmed_from_the_oldest_turn_with_a_note(pair, shell, capfd):
    outputs = [run(shell, capfd, f"%%byzer_chat {SMALL} --session trim --temperature 0 --max_tokens 8\n{i} {QUESTION}")
               for i in range(5)]
    assert not any("Error" in out for out in outputs), outputs
    assert "left out" not in outputs[0] and "left out" not in outputs[1]
    notes = [out.splitlines()[0] for out in outputs if "left out" in out]
    assert notes and notes[0].startswith("(session 'trim': the oldest turn was left out to fit 'sess_small''s "
                                         "context of 128 tokens with room for --max_tokens 8;"), notes
    shell.user_ns.pop("kept", None)
    transcript = run(shell, capfd, "%byzer_history trim -o kept")
    kept = shell.user_ns["kept"]
    assert [m["role"] for m in kept] == ["user", "assistant"] * 5 and kept[0]["content"] == f"0 {QUESTION}"
    assert f"[5] user: 4 {QUESTION}" in transcript and f"[5] {SMALL}: " in transcript
    with pytest.raises(BackendError, match="exceed context window|could not broadcast"):  # llama-cpp-python's words
        chat.chat(SMALL, [*kept, {"role": "user", "content": QUESTION}], SHORT)


def test_a_session_carries_to_another_deployment_and_clears(pair, shell, capfd):
    run(shell, capfd, f"%%byzer_chat {SMALL} --session carry --temperature 0 --max_tokens 8\nMy name is Ada.")
    shell.run_line_magic("byzer_history", "carry -o before")
    answer = run(shell, capfd, f"%%byzer_chat {BIG} --session carry --temperature 0 --max_tokens 8 --no_stream\n"
                               f"What is my name?")
    expected = chat.chat(BIG, [*shell.user_ns["before"], {"role": "user", "content": "What is my name?"}], SHORT)
    assert answer.strip() == expected.text.strip()
    transcript = run(shell, capfd, "%byzer_history carry")
    assert f"[1] {SMALL}: " in transcript and f"[2] {BIG}: " in transcript
    assert run(shell, capfd, "%byzer_history carry --clear").strip() == "session 'carry' cleared"
    assert run(shell, capfd, "%byzer_history carry").strip() == "session 'carry' is empty"


def test_the_command_line_keeps_a_session_in_a_file_across_commands(pair, capsys):
    for question in ("first question", "second question"):
        assert main(["chat", BIG, "--session", "cli_s", "--temperature", "0", "--max_tokens", "4", question]) == 0
    capsys.readouterr()
    assert main(["history", "cli_s"]) == 0
    out = capsys.readouterr().out
    assert "[1] user: first question" in out and f"[2] {BIG}: " in out
    assert main(["history", "cli_s", "--clear"]) == 0
