"""A backend from outside byzer_magic, found through the `byzer_magic.backends` entry point.

The echo backend under tests/plugins/ is pip-installed (not editable, so its
files land in site-packages, where Ray's worker processes find them too),
deployed with `--infer_backend echo` on the session's cluster, and removed
again: nothing under byzer_magic/ names it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from byzer_magic import backends

from byzer_magic.serving import chat, deploy
from byzer_magic.backends.base import GenParams
from byzer_magic.errors import SpecError
from byzer_magic.spec.deploy_spec import parse_spec

from .conftest import ROOT, alive_replicas

ECHO = Path(__file__).parent / "plugins" / "echo_backend"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


@pytest.fixture
def echo_installed(tmp_path):
    """The echo package installed into this venv for the test's length; built from a copy, so tests/ stays clean."""
    source = shutil.copytree(ECHO, tmp_path / "echo_backend")
    _pip("install", "--no-deps", "--no-build-isolation", str(source))
    try:
        yield
    finally:
        _pip("uninstall", "-y", "byzer-echo-backend")


def test_the_built_in_backends_are_declared_as_entry_points_as_the_fallback_lists_them():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][backends.GROUP]
    assert declared == backends._BUILT_IN
    assert [b.name for b in backends.every()][:len(declared)] == list(declared)


def test_an_unknown_backend_names_the_installed_ones():
    with pytest.raises(SpecError, match="'echo' is not a backend.*Valid: vllm, transformers, deepspeed, llama_cpp"):
        parse_spec("--model e --infer_backend echo")


@pytest.mark.ray
def test_an_installed_backend_deploys_chats_and_undeploys(ray_head, echo_installed):
    spec = parse_spec("--model echo_chat --infer_backend echo --infer_params backend.prefix=echo:")
    assert spec.backend == "echo" and spec.worker_concurrency == 1
    assert "echo" in backends.infer_backend_help()
    deploy.deploy(spec)
    try:
        answer = chat.chat("echo_chat", "hello plugin world", GenParams(max_tokens=3))
        assert (answer.text, answer.finish_reason) == ("echo: hello plugin ", "length")
        streamed = [d.text for d in chat.stream("echo_chat", chat.messages_for("hi there"))]
        assert "".join(streamed) == "echo: hi there "
        with pytest.raises(Exception, match="'echo_chat' is a chat model \\(echo\\); it does not embed"):
            chat.embed("echo_chat", ["a"])
    finally:
        deploy.undeploy("echo_chat")
    assert alive_replicas("echo_chat") == []
