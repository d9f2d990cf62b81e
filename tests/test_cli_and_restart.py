"""`byzer-magic` in separate processes: a deploy outlives its driver, a new one controls it."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from .conftest import RAY_NOISE, ROOT, alive_replicas, wait_until


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(["byzer-magic", *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_a_new_process_lists_chats_scales_and_removes_an_earlier_deployment(ray_head, clean_server):
    secret = "sk-cli-secret-abcdef0123456789"
    deployed = cli("deploy", "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=${CLI_KEY}",
                   "saas.model=tiny", f"saas.base_url={clean_server.base_url}", "--num_workers", "2",
                   "--model", "restart_chat", "--ray_address", ray_head.address, env_extra={"CLI_KEY": secret})
    assert deployed.returncode == 0, deployed.stderr
    assert "restart_chat ready in" in deployed.stdout

    listed = cli("list", "--ray_address", ray_head.address)
    assert "restart_chat: ready, 2/2 workers, saas tiny" in listed.stdout

    kernel = textwrap.dedent(f"""
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "byzer_magic")
        ip.run_cell("%config ByzerMagics.ray_address = '{ray_head.address}'")
        ip.run_cell("%byzer_chat restart_chat -o reply --max_tokens 6 --temperature 0 What is Ray?")
        print("REPLY=" + repr(ip.user_ns["reply"].text))
    """)
    second = subprocess.run([sys.executable, "-c", kernel], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "REPLY='" in second.stdout and "REPLY=''" not in second.stdout, second.stdout + second.stderr

    chatted = cli("chat", "restart_chat", "--max_tokens", "6", "--temperature", "0", "What", "is", "Ray?")
    assert chatted.returncode == 0 and chatted.stdout.strip()

    scaled = cli("scale", "restart_chat", "1")
    assert scaled.returncode == 0 and "1/1 workers" in scaled.stdout
    wait_until(lambda: len(alive_replicas("restart_chat")) == 1, 60, "the removed worker's graceful stop")

    removed = cli("undeploy", "restart_chat")
    assert removed.returncode == 0 and "restart_chat undeployed" in removed.stdout
    assert alive_replicas("restart_chat") == []
    for result in (deployed, listed, second, chatted, scaled, removed):
        assert secret not in result.stdout + result.stderr


def test_cli_errors_are_one_line_with_the_right_exit_status(ray_head):
    bad = cli("deploy", "--model", "x", "--num_wokers", "2")
    assert bad.returncode == 2
    assert "Did you mean --num_workers?" in bad.stderr and "Traceback" not in bad.stderr

    missing = cli("chat", "never_deployed", "hi")
    assert missing.returncode == 1
    assert "no deployment named 'never_deployed'" in missing.stderr and "Traceback" not in missing.stderr

    helped = cli("deploy", "--help")
    assert helped.returncode == 0 and "--pretrained_model_type" in helped.stdout and "saas.api_key" in helped.stdout


def ray_head_running() -> bool:
    import ray

    return ray.is_initialized()


@contextlib.contextmanager
def lone_kernel(code: str, env_extra: dict | None = None):
    """A kernel process that sees no cluster (no RAY_ADDRESS, an empty RAY_TMPDIR), removed afterwards."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="bzk", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {}, RAY_TMPDIR=str(ray_tmp))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        yield proc
    finally:
        proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def wait_all_gone(family: list, what: str) -> None:
    import psutil

    wait_until(lambda: not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 60, what)


def deploy_and_chat(server, name: str) -> str:
    """A kernel's code: deploy `name` on the SaaS `server`, chat once, print the reply, wait for stdin to close."""
    return f"""
        import sys
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "byzer_magic")
        ip.run_cell('''%%byzer_deploy
        --pretrained_model_type saas/openai --model {name}
        --infer_params saas.api_key=k saas.model=tiny saas.base_url={server.base_url}''')
        ip.run_cell("%byzer_chat {name} -o reply --max_tokens 4 --temperature 0 hi")
        print("REPLY=" + repr(ip.user_ns["reply"].text), flush=True)
        sys.stdin.readline()
    """


def test_a_kernel_without_a_cluster_gets_an_embedded_ray_that_ends_with_it(clean_server):
    """No RAY_ADDRESS and no cluster file: the kernel starts Ray itself, and takes it along when it exits."""
    import psutil

    with lone_kernel(deploy_and_chat(clean_server, "embedded_chat")) as proc:
        reply = next((line for line in proc.stdout if line.startswith("REPLY=")), "")
        assert reply.startswith("REPLY='") and reply.strip() != "REPLY=''", reply
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in family), "the kernel runs its own Ray"
        if ray_head_running():
            from byzer_magic.serving import deploy

            assert deploy.status("embedded_chat").state == "stopped", "it joined the test cluster instead"
        proc.stdin.close()
        proc.wait(60)
        wait_all_gone(family, "every process of the embedded cluster to exit")
        noise = proc.stderr.read()
        assert not RAY_NOISE.search(noise), f"Ray's own lines (its token warning, say) reach the cell: {noise}"


