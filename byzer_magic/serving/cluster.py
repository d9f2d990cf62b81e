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
import subprocess
import sys
import threading

from . import raydoor
from ..errors import DeployError, NotDeployedError

_lock = threading.Lock()
_serve_started = False

SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
"""Serve settings for the driver and the workers, unless the user set them.

Throughput mode runs the router on the caller's loop and user code on the
replica's loop, which brought a handle call from about 5 ms to the 1.4 ms of a
plain actor call here; direct ingress is turned off because with it every
replica held its deletion for about 30 s (and chat needs no HTTP). Callers
tell Serve's autoscaler their load every second instead of every 10 s, so
a deployment scaled to zero starts a worker soon after a request arrives.
"""

def serve_env() -> dict[str, str]:
    """SERVE_ENV with the user's own values winning."""
    return {key: os.environ.get(key, value) for key, value in SERVE_ENV.items()}


for _key, _value in SERVE_ENV.items():
    # Serve reads these once, when ray.serve is first imported: set them before that.
    os.environ.setdefault(_key, _value)


def running_cluster_address() -> str | None:
    """The address of a `ray start` cluster on this machine that still answers.

    Only the address file `ray start` writes counts: another kernel's embedded
    Ray is that kernel's own, not a cluster to join.
    """
    address = raydoor.address_from_environment()
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return address
    except (OSError, ValueError):
        return None


_configured: str | None = None
"""`%config ByzerMagics.ray_address`, so that an address that does not answer is said to come from there."""
_PROBE_S = 4.0
"""How long a cluster's port may take to accept a connection before the address is called dead."""
RAY_CLIENT_PORT = 10001


def use_configured_address(address: str | None) -> None:
    """Record the notebook's `ByzerMagics.ray_address`; the magics call this when it is set."""
    global _configured
    _configured = address or None


def _target(address: str | None) -> tuple[str | None, str]:
    """The address to join and where it came from, in the words a user set it with."""
    if address:
        return address, "%config ByzerMagics.ray_address" if address == _configured else "--ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return running_cluster_address(), "the cluster running on this machine"


