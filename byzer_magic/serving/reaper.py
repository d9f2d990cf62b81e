"""Ends an embedded Ray's processes when the kernel that started it dies.

A kernel that exits normally shuts Ray down itself. One that is killed
(SIGKILL, an out-of-memory kill, a crashed notebook server) leaves Ray's
per-node agents running with no parent; this small process watches the
kernel's process tree and ends whatever of it outlives the kernel.

    python -m byzer_magic.serving.reaper KERNEL_PID
"""
from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(kernel_pid: int) -> list[int]:
    """Wait for the kernel to die, then end what is left of its tree; returns those pids."""
    kernel = psutil.Process(kernel_pid)
    me = os.getpid()
    family: dict[int, psutil.Process] = {}
    while _alive(kernel):
        try:
            family.update((p.pid, p) for p in kernel.children(recursive=True) if p.pid != me)
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    return end(family.values())


def end(processes) -> list[int]:
    """Terminate those of `processes` still alive, kill what is left after a grace period; returns their pids."""
    survivors = [p for p in processes if _alive(p)]
    for process in survivors:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, stubborn = psutil.wait_procs(survivors, timeout=GRACE_S)
    for process in stubborn:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in survivors]


if __name__ == "__main__":
    watch(int(sys.argv[1]))
