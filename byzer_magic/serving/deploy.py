"""Deploy, scale, stop and inspect deployments: one Serve application each.

The cluster is the only record: every function here reads Serve's own state,
so a restarted kernel sees and controls what an earlier one deployed.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import metrics, placement, raydoor, records, scaling
from .raydoor import (
    app_status, deployed, deployment_options, pinned, serve_details, set_workers, setup_hook_env, start_app,
)
from .cluster import connect, worker_runtime_env
from ..errors import DeployError, NotDeployedError, SpecError, redact
from ..spec.options import MAX_WORKERS
from ..spec.deploy_spec import DeploySpec
from .serve_status import ours, table_of, to_status
from .status import DeploymentStatus, State, StatusTable
from .worker import PRELOAD_ENV, WORKER_NAME, Worker

Progress = Callable[[DeploymentStatus], None]
_POLL_S = 0.05
PROGRESS_S = 0.25
_CLAIM_SLACK_S = 60.0
"""How long past its own deadline a deploy's claim on a name outlives the deploy (a clean-up after a timeout)."""
"""How often a deploy with a progress callback reads the workers' states while Serve is still deploying."""


def preflight(spec: DeploySpec) -> None:
    """Check what the spec needs from this machine, before anything starts."""
    kind = spec.backend_class
    if not kind.library_installed():
        extra = f"pip install 'byzer-magic[{kind.extra}]'" if kind.extra else f"pip install {kind.library}"
        raise DeployError(f"--infer_backend {spec.backend} needs the {kind.library} package: {extra}")
    if spec.model_path is None:
        return
    path = Path(spec.model_path).expanduser()
    if not path.exists():
        raise DeployError(f"--model_path {spec.model_path}: no such file or directory")
    problem = kind.check_model_path(path)
    if problem:
        raise DeployError(f"--model_path {spec.model_path}: {problem}")


def status(name: str, *, ray_address: str | None = None, with_metrics: bool = False) -> DeploymentStatus:
    """The state of one deployment, read from the cluster; with its workers' request figures if asked."""
    connect(ray_address, embedded_ok=False)
    app = serve_details().get("applications", {}).get(name)
    found = to_status(name, app)
    if not with_metrics or found.state == State.STOPPED:
        return found
    replicas = [r.get("replica_id", "") for r in ours(app).get("replicas", []) if r.get("state") == "RUNNING"]
    return replace(found, metrics=metrics.combine(metrics.read(name, replicas), metrics.read_outstanding(name)))


def list_deployments(*, ray_address: str | None = None) -> StatusTable:
    """Every byzer_magic deployment on the cluster, whoever deployed it."""
    connect(ray_address, embedded_ok=False)
    return table_of(serve_details())


def require(name: str, *, ray_address: str | None = None, with_metrics: bool = False) -> DeploymentStatus:
    """The status of a deployment that must exist; the error lists those that do."""
    current = status(name, ray_address=ray_address, with_metrics=with_metrics)
    if current.state == State.STOPPED:
        names = [row.name for row in list_deployments().rows]
        known = f"deployed now: {', '.join(names)}" if names else "nothing is deployed"
        raise NotDeployedError(f"no deployment named {name!r} ({known})")
    return current


def _runtime_env(spec: DeploySpec) -> dict[str, Any]:
    """The workers' runtime env; where it already makes fresh processes, one that preloads the backend's modules.

    On an embedded cluster the env is empty so workers reuse Ray's idle
    processes; a preload hook there would cost a fresh process per worker.
    """
    env = worker_runtime_env()
    modules = spec.backend_class.preload
    hook = setup_hook_env("byzer_magic.serving.worker.preload") if env and modules else {}
    if not hook:
        return env
    return {**env, "env_vars": {**env.get("env_vars", {}), **hook, PRELOAD_ENV: ",".join(modules)}}


