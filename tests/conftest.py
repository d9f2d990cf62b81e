"""Real parts for the tests: a Ray head, the tiny model, llama.cpp's OpenAI server.

The Ray cluster is a separate `ray start --head` process, not one embedded in
pytest, so tests can also run drivers in other processes against it (the
kernel-restart case) and see exactly what a user's second kernel would see.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from byzer_magic.tinymodel import TinyModel, build

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BYZER_MAGIC_HOME", tempfile.mkdtemp(prefix="byzer-home-"))
os.environ.setdefault("BYZER_TEST_NODE_KEY", "sk-node-5e1f7a3c9b2d4f60")
"""A key the test cluster's nodes have in their environment (`ray start` inherits it), for saas.api_key=node-env:."""
"""The endpoint's generated key goes to a folder of the test run's, not the user's home."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


@pytest.fixture(scope="session")
def tiny_model(request) -> TinyModel:
    """The project's tiny random Llama, built once and cached between runs."""
    return build(request.config.cache.mkdir("tinymodel"))


@pytest.fixture(scope="session")
def tiny_encoder(request) -> Path:
    """The project's tiny random BERT-style encoder, for the embedding backend."""
    from byzer_magic.tinymodel import TinyConfig, build_encoder

    return build_encoder(request.config.cache.mkdir("tinyencoder"), TinyConfig(hidden_size=64))


@dataclass
class OpenAIServer:
    """A running llama.cpp server with the test middleware (tests/support/openai_server.py)."""

    url: str
    proc: subprocess.Popen
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _post(self, path: str, payload: dict) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", json.dumps(payload).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_stats", timeout=10) as resp:
            return json.loads(resp.read())

    def control(self, **settings) -> dict:
        return self._post("/_control", settings)


def start_openai_server(model: Path, api_key: str | None = None, delay: float = 0.0) -> OpenAIServer:
    port = free_port()
    cmd = [sys.executable, "-m", "tests.support.openai_server", "--model", str(model), "--port", str(port),
           "--delay", str(delay)]
    if api_key:
        cmd += ["--api_key", api_key]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = OpenAIServer(f"http://127.0.0.1:{port}", proc, api_key)

    def up() -> bool:
        try:
            server.stats()
            return True
        except OSError:
            return False

    wait_until(up, 60, "llama.cpp server")
    return server


@pytest.fixture(scope="session")
def openai_server(tiny_model):
    """llama.cpp's server on 127.0.0.1 serving the tiny GGUF: our stand-in SaaS provider."""
    server = start_openai_server(tiny_model.gguf)
    yield server
    server.proc.terminate()
    server.proc.wait(10)


@pytest.fixture
def clean_server(openai_server):
    """The shared server with its counters reset and no delay or faults left over."""
    calm = dict(delay=0, fail_next=0, short_circuit=False, chunk_delay=0, reset=True)
    openai_server.control(**calm)
    wait_until(lambda: openai_server.stats()["in_flight"] == 0, 60, "the server to finish earlier tests' requests")
    openai_server.control(reset=True)
    yield openai_server
    openai_server.control(**calm)


@dataclass
class RayHead:
    address: str
    proc: subprocess.Popen
    temp_dir: str


@pytest.fixture(scope="session")
def shell():
    """An IPython shell with the extension loaded, as a notebook user has it (IPython keeps one per process)."""
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "byzer_magic")
    return ip


@pytest.fixture(scope="session")
def ray_head():
    """A `ray start --head` cluster of its own, joined by pytest and by subprocess drivers."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="bzt", dir="/tmp")
    cmd = ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={free_port()}", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    try:
        wait_until(up, 60, "ray head")
        os.environ["RAY_ADDRESS"] = address
        from byzer_magic.cluster import connect

        connect(address)
        yield RayHead(address, proc, temp_dir)
    finally:
        _stop_head(proc, temp_dir)


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    import ray

    ray.shutdown()
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def alive_replicas(app: str) -> list:
    """Replica actors of an app that Ray's state API still reports alive."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10000)
    return [a for a in actors if f":{app}:" in (a.class_name or "") or (a.name or "").startswith(f"SERVE_REPLICA::{app}#")]


RAY_NOISE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [EWIF] \d+"  # Ray's C++ log lines
    r"|^(?:WARNING|ERROR|INFO) \d{4}-\d\d-\d\d"  # Serve's
    r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?:WARNING|ERROR|INFO)"  # Ray's Python loggers
    r"|SIGTERM received|Token authentication|\((?:raylet|pid=\d+)|Failed to connect to GCS|Traceback",
    re.MULTILINE,
)
"""Ray's own log lines, which must never reach a notebook's cell (a driver's stderr is forwarded there)."""


def pytest_collection_modifyitems(config, items) -> None:
    """Mark `ray` every test that needs a Ray cluster, so `pytest -m "not ray"` runs the fast ones alone.

    A test needs one when it uses the session's cluster (the `ray_head`
    fixture, directly or through another fixture) or lives in a module whose
    kernels, notebooks or browser start Ray of their own.
    """
    own_ray = {"test_notebooks", "test_binder", "test_browser", "test_cli_and_restart", "test_remote_and_restore"}
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()) or item.module.__name__.rsplit(".", 1)[-1] in own_ray:
            item.add_marker(pytest.mark.ray)
