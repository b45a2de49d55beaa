"""Plays a script into its session: states, progress events, pause, resume, skip and stop.

```
preparing ──► waiting (start_at) ──► playing ⇄ paused ──► finished
     │                                  │  └──────────────► stopped (stop, DELETE)
     └──► failed (an item cannot be read or spoken)
```
Every audio, text and pause item is one utterance of the session, pushed ahead of playback (at most `LEAD_S`),
so items follow each other without a gap and each lasts its own length rounded up to a whole frame. After each
item the runner places a session mark (`script:<id>:<generation>:<index>`): when it fires, that item has played.
Pause, skip and stop interrupt the session (everything pushed ahead is flushed) and start a new generation, so the
marks the interrupt flushes are ignored; resume pushes again from where the paused item was interrupted.

Progress goes to the session's bot websockets (`ServerSession.notify`) as `script.state` {state} and
`script.item` {index, state: playing|done|skipped}, and is in `GET /v1/sessions/{id}/script`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np

from streaming.frames import Event
from vexpress_rt.errors import InputError

from ..sessions import ServerSession
from ..speak import DecodedFile
from .items import ScriptItem, ScriptSpec

LEAD_S = 3.0  # audio pushed ahead of playback
PIECE_S = 0.5  # pushed at a time (the session's lock is never held long)
PAUSE_RATE = 16000
TICK_S = 0.05


def apply_controls(session: ServerSession, item: ScriptItem) -> None:
    """An item's style and controls take effect when it starts being pushed (ramped from the next frame made, as
    a PATCH); they were checked when the script was posted, so a refusal now (the session's controls changed
    since in a way that conflicts) is logged and the item plays with the controls as they are."""
    if not item.changes:
        return
    try:
        change = session.engine_session.change_controls(item.changes)
    except InputError as exc:
        session.log.warning("script item: controls %s not applied: %s", item.changes, exc)
        return
    session.log.info("script item: controls version %s: %s", change.version, item.changes)


@dataclass
class ItemProgress:
    item: ScriptItem
    audio: DecodedFile | None = None  # speaking items, once prepared
    state: str = "pending"  # pending | playing | done | skipped
    started_frame: int | None = None
    done_frame: int | None = None

    def to_json(self, index: int, fps: int) -> dict:
        out = {"index": index, **self.item.to_json(), "state": self.state}
        if self.audio is not None:
            out["duration_s"] = round(self.audio.duration_ms / 1000, 3)
            out["frames"] = -(-round(self.audio.duration_ms * fps) // 1000)
        for key in ("started_frame", "done_frame"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ScriptRunner:
    def __init__(self, script_id: str, session: ServerSession, spec: ScriptSpec, prepare):
        """`prepare(item) -> DecodedFile`: an audio or text item's audio (awaitable; raises ApiError)."""
        self.id = script_id
        self.session = session
        self.es = session.engine_session
        self.spec = spec
        self.items = [ItemProgress(item) for item in spec.items]
        self.state = "preparing"
        self.error: str | None = None
        self.created = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._prepare = prepare
        self._generation = 0
        self._cursor = 0  # next item to push
        self._offset = 0  # samples of it pushed already
        self._playing_utterance: int | None = None
        self._open_item: int | None = None  # the item whose utterance is being pushed
        self._bases: dict[int, int] = {}  # item -> sample its latest utterance started at (a resumed item: > 0)
        self._resume = asyncio.Event()
        self._resume.set()
        self._push_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = session.start_task(self._run(), f"script-{script_id}")

    # -- reports -------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state in ("preparing", "waiting", "playing", "paused")

    @property
    def current(self) -> int | None:
        return next((i for i, p in enumerate(self.items) if p.state in ("pending", "playing")), None)

    def report(self) -> dict:
        fps = self.es.config.fps
        return {
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "start_at": self.spec.start_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "current": self.current if self.running else None,
            "resume_from_s": self._resume_from_s() if self.state == "paused" else None,
            "items": [p.to_json(i, fps) for i, p in enumerate(self.items)],
        }

    def _resume_from_s(self) -> float:
        """Where in the paused item playback resumes."""
        audio = self.items[self._cursor].audio if self._cursor < len(self.items) else None
        return round(self._offset / audio.sample_rate, 3) if audio is not None else 0.0

    def _tell(self, kind: str, **data) -> None:
        self.session.notify({"type": f"script.{kind}", "script_id": self.id, **data})

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._tell("state", state=state, **({"error": self.error} if self.error else {}))

    def _item_state(self, index: int, state: str, frame: int | None = None) -> None:
        progress = self.items[index]
        progress.state = state
        if state == "playing":
            progress.started_frame = frame
        elif state == "done":
            progress.done_frame = frame
        self._tell("item", index=index, state=state, **({"frame": frame} if frame is not None else {}))

    # -- the run -------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        self.es.add_listener(self._on_event)
        try:
            for progress in self.items:
                if progress.item.kind in ("audio", "text"):
                    progress.audio = await self._prepare(progress.item)
                elif progress.item.kind == "pause":
                    silence = np.zeros((round(progress.item.pause_s * PAUSE_RATE), 1), np.float32)
                    progress.audio = DecodedFile(silence, PAUSE_RATE)
            if self.spec.start_at is not None and self.spec.start_at > time.time():
                self._set_state("waiting")
                await asyncio.sleep(self.spec.start_at - time.time())
            self.started_at = time.time()
            self._set_state("playing")
            self.session.connected_once.set()
            self.session.pump.start()  # the clock runs with or without a viewer
            await self._push_all()
            while self.running and self.current is not None:
                await asyncio.sleep(TICK_S)
            if self.state == "playing":
                self._set_state("finished")
        except asyncio.CancelledError:
            if self.running:
                self._set_state("stopped")
            raise
        except Exception as exc:
            self.error = str(getattr(exc, "message", None) or exc)[:500]
            self.session.log.warning("script %s failed: %s", self.id, self.error)
            self._set_state("failed")
        finally:
            self.ended_at = self.ended_at or time.time()
            self.es.remove_listener(self._on_event)

    async def _push_all(self) -> None:
        """Push items ahead of playback until all are pushed (a pause/skip moves the cursor back)."""
        while self.running:
            await self._resume.wait()
            if self._cursor >= len(self.items):
                if self.current is None:
                    return
                await asyncio.sleep(TICK_S)
                continue
            if self.es.buffered_ms > 1000 * LEAD_S:
                await asyncio.sleep(TICK_S)
                continue
            async with self._push_lock:
                if self._resume.is_set() and self.running and self._cursor < len(self.items):
                    await self._push_piece()

    async def _push_piece(self) -> None:
        index, progress = self._cursor, self.items[self._cursor]
        item = progress.item
        name = f"script:{self.id}:{self._generation}:{index}"
        if progress.state in ("done", "skipped"):
            self._cursor += 1
            return
        if item.kind == "mark":
            self.es.mark(item.mark or "")
            self.es.mark(name)
            self._cursor += 1
            return
        audio = progress.audio
        assert audio is not None
        if self._open_item != index:  # a new utterance: the item, or what is left of it after a pause
            self._open_item, self._bases[index] = index, self._offset
            if self._offset == 0:
                apply_controls(self.session, item)
        piece = max(1, int(PIECE_S * audio.sample_rate))
        chunk = audio.samples[self._offset : self._offset + piece]
        if len(chunk):
            await self._loop.run_in_executor(None, self.es.push_audio, chunk, audio.sample_rate, audio.channels)
            self._offset += len(chunk)
        if self._offset >= len(audio.samples):
            self.es.end_utterance()
            self.es.mark(name)
            self._cursor, self._offset, self._open_item = self._cursor + 1, 0, None

    # -- events from the session (marks, playback) ---------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if threading.get_ident() == self._loop_thread:
            self._handle(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._handle, event)
            except RuntimeError:
                pass

    def _handle(self, event: Event) -> None:
        if event.type == "mark":
            parts = str(event.data.get("name", "")).split(":")
            if len(parts) == 4 and parts[0] == "script" and parts[1] == self.id and parts[2] == str(self._generation):
                index = int(parts[3])
                if self.items[index].state in ("pending", "playing"):
                    self._item_state(index, "done", event.frame_index)
        elif event.type == "playback.started":
            current = self.current
            if current is not None and self.items[current].item.speaks and self.items[current].state == "pending":
                self._playing_utterance = event.data.get("utterance")
                self._item_state(current, "playing", event.frame_index)
        elif event.type == "playback.finished" and event.data.get("interrupted"):
            if event.data.get("utterance") == self._playing_utterance and self._interrupting is not None:
                self._interrupting = float(event.data.get("position_ms", 0.0))

    # -- control -------------------------------------------------------------------------------------------------
    _interrupting: float | None = None  # while interrupting: the playing item's position (ms), from the event

    async def _flush(self) -> tuple[int | None, float]:
        """Interrupt the session (on the loop thread: its events come back synchronously) and start a new
        generation. Returns the item that was playing or next, and how far into it playback was (ms)."""
        async with self._push_lock:
            current = self.current
            self._interrupting = 0.0
            self._generation += 1
            self.es.interrupt()
            position = self._interrupting if current is not None and self.items[current].state == "playing" else 0.0
            self._interrupting = None
            self._playing_utterance = self._open_item = None
            return current, position

    def _rewind(self, index: int, position_ms: float) -> None:
        self._cursor = index
        audio = self.items[index].audio if index < len(self.items) else None
        played = int(position_ms * audio.sample_rate / 1000) if audio is not None else 0
        self._offset = self._bases.get(index, 0) + played
        if index < len(self.items) and self.items[index].state == "playing":
            self.items[index].state = "pending"

    async def pause(self) -> None:
        if self.state not in ("playing", "waiting"):
            raise ValueError(f"the script is {self.state}")
        self._resume.clear()
        current, position = await self._flush()
        if current is not None:
            self._rewind(current, position)
        self._set_state("paused")

    async def resume(self) -> None:
        if self.state != "paused":
            raise ValueError(f"the script is {self.state}, not paused")
        self._set_state("playing" if self.started_at is not None else "waiting")
        self._resume.set()

    async def skip(self) -> None:
        if self.state not in ("playing", "paused"):
            raise ValueError(f"the script is {self.state}")
        current, _ = await self._flush()
        if current is None:
            return
        self._item_state(current, "skipped")
        self._rewind(current + 1, 0.0)

    async def stop(self) -> None:
        if not self.running:
            return
        await self._flush()
        self._set_state("stopped")
        self._resume.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
