"""A deployment's state as plain data, so cards and tables render it without Ray."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(str, Enum):
    """What a deployment (or the endpoint) is doing, as printed: compares equal to its word, prints as it.

    The endpoint has two states of its own (starting, running); a worker's state is Serve's, lower-cased.
    """

    DEPLOYING = "deploying"
    READY = "ready"
    SCALING = "scaling"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


SERVING = (State.READY, State.DEGRADED, State.SCALING)
"""States in which a deployment answers requests, so its request figures are worth showing."""


@dataclass(frozen=True)
class DeploymentStatus:
    """What a user wants to know about one deployment at a glance."""

    name: str
    state: State
    workers_ready: int = 0
    workers_wanted: int = 0
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    """Serve's state of each worker, and `metrics.combine` of their request figures."""
    nodes: tuple[str, ...] = ()
    """The node each worker sits on, in the order of `workers`."""
    min_workers: int | None = None
    max_workers: int | None = None
    """The autoscaling range; None for a fixed count."""

    def range_text(self) -> str:
        """`1..4` while autoscaling, else the fixed count."""
        return f"{self.min_workers}..{self.max_workers}" if self.max_workers is not None else str(self.workers_wanted)

    def workers_text(self) -> str:
        """"2/3 workers", or "autoscaling 1..4, now 3" (", going to 4" while a scale runs)."""
        if self.max_workers is None:
            return f"{self.workers_ready}/{self.workers_wanted} workers"
        text = f"autoscaling {self.range_text()}, now {self.workers_ready}"
        return text + (f", going to {self.workers_wanted}" if self.workers_wanted != self.workers_ready else "")

    def placement(self) -> str:
        """Workers per node, "3f2a1b4c (10.0.0.5): 2, 9b0e77aa (10.0.0.6): 1"; '' before any is placed."""
        counts: dict[str, int] = {}
        for node in self.nodes:
            if node and node != "?":
                counts[node] = counts.get(node, 0) + 1
        return ", ".join(f"{node}: {count}" for node, count in counts.items())

    def activity(self) -> str:
        """Requests at a glance: served, in flight, queued, tokens/s and median latency over the last minute."""
        m = self.metrics
        if not m:
            return "no figures yet (workers report them on each health check)"
        limit = int(self.details.get("worker_concurrency") or 1) * max(self.workers_ready, 1)
        parts = [f"{m['served']} served", f"{m['in_flight']} in flight (of {limit})", f"{m.get('queued', 0)} queued",
                 f"{m['errors']} failed"]
        if m.get("median_latency_s") is not None:
            parts.append(f"last minute: {m['tokens_per_s']:.1f} tokens/s, median {m['median_latency_s'] * 1e3:.0f} ms")
        return ", ".join(parts)

    @property
    def backend(self) -> str:
        return str(self.details.get("backend") or "?")

    @property
    def model(self) -> str:
        return str(self.details.get("model") or "?")

    def line(self) -> str:
        text = f"{self.name}: {self.state}, {self.workers_text()}, {self.backend} {self.model}"
        return f"{text} ({self.message})" if self.message and self.state != State.READY else text

    def __repr__(self) -> str:
        """The line, then the request figures when they were read (a scale's answer has none)."""
        text = self.line()
        if self.placement():
            text += f"\n  workers on nodes: {self.placement()}"
        if self.metrics and self.state in SERVING:
            text += f"\n  requests: {self.activity()}"
            if self.metrics.get("last_error"):
                text += f"\n  last error: {self.metrics['last_error']}"
        return text

    __str__ = line


@dataclass(frozen=True)
class StatusTable:
    """Several statuses; prints as text in a terminal and as a table in a notebook."""

    rows: tuple[DeploymentStatus, ...]

    def __repr__(self) -> str:
        if not self.rows:
            return "no deployments on this cluster"
        return "\n".join(row.line() for row in self.rows)

    def _repr_html_(self) -> str:
        from html import escape

        if not self.rows:
            return "<p>no deployments on this cluster</p>"
        head = "".join(f"<th>{h}</th>" for h in ("name", "state", "workers", "backend", "model", "message"))
        body = "".join(
            "<tr>" + "".join(
                f"<td>{escape(str(c))}</td>"
                for c in (r.name, r.state, r.workers_text(), r.backend, r.model, r.message)
            ) + "</tr>"
            for r in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
