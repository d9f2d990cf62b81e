"""Autoscaling's seconds, each beside a baseline of the same run.

    python benchmarks/bench_autoscale.py [--delay 1.0] [--streams 7] [--upscale_delay 0.5] [--downscale_delay 2]

On a running cluster (`ray start --head --num-cpus 4`), in front of the
fake provider with a fixed delay per request (no CPU spent on answers):

1. a 1..4 SaaS deployment under `--streams` steady chats: seconds from the
   first chat to 4 workers ready, beside `%byzer_scale NAME 4` of a fixed
   deployment (the same workers started by hand);
2. the load gone (one chat at a time goes on): seconds back to 1 worker, and
   how many chats failed meanwhile (must be 0);
3. a 0..2 deployment: seconds after its deploy until it runs no worker, and
   from zero to the first answer, beside deploy -> ready of one worker and
   a chat on a warm worker.

Serve averages the load over a 30 s window (its look_back_period_s), which
bounds how fast a scale-down can follow the end of the load.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from byzer_magic.serving import chat

from byzer_magic.serving import deploy  # noqa: E402
from byzer_magic.serving.cluster import connect  # noqa: E402
from byzer_magic.spec.deploy_spec import parse_args  # noqa: E402
from byzer_magic.tinymodel import build  # noqa: E402
from tests.conftest import start_openai_server  # noqa: E402


def spec(server, name: str, *flags: str):
    return parse_args(["--model", name, "--pretrained_model_type", "saas/openai", "--infer_params",
                       "saas.api_key=bench", "saas.model=tiny", f"saas.base_url={server.base_url}", *flags])


def until(check, timeout: float = 300) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError("not reached in time")
        time.sleep(0.1)
    return time.monotonic() - started


class Load:
    def __init__(self, name: str, streams: int):
        self.name, self.failed, self.answered = name, 0, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(streams)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                chat.chat(self.name, "hi")
                self.answered += 1
            except Exception:  # noqa: BLE001 - counted: a lost chat
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def ranged(server, args) -> tuple[float, float, int, int]:
    deploy.deploy(spec(server, "bench_auto", "--min_workers", "1", "--max_workers", "4",
                       "--upscale_delay_s", str(args.upscale_delay), "--downscale_delay_s", str(args.downscale_delay)))
    try:
        heavy, steady = Load("bench_auto", args.streams), Load("bench_auto", 1)
        up = until(lambda: deploy.status("bench_auto").workers_ready == 4)
        heavy.stop()
        down = until(lambda: len(deploy.status("bench_auto").workers) == 1)
        steady.stop()
        return up, down, heavy.failed + steady.failed, heavy.answered + steady.answered
    finally:
        deploy.undeploy("bench_auto")


def by_hand(server) -> float:
    deploy.deploy(spec(server, "bench_fixed", "--num_workers", "1"))
    try:
        started = time.monotonic()
        deploy.scale("bench_fixed", 4)
        return time.monotonic() - started
    finally:
        deploy.undeploy("bench_fixed")


def from_zero(server, args) -> tuple[float, float, float, float]:
    started = time.monotonic()
    deploy.deploy(spec(server, "bench_zero", "--min_workers", "0", "--max_workers", "2", "--upscale_delay_s", "0",
                       "--downscale_delay_s", str(args.downscale_delay)))
    ready = time.monotonic() - started
    try:
        warm = time.monotonic()
        chat.chat("bench_zero", "hi")
        warm = time.monotonic() - warm
        to_zero = until(lambda: deploy.status("bench_zero").workers == ())
        asked = time.monotonic()
        chat.chat("bench_zero", "hi")
        return ready, warm, to_zero, time.monotonic() - asked
    finally:
        deploy.undeploy("bench_zero")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the provider takes per request")
    parser.add_argument("--streams", type=int, default=7, help="concurrent chats of the load")
    parser.add_argument("--upscale_delay", type=float, default=0.5)
    parser.add_argument("--downscale_delay", type=float, default=2.0)
    args = parser.parse_args()
    server = start_openai_server(build(ROOT / ".cache" / "tinymodel").gguf)
    try:
        connect()
        server.control(delay=args.delay, short_circuit=True)
        hand = by_hand(server)
        up, down, failed, answered = ranged(server, args)
        print(f"1 -> 4 workers: autoscaling under {args.streams} chats {up:.1f} s, %byzer_scale 4 by hand {hand:.1f} s "
              f"({up / hand:.2f}x)")
        print(f"4 -> 1 worker once idle: {down:.1f} s (downscale_delay_s {args.downscale_delay:g} and Serve's 30 s "
              f"look-back); chats lost: {failed} of {answered + failed}")
        server.control(delay=0.05)
        ready, warm, to_zero, cold = from_zero(server, args)
        print(f"0..2: no worker {to_zero:.1f} s after deploy; zero -> first answer {cold:.1f} s, against deploy -> "
              f"ready {ready:.1f} s ({cold / ready:.2f}x) and a chat on a warm worker {warm * 1e3:.0f} ms")
    finally:
        server.proc.terminate()


if __name__ == "__main__":
    main()
