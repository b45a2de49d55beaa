"""How a served session ends besides DELETE and its publisher leaving: every session gets a supervisor that

* ends the server session (peers, pump, sockets) when its engine session ended on its own (the model worker
  failed for it, or the device ran out of memory: the engine has sent the `error` event already);
* ends it after `--max_session_s` (code `max_duration`) and after `--idle_timeout_s` without input (code
  `idle_timeout`): no audio pushed (microphone, websocket, speak), no control call and no request with its token.
  A connected viewer alone does not keep a session alive. Both send an `error` event first, then close;
* closes WHEP viewers whose connection is not up within `--connect_timeout_s` (a viewer that went away during
  the handshake), so that they do not hold a slot.
"""

from __future__ import annotations

import asyncio
import logging
import time

from streaming.frames import Event

from .served import ServerSession

log = logging.getLogger("server.session.lifetime")

CHECK_PERIOD_S = 0.5
_closing: set[asyncio.Task] = set()  # close tasks started from callbacks (kept referenced until done)


def closes_pending() -> int:
    """Close tasks started by `close_later` and not finished yet."""
    return len(_closing)


def close_later(state, session, reason: str) -> None:
    """Close the server session from a task of its own (the caller may be one of the tasks closing cancels)."""
    if session.closed:
        return
    task = asyncio.get_running_loop().create_task(state.sessions.close(session.id, reason), name=f"close-{session.id}")
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def end_session(state, session, code: str, message: str) -> None:
    """Tell the clients (an `error` event) and end the session."""
    session.log.info("ending: %s", message)
    try:
        session.engine_session.fail(code, message)  # emits the event, closes the engine session
    finally:
        close_later(state, session, message)


def supervise(state, session: ServerSession) -> None:
    """Attach the supervisor to a new ServerSession (on the server's event loop)."""
    loop = asyncio.get_running_loop()

    def on_event(event: Event) -> None:  # any thread (the model worker's, for errors)
        # Only on "closed": an engine failure emits "error" then "closed", and the listeners after this one must get
        # the error before the server's close (on the loop thread, racing the worker's thread) tells them "closed".
        if event.type == "error":
            session.engine_failed(event.data.get("message"))
        if not (event.type == "state" and event.data.get("state") == "closed") or session.closed:
            return
        reason = session.end_reason or "the engine session ended"
        try:
            loop.call_soon_threadsafe(close_later, state, session, reason)
        except RuntimeError:  # the loop has closed: shutdown is under way
            pass

    session.engine_session.add_listener(on_event)
    session.start_task(_watch(state, session), "supervisor")


async def _watch(state, session: ServerSession) -> None:
    cfg = state.config
    first_seen: dict[str, float] = {}
    while not session.closed:
        await asyncio.sleep(CHECK_PERIOD_S)
        now = time.monotonic()
        if cfg.max_session_s and now - session.started_monotonic > cfg.max_session_s:
            end_session(
                state,
                session,
                "max_duration",
                f"the session reached its maximum duration of {cfg.max_session_s:g} s (--max_session_s)",
            )
            return
        if cfg.idle_timeout_s and session.idle_for(now) > cfg.idle_timeout_s:
            end_session(
                state, session, "idle_timeout", f"no audio or request for {cfg.idle_timeout_s:g} s (--idle_timeout_s)"
            )
            return
        for name, pc in list(session.peers.items()):
            since = first_seen.setdefault(name, now)
            if (
                name != "publisher"
                and pc.connectionState in ("new", "connecting")
                and now - since > cfg.connect_timeout_s
            ):
                session.log.info("viewer %s did not connect within %g s: removed", name, cfg.connect_timeout_s)
                await session.close_peer(name)
        for name in set(first_seen) - set(session.peers):
            del first_seen[name]
