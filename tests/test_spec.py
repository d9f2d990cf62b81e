"""The spec parser, table-driven: the guide's commands, every flag, every error."""
from __future__ import annotations

import pytest

from byzer_magic.errors import SpecError
from byzer_magic.spec.flags import build_parser
from byzer_magic.spec.options import DeployFlags
from byzer_magic.spec.deploy_spec import parse_args, parse_spec

ENV = {"MODEL_QIANWEN_TOKEN": "sk-qianwen-secret-42", "KEY": "sk-key-secret-77", "N": "3"}

GUIDE_SAAS = """byzerllm deploy --pretrained_model_type saas/qianwen \\
--cpus_per_worker 0.001 \\
--gpus_per_worker 0 \\
--num_workers 2 \\
--infer_params saas.api_key=${MODEL_QIANWEN_TOKEN}  saas.model=qwen-max \\
--model qianwen_chat"""

GUIDE_VLLM = """byzerllm deploy --pretrained_model_type custom/auto \\
--infer_backend vllm \\
--model_path /home/winubuntu/models/openbuddy-zephyr-7b-v14.1 \\
--cpus_per_worker 0.001 \\
--gpus_per_worker 1 \\
--num_workers 1 \\
--infer_params backend.max_model_len=28000 \\
--model zephyr_7b_chat"""

ISSUE_SAAS = ("--pretrained_model_type saas/qianwen --cpus_per_worker 0.001 --gpus_per_worker 0 --num_workers 2 "
              "--infer_params saas.api_key=${MODEL_QIANWEN_TOKEN} saas.model=qwen-max --model qianwen_chat")
ISSUE_VLLM = ("--pretrained_model_type custom/auto --infer_backend vllm --model_path /models/zephyr-7b "
              "--cpus_per_worker 0.001 --gpus_per_worker 1 --num_workers 1 --infer_params "
              "backend.max_model_len=28000 --model zephyr_7b_chat")

DESIGN_CELL = """
--pretrained_model_type saas/openai
--infer_params saas.api_key=${KEY} saas.model=gpt-4o-mini saas.base_url=http://127.0.0.1:8080/v1
--num_workers 2 --cpus_per_worker 0.001 --gpus_per_worker 0
--model my_chat
"""

LLAMA_CELL = """# a local GGUF, two workers
--pretrained_model_type custom/auto --infer_backend llama_cpp   # the backend
--model_path /path/m.gguf
--infer_params n_ctx=512 n_gpu_layers=0 verbose=false
--model local_chat --num_workers $N
"""

