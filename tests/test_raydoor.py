"""The door to Ray's private parts: its sentences when Ray moved something, and the traceback reader (no cluster)."""
from __future__ import annotations

import pytest
import ray

from byzer_magic.serving import raydoor


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
