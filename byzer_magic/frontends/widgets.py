"""The live status card: one deployment at a glance, with +, - and Stop.

The card knows nothing of Ray: `refresh(status)` draws a plain
DeploymentStatus, and the actions it runs (fetch, scale, stop) are functions
handed in by the front end, so it is tested as a Python object.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from html import escape
from typing import Callable

import ipywidgets as widgets

from ..serving.status import SERVING, DeploymentStatus, State

Fetch = Callable[[str], DeploymentStatus]
Scale = Callable[[str, "int | tuple[int, int]"], DeploymentStatus]
Stop = Callable[[str], None]

_COLORS = {
    State.READY: "var(--jp-success-color1, #1a7f37)",
    State.DEPLOYING: "var(--jp-warn-color1, #9a6700)",
    State.SCALING: "var(--jp-warn-color1, #9a6700)",
    State.DEGRADED: "var(--jp-warn-color0, #bc4c00)",
    State.FAILED: "var(--jp-error-color1, #cf222e)",
    State.STOPPED: "var(--jp-ui-font-color2, #6e7781)",
}
"""JupyterLab's (and Notebook 7's) theme colours, so a state stays readable in dark themes; hex elsewhere."""


class StatusCard(widgets.VBox):
    """A deployment's card; updates itself every `interval` seconds once started."""

    def __init__(
        self,
        status: DeploymentStatus,
        *,
        fetch: Fetch | None = None,
        scale: Scale | None = None,
        stop: Stop | None = None,
        interval: float = 2.0,
        address: str = "",
    ):
        self._name = status.name
        self.address = address
        self._fetch, self._scale, self._stop_fn = fetch, scale, stop
        self._interval = interval
        self._busy = False
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = DeploymentStatus(status.name, status.state)
        self.title = widgets.HTML()
        self.body = widgets.HTML()
        self.error = widgets.HTML()
        self.minus = widgets.Button(description="-", tooltip="one worker less", layout=widgets.Layout(width="3em"))
        self.plus = widgets.Button(description="+", tooltip="one worker more", layout=widgets.Layout(width="3em"))
        self.stop_button = widgets.Button(description="Stop", button_style="danger", tooltip="undeploy")
        self.minus.on_click(lambda _: self._act(lambda: self._scale(self._name, self._step(-1))))
        self.plus.on_click(lambda _: self._act(lambda: self._scale(self._name, self._step(+1))))
        self.stop_button.on_click(lambda _: self._act(self._stop))
        buttons = widgets.HBox([self.minus, self.plus, self.stop_button])
        super().__init__(
            [self.title, self.body, self.error, buttons],
            layout=widgets.Layout(border="1px solid var(--jp-border-color1, #d0d7de)", padding="6px", width="fit-content"),
        )
        self.refresh(status)

    def _step(self, by: int) -> int | tuple[int, int]:
        """One worker more or less; while autoscaling, the range's top moves (the bottom follows it down)."""
        status = self.status
        if status.max_workers is None:
            return status.workers_wanted + by
        top = status.max_workers + by
        return min(status.min_workers or 0, top), top

    def refresh(self, status: DeploymentStatus) -> None:
        """Draw a status; buttons follow the state (and stay off while an action runs).

        A status without request figures (a scale's answer) keeps the last ones
        drawn, so they do not blink away until the next update brings them.
        """
        if not status.metrics and self.status.metrics and status.state != State.STOPPED:
            status = replace(status, metrics=self.status.metrics)
        self.status = status
        color = _COLORS.get(status.state, _COLORS[State.STOPPED])
        self.title.value = (
            f"<b>{escape(status.name)}</b> &nbsp;<span style='color:{color}'>&#9679; {status.state}</span>"
        )
        details = status.details
        if status.max_workers is None:
            workers = f"{status.workers_ready} ready / {status.workers_wanted} wanted"
        else:
            workers = status.workers_text()
        if status.workers and any(w != "running" for w in status.workers):
            workers += " (" + ", ".join(status.workers) + ")"
        rows = [("workers", workers)]
        if status.state == State.SCALING and status.message:
            rows.append(("scaling", status.message))
        if status.placement():
            rows.append(("on nodes", status.placement()))
        rows += [
            ("backend", f"{details.get('backend') or '?'} ({details.get('pretrained_model_type') or '?'})"),
            ("model", details.get("model") or "?"),
            ("per worker", f"{details.get('worker_concurrency', '?')} at once, "
                           f"{details.get('cpus_per_worker', '?')} CPU, {details.get('gpus_per_worker', '?')} GPU"
                           + "".join(f", {v:g} {k}" for k, v in (details.get("resources") or {}).items())),
        ]
        if details.get("base_url"):
            rows.append(("endpoint", details["base_url"]))
        if self.address:
            rows.append(("ray", self.address))
        if status.state in SERVING:
            rows.append(("requests", status.activity()))
        if status.metrics.get("last_error"):
            rows.append(("last error", status.metrics["last_error"]))
        self.body.value = "<table>" + "".join(
            f"<tr><td style='padding-right:1em;opacity:.7'>{k}</td><td>{escape(str(v))}</td></tr>" for k, v in rows
        ) + "</table>"
        self.error.value = (
            f"<span style='color:{_COLORS['failed']}'>{escape(status.message)}</span>"
            if status.message and status.state in (State.FAILED, State.DEGRADED) else ""
        )
        live = status.state not in (State.STOPPED, State.FAILED) and not self._busy
        self.plus.disabled = not (live and self._scale)
        smallest = status.workers_wanted if status.max_workers is None else status.max_workers
        self.minus.disabled = not (live and self._scale and smallest > 1)
        self.stop_button.disabled = not (live and self._stop_fn)

    def _act(self, action: Callable[[], DeploymentStatus | None]) -> None:
        """Run a button's action off the kernel's thread; the card shows its outcome."""
        self._busy = True
        self.refresh(self.status)

        def run() -> None:
            try:
                result = action()
                self._busy = False
                self.refresh(result if isinstance(result, DeploymentStatus) else self.status)
            except Exception as exc:  # noqa: BLE001 - whatever failed is shown on the card
                self._busy = False
                self.refresh(self.status)
                self.error.value = f"<span style='color:{_COLORS['failed']}'>{escape(str(exc))}</span>"

        threading.Thread(target=run, name=f"byzer-card-{self._name}", daemon=True).start()

    def _stop(self) -> DeploymentStatus:
        self._stop_fn(self._name)
        self._closed.set()
        return DeploymentStatus(self._name, State.STOPPED, 0, 0, "", self.status.details)

    def start_updates(self) -> None:
        """Poll the cluster until the deployment is gone or the card is closed."""
        if self._fetch is None or self._thread is not None:
            return

        def loop() -> None:
            while not self._closed.wait(self._interval):
                if self._busy:
                    continue
                try:
                    status = self._fetch(self._name)
                except Exception:  # noqa: BLE001 - a lost cluster shows as stopped, not as a dead thread
                    status = DeploymentStatus(self._name, State.STOPPED, 0, 0, "cannot reach the cluster", self.status.details)
                if status != self.status:
                    self.refresh(status)
                if status.state == State.STOPPED:
                    break

        self._thread = threading.Thread(target=loop, name=f"byzer-card-{self._name}", daemon=True)
        self._thread.start()

    def stop_updates(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self._interval + 5)

    def close(self) -> None:
        self.stop_updates()
        super().close()
