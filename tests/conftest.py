"""Real parts for the tests: a Ray head, the tiny model, llama.cpp's OpenAI server.

The Ray cluster is a separate `ray start --head` process, not one embedded in
pytest, so tests can also run drivers in other processes against it (the
kernel-restart case) and see exactly what a user's second kernel would see.
"""
from __future__ import annotations

import contextlib
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
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
"""Every raylet the tests start (heads, joining nodes, notebooks' embedded Rays) waits up to 3 min for its
runtime-env agent, not Ray's 30 s, which a busy 2-core machine can miss (the dashboard agent's wait is fixed
in Ray 2.60: see `Nodes.join`)."""


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
    address = f"127.0.0.1:{port}"
    started: list[subprocess.Popen] = []
    log = Path(temp_dir) / "ray-start.log"

    def start() -> subprocess.Popen:
        started.append(ray_start(cmd, log))
        return started[-1]

    try:
        proc = start_until_counted(start, log, address, 1, "the session's ray head")
        os.environ["RAY_ADDRESS"] = address
        from byzer_magic.serving.cluster import connect

        connect(address)
        yield RayHead(address, proc, temp_dir)
    finally:
        _stop_head(started[-1], temp_dir)


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
        if {"ray_head", "three_nodes"} & set(getattr(item, "fixturenames", ())) or item.module.__name__.rsplit(".", 1)[-1] in own_ray:
            item.add_marker(pytest.mark.ray)


@dataclass
class Nodes:
    """A cluster of several raylets on this host: `ray start --head` and `ray start --address` per extra node."""

    address: str
    temp_dir: str
    procs: dict[str, subprocess.Popen]
    """Each node's `ray start --block` (its own process group: the raylet and its services; workers are below the
    raylet, in groups of their own on Ray 2.60), by name."""
    hidden: Path | None = None
    """A folder whose files node b2 does not see (an empty tmpfs over it, in b2's own mount namespace);
    None where this machine cannot make mount namespaces."""

    def kill(self, name: str) -> None:
        """A node dies: its raylet and everything it started are killed at once."""
        kill_node(self.procs.pop(name))

    def join(self, name: str, attempts: int = 4) -> None:
        """Start a node and wait until the cluster counts it (see `start_until_counted`); nodes join one at a time,
        since several agents importing at once on 2 busy cores is what makes them miss Ray's wait."""
        hide = self.hidden if name == "b2" else None
        expected = len(self.procs) + 1

        def start() -> subprocess.Popen:
            self.procs[name] = _start_node(NODE_LAYOUT[name], self.address, self.log(name), hide=hide)
            return self.procs[name]

        start_until_counted(start, self.log(name), self.address, expected, f"node {name}", self.why_not, attempts)

    def log(self, name: str) -> Path:
        return Path(self.temp_dir) / f"node-{name}.log"

    def why_not(self) -> str:
        """Each node's exit status and last output, and what a driver said, for a fixture that did not come up."""
        parts = [f"{name}: {'running' if proc.poll() is None else f'exited {proc.returncode}'}, "
                 f"{self.log(name).read_text()[-600:] if self.log(name).exists() else ''}"
                 for name, proc in self.procs.items()]
        return "; ".join(parts) + f"; a driver: {node_count(self.address, verbose=True)}"


NODE_LAYOUT = {
    "head": {"num_cpus": 2, "resources": {"zone_a": 4}},
    "b1": {"num_cpus": 2, "num_gpus": 1, "resources": {"zone_b": 4}},
    "b2": {"num_cpus": 2, "num_gpus": 1, "resources": {"zone_b": 4, "accel_x": 2}},
}
"""Each node's CPUs and custom resources; README's "Several nodes" starts the same cluster by hand."""
_FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
"""The head declares a node dead after 3 missed checks a second apart (Ray's default: 5, 3 s apart)."""


