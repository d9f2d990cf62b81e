"""The door to Ray's private parts: its sentences when Ray moved something, the traceback reader (no cluster),
and a driver stopped as Jupyter stops a kernel (the session's cluster)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import ray

from byzer_magic.serving import raydoor

from .conftest import RAY_NOISE, ROOT


def test_a_moved_private_api_is_one_sentence_naming_the_ray_version_and_the_api():
    with pytest.raises(raydoor.RayAPIError) as caught:
        raydoor._private("ray.serve.context", "_no_such_client")
    text = str(caught.value)
    assert f"Ray {ray.__version__}" in text and "ray.serve.context._no_such_client" in text
    assert "\n" not in text


def test_an_older_ray_than_the_range_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(raydoor, "ray_version", lambda: (2, 40, 0))
    oldest = ".".join(map(str, raydoor.OLDEST_RAY))
    with pytest.raises(raydoor.RayAPIError, match=f"needs Ray {oldest} to .* this is Ray"):
        raydoor.check_version()


def test_every_private_api_the_package_uses_is_where_this_ray_keeps_it():
    raydoor._private("ray._private.services", "get_ray_address_from_environment")
    raydoor._private("ray.serve.context", "_get_global_client")
    raydoor._private("ray._private.worker", "print_to_stdstream")
    for name in ("put", "get", "del", "list"):
        raydoor._kv(name)
    if raydoor.can_scale_in_place():
        raydoor._private("ray.serve._private.common", "DeploymentID")


@pytest.mark.parametrize("message, reason", [
    ("Traceback (most recent call last):\n  ...\nbyzer_magic.errors.DeployError: bad key (401)\n", "bad key (401)"),
    ("ray::ServeReplica:x\nBackendError: no such model\nmore", "no such model"),
    ("The deployment failed to start 3 times in a row.\n  last line  \n", "last line"),
    ("", ""),
])
def test_the_reason_is_read_out_of_serves_traceback_text(message, reason):
    assert raydoor.reason_in(message) == reason


def test_a_driver_that_imported_ray_first_is_stopped_without_a_stack_dump(ray_head):
    """Ray reads its signal-handler switch at import: a notebook's own `import ray` came before byzer_magic's."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):
        pytest.skip(f"Ray {ray.__version__} has no switch for its SIGTERM stack dump (README, Ray versions)")
    code = f"""
        import ray, sys
        from byzer_magic.serving.cluster import connect
        connect("{ray_head.address}")
        print("UP", flush=True)
        sys.stdin.readline()
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "UP", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)  # what Jupyter does to stop a kernel
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (-signal.SIGTERM, signal.SIGTERM)  # Ray exits 15 itself
    assert not RAY_NOISE.search(err), err
