"""What the process holds: resident memory, open file descriptors, threads, event-loop tasks.

Read from /proc on Linux (no extra dependency); elsewhere `psutil` when installed, else None. Shown on `/metrics`
and reported by `vexpress-rt soak`, where growth over time means a leak.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from pathlib import Path

_PROC = Path("/proc/self")


def rss_bytes() -> int | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return None


def peak_rss_bytes() -> int:
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def open_fds() -> int | None:
    try:
        return len(os.listdir(_PROC / "fd"))
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().num_fds()
    except Exception:
        return None


def threads() -> int:
    return threading.active_count()


def loop_tasks(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Tasks not done on `loop` (default: the running one). Call it from that loop's thread."""
    loop = loop or asyncio.get_running_loop()
    return sum(1 for t in asyncio.all_tasks(loop) if not t.done())


def snapshot(loop: asyncio.AbstractEventLoop | None = None) -> dict:
    return {
        "rss_mb": round((rss_bytes() or 0) / 2**20, 1),
        "open_fds": open_fds(),
        "threads": threads(),
        "tasks": loop_tasks(loop),
    }


def metrics() -> list:
    """`/metrics` series (call on the server's loop)."""
    from .metrics import Metric

    out = [Metric("process_threads", "gauge", "Threads of the server process.").add(threads())]
    try:
        out.append(Metric("event_loop_tasks", "gauge", "Asyncio tasks on the server's event loop.").add(loop_tasks()))
    except RuntimeError:  # not called from a running loop
        pass
    rss, fds = rss_bytes(), open_fds()
    if rss is not None:
        out.append(Metric("process_resident_memory_bytes", "gauge", "Resident memory of the process.").add(rss))
    if fds is not None:
        out.append(Metric("process_open_fds", "gauge", "Open file descriptors of the process.").add(fds))
    return out
