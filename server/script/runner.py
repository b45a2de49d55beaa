"""Plays a script into its session: states, progress events, pause, resume, skip and stop.

```
preparing ──► waiting (start_at) ──► playing ⇄ paused ──► finished
     │                                  │  └──────────────► stopped (stop, DELETE)
     └──► failed (an item cannot be read or spoken)
```
Every audio, text and pause item is one utterance of the session, pushed ahead of playback (at most `LEAD_S`),
so items follow each other without a gap and each lasts its own length rounded up to a whole frame. An item's
audio is decoded (a text spoken by the TTS command) shortly before it plays: the first one while the script is
`preparing`, each next one as soon as the one before it is ready (while that one plays); it is released when the
item has played (or was skipped), and everything when the script ends, so a script holds a few items at most
(`--script_audio_mb`). After each item the runner places a session mark (`script:<id>:<generation>:<index>`): when
it fires, that item has played.
Pause, skip and stop interrupt the session (everything pushed ahead is flushed) and start a new generation, so the
marks the interrupt flushes are ignored; resume pushes again from where the paused item was interrupted.

Progress goes to the session's bot websockets (`ServerSession.notify`) as `script.state` {state} and
`script.item` {index, state: playing|done|skipped}, and is in `GET /v1/sessions/{id}/script`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from streaming.frames import Event
from vexpress_rt.errors import InputError

from ..media.audio_file import BudgetExceeded, DecodedFile
from ..session.served import ServerSession
from .items import ScriptItem, ScriptSpec

LEAD_S = 3.0  # audio pushed ahead of playback
PIECE_S = 0.5  # pushed at a time (the session's lock is never held long)
PAUSE_RATE = 16000
TICK_S = 0.05


class Silence:
    """A pause item's audio: made piece by piece as it is pushed, never held whole."""

    channels = 1
    sample_rate = PAUSE_RATE

    def __init__(self, seconds: float):
        self.num_samples = round(seconds * PAUSE_RATE)
        self.duration_ms = 1000.0 * self.num_samples / PAUSE_RATE

    def piece(self, start: int, n: int) -> np.ndarray:
        return np.zeros((max(0, min(n, self.num_samples - start)), 1), np.int16)

    def release(self) -> None:
        pass


ItemAudio = DecodedFile | Silence


