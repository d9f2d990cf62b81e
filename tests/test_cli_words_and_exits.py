"""`byzer-magic` without a cluster: exit status 2 for bad input, shell words, and imports kept lazy."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

from byzer_magic.frontends.cli import main
from byzer_magic.spec.options import DeployFlags, ServeFlags

from .conftest import ROOT


def exit_code(argv: list[str]) -> int:
    """main's status; argparse's own refusals exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama_cpp installed")
def test_a_missing_model_path_is_bad_input(capsys, tmp_path):
    argv = ["deploy", "--model", "a", "--infer_backend", "llama_cpp", "--model_path", str(tmp_path / "no.gguf")]
    assert exit_code(argv) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "w.gguf").write_bytes(b"not a gguf")
    assert exit_code(argv[:-1] + [str(tmp_path / "w.gguf")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


@pytest.mark.parametrize("workers,message", [("-1", "cannot scale to -1 workers: use 0 to 256"),
                                             ("257", "cannot scale to 257 workers: use 0 to 256"),
                                             ("two", "give a count (3) or a range for autoscaling (2..6)"), ("3..2", "0 <= MIN <= MAX")])
def test_a_worker_count_scale_cannot_take_is_bad_input_before_any_cluster(capsys, workers, message):
    assert exit_code(["scale", "kept", workers, "--ray_address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert message in err and "%byzer" not in err, err


@pytest.mark.parametrize("argv,message", [
    (["serve", "--port", "0"], "byzer-magic serve: --port must be from 1 to 65535, got 0"),
    (["serve", "--prot", "9"], "Did you mean --port?"),
    (["deploy", "--model", "a", "--num_workers", "0"], "byzer-magic deploy: --num_workers must be from 1 to 256"),
    (["deploy", "--model", "a", "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=$UNSET_Q",
      "saas.model=m"], "is not set (set it with export UNSET_Q=...)"),
])
def test_bad_flags_exit_2_in_shell_words(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("UNSET_Q", raising=False)
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "%" not in err, err


@pytest.mark.parametrize("argv,model", [(["deploy", "--help"], DeployFlags), (["serve", "--help"], ServeFlags)])
def test_help_comes_from_the_model_in_shell_words(capsys, argv, model):
    assert exit_code(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in model.model_fields:
        assert f"--{name}" in text, name
    assert "%byzer" not in text and "%%" not in text
    if model is DeployFlags:
        assert "(from 1 to 256; default 1)" in text and "saas.api_key" in text
    else:
        assert "(from 1 to 65535; default 8000)" in text


def test_help_and_refusals_import_no_ray():
    """What a command does not need it does not import (Ray alone costs seconds)."""
    code = textwrap.dedent("""
        import sys
        from byzer_magic.frontends.cli import main

        def run(argv):
            try:
                return main(argv)
            except SystemExit as exc:
                return exc.code

        codes = [run(["--help"]), run(["deploy", "--help"]), run(["serve", "--help"]), run(["chat", "--help"]),
                 run(["chat", "c", "--max_tokens", "0", "hi"]),
                 run(["deploy", "--model", "a", "--num_workers", "0"]), run(["serve", "--port", "0"])]
        print("CODES", codes, "RAY", "ray" in sys.modules, "TORCH", "torch" in sys.modules, file=sys.stderr)
        import jsonschema  # what Ray imports; it must work without its optional IRI checker

        print("IRI", sys.modules["rfc3987_syntax"], file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "CODES [0, 0, 0, 0, 2, 2, 2] RAY False TORCH False" in result.stderr, result.stderr
    assert "IRI None" in result.stderr, result.stderr
