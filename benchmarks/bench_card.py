"""What live status cards cost the kernel while nothing happens: CPU seconds per minute.

    python benchmarks/bench_card.py [--seconds 30] [--cards 1,5]

A 1-worker SaaS deployment runs in front of llama.cpp's server. This process
(standing in for the kernel) first sits idle with no card (the baseline: Ray's
own driver threads), then with 1 and 5 live cards, each refreshing from the
cluster every 2 s with its figures, exactly as `%%byzer_deploy` starts them.
It prints the process's CPU time per minute of wall time, and each level
against the baseline of the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_core import spec, tiny_server  # noqa: E402

from byzer_magic.serving import deploy  # noqa: E402
from byzer_magic.frontends.widgets import StatusCard  # noqa: E402


def cpu_per_minute(seconds: float) -> float:
    started_cpu, started = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    return (time.process_time() - started_cpu) / (time.perf_counter() - started) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--cards", default="1,5")
    args = parser.parse_args()
    with tiny_server() as server:
        status = deploy.deploy(spec(server, "bench_card", 1))
        try:
            base = cpu_per_minute(args.seconds)
            print(f"no card: {base:.2f} CPU s per minute (baseline)", flush=True)
            for n in (int(x) for x in args.cards.split(",")):
                cards = [
                    StatusCard(status, fetch=lambda name: deploy.status(name, with_metrics=True), interval=2.0)
                    for _ in range(n)
                ]
                for card in cards:
                    card.start_updates()
                used = cpu_per_minute(args.seconds)
                for card in cards:
                    card.close()
                print(f"{n} live card(s): {used:.2f} CPU s per minute, +{used - base:.2f} over no card "
                      f"({used / base:.2f}x); {(used - base) / n / 60 * 100:.2f}% of one core per card", flush=True)
        finally:
            deploy.undeploy("bench_card")


if __name__ == "__main__":
    main()