def _drop(task: asyncio.Task) -> None:
    """An item decoded ahead that will not play: cancelled (a cancelled decode gives its bytes back,
    `audio_file.decode_off_loop`), or its audio released."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().release()


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
    audio: ItemAudio | None = None  # speaking items, from shortly before they play until they have played
    duration_ms: float | None = None  # known once prepared (kept after the audio is released)
    state: str = "pending"  # pending | playing | done | skipped
    started_frame: int | None = None
    done_frame: int | None = None

    def hold(self, audio: ItemAudio) -> None:
        self.audio, self.duration_ms = audio, audio.duration_ms

    def release(self) -> None:
        if self.audio is not None:
            self.audio.release()
            self.audio = None

    def to_json(self, index: int, fps: int) -> dict:
        out = {"index": index, **self.item.to_json(), "state": self.state}
        if self.duration_ms is not None:
            out["duration_s"] = round(self.duration_ms / 1000, 3)
            out["frames"] = -(-round(self.duration_ms * fps) // 1000)
        for key in ("started_frame", "done_frame"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ScriptRunner:
    def __init__(self, script_id: str, session: ServerSession, spec: ScriptSpec, prepare):
        """`prepare(item) -> DecodedFile`: an audio or text item's audio (awaitable; raises ApiError, BudgetExceeded
        when the script's budget has no room for it)."""
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
        self._prepare: Callable[[ScriptItem], Awaitable[DecodedFile]] | None = prepare  # dropped at the end
        self._preparing: dict[int, asyncio.Task] = {}  # items being decoded ahead
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
        self._task: asyncio.Task | None = session.start_task(self._run(), f"script-{script_id}")

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
        self.session.notify({"type": f"script.{kind}", "script_id": self.id, **data})  # wire.SCRIPT_STATE / SCRIPT_ITEM

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
        if state in ("done", "skipped"):
            progress.release()
        self._tell("item", index=index, state=state, **({"frame": frame} if frame is not None else {}))

    # -- the run -------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        self.es.add_listener(self._on_event)
        try:
            first = next((i for i, p in enumerate(self.items) if p.item.speaks), None)
            if first is not None:  # a file that cannot be read fails the script before it starts
                await self._ready(first)
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
            self._release_all()

    def _release_all(self) -> None:
        """Give back every item's audio and the uploaded files, and drop the task: the cancelled task's traceback
        holds this runner's frames, and a runner that held its task would be a cycle kept (with its audio) until
        the garbage collector's rare full pass."""
        for task in self._preparing.values():
            _drop(task)
        self._preparing.clear()
        for progress in self.items:
            progress.release()
        self._prepare = None
        self._task = None

    # -- decoding, shortly before an item plays ----------------------------------------------------------------
    def _prefetch(self, index: int) -> None:
        """Start decoding `index` (the next speaking item after it, if `index` is not one)."""
        following = next((i for i in range(index, len(self.items)) if self.items[i].item.speaks), None)
        if following is None or self.items[following].audio is not None or following in self._preparing:
            return
        if self.items[following].item.kind == "pause":
            self.items[following].hold(Silence(self.items[following].item.pause_s))
            return
        if self._prepare is not None and self.running:
            task = self.session.start_task(self._prepare(self.items[following].item), f"script-item-{following}")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved here if never awaited
            self._preparing[following] = task

    async def _ready(self, index: int) -> ItemAudio:
        """Item `index`'s audio, decoded now if it was not already. When the script's budget has no room while
        earlier items are still held (playing), the items decoded ahead are let go and it is decoded again once
        the earlier ones have played."""
        progress = self.items[index]
        if progress.audio is not None:
            return progress.audio
        self._prefetch(index)
        task = self._preparing.get(index)
        if task is None:  # a pause
            assert progress.audio is not None
            return progress.audio
        try:
            audio: ItemAudio = await task
        except BudgetExceeded as exc:
            if exc.budget.parent is None or exc.status == 413 or not self._held_before(index):
                raise  # the server's budget, or the file alone is too large for the script's
            self._let_go_after(index)
            while self.running and self._held_before(index):
                await asyncio.sleep(TICK_S)
            assert self._prepare is not None
            audio = await self._prepare(progress.item)
        finally:
            self._preparing.pop(index, None)
        progress.hold(audio)
        self._prefetch(index + 1)  # the next one is decoded (spoken) while this one waits and plays
        return audio

    def _held_before(self, index: int) -> bool:
        return any(p.audio is not None for p in self.items[:index])

    def _let_go_after(self, index: int) -> None:
        for later in [i for i in self._preparing if i > index]:
            _drop(self._preparing.pop(later))
        for progress in self.items[index + 1 :]:
            progress.release()

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
            if self.items[self._cursor].item.speaks and self.items[self._cursor].state in ("pending", "playing"):
                await self._ready(self._cursor)  # decoded outside the lock: pause, skip and stop never wait for it
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
        if audio is None:  # the cursor moved (skip) since the item was made ready: the loop readies this one
            return
        if self._open_item != index:  # a new utterance: the item, or what is left of it after a pause
            self._open_item, self._bases[index] = index, self._offset
            if self._offset == 0:
                apply_controls(self.session, item)
                self._prefetch(index + 1)  # (again: it may have been let go for the budget)
        piece = max(1, int(PIECE_S * audio.sample_rate))
        chunk = audio.piece(self._offset, piece)
        if len(chunk):
            await self._loop.run_in_executor(None, self.es.push_audio, chunk, audio.sample_rate, audio.channels)
            self._offset += len(chunk)
        del chunk
        if self._offset >= audio.num_samples:
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
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
