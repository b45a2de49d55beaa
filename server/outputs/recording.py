"""Recording a session to MP4 (H.264 + AAC, PyAV).

| method, path | what |
|---|---|
| `POST /v1/sessions` with `"record": true` | the session is recorded from its creation |
| `POST /v1/sessions/{id}/recording` | start recording (201); 409 while one is running; a finished one is replaced |
| `DELETE /v1/sessions/{id}/recording` | stop: 200 with what was recorded (frames, duration...) |
| `GET /v1/sessions/{id}/recording` | the MP4 (`video/mp4`) once stopped or the session ended; 409 meanwhile |

The recorder is one more subscriber of the session's pacing task: it records exactly the frames (and their audio)
that viewers get, frame `i` at `i / fps` from the first recorded frame, so the file lasts as long as the recording
ran (speech and idle alike). Encoding runs in a thread pool, one batch of frames at a time; the queue between the
pacing task and the encoder is bounded (`QUEUE_FRAMES`): if the encoder falls that far behind, the oldest frames are
dropped (a gap in the video, silence in the audio; counted) rather than stalling the session.

Files go to `--recording_dir` (default: a temporary folder made at the first recording). A finished recording is
kept for `--recording_retention_s` (default 1 h) after it stopped, then deleted; all of them together may take
`--recordings_quota_mb` (default 4096) of disk: beyond, running recordings stop and new ones are refused (507);
at shutdown every recording this process made is deleted (and the temporary folder with it). Download what you
want to keep.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from aiortc.mediastreams import MediaStreamError

from ..access.auth import require_session_token
from ..api.session_features import SessionFeature
from ..api.state import server_state, session_for
from ..errors import ApiError
from .mp4_writer import Mp4Writer

log = logging.getLogger("server.outputs.recording")

QUEUE_FRAMES = 50  # 2 s at 25 fps between the pacing task and the encoder
DEFAULT_RETENTION_S = 3600.0
DEFAULT_QUOTA_BYTES = 4 << 30  # all recordings kept on disk; new ones refused (507), running ones stop beyond


class Recording:
    def __init__(self, session, path: Path, executor: ThreadPoolExecutor, over_quota=lambda: False):
        self.session = session  # the ServerSession (kept after it ends, for its token and id)
        self.session_id = session.id
        self.token = session.token
        self.path = path
        self.state = "recording"  # -> finishing -> done | failed
        self.error: str | None = None
        self.started = time.time()
        self.stopped: float | None = None
        self.writer = Mp4Writer(path, session.engine_session.config.fps)
        self._executor = executor
        self._over_quota = over_quota  # () -> bool: the recordings on disk have reached --recordings_quota_mb
        self.stop_reason: str | None = None
        self._queue = session.pump.subscribe(QUEUE_FRAMES)
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"record-{session.id}")
        self.expiry: asyncio.TimerHandle | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    batch = [await self._queue.get()]
                except MediaStreamError:  # stopped, or the session ended
                    break
                while len(self._queue):
                    batch.append(await self._queue.get())
                await loop.run_in_executor(self._executor, self.writer.write, batch)
                if self._over_quota():
                    self.stop_reason = "the recordings' disk quota (--recordings_quota_mb) is full"
                    self.session.log.warning("recording stopped: %s", self.stop_reason)
                    break
        except Exception as exc:
            self.error = f"recording failed: {exc}"
            self.session.log.exception("recording failed")
        finally:
            self.state = "finishing"
            self.session.pump.unsubscribe(self._queue)
            try:
                await loop.run_in_executor(self._executor, self.writer.close)
            except Exception as exc:
                self.error = self.error or f"finishing the recording failed: {exc}"
                self.session.log.exception("finishing the recording failed")
            self.stopped = time.time()
            self.state = "failed" if self.error else "done"
            self.session.log.info("recording %s: %s", self.state, self.summary())

    @property
    def running(self) -> bool:
        """Frames are still coming: the session is open and the recording was not stopped."""
        return self.state == "recording" and not self.session.closed

    async def stop(self) -> None:
        self.session.pump.unsubscribe(self._queue)  # closes the queue: the task writes what is left and ends
        await asyncio.shield(self.task)

    def summary(self) -> dict:
        w = self.writer
        out = {
            "session_id": self.session_id,
            "state": self.state,
            "frames": w.frames,
            "speech_frames": w.speech_frames,
            "dropped_frames": self._queue.dropped,
            "first_frame": w.first,
            "last_frame": w.last if w.first is not None else None,
            "duration_s": round(w.duration_s, 3),
            "fps": w.fps,
            "audio_samples": w.audio_samples,
        }
        if self.state == "done" and self.path.is_file():
            out["bytes"] = self.path.stat().st_size
        if self.error:
            out["error"] = self.error
        if self.stop_reason:
            out["stop_reason"] = self.stop_reason
        return out


class RecordingStore:
    def __init__(self, directory: str | None, retention_s: float, quota_bytes: int = DEFAULT_QUOTA_BYTES):
        self.configured_dir = Path(directory) if directory else None
        self.retention_s = retention_s
        self.quota_bytes = quota_bytes
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="record")
        self.recordings: dict[str, Recording] = {}
        self._dir: Path | None = None
        self._owns_dir = False

    def directory(self) -> Path:
        if self._dir is None:
            if self.configured_dir is None:
                self._dir, self._owns_dir = Path(tempfile.mkdtemp(prefix="vexpress-recordings-")), True
            else:
                self.configured_dir.mkdir(parents=True, exist_ok=True)
                self._dir = self.configured_dir
        return self._dir

    async def start(self, session) -> Recording:
        old = self.recordings.get(session.id)
        if old is not None:
            if old.running:
                raise ApiError(409, "this session is already being recorded", code="conflict")
            await old.stop()
            self._forget(old)
        if self.over_quota():
            raise ApiError(
                507,
                f"the recordings on disk hold {self.used_bytes() / 2**20:.1f} MiB, the quota "
                "(--recordings_quota_mb): download and delete recordings, or wait for them to expire",
                code="recordings_quota",
            )
        path = self.directory() / f"{session.id}-{int(time.time() * 1000)}.mp4"
        recording = Recording(session, path, self.executor, self.over_quota)
        self.recordings[session.id] = recording
        recording.task.add_done_callback(lambda _: self._schedule_expiry(recording))
        session.connected_once.set()
        session.log.info("recording to %s", path)
        return recording

    def used_bytes(self) -> int:
        """Bytes of this server's recordings on disk, running ones included."""
        total = 0
        for recording in list(self.recordings.values()):
            try:
                total += recording.path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def over_quota(self) -> bool:
        return self.used_bytes() >= self.quota_bytes

    def _schedule_expiry(self, recording: Recording) -> None:
        loop = asyncio.get_running_loop()
        recording.expiry = loop.call_later(self.retention_s, self._forget, recording)

    def _forget(self, recording: Recording) -> None:
        if self.recordings.get(recording.session_id) is recording:
            del self.recordings[recording.session_id]
        if recording.expiry is not None:
            recording.expiry.cancel()
        recording.path.unlink(missing_ok=True)

    async def close(self) -> None:
        """Shutdown: finish every recording, then delete them all (and the temporary folder)."""
        recordings = list(self.recordings.values())
        await asyncio.gather(*(r.stop() for r in recordings), return_exceptions=True)
        for recording in recordings:
            self._forget(recording)
        self.executor.shutdown(wait=True)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