GOOD = [
    (GUIDE_SAAS, dict(name="qianwen_chat", backend="saas", provider="qianwen", num_workers=2, gpus_per_worker=0,
                      cpus_per_worker=0.001, worker_concurrency=1),
     dict(model="qwen-max", base_url=None)),
    (ISSUE_SAAS, dict(name="qianwen_chat", backend="saas", num_workers=2), dict(model="qwen-max")),
    (GUIDE_VLLM, dict(name="zephyr_7b_chat", backend="vllm", gpus_per_worker=1, num_workers=1,
                      model_path="/home/winubuntu/models/openbuddy-zephyr-7b-v14.1", worker_concurrency=256),
     dict(max_model_len=28000, gpu_memory_utilization=0.9, enforce_eager=True, trust_remote_code=False)),
    (ISSUE_VLLM, dict(name="zephyr_7b_chat", model_path="/models/zephyr-7b"), dict(max_model_len=28000)),
    (DESIGN_CELL, dict(name="my_chat", provider="openai", num_workers=2),
     dict(model="gpt-4o-mini", base_url="http://127.0.0.1:8080/v1")),
    (LLAMA_CELL, dict(name="local_chat", backend="llama_cpp", num_workers=3, model_path="/path/m.gguf"),
     dict(n_ctx=512, n_gpu_layers=0, verbose=False)),
    ("--model=x --infer_backend llama_cpp --model_path=/m.gguf --worker_concurrency 4 --deploy_timeout 20 --force "
     "--ray_address 127.0.0.1:6379 --infer_params n_ctx=0 --infer_params n_threads=2 seed=7",
     dict(worker_concurrency=4, deploy_timeout=20.0, force=True, ray_address="127.0.0.1:6379"),
     dict(n_ctx=0, n_threads=2, seed=7)),
    ("--model q --pretrained_model_type saas/deepseek --infer_params saas.api_key=k saas.model=deepseek-chat "
     "saas.timeout=5 saas.max_retries=0 saas.check_on_start=false",
     dict(provider="deepseek"), dict(timeout=5.0, max_retries=0, check_on_start=False)),
    ("--model v --infer_backend vllm --model_path /m --worker_concurrency 8 --infer_params backend.max_num_seqs=4",
     dict(worker_concurrency=8), dict(max_num_seqs=4)),
    ("--model v --infer_backend vllm --model_path /m --infer_params backend.max_num_seqs=4",
     dict(worker_concurrency=4), dict(max_num_seqs=4)),
    ("--model t --infer_backend transformers --model_path /m --infer_params backend.device=cpu backend.dtype=float32",
     dict(backend="transformers", task="chat", worker_concurrency=1), dict(device="cpu", dtype="float32")),
    ("--model t --pretrained_model_type llama2 --model_path /m", dict(backend="transformers", task="chat"), {}),
    ("--model d --infer_backend deepspeed --model_path /m --gpus_per_worker 1",
     dict(backend="deepspeed", task="chat"), dict(replace_with_kernel_inject=False)),
    # byzer-llm's own embedding example
    ("byzerllm deploy --pretrained_model_type custom/bge --cpus_per_worker 0.001 --gpus_per_worker 0 "
     "--worker_concurrency 10 --model_path /models/bge-large-zh --infer_backend transformers --num_workers 1 "
     "--model emb", dict(backend="transformers", task="embed", worker_concurrency=10), dict(pooling="mean")),
    ("--model e --pretrained_model_type m3e --model_path /m --infer_params backend.pooling=cls",
     dict(backend="transformers", task="embed"), dict(pooling="cls", normalize=True)),
]


@pytest.mark.parametrize("text,fields,params", GOOD)
def test_good_specs_parse(text, fields, params):
    spec = parse_spec(text, ENV)
    for key, value in fields.items():
        assert getattr(spec, key) == value, key
    for key, value in params.items():
        assert getattr(spec.params, key) == value, key


vllm_installed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None, reason="checking open engine arguments needs vllm installed"
)


@vllm_installed
def test_any_engine_argument_of_the_installed_vllm_is_accepted_typed_and_shown():
    spec = parse_spec("--model v --infer_backend vllm --model_path /m "
                      "--infer_params backend.max_logprobs=5 backend.max_model_len=512")
    assert spec.params.model_extra == {"max_logprobs": 5}
    assert spec.params.model_dump()["max_logprobs"] == 5
    assert spec.describe()["infer_params"]["backend.max_logprobs"] == 5


@vllm_installed
@pytest.mark.parametrize("params,message", [
    ("backend.max_num_seqss=4", "Did you mean backend.max_num_seqs.*other .* arguments of the installed vllm"),
    ("backend.max_logprobs=lots", "backend.max_logprobs='lots': expected"),
    ("backend.tensor_parallel_sise=2", "Did you mean backend.tensor_parallel_size"),
])
def test_unknown_or_mistyped_engine_arguments_are_refused(params, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(f"--model v --infer_backend vllm --model_path /m --infer_params {params}")


def test_the_guide_secret_is_read_from_the_environment_and_masked():
    spec = parse_spec(GUIDE_SAAS, ENV)
    assert spec.params.api_key.get_secret_value() == "sk-qianwen-secret-42"
    assert spec.base_url == "https://dashscope.aliyuncs.com/compatible-mode/v1"
    for text in (repr(spec), str(spec), str(spec.describe()), repr(spec.params)):
        assert "sk-qianwen-secret-42" not in text
    assert spec.describe()["infer_params"]["saas.api_key"] == "***"


def test_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "pretrained_model_type: saas/openai\nmodel: from_yaml\nnum_workers: 4\n"
        "infer_params:\n  saas.api_key: ${KEY}\n  saas.model: m1\n"
    )
    spec = parse_args(["--file", str(path), "--num_workers", "2", "--infer_params", "saas.model=m2"], ENV)
    assert (spec.name, spec.num_workers, spec.params.model) == ("from_yaml", 2, "m2")
    assert spec.params.api_key.get_secret_value() == "sk-key-secret-77"


