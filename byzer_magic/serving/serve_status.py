"""Serve's details of one application, read as a DeploymentStatus: its state, workers, nodes and range.

Serve's own states do not say what a user asks ("is a scale under way?",
"where do the workers sit?"); this module decides, from the details alone,
so a card in any kernel reads the same.
"""
from __future__ import annotations

from typing import Any

from .placement import node_label
from .raydoor import reason_in
from .status import DeploymentStatus, State, StatusTable
from .worker import WORKER_NAME


def ours(app: dict[str, Any]) -> dict[str, Any] | None:
    """The worker deployment of a Serve app, if the app is one of ours."""
    return app.get("deployments", {}).get(WORKER_NAME)


def to_status(name: str, app: dict[str, Any] | None) -> DeploymentStatus:
    if app is None or ours(app) is None:
        return DeploymentStatus(name, State.STOPPED)
    dep = ours(app)
    config = dep.get("deployment_config", {})
    autoscaling = config.get("autoscaling_config") or {}
    replicas = dep.get("replicas", [])
    ready = sum(r.get("state") == "RUNNING" for r in replicas)
    wanted = int(dep.get("target_num_replicas", config.get("num_replicas", 0)) or 0)
    workers = tuple(str(getattr(r.get("state"), "value", r.get("state", "?"))).lower() for r in replicas)
    nodes = tuple(node_label(r.get("node_id") or "", r.get("node_ip") or "") for r in replicas)
    state, message = _state_of(app, dep, ready, wanted, workers)
    return DeploymentStatus(
        name, state, ready, wanted, message, dict(config.get("user_config") or {}), workers, nodes=nodes,
        min_workers=autoscaling.get("min_replicas") if autoscaling else None,
        max_workers=autoscaling.get("max_replicas") if autoscaling else None,
    )


def _state_of(app: dict[str, Any], dep: dict[str, Any], ready: int, wanted: int,
              workers: tuple[str, ...]) -> tuple[State, str]:
    """The deployment's state and its message: a scale under way reads "scaling", not degraded or ready."""
    app_status, dep_status = app.get("status", ""), dep.get("status")
    message = reason_in(dep.get("message") or app.get("message") or "")
    # A worker starting after a scale-up is progress; one starting to replace a dead worker
    # (Serve marks the deployment UNHEALTHY) leaves the deployment degraded until it is up.
    starting = dep_status != "UNHEALTHY" and any(w in ("starting", "updating", "recovering", "pending_allocation")
                                                 for w in workers)
    if app_status == "DEPLOY_FAILED":
        return State.FAILED, message
    if app_status == "DELETING":
        return State.STOPPED, message
    if app_status == "DEPLOYING" and dep_status not in ("UPSCALING", "DOWNSCALING", "HEALTHY"):
        return State.DEPLOYING, message
    if dep_status != "UNHEALTHY" and ready < wanted and (dep_status == "UPSCALING" or starting):
        return State.SCALING, f"scaling up to {_workers(wanted)}"
    if dep_status != "UNHEALTHY" and (ready > wanted or dep_status == "DOWNSCALING" or "stopping" in workers):
        return State.SCALING, f"scaling down to {_workers(wanted)}"
    if ready >= wanted and app_status in ("RUNNING", "DEPLOYING"):
        return State.READY, message
    return State.DEGRADED, message


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def table_of(details: dict[str, Any]) -> StatusTable:
    """Our deployments among the applications of Serve's details."""
    apps = details.get("applications", {})
    return StatusTable(tuple(to_status(n, a) for n, a in sorted(apps.items()) if ours(a)))
