"""A deployment's state as plain data, so cards and tables render it without Ray."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATES = ("deploying", "ready", "degraded", "failed", "stopped")


@dataclass(frozen=True)
class DeploymentStatus:
    """What a user wants to know about one deployment at a glance."""

    name: str
    state: str
    workers_ready: int = 0
    workers_wanted: int = 0
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return str(self.details.get("backend") or "?")

    @property
    def model(self) -> str:
        return str(self.details.get("model") or "?")

    def line(self) -> str:
        text = (
            f"{self.name}: {self.state}, {self.workers_ready}/{self.workers_wanted} workers, "
            f"{self.backend} {self.model}"
        )
        return f"{text} ({self.message})" if self.message and self.state != "ready" else text

    __str__ = __repr__ = line


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
                for c in (r.name, r.state, f"{r.workers_ready}/{r.workers_wanted}", r.backend, r.model, r.message)
            ) + "</tr>"
            for r in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
