"""The picture of a bench: throughput against concurrency, and latency at each level.

Plain matplotlib (its object API, no pyplot state), so a notebook shows the
figure once and a script can save it. Several deployments' results (rows of
one DataFrame, or several DataFrames) share one figure, one colour each, to
compare two backends at a glance.
"""
from __future__ import annotations

from typing import Any

_LATENCIES = (("ttft", "time to first token"), ("itl", "inter-token"), ("e2e", "end to end"))


def figure(results: Any) -> Any:
    """A matplotlib Figure of one or more bench results (DataFrames from `bench.run`)."""
    import pandas as pd
    from matplotlib.figure import Figure

    frame = pd.concat(list(results), ignore_index=True) if isinstance(results, (list, tuple)) else results
    fig = Figure(figsize=(11, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    throughput = "texts_per_s" if "texts_per_s" in frame else "output_tokens_per_s"
    for (name, via), rows in frame.groupby(["deployment", "via"], sort=False):
        label = f"{name} ({via})"
        left.plot(rows["concurrency"], rows[throughput], marker="o", label=label)
        _latency(right, rows, label)
    left.set(xscale="log", xlabel="concurrency (requests in flight)",
             ylabel="texts/s" if throughput == "texts_per_s" else "output tokens/s", title="throughput")
    left.set_xticks(sorted(frame["concurrency"].unique()), labels=[str(c) for c in sorted(frame["concurrency"].unique())])
    left.legend(fontsize="small")
    right.set(xscale="log", yscale="log", xlabel="concurrency (requests in flight)", ylabel="ms",
              title="latency: p50 (solid) and p99 (dashed)")
    right.set_xticks(sorted(frame["concurrency"].unique()), labels=[str(c) for c in sorted(frame["concurrency"].unique())])
    right.legend(fontsize="small")
    return fig


def _latency(axes: Any, rows: Any, label: str) -> None:
    for key, words in _LATENCIES:
        if f"{key}_p50_ms" not in rows or rows[f"{key}_p50_ms"].isna().all():
            continue
        line, = axes.plot(rows["concurrency"], rows[f"{key}_p50_ms"], marker="o", label=f"{label}: {words}")
        axes.plot(rows["concurrency"], rows[f"{key}_p99_ms"], linestyle="--", color=line.get_color())


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, for a notebook's output or a file."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


class Plot:
    """A bench figure that a notebook shows as a picture whatever its matplotlib backend; `.figure` to change it."""

    def __init__(self, *results: Any):
        self.figure = figure(list(results))
        self._shown = [f"{r['deployment'].iloc[0]} ({r['via'].iloc[0]})" for r in results if len(r)]

    def __repr__(self) -> str:
        return f"bench figure: {', '.join(self._shown)}"

    def _repr_png_(self) -> bytes:
        return png(self.figure)

    def save(self, path: str) -> None:
        self.figure.savefig(path)


def plot(*results: Any) -> Plot:
    """One figure of one or more bench results: `plot(vllm_result, llama_result)` compares two deployments."""
    return Plot(*results)