RECORDINGS = web.AppKey("recordings", RecordingStore)


def setup(app: web.Application, directory: str | None, retention_s: float, quota_bytes: int) -> None:
    app[RECORDINGS] = RecordingStore(directory, retention_s, quota_bytes)

    async def cleanup(app: web.Application) -> None:
        await app[RECORDINGS].close()

    app.on_cleanup.append(cleanup)


async def _check_record(request: web.Request, value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, "record must be true or false")
    return value


async def _start_if_asked(request: web.Request, session, record: bool) -> dict:
    """`POST /v1/sessions` with `"record": true`: the session is recorded from its first frame."""
    if not record:
        return {}
    recording = await request.app[RECORDINGS].start(session)
    return {"recording": {"state": recording.state}}


SESSION_FEATURE = SessionFeature("recording", "record", _check_record, _start_if_asked)


def _recording_for(request: web.Request) -> Recording:
    """The session's recording; the session's token (or the API key) also after the session ended."""
    state = server_state(request)
    session_id = request.match_info["session_id"]
    recording = request.app[RECORDINGS].recordings.get(session_id)
    session = state.sessions.get(session_id)
    token = session.token if session is not None else recording.token if recording is not None else None
    if token is None:
        raise ApiError(404, f"no session {session_id!r} (nor a recording of it)")
    require_session_token(request, token, state.config.api_key, session.view_token if session is not None else None)
    if recording is None:
        raise ApiError(404, "this session has no recording; start one with POST .../recording")
    return recording


async def start_recording(request: web.Request) -> web.Response:
    session = session_for(request)
    recording = await request.app[RECORDINGS].start(session)
    return web.json_response(recording.summary(), status=201, headers={"Location": request.path})


async def stop_recording(request: web.Request) -> web.Response:
    recording = _recording_for(request)
    await recording.stop()
    return web.json_response(recording.summary())


async def get_recording(request: web.Request) -> web.StreamResponse:
    recording = _recording_for(request)
    if recording.running:
        raise ApiError(
            409,
            "the session is still being recorded: stop the recording (DELETE) or end the session first",
            code="recording",
            headers={"Retry-After": "5"},
        )
    await asyncio.shield(recording.task)  # the session ended a moment ago: the file is being finished
    if recording.state == "failed":
        raise ApiError(500, recording.error or "the recording failed", code="recording_failed")
    if recording.writer.frames == 0 or not recording.path.is_file():
        raise ApiError(404, "nothing was recorded (no frame was played while recording)")
    headers = {"Content-Disposition": f'attachment; filename="{recording.session_id}.mp4"'}
    return web.FileResponse(recording.path, headers={**headers, "Content-Type": "video/mp4"})
