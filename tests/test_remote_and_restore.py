"""A cluster of this module's own, reached through Ray Client (`ray://`), then stopped, restarted and restored.

The pytest process is already a driver of the session's cluster, so every
driver here is a separate process: an IPython shell over `ray://` and the
`byzer-magic` command. Their stdout and stderr are read whole, so Ray's own
log lines (warnings, forwarded worker output, a stack dump on SIGTERM) would
show up here as they would in a notebook's cell.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import RAY_NOISE, ROOT, _answers, free_port, kill_node, ray_start, start_until_counted, wait_until

LITERAL = "sk-literal-7d1c9e5a30b24f68"
KEYED = "sk-keyed-41f0b8d2c6e97a35"
@dataclass
class Head:
    port: int
    client_port: int
    temp_dir: str
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """`ray start --head` with its Ray Client server; every port its own, beside the session's cluster."""
        ports = [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
            "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
        cmd = ["ray", "start", "--head", "--block", f"--port={self.port}", f"--ray-client-server-port={self.client_port}",
               "--num-cpus=4", "--num-gpus=0", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               "--include-dashboard=false", *ports]

        log = Path(self.temp_dir) / "ray-start.log"

        def start() -> subprocess.Popen:
            self.proc = ray_start(cmd, log)
            return self.proc

        start_until_counted(start, log, self.address, 1, "the module's ray head")
        wait_until(lambda: _answers(self.client_port), 90, "the module's Ray Client server")

    def stop(self) -> None:
        """The whole cluster goes: the head and everything it started."""
        if self.proc is None:
            return
        kill_node(self.proc)
        self.proc = None
        wait_until(lambda: not _answers(self.port), 30, "the old head to be gone")


@pytest.fixture(scope="module")
def head():
    found = Head(free_port(), free_port(), tempfile.mkdtemp(prefix="bzr", dir="/tmp"))
    found.start()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def home():
    """Where this module's drivers keep their records (BYZER_MAGIC_HOME), apart from the session's."""
    return Path(tempfile.mkdtemp(prefix="bzr-home-"))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RESTORE_KEY")}
    return {**env, "BYZER_MAGIC_HOME": str(home), **extra}


def _driver(code: str, env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _values(stdout: str) -> dict[str, str]:
    """The driver's `KEY=value` lines."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if re.match(r"^[A-Z_]+=", line))


def test_a_ray_client_driver_does_everything_a_notebook_does(head, home, clean_server, tiny_encoder):
    """Over `ray://`: deploy, chat (streamed and whole), list, status, the card, scale, the endpoint, embeddings,
    restore and undeploy, with no Ray log line in its output."""
    serve_port = free_port()
    shell = f"""
        import json
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "byzer_magic")

        def cell(name, source):
            result = ip.run_cell(source)
            print(f"{{name}}=" + (repr(result.result) if result.success else "FAILED").replace("\\n", " | "), flush=True)
            return result.result

        ip.run_cell("%config ByzerMagics.ray_address = '{head.client}'")
        base = "--pretrained_model_type saas/openai --infer_params saas.model=tiny saas.base_url={clean_server.base_url}"
        cell("KEYED", "%%byzer_deploy --model keyed\\n" + base + " saas.api_key=${{RESTORE_KEY}}")
        cell("LITERAL", "%%byzer_deploy --model literal --ray_address {head.client}\\n" + base
             + " saas.api_key={LITERAL}")
        cell("STREAM", "%byzer_chat keyed -o streamed --max_tokens 5 --temperature 0 What is Ray?")
        print("STREAMED=" + repr(ip.user_ns["streamed"].text), flush=True)
        cell("WHOLE", "%byzer_chat literal -o whole --no_stream --max_tokens 5 --temperature 0 hi")
        print("WHOLE_TEXT=" + repr(ip.user_ns["whole"].text), flush=True)
        cell("LIST", "%byzer_list")
        import time
        from byzer_magic.serving import deploy
        deadline = time.monotonic() + 15
        while not deploy.status("keyed", with_metrics=True).metrics.get("served") and time.monotonic() < deadline:
            time.sleep(0.5)  # workers hand in their figures on each health check
        cell("STATUS", "%byzer_status keyed")
        card = ip.magics_manager.registry["ByzerMagics"]._new_card(deploy.status("keyed", with_metrics=True))
        print("CARD=" + card.title.value + card.body.value, flush=True)
        cell("SCALED_UP", "%byzer_scale keyed 2")
        print("KEPT_WORKERS=" + str(json.load(open("{home}/deployments/keyed.json"))["flags"].get("num_workers")))
        cell("SCALED_DOWN", "%byzer_scale keyed 1")
        cell("SERVE", "%byzer_serve --port {serve_port}")
        import openai
        from byzer_magic.openai.key_store import endpoint_key
        client = openai.OpenAI(base_url="http://127.0.0.1:{serve_port}/v1", api_key=endpoint_key())
        try:
            pieces = client.chat.completions.create(model="keyed", messages=[{{"role": "user", "content": "hi"}}],
                                                    max_tokens=4, stream=True)
            print("ENDPOINT=" + repr("".join(c.choices[0].delta.content or "" for c in pieces if c.choices)))
        except Exception as exc:
            print("FAILED ENDPOINT " + repr(exc), flush=True)
        cell("SERVE_STOP", "%byzer_serve --stop")
        cell("EMB", "%byzer_deploy --model emb --pretrained_model_type custom/bge --model_path {tiny_encoder}")
        vector = cell("VECTOR", "%byzer_embed emb hello world")
        print("VECTOR_LEN=" + str(len(vector)), flush=True)
        cell("EMB_GONE", "%byzer_undeploy emb")
        from ray import serve
        serve.delete("keyed")  # the cluster loses it behind the record's back
        cell("RESTORED", "%byzer_restore keyed")
        cell("AGAIN", "%byzer_chat keyed --max_tokens 3 --temperature 0 again")
    """
    started = time.monotonic()
    done = _driver(shell, _env(home, RESTORE_KEY=KEYED))
    took = time.monotonic() - started
    out = _values(done.stdout)
    assert "FAILED" not in done.stdout and "AGAIN" in out, done.stdout + done.stderr
    assert "keyed: ready, 1/1 workers" in out["KEYED"] and "literal: ready, 1/1 workers" in out["LITERAL"]
    assert out["STREAMED"] not in ("", "''") and out["WHOLE_TEXT"] not in ("", "''")
    assert "keyed: ready" in out["LIST"] and "literal: ready" in out["LIST"]
    assert "requests:" in out["STATUS"] and "served" in out["STATUS"]
    assert "ready" in out["CARD"] and "requests" in out["CARD"] and "served" in out["CARD"]
    assert "2/2 workers" in out["SCALED_UP"] and out["KEPT_WORKERS"] == "2" and "1/1 workers" in out["SCALED_DOWN"]
    assert out["ENDPOINT"] not in ("", "''"), out
    assert out["VECTOR_LEN"] == "64"
    assert "restored keyed: ready, 1/1 workers" in out["RESTORED"]
    assert not RAY_NOISE.search(done.stderr), done.stderr
    assert LITERAL not in done.stdout + done.stderr and KEYED not in done.stdout + done.stderr
    records = home / "deployments"
    assert sorted(p.name for p in records.iterdir()) == ["keyed.json", "literal.json"], "emb left with its undeploy"
    keyed, literal = (json.loads((records / f"{n}.json").read_text()) for n in ("keyed", "literal"))
    assert keyed["infer_params"]["saas.api_key"] == "${RESTORE_KEY}" and keyed["missing_secrets"] == []
    assert "saas.api_key" not in literal["infer_params"] and literal["missing_secrets"] == ["saas.api_key"]
    for path in records.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600
        assert LITERAL not in path.read_text() and KEYED not in path.read_text()
    print(f"ray client driver: {took:.1f} s")


def test_after_the_whole_cluster_restarts_restore_gives_both_back(head, home, clean_server):
    head.stop()
    head.start()
    started = time.monotonic()
    first = subprocess.run(["byzer-magic", "restore", "--ray_address", head.address], capture_output=True, text=True,
                           timeout=300, cwd=ROOT, env=_env(home))
    assert first.returncode == 1, first.stdout + first.stderr
    lines = first.stdout.strip().splitlines()
    keyed = next(line for line in lines if line.startswith("not restored keyed:"))
    literal = next(line for line in lines if line.startswith("not restored literal:"))
    assert "$RESTORE_KEY is not set" in keyed
    assert "saas.api_key was given literally" in literal
    assert "byzer-magic restore literal --infer_params saas.api_key=${VAR}" in literal
    assert not RAY_NOISE.search(first.stderr), first.stderr

    driver = f"""
        import os, sys, threading, time
        from byzer_magic.serving import chat, deploy, restore
        from byzer_magic.backends.base import GenParams
        from byzer_magic.serving.cluster import connect
        from byzer_magic.errors import BackendError
        connect("{head.address}")
        print("SECOND=" + repr(restore.restore()).replace("\\n", " | "), flush=True)
        print("THIRD=" + repr(restore.restore(["literal"], infer_params=["saas.api_key=${{LIT}}"])), flush=True)
        for name in ("keyed", "literal"):
            print(name.upper() + "_SAYS=" + repr(chat.chat(name, "hi", GenParams(max_tokens=4)).text), flush=True)
        from byzer_magic.serving.raydoor import serve_details
        from byzer_magic.serving.worker import WORKER_NAME
        pid = serve_details()["applications"]["literal"]["deployments"][WORKER_NAME]["replicas"][0]["pid"]
        pieces = []
        try:
            for delta in chat.stream("literal", chat.messages_for("tell me more"), GenParams(max_tokens=40)):
                pieces.append(delta.text)
                if len(pieces) == 2:
                    os.kill(pid, 9)
        except BackendError as exc:
            print("DIED=" + str(exc), flush=True)
        time.sleep(3)  # the worker's death reaches the driver's C++ side and Serve's router meanwhile
        print("WAITING=1", flush=True)
        sys.stdin.readline()
    """
    clean_server.control(chunk_delay=0.2)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(driver)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env(home, RESTORE_KEY=KEYED, LIT=LITERAL))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("WAITING="):
                break
        took = time.monotonic() - started
        proc.send_signal(signal.SIGTERM)  # what Jupyter does to stop a kernel
        rest, err = proc.communicate(timeout=60)
    finally:
        clean_server.control(chunk_delay=0)
        proc.kill()
    out = _values("".join(lines) + rest)
    assert "restored keyed: ready, 1/1 workers" in out["SECOND"] and "not restored literal" in out["SECOND"], out
    assert "restored literal: ready, 1/1 workers" in out["THIRD"], out
    assert out["KEYED_SAYS"] not in ("", "''") and out["LITERAL_SAYS"] not in ("", "''")
    assert "the worker died while answering" in out["DIED"], out
    assert not RAY_NOISE.search(err), err
    assert LITERAL not in err + "".join(lines) + first.stdout + first.stderr

    removed = subprocess.run(["byzer-magic", "undeploy", "keyed", "--ray_address", head.address],
                             capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env(home))
    assert removed.returncode == 0, removed.stderr
    assert [p.name for p in (home / "deployments").iterdir()] == ["literal.json"], "an undeploy forgets the record"
    print(f"stop, start, restore and chat: {took:.1f} s")
