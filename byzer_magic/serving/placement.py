"""Whether the cluster can place a deployment's workers, asked before any worker starts.

Ray would otherwise leave a worker pending for ever (a resource no node has)
or start it where its model is missing and fail late with a loader's
traceback. Each check names what is wrong in one sentence: the flag, and what
the cluster has.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import DeployError

_HIDDEN = ("node:", "object_store_memory", "memory", "accelerator_type:")
"""Ray's own bookkeeping resources, left out when naming what the cluster has."""
_PATH_CHECK_S = 60.0


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_label(node_id: str, ip: str) -> str:
    """How a node is named to the user: its short id (several nodes may share one host) and its address."""
    return f"{node_id[:8]} ({ip})" if node_id else ip or "?"


def _asks(cpus: float, gpus: float, resources: Mapping[str, float]) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus, **resources}


def _fits(node: dict[str, Any], asks: Mapping[str, float]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(name, 0) + 1e-9 >= amount for name, amount in asks.items() if amount)


def cluster_resources(nodes: list[dict[str, Any]]) -> list[str]:
    """Every resource some node has, less Ray's bookkeeping ones, for an error to name."""
    names = {name for node in nodes for name in node.get("Resources", {})}
    return sorted(name for name in names if not name.startswith(_HIDDEN))


def hosts(cpus: float, gpus: float, resources: Mapping[str, float]) -> list[dict[str, Any]]:
    """The alive nodes that can hold one worker; a custom resource no node has is refused by name."""
    nodes = alive_nodes()
    for name, amount in resources.items():
        if not any(node.get("Resources", {}).get(name, 0) + 1e-9 >= amount for node in nodes):
            raise DeployError(f"--resources {name}={amount:g}: no node of the cluster has that much {name}; the "
                              f"cluster's resources are {', '.join(cluster_resources(nodes))}")
    most_gpus = max((node.get("Resources", {}).get("GPU", 0) for node in nodes), default=0)
    if gpus > 1 and 0 < most_gpus < gpus:
        raise DeployError(f"--gpus_per_worker {gpus:g}: a worker's GPUs must all be on one node (vLLM's tensor "
                          f"parallelism runs inside one worker), and the most GPUs one node of this cluster has is "
                          f"{most_gpus:g}; use --gpus_per_worker {most_gpus:g} with more workers instead")
    found = [node for node in nodes if _fits(node, _asks(cpus, gpus, resources))]
    if not found:
        _check_totals(1, cpus, gpus, resources)
        asked = ", ".join(f"{amount:g} {name}" for name, amount in _asks(cpus, gpus, resources).items() if amount)
        raise DeployError(f"no node of the cluster has all that one worker asks for ({asked}) at once: lower "
                          f"--cpus_per_worker, --gpus_per_worker or --resources")
    return found


def check_room(workers: int, cpus: float, gpus: float, resources: Mapping[str, float]) -> None:
    """Refuse what the cluster cannot place, instead of waiting on it forever."""
    _check_totals(workers, cpus, gpus, resources)
    hosts(cpus, gpus, resources)


def _check_totals(workers: int, cpus: float, gpus: float, resources: Mapping[str, float]) -> None:
    """What the cluster lacks in all, or has too little of free; said before any per-node reason."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    asks = [("--cpus_per_worker", "CPU", cpus), ("--gpus_per_worker", "GPU", gpus)]
    asks += [(f"--resources {name}=", name, amount) for name, amount in resources.items()]
    for flag, key, per in asks:
        need, shown = per * workers, f"{flag}{per:g}" if flag.endswith("=") else f"{flag} {per:g}"
        unit = f"{key}s" if key in ("CPU", "GPU") else key
        if need > total.get(key, 0) + 1e-9:
            raise DeployError(
                f"{workers} workers x {shown} need {need:g} {unit}; the cluster has "
                f"{total.get(key, 0):g} in all. Ask for fewer workers or a smaller {flag.rstrip('=')}."
            )
        if need > free.get(key, 0) + 1e-9:
            raise DeployError(
                f"{workers} workers x {shown} need {need:g} {unit}; only {free.get(key, 0):g} "
                f"are free (other deployments hold the rest: see %byzer_list)."
            )


def path_problem(path: str, backend: str) -> str | None:
    """What is wrong with a model path on this node: missing, unreadable, or not what the backend loads."""
    from .. import backends

    found = Path(path)
    if not found.exists():
        return "no such file or directory"
    if not os.access(found, os.R_OK) or (found.is_dir() and not os.access(found, os.X_OK)):
        return "not readable by the user Ray runs as"
    return backends.find(backend).check_model_path(found)


def check_model_path(path: str, backend: str, nodes: list[dict[str, Any]]) -> None:
    """Check the path on every node that can host a worker (one small task pinned to each); refuse naming those that lack it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(path_problem)
    refs = {
        node_label(node["NodeID"], node.get("NodeManagerAddress", "")): probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(path, backend)
        for node in nodes
    }
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=_PATH_CHECK_S)))
    except ray.exceptions.GetTimeoutError:
        raise DeployError(f"--model_path {path}: the nodes did not answer whether they have it within "
                          f"{_PATH_CHECK_S:g} s") from None
    missing = {label: problem for label, problem in answers.items() if problem}
    if not missing:
        return
    problems = set(missing.values())
    said = problems.pop() if len(problems) == 1 else "; ".join(f"{k}: {v}" for k, v in missing.items())
    raise DeployError(f"--model_path {path} is not usable on {len(missing)} of the {len(answers)} nodes that can "
                      f"host a worker ({', '.join(missing)}): {said}. Copy the model there, or keep the workers off "
                      f"those nodes with --resources")
