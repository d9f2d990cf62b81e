"""One OpenAI-compatible HTTP endpoint for every deployment, as a Serve app on the cluster.

The endpoint is a Serve application of several replicas on this machine's
node; each runs uvicorn (httptools on Ray's uvloop) with `openai_api`'s app
on one listening port, which they share through SO_REUSEPORT, so the kernel
spreads connections over them and HTTP parsing, SSE and the handle calls
use as many cores as there are replicas. They reach the workers through
Serve handles. Serve's own HTTP proxy is not used: its address is fixed
when Serve starts, so a user who deployed first could not pick a port later
without stopping every deployment. As a Serve app the endpoint outlives the
kernel that started it, is health-checked and restarted by Serve, and sees
deployments come and go without a restart. Its Prometheus series are kept
in prometheus_client's multiprocess files, so /metrics on any replica
counts the requests of all.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from ..backends.base import Delta, Embeddings, GenParams, Messages
from ..serving.cluster import connect, worker_runtime_env
from ..errors import DeployError, NotDeployedError
from .key_store import endpoint_key, key_file
from .routes import LOOPBACK_NAMES, build_app, key_digest, trusted_hosts
from ..spec.options import RESERVED_NAME, SERVE_DEFAULTS
from ..serving.status import State

GATEWAY_APP = RESERVED_NAME
GATEWAY_NAME = "ByzerGateway"


class _ServeDeployments:
    """The API's view of the cluster: Serve's details for listing, handles for answers."""

    async def models(self) -> list[dict[str, Any]]:
        from ..serving.deploy import table_of
        from ..serving.metrics import read_context
        from ..serving.raydoor import serve_details_async

        details = await serve_details_async()
        rows = table_of(details).rows
        lengths = await asyncio.to_thread(lambda: [read_context(row.name) for row in rows])
        return [{**row.details, "name": row.name, "max_model_len": n} for row, n in zip(rows, lengths)]

    def stream(self, name: str, request: Messages | str, gen: GenParams) -> AsyncIterator[Delta]:
        from ..serving.chat import astream

        return astream(name, request, gen)

    async def complete(self, name: str, request: Messages | str, gen: GenParams) -> list[Delta]:
        from ..serving.chat import acomplete

        return await acomplete(name, request, gen)

    async def embed(self, name: str, texts: list[str]) -> Embeddings:
        from ..serving.chat import aembed

        return await aembed(name, texts)


HEADER_TIMEOUT_S = 5.0
"""A connection must finish its request's headers this soon, or it is closed (uvicorn has no such limit)."""


def _protocol() -> type:
    """uvicorn's HTTP protocol with a deadline for each request's headers.

    uvicorn closes a connection idle after a response (timeout_keep_alive) but
    waits forever on one whose request never finishes arriving: 800 half-sent
    connections were held here. Each connection gets HEADER_TIMEOUT_S to send
    its headers, counted again for each request on it.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class Deadline(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._headers_due = self.loop.call_later(HEADER_TIMEOUT_S, self._too_slow)

        def _too_slow(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._headers_due.cancel()
            self._headers_due = self.loop.call_later(HEADER_TIMEOUT_S + self.timeout_keep_alive, self._too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_due.cancel()
            super().connection_lost(exc)

    return Deadline


def default_processes() -> int:
    """Server processes for this machine: two at least (one busy parsing never stalls the rest), at most four."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


def _bind(host: str, port: int, shared: bool) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise DeployError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None
    return sock


def _check_free(host: str, port: int) -> None:
    """Refuse a port that any socket holds, before the replicas share it.

    The replicas bind with SO_REUSEPORT, which another process of this user
    that also sets it (another cluster's endpoint) could share silently; a
    plain bind first fails on every holder, with the one readable sentence.
    """
    _bind(host, port, shared=False).close()


