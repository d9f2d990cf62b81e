"""Autoscaling on the session's cluster: Serve follows the load between the bounds, down to zero and back.

The provider is the fake one with a fixed delay and a canned answer, so the
load is waiting, not CPU, and four workers are visibly busier than one.
Delays are small here (Serve's defaults are 30 s up and 600 s down); Serve
still averages the load over its 30 s look-back window, which sets how long
a scale-down takes once the load stops.
"""
from __future__ import annotations

import threading
import time

import pytest

from byzer_magic.serving import chat as chat_api
from byzer_magic.serving import deploy as deploy_api
from byzer_magic.spec.deploy_spec import parse_args

from .conftest import wait_until

RANGE_SCALE_S = 90


def _spec(server, name: str, *flags: str):
    return parse_args(["--model", name, "--pretrained_model_type", "saas/openai", "--infer_params", "saas.api_key=sk-x",
                       "saas.model=tiny", f"saas.base_url={server.base_url}", "saas.timeout=20", *flags])


class Load:
    """`streams` chat loops until stopped; every answer and every failure is kept."""

    def __init__(self, name: str, streams: int):
        self.name, self.answers, self.failures = name, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(streams)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                assert chat_api.chat(self.name, "hi").text == "ok"
                self.answers += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a lost chat, asserted below
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


@pytest.fixture
def slow_provider(clean_server):
    clean_server.control(delay=1.0, short_circuit=True)
    return clean_server


def test_one_to_four_follows_the_load_up_and_back_down_without_losing_a_chat(ray_head, slow_provider):
    spec = _spec(slow_provider, "auto14", "--min_workers", "1", "--max_workers", "4", "--upscale_delay_s", "0.5",
                 "--downscale_delay_s", "2")
    ready = deploy_api.deploy(spec)
    assert (ready.min_workers, ready.max_workers, ready.workers_ready) == (1, 4, 1)
    assert "autoscaling 1..4, now 1" in ready.line()
    started = time.monotonic()
    heavy, steady = Load("auto14", 7), Load("auto14", 1)
    try:
        seen = []
        wait_until(lambda: seen.append(deploy_api.status("auto14")) or seen[-1].workers_ready == 4, RANGE_SCALE_S,
                   "four workers under load")
        up_s = time.monotonic() - started
        assert any(s.state == "scaling" and "scaling up" in s.message for s in seen), [s.line() for s in seen]
        assert not any(s.state == "degraded" for s in seen), [s.line() for s in seen]
        heavy.stop()
        stopped = time.monotonic()
        # One chat at a time goes on while Serve removes three workers: none of its chats may fail.
        wait_until(lambda: seen.append(deploy_api.status("auto14")) or seen[-1].workers_ready == 1 == len(
            seen[-1].workers), RANGE_SCALE_S, "back to one worker when the load is gone")
        down_s = time.monotonic() - stopped
        assert any("scaling down" in s.message for s in seen), [s.line() for s in seen]
    finally:
        heavy.stop()
        steady.stop()
        deploy_api.undeploy("auto14")
    assert heavy.failures == [] and steady.failures == []
    assert heavy.answers > 20 and steady.answers > 5
    print(f"\n1..4 SaaS workers: up to 4 in {up_s:.1f} s under load, back to 1 in {down_s:.1f} s once idle")


def test_zero_to_two_gives_its_cpus_back_and_wakes_for_the_next_chat(ray_head, slow_provider, shell, capsys):
    import ray

    slow_provider.control(delay=0.2)
    free_before = ray.available_resources().get("CPU", 0)
    spec = _spec(slow_provider, "auto02", "--min_workers", "0", "--max_workers", "2", "--cpus_per_worker", "0.5",
                 "--upscale_delay_s", "0", "--downscale_delay_s", "1")
    try:
        deploy_api.deploy(spec)
        idle = time.monotonic()
        wait_until(lambda: deploy_api.status("auto02").workers == (), RANGE_SCALE_S, "zero workers when idle")
        zero_s = time.monotonic() - idle
        wait_until(lambda: ray.available_resources().get("CPU", 0) >= free_before - 1e-6, 30, "the CPUs given back")
        assert "autoscaling 0..2, now 0" in deploy_api.status("auto02").line()
        capsys.readouterr()
        asked = time.monotonic()
        shell.run_line_magic("byzer_chat", "auto02 hello")
        wake_s = time.monotonic() - asked
        out = capsys.readouterr().out
        assert "waking a worker of 'auto02'" in out and out.rstrip().endswith("ok"), out
    finally:
        deploy_api.undeploy("auto02")
    print(f"\n0..2: at zero {zero_s:.1f} s after the deploy, first answer from zero in {wake_s:.1f} s")


def test_scale_changes_the_range_in_place_and_a_count_fixes_it(ray_head, clean_server, shell):
    from .conftest import alive_replicas

    spec = _spec(clean_server, "auto_bounds", "--min_workers", "1", "--max_workers", "2", "--downscale_delay_s", "600")
    try:
        deploy_api.deploy(spec)
        before = {a.actor_id for a in alive_replicas("auto_bounds")}
        ranged = shell.run_line_magic("byzer_scale", "auto_bounds 2..3")
        assert (ranged.min_workers, ranged.max_workers, ranged.workers_ready) == (2, 3, 2), ranged.line()
        assert "autoscaling 2..3, now 2" in ranged.line()
        fixed = shell.run_line_magic("byzer_scale", "auto_bounds 3")
        assert fixed.max_workers is None and fixed.line().startswith("auto_bounds: ready, 3/3 workers")
        after = {a.actor_id for a in alive_replicas("auto_bounds")}
        assert before <= after, "a change of bounds restarted a worker"
        again = shell.run_line_magic("byzer_scale", "auto_bounds 1..4")
        assert "autoscaling 1..4" in again.line()
        assert chat_api.chat("auto_bounds", "hi", max_tokens_gen()).text
    finally:
        deploy_api.undeploy("auto_bounds")


def max_tokens_gen():
    from byzer_magic.backends.base import GenParams

    return GenParams(max_tokens=4, temperature=0)
