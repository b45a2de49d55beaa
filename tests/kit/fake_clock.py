"""A clock the test moves by hand: pass it where the code takes `now` (a callable that returns seconds)."""

from __future__ import annotations


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t
