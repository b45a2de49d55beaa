"""Waiting in tests, always bounded: `run` a coroutine, `wait_for` / `wait_until` a condition (each raises a
TimeoutError that says what it waited for: a wait that times out is a failure, never a False to forget), and a
`free_port` to listen on."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 90) -> T:
    """Run `coro` on a fresh event loop; asyncio.TimeoutError past `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


Said = str | Callable[[], str]  # what is awaited; a function for a message made at the timeout (with counts)


def _timed_out(predicate: Callable[[], object], timeout: float, what: Said) -> TimeoutError:
    name = (what() if callable(what) else what) or getattr(predicate, "__name__", "the condition")
    return TimeoutError(f"not within {timeout:g} s: {name}")


async def wait_for(predicate: Callable[[], object], timeout: float, what: Said = "", step: float = 0.05) -> float:
    """Poll `predicate` on the running loop until it holds; the seconds it took. TimeoutError (naming `what`) when
    it does not hold within `timeout`; `what` may be a function, called then, for a message with counts."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise _timed_out(predicate, timeout, what)
        await asyncio.sleep(step)
    return loop.time() - start


def wait_until(predicate: Callable[[], object], timeout: float, what: Said = "", step: float = 0.02) -> float:
    """`wait_for` for code without a loop: blocks this thread."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise _timed_out(predicate, timeout, what)
        time.sleep(step)
    return time.perf_counter() - start


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago (TCP, or UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