def worker_options(spec: DeploySpec, *, deployed_at: int | None = None) -> dict[str, Any]:
    """Serve's deployment options for the spec's workers: count or autoscaling, placement, concurrency, health checks."""
    autoscaling = scaling.autoscaling_config(spec)
    count = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": spec.num_workers}
    placed = {"max_replicas_per_node": spec.max_workers_per_node} if spec.max_workers_per_node else {}
    return dict(
        **count,
        **placed,
        max_ongoing_requests=spec.worker_concurrency,
        max_queued_requests=spec.max_queued_requests,
        ray_actor_options={
            "num_cpus": spec.cpus_per_worker,
            "num_gpus": spec.gpus_per_worker,
            **({"resources": dict(spec.resources)} if spec.resources else {}),
            "runtime_env": _runtime_env(spec),
        },
        user_config={**spec.describe(), "deployed_at": deployed_at or int(time.time())},
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=scaling.shutdown_timeout(spec),
        graceful_shutdown_wait_loop_s=0.2,
        health_check_period_s=2,
        health_check_timeout_s=10,
        request_router_config={"initial_backoff_s": 0.002, "max_backoff_s": 0.02},
    )


def _app(spec: DeploySpec, **kept: Any) -> Any:
    """The Serve application of a spec; `kept` (version, actor options, deployed_at) makes a redeploy in place."""
    from ray import serve

    options = worker_options(spec, deployed_at=kept.get("deployed_at"))
    if kept.get("actor_options"):
        options["ray_actor_options"] = kept["actor_options"]
    deployment = serve.deployment(Worker, name=WORKER_NAME).options(**deployment_options(options))
    if kept.get("version"):
        deployment = pinned(deployment, kept["version"])
    return deployment.bind(spec)


def deploy(spec: DeploySpec, *, on_progress: Progress | None = None) -> DeploymentStatus:
    """Start the spec's workers (a fixed count, or autoscaling's first ones) and wait until they are ready.

    What the cluster cannot give (a resource no node has, a model path missing
    on a node that could host a worker) is refused before anything starts. On
    any failure, timeout or interrupt the application is deleted again, so
    nothing is left half-deployed, and the worker's own reason is raised.
    """
    preflight(spec)
    if spec.model_path:
        # Workers run in other directories: a path relative to the notebook must not reach them as is.
        spec = replace(spec, model_path=str(Path(spec.model_path).expanduser().resolve()))
    address = connect(spec.ray_address)
    with _one_deploy_at_a_time(spec.name, spec.deploy_timeout):
        return _deploy_claimed(spec, address, on_progress)


def _deploy_claimed(spec: DeploySpec, address: str, on_progress: Progress | None) -> DeploymentStatus:
    """`deploy` once this driver holds the name's claim."""
    from ray import serve

    app = serve_details().get("applications", {}).get(spec.name)
    _refuse_foreign(spec.name, app)
    nodes = placement.hosts(spec.cpus_per_worker, spec.gpus_per_worker, spec.resources)
    if spec.model_path:
        placement.check_model_path(spec.model_path, spec.backend, nodes)
    existing = to_status(spec.name, app)
    if existing.state != State.STOPPED:
        if not spec.force:
            raise DeployError(
                f"a deployment named {spec.name!r} already exists ({existing.line()}). Chat with it, "
                f"remove it with %byzer_undeploy {spec.name}, or add --force to replace it."
            )
        serve.delete(spec.name)
    first = scaling.first_workers(spec)
    placement.check_room(first, spec.cpus_per_worker, spec.gpus_per_worker, spec.resources)
    deadline = time.monotonic() + spec.deploy_timeout
    try:
        start_app(_app(spec), spec.name, scalable=not spec.autoscaling)
        bounds = (spec.min_workers, spec.max_workers) if spec.autoscaling else None
        ready = _wait(spec.name, first, deadline, on_progress, "raise --deploy_timeout", bounds=bounds)  # type: ignore[arg-type]
        records.save(spec, address)
        return ready
    except BaseException as exc:
        serve.delete(spec.name)
        if isinstance(exc, DeployError):
            raise DeployError(redact(str(exc), spec.secrets())) from None
        raise


