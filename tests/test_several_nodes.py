"""Several nodes: placement, checks before anything starts, and a node's death and return.

The cluster is `three_nodes` (conftest.NODE_LAYOUT: three raylets on this
host, each with its own CPUs and custom resources); pytest's own process is
joined to the session's cluster, so a driver process (tests/support/driver.py)
deploys and chats here, as a second kernel would.
"""
from __future__ import annotations

import json
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from .conftest import ROOT


class Driver:
    """A driver process joined to the several-node cluster; `driver(code)` runs code there and returns its `out`."""

    def __init__(self, address: str):
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.driver", address], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        assert self._answer(120) == {"out": "connected"}

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the driver did not answer within {timeout} s"
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"the driver exited ({self.proc.wait(10)}): {self.stderr.read()[-3000:]}")
        return json.loads(line)

    def __call__(self, code: str, timeout: float = 300) -> Any:
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        answer = self._answer(timeout)
        if "error" in answer:
            raise DriverError(answer["error"])
        return answer["out"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


class DriverError(Exception):
    pass


@pytest.fixture(scope="module")
def driver(three_nodes):
    found = Driver(three_nodes.address)
    found("import threading, time\nfrom byzer_magic.serving import placement\n"
          "b2 = next(n['NodeID'] for n in placement.alive_nodes() if 'accel_x' in n['Resources'])")
    yield found
    found.close()


def saas(server, name: str, *flags: str) -> str:
    """Code that deploys a SaaS deployment in front of the test provider, with more flags."""
    argv = ["--model", name, "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=sk-x",
            "saas.model=tiny", f"saas.base_url={server.base_url}", *flags]
    return f"out = deploy.deploy(parse_args({argv!r})).line()"


def nothing_deployed(driver: Driver) -> None:
    assert driver("out = repr(deploy.list_deployments())") == "no deployments on this cluster"


def test_a_resource_no_node_has_is_refused_naming_those_it_has(driver, clean_server):
    with pytest.raises(DriverError) as refused:
        driver(saas(clean_server, "nowhere", "--resources", "accel_h100=1"))
    message = str(refused.value)
    assert "--resources accel_h100=1: no node of the cluster has that much accel_h100" in message
    assert "accel_x, zone_a, zone_b" in message and "node:" not in message, message
    nothing_deployed(driver)


def test_custom_resources_put_workers_only_on_the_nodes_that_have_them(driver, clean_server):
    line = driver(saas(clean_server, "zoned", "--resources", "accel_x=1", "--num_workers", "2"))
    assert line.startswith("zoned: ready, 2/2 workers"), line
    nodes = driver("out = deploy.status('zoned').nodes")
    assert len(nodes) == 2 and all(node.startswith(driver("out = b2[:8]")) for node in nodes), nodes
    driver("deploy.undeploy('zoned')")


def test_a_model_path_missing_on_one_node_is_refused_naming_it(driver, three_nodes, tiny_model):
    if three_nodes.hidden is None:
        pytest.skip("this machine cannot mount in a namespace of a node's own (unshare -m), so no node can lack a file")
    model = three_nodes.hidden / "tiny.gguf"
    shutil.copy(tiny_model.gguf, model)
    flags = ["--model", "pathcheck", "--pretrained_model_type", "custom/auto", "--infer_backend", "llama_cpp",
             "--model_path", str(model), "--infer_params", "n_ctx=256"]
    with pytest.raises(DriverError) as refused:
        driver(f"out = deploy.deploy(parse_args({flags!r}))")
    message = str(refused.value)
    b2 = driver("out = b2[:8]")
    assert f"--model_path {model} is not usable on 1 of the 3 nodes that can host a worker ({b2}" in message, message
    assert "no such file or directory" in message
    nothing_deployed(driver)
    # Kept off that node, the same path deploys.
    line = driver(f"out = deploy.deploy(parse_args({flags + ['--resources', 'zone_a=1']!r})).line()")
    assert line.startswith("pathcheck: ready, 1/1 workers"), line
    driver("deploy.undeploy('pathcheck')")


def test_a_worker_of_two_gpus_on_nodes_of_one_gpu_each_is_refused_before_anything_starts(driver, tiny_model):
    """Tensor parallelism needs a worker's GPUs on one node: b1 and b2 declare one GPU each (Ray takes the count as
    given, no GPU needed), so two GPUs per worker fit the cluster's total and still no node."""
    flags = ["--model", "tp2", "--pretrained_model_type", "custom/auto", "--infer_backend", "vllm",
             "--model_path", str(tiny_model.hf_dir), "--gpus_per_worker", "2"]
    with pytest.raises(DriverError) as refused:
        driver(f"out = deploy.deploy(parse_args({flags!r}))")
    message = str(refused.value)
    assert "--gpus_per_worker 2: a worker's GPUs must all be on one node" in message, message
    assert "the most GPUs one node of this cluster has is 1" in message, message
    nothing_deployed(driver)


def test_a_node_dies_and_returns(driver, three_nodes, clean_server):
    """One worker per node; b2 is killed mid-request and joins again. The seconds of each step are printed."""
    line = driver(saas(clean_server, "spread", "--num_workers", "3", "--max_workers_per_node", "1"))
    assert line.startswith("spread: ready, 3/3 workers"), line
    shown = driver("out = repr(deploy.status('spread'))")
    assert "workers on nodes:" in shown and re.findall(r"\): (\d+)", shown) == ["1", "1", "1"], shown
    driver("chat.chat('spread', 'hi')")  # the driver's router knows the workers before one dies
    clean_server.control(delay=3.0, short_circuit=True)
    driver("results = []\n"
           "def one():\n"
           "    try: results.append(('ok', chat.chat('spread', 'hi').text))\n"
           "    except Exception as exc: results.append(('error', str(exc)))\n"
           "threads = [threading.Thread(target=one) for _ in range(6)]\n"
           "[t.start() for t in threads]\n"
           "time.sleep(1.5)")
    killed = time.monotonic()
    three_nodes.kill("b2")
    degraded_s = driver("t = time.monotonic()\n"
                        "while deploy.status('spread').state != 'degraded' and time.monotonic() < t + 90:\n"
                        "    time.sleep(0.1)\n"
                        "out = time.monotonic() - t", timeout=120)
    seen_s = time.monotonic() - killed
    assert driver("out = deploy.status('spread').state") == "degraded"
    results = driver("[t.join(120) for t in threads]\nout = results")
    # Six chats on three workers, two each as Serve's router spreads them: those on b2's worker fail, the rest answer.
    errors = [text for kind, text in results if kind == "error"]
    assert 1 <= len(errors) <= 3 and len(results) == 6, results
    assert all("the worker died while answering" in text for text in errors), results
    clean_server.control(delay=0.2)
    survivors = driver("t = time.monotonic()\nout = [chat.chat('spread', 'hi').text for _ in range(4)], "
                       "time.monotonic() - t")
    assert survivors[0] == ["ok"] * 4
    assert driver("out = deploy.status('spread').line()").startswith("spread: degraded, 2/3 workers")
    joined = time.monotonic()
    three_nodes.join("b2")
    driver("t = time.monotonic()\n"
           "while (deploy.status('spread').line().split(',')[:2] != ['spread: ready', ' 3/3 workers']\n"
           "       and time.monotonic() < t + 150):\n"
           "    time.sleep(0.2)", timeout=180)
    back_s = time.monotonic() - joined
    assert driver("out = deploy.status('spread').line()").startswith("spread: ready, 3/3 workers")
    assert driver("out = len(set(deploy.status('spread').nodes))") == 3
    driver("deploy.undeploy('spread')")
    print(f"\nnode death: degraded {seen_s:.1f} s after the kill (the driver polled {degraded_s:.1f} s); 4 chats on the "
          f"survivors in {survivors[1]:.1f} s; all 3 workers ready {back_s:.1f} s after the node was started again")
