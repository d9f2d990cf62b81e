"""Which Ray cluster this process uses, decided explicitly, and Serve on it.

Order: --ray_address, then RAY_ADDRESS, then a cluster that is running on this
machine (one whose GCS answers), else an embedded local Ray that lives as long
as this process. Ray's own guess is not used: a stale
/tmp/ray/ray_current_cluster makes it fail instead of starting a local one.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

from .errors import DeployError

_lock = threading.Lock()
_serve_started = False


def running_cluster_address() -> str | None:
    """The address of a Ray cluster started on this machine that still answers."""
    from ray._private.services import get_ray_address_from_environment

    try:
        address = get_ray_address_from_environment("auto", None)
    except (ConnectionError, ValueError, OSError):
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return address
    except (OSError, ValueError):
        return None


def _use_token_if_present() -> None:
    """Send this machine's Ray token when joining a cluster.

    Ray 2.60 clusters require a token by default, but a driver joining one only
    sends it in token mode; Ray's own helper switches to it when a token exists
    and RAY_AUTH_MODE does not say otherwise.
    """
    from ray._private.authentication import authentication_token_setup as auth

    quiet = logging.getLogger(auth.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def connect(address: str | None = None, *, embedded_ok: bool = True) -> str:
    """Connect this process to Ray and make sure Serve runs; returns the address.

    Serve starts without its HTTP proxy: handles are all that chat needs, and
    on a loaded machine the proxy was the first actor to be killed.
    """
    import ray
    from ray import serve

    global _serve_started
    with _lock:
        if ray.is_initialized() and _serve_started:
            return ray.get_runtime_context().gcs_address
        if not ray.is_initialized():
            target = address or os.environ.get("RAY_ADDRESS") or running_cluster_address()
            if target is None and not embedded_ok:
                raise DeployError(
                    "no Ray cluster is running: start one with `ray start --head`, "
                    "or pass --ray_address HOST:PORT"
                )
            kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, namespace="byzer_magic")
            try:
                if target:
                    _use_token_if_present()
                    ray.init(address=target, **kwargs)
                else:
                    ray.init(address="local", include_dashboard=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DeployError(f"cannot connect to Ray at {target}: {exc}") from None
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        _serve_started = True
        return ray.get_runtime_context().gcs_address


def is_embedded() -> bool:
    """True when this process started the cluster, so it ends with the process."""
    import ray

    return ray.is_initialized() and ray._private.worker.global_worker.node is not None and (
        ray._private.worker.global_worker.node.head
    )
