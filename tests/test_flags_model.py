"""The options models, without Ray: every parser, help text, default and error comes from them."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from byzer_magic.errors import SpecError
from byzer_magic.spec.flags import build_parser, build_serve_parser, read_serve_flags
from byzer_magic.spec.option_args import bounds, default_of, help_lines, help_text, validated
from byzer_magic.spec.options import SERVE_DEFAULTS, ChatOptions, DeployFlags, ServeFlags
from byzer_magic.spec.deploy_spec import DeploySpec, parse_args, parse_spec
from byzer_magic.serving.status import DeploymentStatus
from byzer_magic.frontends.wording import SHELL_COMMANDS, for_shell

LLAMA = "--model x --infer_backend llama_cpp --model_path /m.gguf"
PACKAGE = Path(__file__).resolve().parent.parent / "byzer_magic"


@pytest.mark.parametrize("model", [DeployFlags, ServeFlags, ChatOptions])
def test_every_option_is_described_and_in_its_parser(model):
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), name
    if model is ChatOptions:
        return
    parser = build_parser() if model is DeployFlags else build_serve_parser("byzer-magic serve")
    text = parser.format_help()
    for name, field in model.model_fields.items():
        assert f"--{name}" in text, name


def test_help_states_each_range_and_default_from_the_model():
    lines = help_lines(DeployFlags)
    assert "--num_workers: workers, i.e. Ray Serve replicas (from 1 to 256; default 1)" in lines
    assert "--cpus_per_worker: Ray CPUs per worker, fractions allowed (0 or more; default 0.001)" in lines
    assert "(more than 0 seconds; default 300)" in lines
    assert "--model: " in lines and "(required)" in lines
    assert help_text(ServeFlags.model_fields["port"]) == "TCP port (from 1 to 65535; default 8000)"
    assert "-o, --output" in help_lines(ChatOptions)
    assert bounds(ChatOptions.model_fields["top_p"]) == "more than 0 and at most 1"


def test_defaults_are_the_models_and_nowhere_else():
    spec = parse_spec(LLAMA)
    for name in ("num_workers", "cpus_per_worker", "gpus_per_worker", "force", "deploy_timeout"):
        assert getattr(spec, name) == default_of(DeployFlags, name), name
        assert DeploySpec.__dataclass_fields__[name].default == default_of(DeployFlags, name), name
    assert (SERVE_DEFAULTS.host, SERVE_DEFAULTS.port) == ("127.0.0.1", 8000)
    flags = read_serve_flags([], {})
    assert (flags.host, flags.port, flags.api_key, flags.stop) == ("127.0.0.1", 8000, None, False)
    from byzer_magic.openai import gateway

    signature = inspect.signature(gateway.start)
    assert signature.parameters["host"].default == SERVE_DEFAULTS.host
    assert signature.parameters["port"].default == SERVE_DEFAULTS.port


def test_no_module_writes_a_flag_default_again():
    """The literals of the old tables: each default now lives in options.py alone."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "options.py":
            continue
        text = path.read_text()
        for literal in ("default 0.001", "default 300", "default=8000", "port: int = 8000", 'host: str = "127.0.0.1"'):
            assert literal not in text, f"{path.name}: {literal}"


BAD_VALUES = [
    ("--num_workers 0", "--num_workers must be from 1 to 256, got 0"),
    ("--num_workers 257", "--num_workers must be from 1 to 256, got 257"),
    ("--num_workers many", "--num_workers must be a whole number from 1 to 256, got 'many'"),
    ("--num_workers 1.5", "--num_workers must be a whole number from 1 to 256, got '1.5'"),
    ("--cpus_per_worker -1", "--cpus_per_worker must be 0 or more, got -1"),
    ("--cpus_per_worker inf", "--cpus_per_worker must be a number (0 or more), got 'inf'"),
    ("--gpus_per_worker lots", "--gpus_per_worker must be a number (0 or more), got 'lots'"),
    ("--worker_concurrency 0", "--worker_concurrency must be 1 or more, got 0"),
    ("--deploy_timeout 0", "--deploy_timeout must be more than 0 seconds, got 0"),
    ("--deploy_timeout soon", "--deploy_timeout must be a number of seconds (more than 0), got 'soon'"),
]


