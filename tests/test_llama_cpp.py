"""The llama_cpp backend on a real Ray cluster, against llama_cpp.Llama itself."""
from __future__ import annotations

import re
import time

import pytest

from byzer_magic.serving import chat, deploy
from byzer_magic.backends.base import GenParams
from byzer_magic.errors import DeployError
from byzer_magic.spec.deploy_spec import parse_spec

from .conftest import alive_replicas

PROMPT = [{"role": "user", "content": "Hello there, what is ray?"}]


def llama_spec(path, name: str, extra: str = "") -> str:
    return parse_spec(
        f"--pretrained_model_type custom/auto --infer_backend llama_cpp --model_path {path} "
        f"--infer_params n_ctx=512 n_gpu_layers=0 verbose=false {extra} --cpus_per_worker 1 --model {name}"
    )


def test_greedy_answer_equals_calling_llama_directly(ray_head, tiny_model):
    from llama_cpp import Llama

    direct = Llama(str(tiny_model.gguf), n_ctx=512, verbose=False)
    expected = direct.create_chat_completion(PROMPT, temperature=0, max_tokens=16)["choices"][0]["message"]["content"]
    direct.close()
    assert expected

    deploy.deploy(llama_spec(tiny_model.gguf, "llama_local"))
    try:
        gen = GenParams(temperature=0, max_tokens=16)
        whole = chat.chat("llama_local", PROMPT, gen)
        streamed = [d.text for d in chat.stream("llama_local", PROMPT, gen)]
        assert whole.text == expected
        assert "".join(streamed) == expected and len(streamed) > 1
        assert whole.finish_reason == "length"
    finally:
        deploy.undeploy("llama_local")
    assert alive_replicas("llama_local") == []


def test_a_missing_model_path_is_refused_before_anything_starts(ray_head, tmp_path):
    before = deploy.list_deployments()
    with pytest.raises(DeployError, match="no such file"):
        deploy.deploy(llama_spec(tmp_path / "absent.gguf", "absent"))
    assert deploy.list_deployments() == before


def test_a_file_that_is_not_gguf_is_refused_before_anything_starts(ray_head, tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(DeployError, match="not a GGUF file"):
        deploy.deploy(llama_spec(fake, "notgguf"))
    assert deploy.status("notgguf").state == "stopped"


def test_a_corrupt_gguf_fails_in_the_worker_and_leaves_nothing(ray_head, tiny_model, tmp_path):
    corrupt = tmp_path / "truncated.gguf"
    corrupt.write_bytes(tiny_model.gguf.read_bytes()[:4096])
    with pytest.raises(DeployError, match="cannot load"):
        deploy.deploy(llama_spec(corrupt, "corrupt", extra="--deploy_timeout 120"))
    assert deploy.status("corrupt").state == "stopped"
    assert alive_replicas("corrupt") == []


def test_a_relative_model_path_means_relative_to_the_notebook(ray_head, tiny_model, tmp_path, monkeypatch):
    import shutil

    shutil.copy(tiny_model.gguf, tmp_path / "here.gguf")
    monkeypatch.chdir(tmp_path)
    status = deploy.deploy(llama_spec("here.gguf", "llama_relative"))
    try:
        assert status.state == "ready" and status.details["model"] == str(tmp_path / "here.gguf")
        assert chat.chat("llama_relative", PROMPT, GenParams(temperature=0, max_tokens=4)).text
    finally:
        deploy.undeploy("llama_relative")


def test_cancelled_and_resent_100_times_never_two_threads_in_the_model(ray_head, tiny_model):
    """llama.cpp is not thread-safe: a cancelled chat must leave the model before the next one enters."""
    deploy.deploy(llama_spec(tiny_model.gguf, "llama_cancel"))
    try:
        long = GenParams(temperature=1.0, max_tokens=48, seed=1)
        for i in range(100):
            stream = chat.stream("llama_cancel", [{"role": "user", "content": f"tell me a story {i}"}], long)
            next(stream)
            stream.close()
        answer = chat.chat("llama_cancel", PROMPT, GenParams(temperature=0, max_tokens=8))
        assert answer.text and answer.finish_reason == "length"

        async def stats() -> dict:
            return await chat._handle("llama_cancel").stats.remote()

        assert chat.run_on_client_loop(stats())["most_threads_inside"] == 1
    finally:
        deploy.undeploy("llama_cancel")


def test_a_max_tokens_or_a_prompt_over_the_context_is_refused_at_once(ray_head, tiny_model, shell, capfd):
    from byzer_magic.errors import SpecError

    deploy.deploy(llama_spec(tiny_model.gguf, "llama_ctx"))
    try:
        with pytest.raises(SpecError, match="max_tokens 100000 is more than 'llama_ctx' can hold: its context is 512"):
            chat.chat("llama_ctx", PROMPT, GenParams(max_tokens=100_000))
        assert chat.chat("llama_ctx", PROMPT, GenParams(temperature=0, max_tokens=4)).text
        # In a cell: one sentence with both numbers, no traceback, at once.
        capfd.readouterr()
        started = time.monotonic()
        shell.run_cell("%byzer_chat llama_ctx " + "ray " * 600)
        out, err = capfd.readouterr()
        assert time.monotonic() - started < 10
        assert re.search(r"the prompt is \d+ tokens, and 'llama_ctx' holds 512 tokens in its context, answer "
                         r"included; shorten the prompt", out + err) and "Traceback" not in out + err
        # -o keeps the same counts the endpoint reports: llama.cpp's own, prompt and answer.
        shell.run_cell("%byzer_chat llama_ctx -o kept --temperature 0 --max_tokens 5 What is Ray?")
        capfd.readouterr()
        from llama_cpp import Llama

        own = Llama(str(tiny_model.gguf), n_ctx=512, verbose=False).create_chat_completion(
            [{"role": "user", "content": "What is Ray?"}], temperature=0, max_tokens=5)["usage"]
        assert shell.user_ns["kept"].usage == own
    finally:
        deploy.undeploy("llama_ctx")
