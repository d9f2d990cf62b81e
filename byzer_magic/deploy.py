"""Deploy, scale, stop and inspect deployments: one Serve application each.

The cluster is the only record: every function here reads Serve's own state,
so a restarted kernel sees and controls what an earlier one deployed.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import metrics, records
from .raydoor import (
    app_status, deployment_options, reason_in, serve_details, set_workers, setup_hook_env, start_app,
)
from .cluster import connect, worker_runtime_env
from .errors import DeployError, NotDeployedError, SpecError, redact
from .spec import MAX_WORKERS, DeploySpec
from .status import DeploymentStatus, StatusTable
from .worker import PRELOAD_ENV, WORKER_NAME, Worker

Progress = Callable[[DeploymentStatus], None]
_POLL_S = 0.05
PROGRESS_S = 0.25
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


def _check_resources(workers: int, cpus: float, gpus: float) -> None:
    """Refuse what the cluster cannot place, instead of waiting on it forever."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    for flag, key, per in (("--cpus_per_worker", "CPU", cpus), ("--gpus_per_worker", "GPU", gpus)):
        need = per * workers
        if need > total.get(key, 0) + 1e-9:
            raise DeployError(
                f"{workers} workers x {flag} {per:g} need {need:g} {key}s; the cluster has "
                f"{total.get(key, 0):g} in all. Ask for fewer workers or a smaller {flag}."
            )
        if need > free.get(key, 0) + 1e-9:
            raise DeployError(
                f"{workers} workers x {flag} {per:g} need {need:g} {key}s; only {free.get(key, 0):g} "
                f"are free (other deployments hold the rest: see %byzer_list)."
            )


def _ours(app: dict[str, Any]) -> dict[str, Any] | None:
    """The worker deployment of a Serve app, if the app is one of ours."""
    return app.get("deployments", {}).get(WORKER_NAME)


def _to_status(name: str, app: dict[str, Any] | None) -> DeploymentStatus:
    if app is None or _ours(app) is None:
        return DeploymentStatus(name, "stopped")
    dep = _ours(app)
    config = dep.get("deployment_config", {})
    replicas = dep.get("replicas", [])
    ready = sum(r.get("state") == "RUNNING" for r in replicas)
    wanted = int(dep.get("target_num_replicas", config.get("num_replicas", 0)) or 0)
    app_status = app.get("status", "")
    workers = tuple(str(getattr(r.get("state"), "value", r.get("state", "?"))).lower() for r in replicas)
    # A worker starting after a scale-up is progress; one starting to replace a dead worker
    # (Serve marks the deployment UNHEALTHY) leaves the deployment degraded until it is up.
    starting = dep.get("status") != "UNHEALTHY" and any(w in ("starting", "updating", "recovering") for w in workers)
    if app_status == "DEPLOY_FAILED":
        state = "failed"
    elif app_status == "DELETING":
        state = "stopped"
    elif app_status == "DEPLOYING" or (ready < wanted and (dep.get("status") == "UPSCALING" or starting)):
        state = "deploying"
    elif ready >= wanted and app_status == "RUNNING":
        state = "ready"
    else:
        state = "degraded"
    message = reason_in(dep.get("message") or app.get("message") or "")
    return DeploymentStatus(name, state, ready, wanted, message, dict(config.get("user_config") or {}), workers)


def status(name: str, *, ray_address: str | None = None, with_metrics: bool = False) -> DeploymentStatus:
    """The state of one deployment, read from the cluster; with its workers' request figures if asked."""
    connect(ray_address, embedded_ok=False)
    app = serve_details().get("applications", {}).get(name)
    found = _to_status(name, app)
    if not with_metrics or found.state == "stopped":
        return found
    replicas = [r.get("replica_id", "") for r in _ours(app).get("replicas", []) if r.get("state") == "RUNNING"]
    return replace(found, metrics=metrics.combine(metrics.read(name, replicas), metrics.read_outstanding(name)))


def list_deployments(*, ray_address: str | None = None) -> StatusTable:
    """Every byzer_magic deployment on the cluster, whoever deployed it."""
    connect(ray_address, embedded_ok=False)
    return table_of(serve_details())


def table_of(details: dict[str, Any]) -> StatusTable:
    """Our deployments among the applications of Serve's details."""
    apps = details.get("applications", {})
    return StatusTable(tuple(_to_status(n, a) for n, a in sorted(apps.items()) if _ours(a)))


def require(name: str, *, ray_address: str | None = None, with_metrics: bool = False) -> DeploymentStatus:
    """The status of a deployment that must exist; the error lists those that do."""
    current = status(name, ray_address=ray_address, with_metrics=with_metrics)
    if current.state == "stopped":
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
    hook = setup_hook_env("byzer_magic.worker.preload") if env and modules else {}
    if not hook:
        return env
    return {**env, "env_vars": {**env.get("env_vars", {}), **hook, PRELOAD_ENV: ",".join(modules)}}