@contextmanager
def _one_deploy_at_a_time(name: str, timeout: float) -> Iterator[None]:
    """Claim the name in the cluster's key-value store for the length of one deploy.

    Two deploys of one name at once (two cells, a notebook and a shell) would
    both find it free, and the one that failed would delete what the other
    started: the second is refused instead. A claim left by a killed kernel
    lapses once its deploy could no longer be running.
    """
    key = f"deploying/{name}"
    claim = json.dumps({"until": time.time() + timeout + _CLAIM_SLACK_S})
    held = _take_claim(key, claim, name)
    try:
        yield
    finally:
        raydoor.kv_del(key)
        if held is not None:
            raydoor.kv_del(held)


def _take_claim(key: str, claim: str, name: str) -> str | None:
    """Store `claim` under `key`, or take over a lapsed one; returns the takeover's own key, held until the deploy ends.

    The store has put-if-absent but no compare-and-swap, so two drivers that
    both find a lapsed claim could both overwrite it and both deploy. Each
    lapsed claim gets a takeover key named for its value instead, and only
    the one driver that stores that key first replaces it.
    """
    busy = DeployError(f"another deploy of {name!r} is under way (from another cell or process); wait for it to "
                       f"finish, then chat with it or replace it with --force")
    for _ in range(3):
        if raydoor.kv_claim(key, claim):
            return None
        held = raydoor.kv_get(key)
        if held is None:
            continue  # its deploy ended between the two calls: the name is free again
        if json.loads(held).get("until", 0) > time.time():
            raise busy
        takeover = f"{key}/lapsed/{hashlib.sha256(held).hexdigest()[:16]}"
        if not raydoor.kv_claim(takeover, claim):
            raise busy
        raydoor.kv_put(key, claim)
        return takeover
    raise busy


def _refuse_foreign(name: str, app: dict[str, Any] | None) -> None:
    """A Serve application that byzer_magic did not deploy is never replaced, --force or not."""
    if app is not None and ours(app) is None:
        raise DeployError(
            f"a Serve application named {name!r} runs on this cluster and was not deployed by byzer_magic; it is "
            f"left alone: pick another --model"
        )


def _wait(name: str, workers: int, deadline: float, on_progress: Progress | None, wait_longer: str,
          *, bounds: tuple[int, int] | None = None) -> DeploymentStatus:
    """Until `workers` are ready: exactly that many for a fixed count, at least that many within autoscaling `bounds`.

    While the application is DEPLOYING nothing in the details can finish the
    wait, so its bare status is polled (cheap for the controller), and the
    details are read only every PROGRESS_S for on_progress. `wait_longer` says
    how the caller can give a slow model more time.
    """
    exact = bounds is None
    last = None
    details_due = 0.0
    while True:
        now = time.monotonic()
        if app_status(name) == "DEPLOYING" and now < deadline and (on_progress is None or now < details_due):
            time.sleep(_POLL_S)
            continue
        details_due = now + PROGRESS_S
        current = status(name)
        if current != last and on_progress:
            on_progress(current)
        last = current
        if current.state == State.FAILED:
            raise DeployError(f"deploying {name!r} failed: {current.message}")
        if exact and (current.state == State.READY and current.workers_ready == workers == current.workers_wanted
                      and len(current.workers) == workers and current.max_workers is None):
            return current
        if (not exact and current.state in (State.READY, State.SCALING) and current.workers_ready >= workers
                and (current.min_workers, current.max_workers) == bounds):
            return current
        if time.monotonic() > deadline:
            raise DeployError(
                f"{name!r} was not ready in time ({current.workers_ready}/{workers} workers; "
                f"{current.message or 'still starting'}); {wait_longer} if the model is slow to load"
            )
        time.sleep(_POLL_S)


