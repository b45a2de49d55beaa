"""A live session's state machine: idle <-> speaking, then closed for good; the epoch an interrupt advances; and
the listeners its events go to.

The session (`streaming/session.py`) calls it under its lock, except `emit`, which it calls after releasing the
lock: a listener (a websocket sending an event) must never run while the session is locked.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from vexpress_rt.errors import InputError

from .frames import Event

log = logging.getLogger(__name__)


class SessionState(str, enum.Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    CLOSED = "closed"


class SessionLifecycle:
    """Which state the session is in and which generation of its frames counts (the epoch).

    Transitions: idle -> speaking when an utterance starts playing, speaking -> idle when the last one ends or on
    an interrupt, any -> closed. Closed is final: a frame still in flight (a late `deliver`, a reader's last
    frame) cannot bring a closed session back."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.state = SessionState.IDLE
        # Frames carry the epoch they were made in; an interrupt advances it, so that what was in flight then
        # (in the denoiser, in the worker's hands) is dropped when it arrives.
        self.epoch = 0
        self._listeners: list[Callable[[Event], None]] = []

    @property
    def closed(self) -> bool:
        return self.state == SessionState.CLOSED

    def check_open(self) -> None:
        if self.closed:
            raise InputError(f"session {self.session_id} is closed")

    def to(self, state: SessionState, index: int) -> list[Event]:
        """Enter `state` at output frame `index`: its "state" event, or none when nothing changes (or the session
        is closed)."""
        if state == self.state or self.closed:
            return []
        self.state = state
        return [Event("state", {"state": state.value}, index)]

    def interrupt(self) -> None:
        self.epoch += 1

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Event], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    @property
    def listener_count(self) -> int:
        return len(self._listeners)

    def emit(self, events: list[Event]) -> None:
        for event in events:
            for fn in list(self._listeners):
                try:
                    fn(event)
                except Exception:  # a broken listener must not break the stream
                    log.exception("session %s: event listener failed", self.session_id)
