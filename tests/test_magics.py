"""The magics through a real IPython InteractiveShell, as a notebook user types them."""
from __future__ import annotations

import asyncio
import os

from .conftest import alive_replicas, start_openai_server

SECRET = "sk-magic-secret-0123456789abcdef"


def run(shell, capfd, cell: str) -> str:
    shell.run_cell(cell)
    out, err = capfd.readouterr()
    return out + err


def test_help_is_there_for_every_magic(shell, capfd):
    for magic, needle in (("%byzer_chat?", "%byzer_chat my_chat What is Ray?"),
                          ("%%byzer_deploy?", "--num_workers"),
                          ("%byzer_scale?", "%byzer_scale my_chat 3")):
        text = run(shell, capfd, magic)
        assert needle in text, magic
    assert "saas.api_key" in run(shell, capfd, "%%byzer_deploy?")


def test_config_lists_the_settings(shell, capfd):
    text = run(shell, capfd, "%config ByzerMagics")
    assert "ByzerMagics.stream" in text and "ByzerMagics.max_tokens" in text
    shell.run_cell("%config ByzerMagics.max_tokens = 6")
    assert shell.find_magic("byzer_chat").__self__.max_tokens == 6
    shell.run_cell("%config ByzerMagics.max_tokens = None")


def test_a_bad_flag_is_one_paragraph_and_starts_nothing(shell, capfd, ray_head):
    text = run(shell, capfd, "%%byzer_deploy\n--model oops --num_wokers 2 --infer_backend llama_cpp --model_path /m")
    assert "UsageError" in text and "Did you mean --num_workers?" in text
    assert "Traceback" not in text
    assert alive_replicas("oops") == []


def test_deploy_chat_scale_list_undeploy_and_no_key_anywhere(shell, capfd, ray_head, clean_server):
    os.environ["BYZER_TEST_KEY"] = SECRET
    outputs = []
    outputs.append(run(shell, capfd, f"""%%byzer_deploy --model magic_chat
# the key comes from the environment
--pretrained_model_type saas/openai
--infer_params saas.api_key=${{BYZER_TEST_KEY}} saas.model=tiny \\
    saas.base_url={clean_server.base_url}
--num_workers 2 --cpus_per_worker 0.001 --gpus_per_worker 0
"""))
    assert "magic_chat ready in" in outputs[-1]

    outputs.append(run(shell, capfd, "%byzer_chat --max_tokens 8 --temperature 0 magic_chat What's Ray? -- it's \"fast\""))
    streamed = outputs[-1].strip()
    assert streamed

    outputs.append(run(shell, capfd, "%byzer_chat --max_tokens 8 --temperature 0 magic_chat What is Ray?"))
    assert outputs[-1].strip() and "not found" not in outputs[-1]

    shell.run_cell("%%byzer_chat magic_chat -o answer --max_tokens 8 --temperature 0\nWhat's Ray? -- it's \"fast\"")
    outputs.append("".join(capfd.readouterr()))
    assert shell.user_ns["answer"].text == streamed

    shell.run_cell("table = %byzer_list")
    outputs.append(repr(shell.user_ns["table"]) + shell.user_ns["table"]._repr_html_())
    assert "magic_chat: ready, 2/2 workers, saas tiny" in outputs[-1]

    shell.run_cell("scaled = %byzer_scale magic_chat 3")
    outputs.append("".join(capfd.readouterr()))
    assert shell.user_ns["scaled"].workers_ready == 3

    outputs.append(run(shell, capfd, "%byzer_undeploy magic_chat"))
    assert "magic_chat undeployed" in outputs[-1]
    assert alive_replicas("magic_chat") == []

    outputs.append(run(shell, capfd, "%byzer_chat magic_chat hello?"))
    assert "no deployment named 'magic_chat'" in outputs[-1] and "Traceback" not in outputs[-1]
    everything = "\n".join(outputs) + repr(shell.user_ns.get("scaled"))
    assert SECRET not in everything and SECRET[:12] not in everything


def test_a_provider_401_is_readable_and_hides_the_key(shell, capfd, ray_head, tiny_model):
    server = start_openai_server(tiny_model.gguf, api_key="the-right-key")
    try:
        text = run(shell, capfd, f"""%%byzer_deploy
--pretrained_model_type saas/openai --model wrong_key --num_workers 1
--infer_params saas.api_key={SECRET} saas.model=tiny saas.base_url={server.base_url}
""")
    finally:
        server.proc.terminate()
    assert "UsageError" in text and "401" in text and "failed" in text
    assert SECRET not in text and "Traceback" not in text
    assert alive_replicas("wrong_key") == []


def test_magics_work_inside_a_running_event_loop_as_in_jupyter(shell, capfd, ray_head, clean_server):
    """ipykernel runs cells while its asyncio loop runs; Serve's sync calls refuse that loop."""

    async def in_kernel():
        assert asyncio.get_running_loop()
        shell.run_cell(f"""%%byzer_deploy
--pretrained_model_type saas/openai --model loop_chat
--infer_params saas.api_key=k saas.model=tiny saas.base_url={clean_server.base_url}""")
        shell.run_cell("%byzer_chat loop_chat -o reply --max_tokens 4 hi")
        shell.run_cell("%byzer_undeploy loop_chat")

    asyncio.run(in_kernel())
    text = "".join(capfd.readouterr())
    assert "Error" not in text, text
    assert shell.user_ns["reply"].text


def test_ctrl_c_in_a_magic_is_one_line(shell, capsys):
    """An interrupt while the cluster is asked (here: the listing) ends as one line, not a traceback."""
    from unittest import mock

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with mock.patch("byzer_magic.serving.deploy.list_deployments", interrupted):
        shell.run_cell("%byzer_list", store_history=False)
    out = capsys.readouterr()
    shown = out.err + out.out
    assert "byzer_list interrupted" in shown and "Traceback" not in shown and "KeyboardInterrupt" not in shown