def scale(
    name: str,
    workers: int | tuple[int, int],
    *,
    timeout: float = 300.0,
    ray_address: str | None = None,
    on_progress: Progress | None = None,
) -> DeploymentStatus:
    """Change the worker count, or the autoscaling range (a (min, max) pair), in place; requests keep flowing."""
    if isinstance(workers, int) and not 0 <= workers <= MAX_WORKERS:
        raise SpecError(f"cannot scale to {workers} workers: use 0 to {MAX_WORKERS} (0 keeps the deployment "
                          f"but gives its CPUs and GPUs back)")
    current = require(name, ray_address=ray_address, with_metrics=True)
    first = workers if isinstance(workers, int) else workers[0]
    extra = max(0, first - current.workers_wanted)
    if extra:
        per_worker = current.details
        placement.check_room(extra, per_worker.get("cpus_per_worker") or 0, per_worker.get("gpus_per_worker") or 0,
                             per_worker.get("resources") or {})
        _check_memory(extra, current.metrics.get("largest_worker_bytes") or 0)
    if isinstance(workers, int) and current.max_workers is None:
        # Serve's external scaler: on a Ray without it, set_workers says how to redeploy instead.
        set_workers(name, WORKER_NAME, workers)
        undo: Callable[[], None] = lambda: set_workers(name, WORKER_NAME, current.workers_wanted)
        before = f"{current.workers_wanted} workers"
    else:
        undo = _rebound(name, workers)
        before = f"{current.range_text()} workers"
    _record_workers(name, workers)
    try:
        return _wait(name, first, time.monotonic() + timeout, on_progress,
                     f"byzer_magic.serving.deploy.scale(..., timeout=SECONDS) waits longer than {timeout:g} s",
                     bounds=None if isinstance(workers, int) else workers)
    except (DeployError, KeyboardInterrupt) as exc:
        # A scale that cannot finish goes back to where it was, instead of leaving Serve adding workers.
        undo()
        _record_workers(name, (current.min_workers, current.max_workers) if current.max_workers is not None
                        else current.workers_wanted)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise DeployError(f"{exc}; scaled back to {before}") from None


def _record_workers(name: str, workers: int | tuple[int, int]) -> None:
    """Keep a scale's count or range in the deployment's record, so a restore brings back what runs now."""
    if isinstance(workers, tuple):
        records.update(name, min_workers=workers[0], max_workers=workers[1], num_workers=None)
    else:
        records.update(name, num_workers=workers, min_workers=None, max_workers=None)


def _rebound(name: str, workers: int | tuple[int, int]) -> Callable[[], None]:
    """Redeploy with a new count or range, keeping the code version and actor options, so no worker restarts.

    The spec is read back from the cluster, so any kernel can do it; returns how to undo it.
    """
    args, version, actor_options = deployed(name, WORKER_NAME)
    spec: DeploySpec = args[0]
    deployed_at = int(status(name).details.get("deployed_at") or 0) or None
    if isinstance(workers, tuple):
        new = replace(spec, min_workers=workers[0], max_workers=workers[1])
    else:
        new = replace(spec, num_workers=workers, min_workers=None, max_workers=None)

    def apply(target: DeploySpec) -> None:
        app = _app(target, version=version, actor_options=actor_options, deployed_at=deployed_at)
        start_app(app, name, scalable=not target.autoscaling)

    apply(new)
    return lambda: apply(spec)


def _check_memory(extra: int, per_worker: int) -> None:
    """Refuse a scale-up whose workers, each the size of the largest running one, do not fit the memory left.

    Ray's CPU count let a SaaS deployment grow to 300 workers of about 184 MB
    each on a 24 GiB machine, until Ray's memory monitor killed workers; the
    workers report their resident memory, so the scale is refused up front.
    """
    import psutil
    import ray

    if not per_worker:
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    free = psutil.virtual_memory().available if len(nodes) <= 1 else ray.available_resources().get("memory", 0)
    need = extra * per_worker
    if need > free * 0.9:
        raise DeployError(
            f"{extra} more workers of about {per_worker / 2**20:.0f} MiB each need {need / 2**30:.1f} GiB; the "
            f"cluster has {free / 2**30:.1f} GiB of memory free. Scale to fewer workers."
        )


def undeploy(name: str, *, ray_address: str | None = None) -> None:
    """Stop every worker of the deployment and forget it; waits until they are gone."""
    from ray import serve

    require(name, ray_address=ray_address)
    serve.delete(name)
    records.remove(name)