def test_yaml_infer_params_may_be_a_list_of_pairs(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("--model: y\n--infer_backend: llama_cpp\nmodel_path: /m.gguf\ninfer_params: [n_ctx=64, verbose=true]\n")
    spec = parse_args(["--file", str(path)], ENV)
    assert (spec.params.n_ctx, spec.params.verbose) == (64, True)


BAD = [
    ("", "no flags given"),
    ("--pretrained_model_type saas/openai", "--model is required"),
    ("--model x --pretrained_model_type saas/nosuch --infer_params saas.api_key=k saas.model=m",
     "unknown provider.*saas/qianwen"),
    ("--model x --pretrained_model_type saas/opnai", "Did you mean saas/openai"),
    ("--model x --pretrained_model_type custom/auto --model_path /m",
     "needs --infer_backend, one of: vllm, transformers, deepspeed, llama_cpp"),
    ("--model x --infer_backend tensorrt --model_path /m", "'tensorrt' is not a backend.*Valid: vllm, transformers"),
    ("--model x --infer_backend transformer --model_path /m", "Did you mean transformers"),
    ("--model x --pretrained_model_type custom/atuo --infer_backend vllm --model_path /m", "did you mean custom/auto"),
    ("--model x --pretrained_model_type 'llama 2!' --model_path /m", "use saas/<provider>.*custom/bge"),
    ("--model x --pretrained_model_type custom/bge --infer_backend vllm --model_path /m",
     "embedding model: it deploys with --infer_backend transformers, not vllm"),
    ("--model x --infer_backend deepspeed --model_path /m --gpus_per_worker 2", "one process per GPU"),
    ("--model x --infer_backend deepspeed --model_path /m --gpus_per_worker 1.5", "one process per GPU"),
    ("--model x --infer_backend transformers --model_path /m --infer_params device=cpu", "Did you mean backend.device"),
    ("--model x --infer_backend transformers --model_path /m --infer_params backend.dtype=fp7",
     "backend.dtype: input should be 'auto', 'float32'"),
    ("--model x --infer_backend llama_cpp", "--model_path is required"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --infer_params n_ctxx=5", "Did you mean n_ctx.*Valid keys"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --infer_params n_ctx=abc", "n_ctx: input should be a valid integer"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --infer_params verbose=maybe", "verbose: input should be a valid boolean"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --infer_params n_ctx", "takes key=value pairs"),
    ("--model x --infer_backend vllm --model_path /m --infer_params max_model_len=5", "Did you mean backend.max_model_len"),
    ("--model x --pretrained_model_type saas/openai --infer_params saas.api_key=k saas.modle=m", "Did you mean saas.model"),
    ("--model x --pretrained_model_type saas/openai --infer_params saas.model=m", "saas.api_key=... is required"),
    ("--model x --pretrained_model_type saas/openai --infer_params saas.api_key=k", "saas.model=... is required"),
    ("--model x --pretrained_model_type saas/openai --infer_params saas.api_key=${UNSET_VAR} saas.model=m",
     r"\$UNSET_VAR is not set"),
    ("--model x --pretrained_model_type saas/openai --infer_params saas.api_key=k saas.model=m --model_path /m",
     "--model_path does not apply"),
    ("--model x --pretrained_model_type saas/openai --infer_backend vllm --infer_params saas.api_key=k saas.model=m",
     "--infer_backend does not apply"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --num_workers 0", "--num_workers must be from 1 to 256, got"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --num_workers -2", "--num_workers must be from 1 to 256, got"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --num_workers 100000", "--num_workers must be from 1 to 256, got"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --num_workers two", "--num_workers must be a whole number"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --num_workers 1.5", "--num_workers must be a whole number"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --cpus_per_worker -1", "--cpus_per_worker must be 0 or more"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --gpus_per_worker lots", "--gpus_per_worker must be a number"),
    ("--model x --infer_backend vllm --model_path /m --gpus_per_worker 2.5", "vllm needs whole GPUs"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --worker_concurrency 0", "--worker_concurrency must be 1"),
    ("--model 'has space' --infer_backend llama_cpp --model_path /m.gguf", "not a valid name"),
    ("--model byzer_openai --infer_backend llama_cpp --model_path /m.gguf", "is the name of the OpenAI endpoint"),
    ("--model 'x;rm -rf' --infer_backend llama_cpp --model_path /m.gguf", "not a valid name"),
    ("--model x --num_wokers 2", "unknown flag --num_wokers. Did you mean --num_workers"),
    ("--model x --num 2", "unknown flag --num"),
    ("--mod x --infer_backend llama_cpp --model_path /m.gguf", "unknown flag --mod"),
    ("--model x stray --infer_backend llama_cpp", "unexpected word 'stray'"),
    ("--model x --infer_backend 'llama_cpp", "unclosed quote"),
    ("--model x --file /no/such/file.yaml", "cannot read it"),
    ("--model x --infer_backend llama_cpp --model_path /m.gguf --deploy_timeout 0", "--deploy_timeout must be more"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_specs_say_what_to_fix(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text, ENV)


@pytest.mark.parametrize("text", [
    "--model x --pretrained_model_type saas/openai --infer_params saas.api_key=sk-visible-secret saas.modle=m",
    "--model x --pretrained_model_type saas/openai --infer_params saas.api_key=sk-visible-secret saas.model=m extra",
    "--model x --pretrained_model_type saas/openai --infer_params saas.api_key=${KEY} saas.timeout=soon saas.model=m",
    "--model x --pretrained_model_type saas/nosuch --infer_params saas.api_key=${KEY} saas.model=m",
])
def test_errors_never_show_the_key(text):
    with pytest.raises(SpecError) as info:
        parse_spec(text, ENV)
    assert "sk-visible-secret" not in str(info.value)
    assert ENV["KEY"] not in str(info.value)


def test_bad_yaml_keys_and_types_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle: x\n")
    with pytest.raises(SpecError, match="bad.yaml: unknown key 'modle'. Did you mean model"):
        parse_args(["--file", str(path)], ENV)
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_args(["--file", str(path)], ENV)
    path.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_args(["--file", str(path)], ENV)


def test_every_flag_has_help_text_from_the_model():
    assert all(f.description and f.description.strip() for f in DeployFlags.model_fields.values())
    assert {"model", "pretrained_model_type", "infer_backend", "model_path", "num_workers", "worker_concurrency",
            "cpus_per_worker", "gpus_per_worker", "infer_params", "ray_address", "file"} <= set(DeployFlags.model_fields)
    text = build_parser().format_help()
    assert all(f"--{name}" in text for name in DeployFlags.model_fields)


def test_every_secret_looking_setting_is_masked_and_an_empty_one_refused():
    token = parse_spec("--model v --infer_backend vllm --model_path /m "
                       "--infer_params backend.hf_token=hf_secret123 backend.max_model_len=64")
    assert "hf_secret123" not in repr(token) + str(token.describe())
    assert "hf_secret123" in token.secrets()
    url = parse_spec("--model s --pretrained_model_type saas/openai --infer_params saas.api_key=sk-abc "
                     "saas.model=m saas.base_url=http://me:pa55word@127.0.0.1:9/v1")
    shown = repr(url) + str(url.describe())
    assert "pa55word" not in shown and "http://me:***@127.0.0.1:9/v1" in shown
    with pytest.raises(SpecError, match="saas.api_key is empty: a shell may have expanded an unset variable"):
        parse_spec("--model s --pretrained_model_type saas/openai --infer_params saas.api_key= saas.model=m")


def test_an_unset_variable_hint_leaves_no_trace_in_the_notebook():
    with pytest.raises(SpecError) as unset:
        parse_spec("--model s --pretrained_model_type saas/openai --infer_params saas.api_key=${NOT_SET_X} saas.model=m")
    assert "%env" not in str(unset.value) and "getpass" in str(unset.value)

