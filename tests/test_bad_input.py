"""Bad input of every kind, through the magics, the command line and --file YAML.

For each case the user sees one paragraph naming what to fix (no traceback),
and the cluster holds exactly what it held before, read through Ray's state API.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from .conftest import ROOT

SAAS = "--pretrained_model_type saas/openai --infer_params saas.api_key=k saas.model=tiny saas.base_url={url}"
LLAMA = "--infer_backend llama_cpp --model_path {gguf}"

MAGIC_CASES = [
    ("%%byzer_deploy\n", "cell body is empty|no flags given"),
    ("%%byzer_deploy\n# only a comment\n", "no flags given"),
    ("%%byzer_deploy\n--model a --bogus 1", "unknown flag --bogus"),
    ("%byzer_deploy --model a --infer_backend tgi --model_path /m", "'tgi' is not a backend"),
    ("%byzer_deploy byzerllm deploy --model a --infer_backend llama_cpp", "--model_path is required"),
    ("%%byzer_deploy\n--model a --num_wokers 2 " + LLAMA, "Did you mean --num_workers"),
    ("%%byzer_deploy\n--model a --num_workers 0 " + LLAMA, "--num_workers must be from 1 to 256"),
    ("%%byzer_deploy\n--model a --num_workers -3 " + LLAMA, "--num_workers must be from 1 to 256"),
    ("%%byzer_deploy\n--model a --num_workers 99999 " + LLAMA, "--num_workers must be from 1 to 256"),
    ("%%byzer_deploy\n--model a --num_workers many " + LLAMA, "--num_workers must be a whole number"),
    ("%%byzer_deploy\n--model a --cpus_per_worker x " + LLAMA, "--cpus_per_worker must be a number"),
    ("%%byzer_deploy\n--model a --pretrained_model_type saas/nope --infer_params saas.api_key=k saas.model=m",
     "unknown provider"),
    ("%%byzer_deploy\n--model a --infer_backend tgi --model_path /m", "'tgi' is not a backend. Valid: vllm, transformers"),
    ("%%byzer_deploy\n--model a --infer_backend llama_cpp", "--model_path is required"),
    ("%%byzer_deploy\n--model a --infer_backend llama_cpp --model_path /no/such.gguf", "no such file"),
    ("%%byzer_deploy\n--model a --infer_backend llama_cpp --model_path {not_gguf}", "not a GGUF file"),
    ("%%byzer_deploy\n--model a --infer_backend llama_cpp --model_path {dir}", "needs a .gguf file"),
    ("%%byzer_deploy\n--model a " + LLAMA + " --infer_params n_ctxx=5", "Did you mean n_ctx"),
    ("%%byzer_deploy\n--model a " + LLAMA + " --infer_params n_ctx=big", "n_ctx: input should be a valid integer"),
    ("%%byzer_deploy\n--model a " + SAAS + " saas.timeout=-1", "saas.timeout: input should be greater than 0"),
    ("%%byzer_deploy\n--model a --pretrained_model_type saas/openai --infer_params saas.api_key=${{NOT_SET_ANYWHERE}} "
     "saas.model=m", r"\$NOT_SET_ANYWHERE is not set"),
    ("%%byzer_deploy\n--model 'two words' " + LLAMA, "not a valid name"),
    ("%%byzer_deploy\n--model 'a;rm -rf ~' " + LLAMA, "not a valid name"),
    ("%%byzer_deploy\n--model '$(reboot)' " + LLAMA, "not a valid name"),
    ("%%byzer_deploy\n--model a --infer_backend llama_cpp --model_path \"unclosed", "unclosed quote"),
    ("%%byzer_deploy\n--model a " + LLAMA + " --gpus_per_worker 1", "need 1 GPUs; the cluster has 0"),
    ("%%byzer_deploy\n--model a " + LLAMA + " --num_workers 200 --cpus_per_worker 1", "need 200 CPUs"),
    ("%%byzer_deploy\n--model a --file {yaml_unknown}", "unknown key 'workers'. Did you mean num_workers"),
    ("%%byzer_deploy\n--model a --file {yaml_list}", "expected a mapping"),
    ("%%byzer_deploy\n--model a --file {yaml_broken}", "not valid YAML"),
    ("%%byzer_deploy\n--file {yaml_badtype}", "--num_workers must be a whole number"),
    ("%%byzer_deploy\n--model a --file /no/such.yaml", "cannot read it"),
    ("%byzer_chat", "name"),
    ("%byzer_chat not_deployed hello", "no deployment named 'not_deployed'"),
    ("%byzer_chat --temperature hot not_deployed hi", "--temperature must be a number from 0 to 2, got 'hot'"),
    ("%byzer_chat --temperature -1 kept hi", "--temperature must be from 0 to 2, got -1"),
    ("%byzer_chat --max_tokens -5 kept hi", "--max_tokens must be 1 or more, got -5"),
    ("%byzer_chat --max_tokens 0 kept hi", "--max_tokens must be 1 or more, got 0"),
    ("%%byzer_chat not_deployed\n   \n", "nothing to ask"),
    ("%byzer_scale", "usage: %byzer_scale NAME WORKERS"),
    ("%byzer_scale kept -1", "cannot scale to -1 workers: use 0 to 256"),
    ("%byzer_scale kept 257", "cannot scale to 257 workers: use 0 to 256"),
    ("%byzer_scale kept 100000", "cannot scale to 100000 workers"),
    ("%byzer_scale not_deployed 2", "no deployment named 'not_deployed'"),
    ("%byzer_undeploy", "usage: %byzer_undeploy NAME"),
    ("%byzer_undeploy not_deployed", "no deployment named 'not_deployed'.*kept"),
    ("%byzer_status not_deployed", "no deployment named 'not_deployed'"),
    ("%%byzer_deploy\n--model kept " + LLAMA, "already exists"),
]


def cluster_state() -> tuple:
    """What the cluster holds: alive actors and Serve applications."""
    from ray.util.state import list_actors

    from byzer_magic.serving import deploy

    actors = sorted(a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10000))
    apps = tuple((r.name, r.state, r.workers_ready) for r in deploy.list_deployments().rows)
    return tuple(actors), apps


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("bad")
    (root / "weights.gguf").write_bytes(b"not a gguf")
    (root / "u.yaml").write_text("model: a\nworkers: 2\n")
    (root / "l.yaml").write_text("- a\n- b\n")
    (root / "b.yaml").write_text("model: [a\n")
    (root / "t.yaml").write_text(f"model: a\ninfer_backend: llama_cpp\nmodel_path: {tiny_model.gguf}\nnum_workers: 1.5\n")
    return {"not_gguf": root / "weights.gguf", "dir": root, "yaml_unknown": root / "u.yaml",
            "yaml_list": root / "l.yaml", "yaml_broken": root / "b.yaml", "yaml_badtype": root / "t.yaml",
            "gguf": tiny_model.gguf}


@pytest.fixture(scope="module")
def kept(ray_head, openai_server):
    """One deployment that stays up through the cases, so 'already in use' and scale bounds are real."""
    from byzer_magic.serving import deploy
    from byzer_magic.spec.deploy_spec import parse_spec

    deploy.deploy(parse_spec(f"--model kept {SAAS.format(url=openai_server.base_url)}"))
    yield "kept"
    deploy.undeploy("kept")


@pytest.mark.parametrize("cell,message", MAGIC_CASES)
def test_bad_magic_input_is_one_paragraph_and_changes_nothing(shell, capfd, kept, files, openai_server, cell, message):
    cell = cell.format(url=openai_server.base_url, **files)
    os.environ.pop("NOT_SET_ANYWHERE", None)
    before = cluster_state()
    capfd.readouterr()
    shell.run_cell(cell)
    out, err = capfd.readouterr()
    text = out + err
    assert "UsageError" in text, text
    assert "Traceback" not in text, text
    import re

    assert re.search(message, text), text
    assert cluster_state() == before


CLI_CASES = [
    (["deploy"], 0, "--pretrained_model_type"),
    (["deploy", "--model", "a", "--num_wokers", "2"], 2, "Did you mean --num_workers"),
    (["deploy", "--model", "a", "--infer_backend", "llama_cpp", "--model_path", "/no/such.gguf"], 2, "no such file"),
    (["deploy", "--model", "kept", *SAAS.split()], 1, "already exists.*remove it with byzer-magic undeploy kept"),
    (["deploy", "--model", "a", "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=$UNSET_X",
      "saas.model=m"], 2, r"\$UNSET_X is not set"),
    (["scale", "kept", "-1"], 2, "cannot scale to -1 workers: use 0 to 256"),
    (["scale", "kept", "257"], 2, "cannot scale to 257 workers: use 0 to 256"),
    (["scale", "kept", "two"], 2, "cannot scale to 'two': give a count"),
    (["chat", "not_deployed", "hi"], 1, "no deployment named.*deploy it with byzer-magic deploy, see byzer-magic list"),
    (["chat", "kept", "--max_tokens", "0", "hi"], 2, "--max_tokens must be 1 or more, got 0"),
    (["chat", "kept", "--temperature", "-1", "hi"], 2, "--temperature must be from 0 to 2, got -1"),
    (["undeploy", "not_deployed"], 1, "no deployment named"),
    (["stat", "not_deployed"], 1, "no deployment named"),
    (["frobnicate"], 2, "invalid choice"),
]


@pytest.mark.parametrize("argv,code,message", CLI_CASES)
def test_bad_cli_input_exits_with_a_clear_line(kept, ray_head, openai_server, argv, code, message):
    import re

    argv = [word.format(url=openai_server.base_url) for word in argv]
    before = cluster_state()
    env = {k: v for k, v in os.environ.items() if k != "UNSET_X"}
    result = subprocess.run(["byzer-magic", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert re.search(message, text) and "Traceback" not in text, text
    assert "%byzer" not in text, text
    assert cluster_state() == before