def _node_ports() -> list[str]:
    """Ports of a node's own processes: free ones, since several nodes share this host."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={free_port()}" for name in names]


def _start_node(layout: dict, head: str | None, log: Path, temp_dir: str | None = None, port: int | None = None,
                hide: Path | None = None) -> subprocess.Popen:
    cmd = ["ray", "start", "--block", f"--num-cpus={layout['num_cpus']}", f"--num-gpus={layout.get('num_gpus', 0)}",
           f"--resources={json.dumps(layout['resources'])}", "--disable-usage-stats", *_node_ports()]
    if head is None:
        cmd += ["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={head}"]
    if hide is not None:
        import shlex

        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f"mount -t tmpfs none {shlex.quote(str(hide))} && exec {shlex.join(cmd)}"]
    env = {**os.environ, **_FAST_NODE_DEATH}
    env.pop("RAY_ADDRESS", None)
    if head is not None and (Path.home() / ".ray" / "auth_token").exists():
        # A joining node sends the cluster's token only in token mode ("InvalidAuthToken" without it, Ray 2.60).
        env.setdefault("RAY_AUTH_MODE", "token")
    return ray_start(cmd, log, env)


def ray_start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A `ray start --block` in a session of its own (so its node can be ended as one group), its output in `log`,
    where `start_until_counted` reads whether the node came up; a new start writes over the last one's output."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def start_until_counted(start, log: Path, address: str, nodes: int, what: str, why_not=None, attempts: int = 4,
                        timeout: float = 120) -> subprocess.Popen:
    """Run `start` (a `ray start --block` writing to `log`) until the cluster at `address` counts `nodes` alive nodes.

    Ray 2.60's raylet gives its dashboard agent a fixed 15 s to write its port
    files and aborts otherwise, and `ray start` then fails or, with `--block`,
    stops the node's every process (a head's GCS and Ray Client server too).
    On a busy 2-core machine the agent's imports can take longer: CI saw a
    head's raylet die this way, and a rejoining node fail three starts in a
    row. So the start is watched quietly, by `ray start`'s own output, which
    says "Ray runtime started." only once its raylet registered (after that
    wait). Asking a driver sooner is what slowed the agent down: a driver
    process every half second (each one importing Ray) kept a core busy, and
    a joining node's agent took 10.9 s instead of 4.7 s to write its ports.
    A start that failed is ended with all it started (its GCS would hold the
    port of the next) and run again, as a user would rerun `ray start`.
    """
    explain = why_not or (lambda: node_count(address, verbose=True))
    for _ in range(attempts):
        proc, deadline = start(), time.monotonic() + timeout
        while proc.poll() is None and not _says_started(log) and time.monotonic() < deadline:
            time.sleep(0.5)
        while proc.poll() is None and time.monotonic() < deadline:
            if node_count(address, timeout=60) == nodes:
                return proc
            time.sleep(2)
        if proc.poll() is None:
            raise TimeoutError(f"{what} not counted after {timeout} s: {explain()}")
        kill_node(proc)  # what the failed start left: a GCS, monitors, a log monitor
    raise TimeoutError(f"{what} did not start in {attempts} tries: {explain()}")


def kill_node(proc: subprocess.Popen) -> None:
    """A node dies as a machine would: `ray start`'s process group and every process below it, at once.

    Ray 2.60 puts each worker in a process group of its own, so killing the group alone left the workers running
    after their raylet (an actor lived 3.5 s on, measured here), long enough to finish a request in flight and
    answer it, which a dead machine never does. The group is stopped first so the raylet starts no worker while
    the ones below it are listed."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGSTOP)
    try:
        below = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for process in below:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    proc.wait(30)


def _says_started(log: Path) -> bool:
    """Whether `ray start` printed that its node is up: it does so after Node() returned, so after the agent's wait."""
    with contextlib.suppress(FileNotFoundError):
        return "Ray runtime started." in log.read_text(errors="replace")
    return False


def node_count(address: str, verbose: bool = False, timeout: float = 120):
    """Alive nodes, asked of the cluster by a short driver process (pytest's own is joined to `ray_head`)."""
    code = ("import ray, sys; from byzer_magic.serving import raydoor; raydoor.use_token_if_present(); "
            "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); print(len([n for n in ray.nodes() if n['Alive']]))")
    try:
        done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"a driver did not join in {timeout} s" if verbose else -1
    if verbose:
        return f"exit {done.returncode}: {(done.stdout + done.stderr)[-800:]}"
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else -1


@pytest.fixture(scope="module")
def three_nodes():
    """Three raylets on this host (NODE_LAYOUT), for the several-node tests; drivers join it from subprocesses."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="bzn", dir="/tmp")
    address = f"127.0.0.1:{port}"
    nodes = Nodes(address, temp_dir, {})
    hidden = Path(tempfile.mkdtemp(prefix="bzn-hidden", dir="/tmp"))
    if _can_unshare(hidden):
        nodes.hidden = hidden

    def start_head() -> subprocess.Popen:
        nodes.procs["head"] = _start_node(NODE_LAYOUT["head"], None, nodes.log("head"), temp_dir, port)
        return nodes.procs["head"]

    try:
        start_until_counted(start_head, nodes.log("head"), address, 1, "the head node", nodes.why_not)
        for name in ("b1", "b2"):
            nodes.join(name)  # waits until the cluster counts it: three nodes once b2 is in
        yield nodes
    finally:
        for proc in list(nodes.procs.values())[::-1]:
            _stop_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)


def _can_unshare(folder: Path) -> bool:
    """Whether this machine lets a process mount over a folder in a namespace of its own (root, unshare)."""
    cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs none {folder}"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _stop_node(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