def worker_options(spec: DeploySpec) -> dict[str, Any]:
    """Serve's deployment options for the spec's workers: replicas, resources, concurrency, health checks."""
    return dict(
        num_replicas=spec.num_workers,
        max_ongoing_requests=spec.worker_concurrency,
        max_queued_requests=spec.max_queued_requests,
        ray_actor_options={
            "num_cpus": spec.cpus_per_worker,
            "num_gpus": spec.gpus_per_worker,
            "runtime_env": _runtime_env(spec),
        },
        user_config={**spec.describe(), "deployed_at": int(time.time())},
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=30,
        graceful_shutdown_wait_loop_s=0.2,
        health_check_period_s=2,
        health_check_timeout_s=10,
        request_router_config={"initial_backoff_s": 0.002, "max_backoff_s": 0.02},
    )


def deploy(spec: DeploySpec, *, on_progress: Progress | None = None) -> DeploymentStatus:
    """Start `spec.num_workers` workers and wait until all are ready.

    On any failure, timeout or interrupt the application is deleted again, so
    nothing is left half-deployed, and the worker's own reason is raised.
    """
    from ray import serve

    preflight(spec)
    if spec.model_path:
        # Workers run in other directories: a path relative to the notebook must not reach them as is.
        spec = replace(spec, model_path=str(Path(spec.model_path).expanduser().resolve()))
    address = connect(spec.ray_address)
    app = serve_details().get("applications", {}).get(spec.name)
    _refuse_foreign(spec.name, app)
    existing = _to_status(spec.name, app)
    if existing.state != "stopped":
        if not spec.force:
            raise DeployError(
                f"a deployment named {spec.name!r} already exists ({existing.line()}). Chat with it, "
                f"remove it with %byzer_undeploy {spec.name}, or add --force to replace it."
            )
        serve.delete(spec.name)
    _check_resources(spec.num_workers, spec.cpus_per_worker, spec.gpus_per_worker)

    app = serve.deployment(Worker, name=WORKER_NAME).options(**deployment_options(worker_options(spec))).bind(spec)
    deadline = time.monotonic() + spec.deploy_timeout
    try:
        start_app(app, spec.name, scalable=True)
        ready = _wait(spec.name, spec.num_workers, deadline, on_progress, "--deploy_timeout")
        records.save(spec, address)
        return ready
    except BaseException as exc:
        serve.delete(spec.name)
        if isinstance(exc, DeployError):
            raise DeployError(redact(str(exc), spec.secrets())) from None
        raise


def _refuse_foreign(name: str, app: dict[str, Any] | None) -> None:
    """A Serve application that byzer_magic did not deploy is never replaced, --force or not."""
    if app is not None and _ours(app) is None:
        raise DeployError(
            f"a Serve application named {name!r} runs on this cluster and was not deployed by byzer_magic; it is "
            f"left alone: pick another --model"
        )


def _wait(name: str, workers: int, deadline: float, on_progress: Progress | None, timeout_flag: str) -> DeploymentStatus:
    """Poll until the workers are ready; Serve's whole details only when they can say something new.

    While the application is DEPLOYING nothing in the details can finish the
    wait, so its bare status is polled (cheap for the controller), and the
    details are read only every PROGRESS_S for on_progress.
    """
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
        if current.state == "failed":
            raise DeployError(f"deploying {name!r} failed: {current.message}")
        if (current.state == "ready" and current.workers_ready == workers == current.workers_wanted
                and len(current.workers) == workers):
            return current
        if time.monotonic() > deadline:
            raise DeployError(
                f"{name!r} was not ready in time ({current.workers_ready}/{workers} workers; "
                f"{current.message or 'still starting'}); raise {timeout_flag} if the model is slow to load"
            )
        time.sleep(_POLL_S)


def scale(
    name: str,
    workers: int,
    *,
    timeout: float = 300.0,
    ray_address: str | None = None,
    on_progress: Progress | None = None,
) -> DeploymentStatus:
    """Change the number of workers in place; requests keep flowing meanwhile."""
    if not 0 <= workers <= MAX_WORKERS:
        raise SpecError(f"cannot scale to {workers} workers: use 0 to {MAX_WORKERS} (0 keeps the deployment "
                          f"but gives its CPUs and GPUs back)")
    current = require(name, ray_address=ray_address, with_metrics=True)
    extra = max(0, workers - current.workers_wanted)
    if extra:
        per_worker = current.details
        _check_resources(extra, per_worker.get("cpus_per_worker") or 0, per_worker.get("gpus_per_worker") or 0)
        _check_memory(extra, current.metrics.get("largest_worker_bytes") or 0)
    set_workers(name, WORKER_NAME, workers)
    records.update(name, num_workers=workers)
    try:
        return _wait(name, workers, time.monotonic() + timeout, on_progress, "the scale timeout")
    except (DeployError, KeyboardInterrupt) as exc:
        # A scale that cannot finish goes back to the count before it, instead of leaving Serve adding workers.
        set_workers(name, WORKER_NAME, current.workers_wanted)
        records.update(name, num_workers=current.workers_wanted)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise DeployError(f"{exc}; scaled back to {current.workers_wanted} workers") from None


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
