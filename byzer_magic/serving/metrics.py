"""Per-worker request figures, and how they reach a status card.

A worker keeps a `RequestLog` and, on each of Serve's health checks (every
2 s), writes its summary to Ray's GCS key-value store under its replica id.
Any process on the cluster reads them back for the replicas that are alive,
so a card in a new kernel shows what the workers did before it started.
The queue itself lives in each caller's Serve router, where no worker sees
it; so each caller (a kernel, the OpenAI endpoint) also publishes how many
requests it has outstanding per deployment, and "queued" is what callers
have outstanding beyond what the workers hold in flight.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from . import raydoor

WINDOW_S = 60.0
CALLER_FRESH_S = 5.0
"""A caller's count older than this is from a caller that went away."""


@dataclass
class Tally:
    """Tokens one request produced, filled in while it runs."""

    tokens: int = 0


class RequestLog:
    """What one worker answered: totals, and the last minute's latency and tokens."""

    def __init__(self) -> None:
        self.served = 0
        self.errors = 0
        self.in_flight = 0
        self.last_error = ""
        self._recent: deque[tuple[float, float, int]] = deque()

    @contextlib.contextmanager
    def request(self) -> Iterator[Tally]:
        """Count one request from start to end; the caller adds its tokens to the tally as they go.

        An exception is a failed request; a stream closed early (GeneratorExit,
        cancellation) is not an error and counts as served.
        """
        self.in_flight += 1
        since, tally = time.monotonic(), Tally()
        error: BaseException | None = None
        try:
            yield tally
        except Exception as exc:
            error = exc
            raise
        finally:
            self._finished(since, tally.tokens, error)

    def _finished(self, since: float, tokens: int, error: BaseException | None) -> None:
        self.in_flight -= 1
        now = time.monotonic()
        if error is None:
            self.served += 1
            self._recent.append((now, now - since, tokens))
        else:
            self.errors += 1
            self.last_error = str(error)[:300]
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def summary(self) -> dict[str, Any]:
        self._trim(time.monotonic())
        latencies = [r[1] for r in self._recent]
        return {
            "served": self.served,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "last_error": self.last_error,
            "minute_tokens": sum(r[2] for r in self._recent),
            "minute_latencies": sorted(latencies)[-200:],
        }


def _key(app: str, replica: str) -> str:
    return f"stats/{app}/{replica}"


def publish(app: str, replica: str, summary: dict[str, Any]) -> None:
    raydoor.kv_put(_key(app, replica), json.dumps(summary))


def forget(app: str, replica: str) -> None:
    raydoor.kv_del(_key(app, replica))


def read(app: str, replicas: Iterable[str]) -> list[dict[str, Any]]:
    """The latest summary of each named replica that has published one."""
    found = []
    for replica in replicas:
        raw = raydoor.kv_get(_key(app, replica))
        if raw:
            found.append(json.loads(raw))
    return found


def _context_key(app: str) -> str:
    return f"context/{app}"


def publish_context(app: str, tokens: int | None) -> None:
    """A deployment's context length, as its workers know it once started (for /v1/models' max_model_len)."""
    raydoor.kv_put(_context_key(app), json.dumps({"context_length": tokens}))


def read_context(app: str) -> int | None:
    """The context length a deployment's workers published; None before one started, or where unknown (SaaS)."""
    raw = raydoor.kv_get(_context_key(app))
    return json.loads(raw).get("context_length") if raw else None


def _caller_key(app: str, caller: str) -> str:
    return f"callers/{app}/{caller}"


def publish_outstanding(caller: str, counts: dict[str, int]) -> None:
    """A caller's requests sent and not yet answered, per deployment; a count of 0 removes its key."""
    for app, count in counts.items():
        if count > 0:
            raydoor.kv_put(_caller_key(app, caller), json.dumps({"outstanding": count, "at": time.time()}))
        else:
            raydoor.kv_del(_caller_key(app, caller))


def read_outstanding(app: str) -> int:
    """Requests every live caller has outstanding to one deployment, in workers or in its queue."""
    total, now = 0, time.time()
    for key in raydoor.kv_keys(_caller_key(app, "")):
        raw = raydoor.kv_get(key)
        if raw:
            entry = json.loads(raw)
            if now - entry.get("at", 0) < CALLER_FRESH_S:
                total += int(entry.get("outstanding", 0))
    return total


def combine(summaries: list[dict[str, Any]], outstanding: int = 0) -> dict[str, Any]:
    """One deployment's figures from its workers' summaries and its callers' outstanding requests."""
    if not summaries:
        return {}
    in_flight = sum(s.get("in_flight", 0) for s in summaries)
    latencies = [x for s in summaries for x in s.get("minute_latencies", [])]
    errors = [s["last_error"] for s in summaries if s.get("last_error")]
    return {
        "served": sum(s.get("served", 0) for s in summaries),
        "errors": sum(s.get("errors", 0) for s in summaries),
        "in_flight": in_flight,
        "queued": max(0, outstanding - in_flight),
        "tokens_per_s": sum(s.get("minute_tokens", 0) for s in summaries) / WINDOW_S,
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "last_error": errors[-1] if errors else "",
        "largest_worker_bytes": max((s.get("rss_bytes", 0) for s in summaries), default=0),
    }
