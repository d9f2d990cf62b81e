"""How many workers a deployment has: a fixed count, or a range Serve's autoscaler follows.

Pure rules, no Ray: which flags go together, what Serve's `autoscaling_config`
and placement options they make, and how `%byzer_scale`'s target reads
(`3` fixes the count, `2..6` sets the range). Serve's autoscaler does the
scaling itself; deploy.py hands these options to it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..errors import SpecError
from ..spec.options import MAX_WORKERS, DeployFlags

if TYPE_CHECKING:
    from ..spec.deploy_spec import DeploySpec

_RANGE = re.compile(r"^\s*(\d+)\s*\.\.\s*(\d+)\s*$")
_AUTOSCALING_ONLY = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
_RAY_OWN = {"CPU": "--cpus_per_worker", "GPU": "--gpus_per_worker"}
TARGET_SHARE = 0.8
"""Autoscaling aims at this share of a batching worker's concurrency, so it gets help before it is full;
a worker that takes one request at a time aims at that one (a single steady chat keeps a single worker)."""
SHUTDOWN_MARGIN_S = 5.0


def check_flags(flags: DeployFlags) -> tuple[int | None, int | None]:
    """The (min, max) range the flags ask for, or (None, None) for a fixed count; bad mixes refused."""
    given = flags.model_fields_set
    ranged = [name for name in ("min_workers", "max_workers") if name in given]
    if ranged and "num_workers" in given:
        raise SpecError(f"--{ranged[0]} with --num_workers: --min_workers/--max_workers let the load set the "
                        f"count, --num_workers fixes it; give one or the other")
    if not ranged:
        extra = [name for name in _AUTOSCALING_ONLY if name in given]
        if extra:
            raise SpecError(f"--{extra[0]} applies only to autoscaling: add --min_workers N --max_workers M")
        return None, None
    if flags.max_workers is None:
        raise SpecError(f"--min_workers {flags.min_workers} needs --max_workers, the most workers autoscaling may "
                        f"start (1 to {MAX_WORKERS})")
    low = 1 if flags.min_workers is None else flags.min_workers
    if low > flags.max_workers:
        raise SpecError(f"--min_workers {low} is more than --max_workers {flags.max_workers}: the range needs "
                        f"min <= max")
    return low, flags.max_workers


def check_resources(resources: dict[str, float]) -> None:
    """Custom resources only: CPUs and GPUs have flags of their own."""
    for name, amount in resources.items():
        if name in _RAY_OWN:
            raise SpecError(f"--resources {name}={amount:g}: ask for {name}s with {_RAY_OWN[name]} {amount:g}, "
                            f"--resources is for custom resources")
        if amount <= 0:
            raise SpecError(f"--resources {name}={amount:g}: an amount must be more than 0")


def autoscaling_config(spec: DeploySpec) -> dict[str, Any] | None:
    """Serve's autoscaling_config for a ranged spec, None for a fixed count.

    A deploy starts at least one worker even when the range starts at 0, so a
    bad key or model fails the deploy instead of the first chat; Serve then
    scales to zero once the deployment has been idle for `downscale_delay_s`.
    """
    if spec.max_workers is None:
        return None
    target = spec.target_ongoing_requests or max(TARGET_SHARE * spec.worker_concurrency, 1.0)
    return {
        "min_replicas": spec.min_workers,
        "initial_replicas": max(spec.min_workers or 0, 1),
        "max_replicas": spec.max_workers,
        "target_ongoing_requests": target,
        "upscale_delay_s": spec.upscale_delay_s,
        "downscale_delay_s": spec.downscale_delay_s,
    }


def first_workers(spec: DeploySpec) -> int:
    """Workers a deploy waits for: the fixed count, or the autoscaler's first ones."""
    config = autoscaling_config(spec)
    return spec.num_workers if config is None else config["initial_replicas"]


def shutdown_timeout(spec: DeploySpec) -> float:
    """Seconds a worker being removed may take to finish what it holds: its backend's longest request, and a margin."""
    longest = spec.backend_class.longest_request_s(spec.params)
    return longest + SHUTDOWN_MARGIN_S if longest else spec.deploy_timeout


def parse_target(text: str) -> int | tuple[int, int]:
    """`%byzer_scale`'s count: `3` fixes it at 3, `2..6` lets autoscaling keep it between 2 and 6."""
    found = _RANGE.match(text)
    if found:
        low, high = int(found.group(1)), int(found.group(2))
        if not 1 <= high <= MAX_WORKERS or low > high:
            raise SpecError(f"cannot scale to {text}: a range is MIN..MAX with 0 <= MIN <= MAX, MAX from 1 to "
                            f"{MAX_WORKERS}")
        return low, high
    try:
        return int(text)
    except ValueError:
        pass
    raise SpecError(f"cannot scale to {text!r}: give a count (3) or a range for autoscaling (2..6)")


def describe_target(target: int | tuple[int, int]) -> str:
    return f"{target[0]}..{target[1]}" if isinstance(target, tuple) else str(target)