def probe(target: str, source: str) -> None:
    """Refuse, within seconds, an address whose port does not accept a connection.

    Ray's own `ray.init` retries such an address for minutes, printing its
    C++ "Failed to connect to GCS" warnings into the cell all the while.
    """
    if target in ("auto", "local") or ("://" in target and not target.startswith("ray://")):
        return
    client = target.startswith("ray://")
    host, _, port = target.removeprefix("ray://").rstrip("/").rpartition(":")
    if client and not port.isdigit():
        host, port = target.removeprefix("ray://").rstrip("/"), str(RAY_CLIENT_PORT)
    if not host or not port.isdigit():
        raise DeployError(f"{source} {target!r} is not a Ray address: write HOST:PORT (the head's GCS port, 6379 "
                          f"unless `ray start --port` said otherwise) or ray://HOST:{RAY_CLIENT_PORT} (Ray Client)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_S):
            return
    except OSError as exc:
        why = exc.strerror or "no answer"
        start = f"ray start --head --ray-client-server-port={port}" if client else f"ray start --head --port={port}"
        raise DeployError(f"no Ray cluster answers at {target} (from {source}: {why.lower()}): start one there "
                          f"(`{start}`) or correct the address") from None


def connect(address: str | None = None, *, embedded_ok: bool = True) -> str:
    """Connect this process to Ray and make sure Serve runs; returns the address.

    Serve starts without its HTTP proxy: handles are all that chat needs, and
    on a loaded machine the proxy was the first actor to be killed.
    """
    import ray
    from ray import serve

    global _serve_started, _embedded
    with _lock:
        if ray.is_initialized() and (_serve_started or raydoor.in_replica()):
            return ray.get_runtime_context().gcs_address
        if not ray.is_initialized():
            raydoor.check_version()
            target, source = _target(address)
            if target is None and not embedded_ok:
                raise NotDeployedError(
                    "no Ray cluster is running (none at RAY_ADDRESS or on this machine), so nothing is "
                    "deployed: `ray start --head` starts a shared one, %%byzer_deploy in a notebook starts "
                    "one in its kernel, --ray_address names another"
                )
            # A kernel forwards its stderr into the running cell: no stack dump there when Jupyter stops it.
            raydoor.quiet_failure_signal_handler()
            raydoor.quiet_cluster_messages()
            # ERROR: Ray's Python warnings (such as the one saying token authentication is on) stay out of cells.
            kwargs = dict(logging_level=logging.ERROR, log_to_driver=False, namespace="byzer_magic")
            try:
                if target:
                    probe(target, source)
                    raydoor.use_token_if_present()
                    _join(target, kwargs)
                else:
                    _start_embedded(kwargs)
                    _embedded = True
                    _start_reaper()
            except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
                where = f"connect to Ray at {target}" if target else "start a local Ray"
                raise DeployError(f"cannot {where}: {_one_paragraph(exc)}") from None
        # The driver's router warns of every worker it lost and of a Ray Client link it closes; the card says so.
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        _serve_started = True
        return ray.get_runtime_context().gcs_address


_embedded = False

_CLIENT_SERVER_FAILED = "Starting Ray client server failed"
"""What Ray Client's proxy answers when the per-driver server it spawned died at once.

It happened to the first driver of a freshly started head here (the spawned
process exited within 50 ms, its logs empty) while the next one was served:
a driver asks once more before it reports the failure.
"""


def _one_paragraph(exc: Exception) -> str:
    """Ray's reason for refusing a driver, as one paragraph: a server's traceback shrinks to its last line."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        return raydoor.reason_in(text)
    return " ".join(text.split()) or type(exc).__name__


def _join(target: str, kwargs: dict) -> None:
    """`ray.init` on a cluster's address, asking Ray Client's proxy twice."""
    import ray

    if target.startswith("ray://"):
        raydoor.quiet_ray_client()

    for attempt in (1, 2):
        try:
            ray.init(address=target, **kwargs)
            return
        except (ConnectionError, RuntimeError) as exc:
            if attempt == 2 or not target.startswith("ray://") or _CLIENT_SERVER_FAILED not in str(exc):
                raise


def _start_embedded(kwargs: dict) -> None:
    """`ray.init` of a Ray in this process, started once more when its node did not come up in time.

    Ray 2.60's raylet aborts when the node's dashboard agent takes more than
    15 s to start, which a busy 2-core machine can cause; `ray.init` then
    fails after about 35 s and leaves what it started (the GCS, the
    dashboard, the monitors) running under the kernel. What a failed start
    left is ended either way, and this one failure is tried once more, as a
    user would rerun the cell.
    """
    import psutil
    import ray

    from . import reaper

    for attempt in (1, 2):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", include_dashboard=False, **kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception when the node does not come up
            reaper.end(p for p in psutil.Process().children(recursive=True) if p.pid not in before)
            if not raydoor.node_start_timed_out(exc):
                raise RuntimeError(_one_paragraph(exc)) from None
            if attempt == 2:
                raise RuntimeError(f"{_one_paragraph(exc)} It failed twice: on a busy machine Ray's node agents "
                                   f"can start too slowly; start a cluster with `ray start --head` and run the "
                                   f"cell again") from None


def _start_reaper() -> None:
    """Watch this process so a killed kernel does not leave Ray's agents running."""
    subprocess.Popen(
        [sys.executable, "-m", "byzer_magic.serving.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def worker_runtime_env() -> dict:
    """What replicas need to share the driver's Serve settings.

    An embedded cluster inherited them from this process already; an env_vars
    runtime_env would only cost a fresh worker process per replica there.
    """
    return {} if _embedded else {"env_vars": serve_env()}