@pytest.mark.parametrize("flag,message", BAD_VALUES)
def test_a_bad_value_is_one_sentence_naming_the_flag_and_what_is_valid(flag, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(f"{LLAMA} {flag}")
    assert str(caught.value) == message


def test_yaml_values_are_typed_by_the_same_model(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: 123\ninfer_backend: llama_cpp\nmodel_path: /m.gguf\nnum_workers: 2.0\nforce: 'yes'\n")
    spec = parse_args(["--file", str(path)])
    assert (spec.name, spec.num_workers, spec.force) == ("123", 2, True)
    path.write_text("model: x\ninfer_backend: llama_cpp\nmodel_path: /m.gguf\nforce: maybe\n")
    with pytest.raises(SpecError, match="--force must be true or false, got 'maybe'"):
        parse_args(["--file", str(path)])
    path.write_text("model: x\nfile: other.yaml\n")
    with pytest.raises(SpecError, match="unknown key 'file'"):
        parse_args(["--file", str(path)])


def test_a_missing_model_says_what_it_is_with_an_example():
    with pytest.raises(SpecError, match=r"^--model is required: .*e\.g\. --model my_chat$"):
        parse_spec("--infer_backend llama_cpp --model_path /m.gguf")


def test_deepspeed_is_not_told_to_shard_over_gpus_it_cannot_use():
    with pytest.raises(SpecError) as caught:
        parse_spec("--model x --infer_backend deepspeed --model_path /m --gpus_per_worker 1.5")
    assert "one process per GPU" in str(caught.value)
    assert "use 2, 3" not in str(caught.value) and "gpu_memory_utilization" not in str(caught.value)
    assert parse_spec("--model x --infer_backend deepspeed --model_path /m --gpus_per_worker 0.5").gpus_per_worker == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--port", "0"], "--port must be from 1 to 65535, got 0"),
    (["--port", "http"], "--port must be a whole number from 1 to 65535, got 'http'"),
    (["--api_key", " "], "--api_key ' ' is empty"),
    (["--prot", "9"], "unknown flag --prot. Did you mean --port?"),
])
def test_bad_serve_flags(argv, message):
    with pytest.raises(SpecError) as caught:
        read_serve_flags(argv, {})
    assert str(caught.value).startswith(message)


def test_the_serve_key_is_read_from_the_environment():
    assert read_serve_flags(["--api_key", "${K}"], {"K": "sk-1"}).api_key == "sk-1"


def test_validated_treats_none_as_not_given():
    assert validated(ChatOptions, {"max_tokens": None, "temperature": "0.5"}).temperature == 0.5


def test_the_shell_names_its_own_commands():
    assert for_shell("remove it with %byzer_undeploy kept, or add --force") == \
        "remove it with byzer-magic undeploy kept, or add --force"
    assert for_shell("deploy it with %%byzer_deploy, see %byzer_list") == \
        "deploy it with byzer-magic deploy, see byzer-magic list"
    assert for_shell("%byzer_status x and %byzer_serve --stop") == "byzer-magic stat x and byzer-magic serve --stop"
    assert for_shell("(set it with %env KEY=...)") == "(set it with export KEY=...)"
    kept = "`ray start --head` starts one, %%byzer_deploy in a notebook starts one in its kernel"
    assert for_shell(kept) == kept


def test_every_magic_a_message_mentions_has_a_shell_command():
    mentioned = set()
    for path in PACKAGE.rglob("*.py"):
        mentioned |= set(re.findall(r"%%?byzer_(\w+)", path.read_text()))
    assert mentioned - set(SHELL_COMMANDS) == set()


def test_a_status_without_figures_claims_none():
    scaled = DeploymentStatus("c", "ready", 3, 3, details={"backend": "saas", "model": "m"})
    assert "requests" not in repr(scaled)
    read = DeploymentStatus("c", "ready", 1, 1, metrics={"served": 4, "errors": 0, "in_flight": 0})
    assert "requests: 4 served" in repr(read)
