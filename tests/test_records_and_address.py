"""Without a cluster: what a deployment's record keeps (never a secret's value), and a dead address refused fast."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from byzer_magic.serving import records
from byzer_magic.spec.deploy_spec import parse_args

from .conftest import ROOT, free_port

SECRET = "sk-record-0a9b8c7d6e5f4321"


@pytest.fixture
def state(tmp_path):
    records.use_state_dir(str(tmp_path / "kept"))
    yield tmp_path / "kept"
    records.use_state_dir(None)


def _spec(*params: str, **env: str):
    return parse_args(["--pretrained_model_type", "saas/openai", "--model", "kept", "--num_workers", "3",
                       "--infer_params", "saas.model=tiny", *params], env)


def test_a_secret_given_by_reference_is_kept_as_the_reference_and_read_again_on_restore(state):
    spec = _spec("saas.api_key=${KEY}", "saas.base_url=http://me:$PW@h/v1", "saas.timeout=5",
                 KEY=SECRET, PW="pw-secret-123")
    path = records.save(spec, "127.0.0.1:1")
    text = path.read_text()
    assert SECRET not in text and "pw-secret-123" not in text
    assert path.stat().st_mode & 0o777 == 0o600 and state.stat().st_mode & 0o777 == 0o700
    record = records.load("kept")
    assert record.infer_params == {"saas.model": "tiny", "saas.api_key": "${KEY}",
                                   "saas.base_url": "http://me:${PW}@h/v1", "saas.timeout": 5.0}
    again = parse_args(record.argv(), {"KEY": "sk-new-key-000", "PW": "pw2"})
    assert again.params.api_key.get_secret_value() == "sk-new-key-000"
    assert again.params.base_url == "http://me:pw2@h/v1"
    assert (again.name, again.num_workers, again.params.timeout) == ("kept", 3, 5.0)


def test_a_literal_secret_is_left_out_and_named(state):
    records.save(_spec(f"saas.api_key={SECRET}", "saas.base_url=http://me:pw-lit-999@h/v1"))
    record = records.load("kept")
    assert record.missing_secrets == ("saas.api_key", "saas.base_url")
    assert SECRET not in (state / "kept.json").read_text() and "pw-lit-999" not in (state / "kept.json").read_text()


def test_a_node_env_key_holds_no_secret_and_is_kept(state):
    records.save(_spec("saas.api_key=node-env:PROVIDER_KEY"))
    assert records.load("kept").infer_params["saas.api_key"] == "node-env:PROVIDER_KEY"


def test_a_scale_updates_the_record_and_an_undeploy_removes_it(state):
    records.save(_spec("saas.api_key=${KEY}", KEY=SECRET))
    records.update("kept", num_workers=1)
    assert records.load("kept").flags["num_workers"] == 1
    records.update("never_kept", num_workers=2)
    assert records.load("never_kept") is None
    records.remove("kept")
    assert records.load_all() == []


def test_the_state_folder_follows_byzer_magic_home(monkeypatch, tmp_path):
    monkeypatch.setenv("BYZER_MAGIC_HOME", str(tmp_path))
    assert records.state_dir() == tmp_path / "deployments"


def test_an_address_nobody_answers_fails_in_seconds_naming_where_it_came_from(tmp_path):
    """No Ray is started: the port is closed, and the refusal comes before `ray.init` would retry for minutes."""
    dead = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    listed = subprocess.run(["byzer-magic", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**env, "RAY_ADDRESS": f"127.0.0.1:{dead}"})
    assert time.monotonic() - started < 10
    assert listed.returncode == 1
    assert listed.stderr.strip() == (f"byzer-magic list: no Ray cluster answers at 127.0.0.1:{dead} (from RAY_ADDRESS: "
                                     f"connection refused): start one there (`ray start --head --port={dead}`) or "
                                     f"correct the address")

    shell = f"""
        import time
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "byzer_magic")
        ip.run_cell("%config ByzerMagics.ray_address = 'ray://127.0.0.1:{dead}'")
        deploy = "%%byzer_deploy --model x\\n--pretrained_model_type saas/openai --infer_params saas.api_key=k saas.model=m"
        for cell in (deploy, "%byzer_list", "%config ByzerMagics.ray_address = None",
                     deploy + " --ray_address ray://127.0.0.1:{dead}"):
            started = time.monotonic()
            ip.run_cell(cell)
            print(f"TOOK {{time.monotonic() - started:.1f}}", flush=True)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(shell)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("UsageError")]
    config = f"UsageError: no Ray cluster answers at ray://127.0.0.1:{dead} (from %config ByzerMagics.ray_address: "
    assert len(said) == 3 and said[0].startswith(config) and said[1].startswith(config), done.stdout + done.stderr
    assert said[2].startswith(f"UsageError: no Ray cluster answers at ray://127.0.0.1:{dead} (from --ray_address: ")
    assert f"(`ray start --head --ray-client-server-port={dead}`)" in said[0]
    assert all(float(t) < 10 for t in re.findall(r"^TOOK (\S+)", done.stdout, re.M)), done.stdout
    assert "Failed to connect" not in done.stderr and "Traceback" not in done.stdout + done.stderr


def test_rays_refusal_of_a_driver_is_one_paragraph_without_the_servers_traceback():
    from byzer_magic.serving.cluster import _one_paragraph

    served = RuntimeError("Initialization failure from server:\nTraceback (most recent call last):\n  File \"x.py\"\n"
                          "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err.")
    assert _one_paragraph(served) == "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err."
    assert _one_paragraph(RuntimeError("Version mismatch:\n  Ray 2.60\n  Ray 2.48")) == "Version mismatch: Ray 2.60 Ray 2.48"
