"""The status card as a Python object (as ipywidgets tests its own), then driving a real deployment."""
from __future__ import annotations

import json
import threading

from byzer_magic.serving import deploy
from byzer_magic.serving.status import DeploymentStatus
from byzer_magic.frontends.widgets import StatusCard

from .conftest import alive_replicas, wait_until
from .test_deploy_saas import saas_spec

DETAILS = {"backend": "saas", "model": "tiny", "pretrained_model_type": "saas/openai", "worker_concurrency": 1,
           "cpus_per_worker": 0.001, "gpus_per_worker": 0, "base_url": "http://127.0.0.1:1/v1",
           "infer_params": {"saas.api_key": "***", "saas.model": "tiny"}}


def card_state(card: StatusCard) -> str:
    return json.dumps([w.get_state() for w in (card.title, card.body, card.error, card.plus, card.minus,
                                                 card.stop_button)], default=str)


def test_buttons_follow_the_state():
    noop_scale = deploy.scale
    card = StatusCard(DeploymentStatus("c", "ready", 1, 1, "", DETAILS), scale=noop_scale, stop=deploy.undeploy)
    assert (card.plus.disabled, card.minus.disabled, card.stop_button.disabled) == (False, True, False)
    card.refresh(DeploymentStatus("c", "ready", 3, 3, "", DETAILS))
    assert not card.minus.disabled
    card.refresh(DeploymentStatus("c", "degraded", 2, 3, "HEALTH_CHECK_FAILED", DETAILS))
    assert "HEALTH_CHECK_FAILED" in card.error.value and "degraded" in card.title.value
    card.refresh(DeploymentStatus("c", "failed", 0, 2, "saas (HTTP 401): bad key", DETAILS))
    assert "401" in card.error.value
    assert card.plus.disabled and card.minus.disabled and card.stop_button.disabled
    card.refresh(DeploymentStatus("c", "stopped", 0, 0, "", DETAILS))
    assert card.plus.disabled and card.minus.disabled and card.stop_button.disabled


def test_a_card_without_actions_offers_no_buttons():
    card = StatusCard(DeploymentStatus("c", "ready", 2, 2, "", DETAILS))
    assert card.plus.disabled and card.minus.disabled and card.stop_button.disabled


def test_the_card_shows_what_matters_and_never_a_key():
    card = StatusCard(DeploymentStatus("c", "ready", 2, 2, "", DETAILS))
    state = card_state(card)
    for needle in ("2 ready / 2 wanted", "saas/openai", "tiny", "127.0.0.1:1"):
        assert needle in state
    assert "api_key" not in state


def test_plus_minus_and_stop_drive_a_real_deployment(ray_head, clean_server):
    status = deploy.deploy(saas_spec(clean_server, "carded", 1))
    card = StatusCard(status, fetch=deploy.status, scale=deploy.scale, stop=deploy.undeploy, interval=0.2)
    card.start_updates()
    try:
        card.plus.click()
        assert card.plus.disabled, "no second click while a change is in flight"
        wait_until(lambda: card.status.workers_ready == 2 and not card.plus.disabled, 60, "a second worker")
        assert len(alive_replicas("carded")) == 2
        card.minus.click()
        wait_until(lambda: card.status.workers_wanted == 1 and card.status.state == "ready", 60, "back to one")
        card.stop_button.click()
        wait_until(lambda: card.status.state == "stopped", 60, "the card to show stopped")
        assert card.plus.disabled and card.minus.disabled and card.stop_button.disabled
        assert deploy.status("carded").state == "stopped"
        wait_until(lambda: alive_replicas("carded") == [], 60, "the workers to go")
    finally:
        card.close()
        if deploy.status("carded").state != "stopped":
            deploy.undeploy("carded")
    assert not [t for t in threading.enumerate() if t.name == "byzer-card-carded" and t.is_alive()]


def test_the_card_counts_requests_tokens_latency_and_the_last_error(ray_head, clean_server):
    from byzer_magic.serving import chat
    from byzer_magic.backends.base import GenParams
    from byzer_magic.errors import BackendError

    deploy.deploy(saas_spec(clean_server, "metered", 2, "saas.max_retries=0"))
    card = StatusCard(deploy.status("metered"), fetch=lambda n: deploy.status(n, with_metrics=True), interval=0.2)
    card.start_updates()
    try:
        for i in range(3):
            chat.chat("metered", f"question {i}", GenParams(temperature=0, max_tokens=5))
        clean_server.control(fail_next=1, fail_status=500)
        try:
            chat.chat("metered", "this one fails", GenParams(max_tokens=5))
        except BackendError:
            pass
        wait_until(lambda: card.status.metrics.get("served") == 3 and card.status.metrics.get("errors") == 1,
                   30, "the workers' figures on the card")
        m = card.status.metrics
        assert m["in_flight"] == 0 and m["tokens_per_s"] == 15 / 60 and 0 < m["median_latency_s"] < 5
        assert "injected failure 500" in m["last_error"]
        state = card_state(card)
        assert "3 served" in state and "1 failed" in state and "0.2 tokens/s" in state
        assert "injected failure 500" in state
        assert "3 served" in repr(deploy.status("metered", with_metrics=True))
    finally:
        card.close()
        deploy.undeploy("metered")


def test_the_card_counts_requests_queued_in_callers(ray_head, clean_server):
    """One worker that takes one request at a time, six callers: five wait in Serve's queue, and the card says so."""
    from concurrent.futures import ThreadPoolExecutor

    from byzer_magic.serving import chat
    from byzer_magic.backends.base import GenParams

    deploy.deploy(saas_spec(clean_server, "queueing", 1))
    clean_server.control(delay=1.5)
    card = StatusCard(deploy.status("queueing"), fetch=lambda n: deploy.status(n, with_metrics=True), interval=0.2)
    card.start_updates()
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(chat.chat, "queueing", f"q{i}", GenParams(max_tokens=2)) for i in range(6)]
            # The first request is counted as queued by its caller until the worker takes it, so wait for a
            # snapshot where the worker holds one and the rest wait; the worker never holds more than one.
            seen = []

            def one_held_rest_queued() -> bool:
                m = card.status.metrics
                seen.append(m.get("in_flight", 0))
                return m.get("queued", 0) >= 3 and m.get("in_flight") == 1

            wait_until(one_held_rest_queued, 20, "one request in flight and the rest queued on the card")
            assert "queued" in card_state(card)
            assert max(seen) == 1
            for answer in answers:
                answer.result(60)
        wait_until(lambda: card.status.metrics.get("queued") == 0 and card.status.metrics.get("served") == 6,
                   20, "the queue to drain on the card")
    finally:
        card.close()
        clean_server.control(delay=0)
        deploy.undeploy("queueing")


def test_re_running_list_leaves_one_polling_card_per_deployment(ray_head, clean_server, shell):
    """A re-run cell draws new cards; the earlier card of the same deployment stops polling."""
    import time

    from byzer_magic.frontends.magics import ByzerMagics

    deploy.deploy(saas_spec(clean_server, "card_rerun", 1))
    try:
        magics = next(c for c in shell.configurables if isinstance(c, ByzerMagics))
        row = deploy.status("card_rerun")
        cards = [magics._card(row) for _ in range(5)]
        for card in cards:
            card.start_updates()
        time.sleep(0.2)
        polling = [t for t in threading.enumerate() if t.name == "byzer-card-card_rerun" and t.is_alive()]
        assert len(polling) == 1
        assert cards[-1]._thread in polling
    finally:
        for card in cards:
            card.stop_updates()
        deploy.undeploy("card_rerun")