def _listen(host: str, port: int) -> socket.socket:
    sock = _bind(host, port, shared=True)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Gateway:
    """One Serve replica of the endpoint: an HTTP server on the shared port."""

    async def __init__(self, host: str, port: int, digest: str | None, allowed_hosts: list[str] | None = None,
                       max_body_bytes: int = 16 << 20):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                """Ray owns this process's signals; uvicorn must not take them."""
                yield

        sock = _listen(host, port)
        config = uvicorn.Config(
            build_app(_ServeDeployments(), key_digest=digest, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes),
            log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2, http=_protocol(),
        )
        self._server = Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                raise DeployError(f"the HTTP server on {host}:{port} stopped while starting")
            await asyncio.sleep(0.01)

    async def check_health(self) -> None:
        if self._task.done():
            raise DeployError("the HTTP server has stopped")

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config holds where the endpoint listens, for `endpoint()` to report."""

    async def __del__(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


@dataclass(frozen=True)
class Endpoint:
    """Where the endpoint listens and whether it is up; prints as a line a user can act on."""

    host: str
    port: int
    auth: bool
    state: State
    message: str = ""
    generated_key: bool = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def __repr__(self) -> str:
        if self.generated_key:
            key = f"API key required: byzer_magic.endpoint_key() reads it from {key_file()}"
        else:
            key = "API key required" if self.auth else "no API key"
        text = f"OpenAI-compatible endpoint {self.state} at {self.url} ({key})"
        if self.state != State.STOPPED:
            text += "; stop it with %byzer_serve --stop"
        return f"{text}: {self.message}" if self.message else text

    __str__ = __repr__


def endpoint(*, ray_address: str | None = None) -> Endpoint | None:
    """The running endpoint, read from the cluster, or None."""
    from ..serving.raydoor import reason_in, serve_details

    connect(ray_address, embedded_ok=False)
    app = serve_details().get("applications", {}).get(GATEWAY_APP)
    dep = (app or {}).get("deployments", {}).get(GATEWAY_NAME)
    if not dep or app.get("status") == "DELETING":
        return None
    where = dep.get("deployment_config", {}).get("user_config") or {}
    state = {"RUNNING": State.RUNNING, "DEPLOY_FAILED": State.FAILED}.get(app.get("status", ""), State.STARTING)
    message = reason_in(dep.get("message") or app.get("message") or "") if state != State.RUNNING else ""
    return Endpoint(str(where.get("host")), int(where.get("port") or 0), bool(where.get("auth")), state, message,
                    where.get("key") == "generated")


def _keeps(current: Endpoint | None, host: str, port: int, generated: bool, force: bool) -> bool:
    """Whether the running endpoint stays: a plain repeat keeps it; opening a loopback one to the network needs force."""
    if current is None or force:
        return False
    if current.state == State.RUNNING and (current.host, current.port) == (host, port) and generated and current.generated_key:
        return True
    if current.host in LOOPBACK_NAMES and host not in LOOPBACK_NAMES:
        raise DeployError(
            f"an endpoint already runs on {current.host}:{current.port}, reachable from this machine only; serving "
            f"on {host} would open it to the network: add --force to replace it"
        )
    return False


def start(
    host: str = SERVE_DEFAULTS.host,
    port: int = SERVE_DEFAULTS.port,
    api_key: str | None = None,
    *,
    allowed_hosts: str | None = None,
    force: bool = False,
    max_body_mb: float = SERVE_DEFAULTS.max_body_mb,
    processes: int | None = None,
    ray_address: str | None = None,
    timeout: float = 60.0,
) -> Endpoint:
    """Start the endpoint, closed: with the key given, else the one kept for this user (endpoint_key).

    A plain repeat keeps a running endpoint and its key; replacing one that
    listens on loopback with one open to the network takes --force. The
    replicas (`processes`, default_processes() if None) are pinned to this
    machine's Ray node, so 127.0.0.1 means the machine the notebook runs on.
    """
    import ray
    from ray import serve

    from ..serving.raydoor import HEAD_NODE_RESOURCE, deployment_options, over_ray_client, start_app

    connect(ray_address)
    generated = api_key is None
    api_key = api_key or endpoint_key()
    current = endpoint()
    if _keeps(current, host, port, generated, force):
        return current
    if current:
        _delete()
    _check_free(host, port)
    metrics_dir = tempfile.mkdtemp(prefix="byzer-endpoint-metrics-")
    # A Ray Client driver is no node of the cluster: its endpoint runs on the head, where the client server is.
    node = HEAD_NODE_RESOURCE if over_ray_client() else f"node:{ray.util.get_node_ip_address()}"
    env = worker_runtime_env().get("env_vars", {})
    app = serve.deployment(Gateway, name=GATEWAY_NAME).options(**deployment_options(dict(
        num_replicas=processes or default_processes(),
        ray_actor_options={"num_cpus": 0, "resources": {node: 0.001},
                           "runtime_env": {"env_vars": {**env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}}},
        user_config={"host": host, "port": port, "auth": True, "key": "generated" if generated else "given",
                     "metrics_dir": metrics_dir},
        max_constructor_retry_count=1,
        health_check_period_s=2,
        graceful_shutdown_timeout_s=5,
    ))).bind(host, port, key_digest(api_key), trusted_hosts(host, allowed_hosts), int(max_body_mb * 2**20))
    try:
        start_app(app, GATEWAY_APP)
        return _wait_running(timeout)
    except BaseException:
        _delete(metrics_dir)
        raise


def _wait_running(timeout: float) -> Endpoint:
    """The endpoint once Serve says it runs; a DeployError when it failed or is not up in time."""
    deadline = time.monotonic() + timeout
    while True:
        found = endpoint()
        if found and found.state == State.RUNNING:
            return found
        if found and found.state == State.FAILED:
            raise DeployError(f"the OpenAI endpoint did not start: {found.message}")
        if time.monotonic() > deadline:
            raise DeployError(f"the OpenAI endpoint was not up within {timeout:g} s")
        time.sleep(0.05)


def _delete(metrics_dir: str | None = None) -> None:
    """Remove the endpoint's app, then its metrics files (on this machine, where its replicas ran)."""
    from ray import serve

    from ..serving.raydoor import serve_details

    app = serve_details().get("applications", {}).get(GATEWAY_APP) or {}
    config = app.get("deployments", {}).get(GATEWAY_NAME, {}).get("deployment_config", {}).get("user_config") or {}
    serve.delete(GATEWAY_APP)
    folder = str(metrics_dir or config.get("metrics_dir") or "")
    if os.path.basename(folder).startswith("byzer-endpoint-metrics-"):
        shutil.rmtree(folder, ignore_errors=True)


def stop(*, ray_address: str | None = None) -> Endpoint:
    """Stop the endpoint; the deployments behind it keep running."""
    current = endpoint(ray_address=ray_address)
    if current is None:
        raise NotDeployedError("no OpenAI endpoint is running on this cluster (start one with %byzer_serve)")
    _delete()
    return Endpoint(current.host, current.port, current.auth, State.STOPPED)