def test_without_any_cluster_list_says_so_instead_of_starting_one():
    ray_tmp = tempfile.mkdtemp(prefix="bzn", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    listed = subprocess.run(["byzer-magic", "list"], capture_output=True, text=True, timeout=120, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert listed.returncode == 1
    assert "no Ray cluster is running" in listed.stderr and "ray start --head" in listed.stderr
    assert "Traceback" not in listed.stderr


def test_a_killed_kernel_takes_its_embedded_ray_along(clean_server):
    """SIGKILL gives the kernel no chance to shut Ray down; the reaper ends what is left."""
    import psutil

    with lone_kernel(f"""
        import sys
        from byzer_magic.serving import deploy
        from byzer_magic.spec.deploy_spec import parse_spec
        deploy.deploy(parse_spec("--pretrained_model_type saas/openai --model doomed --infer_params "
                                 "saas.api_key=k saas.model=tiny saas.base_url={clean_server.base_url}"))
        print("DEPLOYED", flush=True)
        sys.stdin.readline()
    """) as proc:
        assert next((line for line in proc.stdout if line.startswith("DEPLOYED")), "")
        family = psutil.Process(proc.pid).children(recursive=True)
        assert any("Agent" in p.name() for p in family), "Ray's agents run while the kernel lives"
        proc.kill()
        proc.wait(10)
        wait_all_gone(family, "every process of the killed kernel's Ray to exit")


SLOW_AGENT = """
import os, sys, time
if any(arg.endswith(os.path.join("dashboard", "agent.py")) for arg in sys.argv):
    for marker in {markers!r}:
        if os.path.exists(marker):
            os.remove(marker)
            time.sleep(25)  # past the 15 s Ray 2.60's raylet waits for this agent's ports
            break
"""
"""A sitecustomize that makes the node agent of the first starts slower than Ray's raylet waits, once per marker."""


def slow_first_agents(folder: Path, how_many: int) -> dict[str, str]:
    """The environment of a kernel whose first `how_many` node agents start too slowly, as on a busy machine."""
    markers = [str(folder / f"slow{i}") for i in range(how_many)]
    for marker in markers:
        Path(marker).touch()
    (folder / "sitecustomize.py").write_text(SLOW_AGENT.format(markers=markers))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_a_kernel_whose_ray_did_not_come_up_starts_it_again_and_leaves_nothing_of_the_first(clean_server, tmp_path):
    """The first embedded node's raylet aborts (its agent is late); the cell still deploys and answers, on one GCS."""
    import psutil

    with lone_kernel(deploy_and_chat(clean_server, "second_start"), slow_first_agents(tmp_path, 1)) as proc:
        reply = next((line for line in proc.stdout if line.startswith("REPLY=")), "")
        assert reply.startswith("REPLY='") and reply.strip() != "REPLY=''", reply
        assert not (tmp_path / "slow0").exists(), "the first start's agent was not the slow one"
        family = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        assert sum("gcs_server" in " ".join(p.cmdline()) for p in family) == 1, [p.cmdline()[:2] for p in family]
        proc.stdin.close()
        proc.wait(60)
        noise = proc.stderr.read()
        assert "Traceback" not in noise and not RAY_NOISE.search(noise), noise


def test_a_local_ray_that_fails_to_start_twice_is_one_paragraph_and_other_failures_are_not_retried(monkeypatch):
    """Ray's bare Exception, stood in for: the node's timeout is tried twice, any other failure once."""
    import ray

    from byzer_magic.serving import cluster

    calls = []
    reason = ("The current node timed out during startup. This could happen because some of the raylet failed to "
              "startup or the GCS has become overloaded.")

    def init(**kwargs):
        calls.append(kwargs)
        raise Exception(reason)

    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(RuntimeError) as twice:
        cluster._start_embedded({})
    assert len(calls) == 2 and "It failed twice" in str(twice.value) and "ray start --head" in str(twice.value)
    assert "\n" not in str(twice.value)
    calls.clear()
    reason = "Not enough shared memory\nTraceback (most recent call last):\n  ...\nOSError: /dev/shm is full"
    with pytest.raises(RuntimeError) as once:
        cluster._start_embedded({})
    assert len(calls) == 1 and "\n" not in str(once.value), str(once.value)
