"""Faults from the provider and from Ray: retried within a bound, or a readable error; none hangs."""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from byzer_magic.serving import chat, deploy
from byzer_magic.backends.base import GenParams
from byzer_magic.errors import BackendError

from .conftest import alive_replicas, wait_until
from .test_deploy_saas import saas_spec

SHORT = GenParams(temperature=0, max_tokens=4)


@pytest.fixture
def one_worker(ray_head, clean_server, request):
    name = "fault_" + re.sub(r"\W", "_", request.node.name[5:])[-40:]
    deploy.deploy(saas_spec(clean_server, name, 1, extra="saas.max_retries=2 saas.timeout=2"))
    yield name
    deploy.undeploy(name)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_provider_errors_are_retried_then_succeed(one_worker, clean_server, status):
    clean_server.control(fail_next=2, fail_status=status, reset=True)
    started = time.monotonic()
    assert chat.chat(one_worker, "hi", SHORT).text
    assert clean_server.stats()["requests"] == 3, "two failures, then the answer"
    assert 0.2 < time.monotonic() - started < 20, "retried with backoff, within a bound"


def test_persistent_5xx_gives_up_with_the_status_and_the_provider_message(one_worker, clean_server):
    clean_server.control(fail_next=100, fail_status=503, reset=True)
    with pytest.raises(BackendError) as info:
        chat.chat(one_worker, "hi", SHORT)
    assert info.value.status_code == 503 and "injected failure 503" in str(info.value)
    assert clean_server.stats()["requests"] == 3, "the first try and saas.max_retries=2 retries"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(one_worker, clean_server, status):
    clean_server.control(fail_next=100, fail_status=status, reset=True)
    with pytest.raises(BackendError) as info:
        chat.chat(one_worker, "hi", SHORT)
    assert info.value.status_code == status
    assert clean_server.stats()["requests"] == 1


def test_a_hanging_endpoint_times_out_after_saas_timeout(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "hanging", 1, extra="saas.timeout=1 saas.max_retries=0"))
    try:
        clean_server.control(delay=30)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"no answer within 1 s \(saas.timeout\)"):
            chat.chat("hanging", "hi", SHORT)
        assert time.monotonic() - started < 10
    finally:
        clean_server.control(delay=0)
        deploy.undeploy("hanging")


def test_a_drip_fed_answer_is_cut_at_saas_timeout_and_reaches_the_provider_once(ray_head, clean_server):
    """saas.timeout bounds the whole request, not each read, and a timed-out request is not sent again."""
    deploy.deploy(saas_spec(clean_server, "dripping", 1, extra="saas.timeout=2"))
    try:
        clean_server.control(chunk_delay=0.4, reset=True)
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"no answer within 2 s \(saas.timeout\)"):
            chat.chat("dripping", "hi", GenParams(temperature=0, max_tokens=64))
        assert time.monotonic() - started < 3
        assert clean_server.stats()["requests"] == 1
    finally:
        clean_server.control(chunk_delay=0)
        deploy.undeploy("dripping")


def _replica_pids(name: str) -> list[int]:
    return [a.pid for a in alive_replicas(name) if a.pid]


def test_a_killed_worker_is_replaced_and_no_request_hangs(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "victim", 2))
    seen: set[str] = set()
    stop = threading.Event()
    try:
        clean_server.control(delay=1.0)
        pids = _replica_pids("victim")
        assert len(pids) == 2

        def watch() -> None:
            while not stop.is_set():
                seen.add(deploy.status("victim").state)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(chat.chat, "victim", f"q{i}", SHORT) for i in range(6)]
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGKILL)
            watcher.start()
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result(timeout=60).text)
                except BackendError as exc:
                    outcomes.append(exc)
        failed = [o for o in outcomes if isinstance(o, BackendError)]
        assert len(outcomes) == 6, "every request came back, none hangs"
        assert all("worker died" in str(e) for e in failed), failed
        assert len(failed) < 6
        clean_server.control(delay=0)
        wait_until(lambda: "degraded" in seen, 30, "a degraded status")
        wait_until(lambda: deploy.status("victim").workers_ready == 2 and pids[0] not in _replica_pids("victim")
                   and len(_replica_pids("victim")) == 2, 60, "a replacement worker")
        assert chat.chat("victim", "after", SHORT).text
    finally:
        stop.set()
        clean_server.control(delay=0)
        deploy.undeploy("victim")


def test_a_stream_cut_by_a_dying_worker_ends_with_an_error(ray_head, clean_server):
    deploy.deploy(saas_spec(clean_server, "cut_stream", 1))
    try:
        clean_server.control(chunk_delay=0.2)
        pid = _replica_pids("cut_stream")[0]
        pieces = []
        with pytest.raises(BackendError, match="worker died"):
            for delta in chat.stream("cut_stream", chat.messages_for("tell me more"), GenParams(max_tokens=40)):
                pieces.append(delta.text)
                if len(pieces) == 2:
                    os.kill(pid, signal.SIGKILL)
        assert 2 <= len(pieces) < 40
    finally:
        clean_server.control(chunk_delay=0)
        deploy.undeploy("cut_stream")
