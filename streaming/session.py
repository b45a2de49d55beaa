"""A live session: pushed audio in, a never-stalling stream of frames paired with their audio out.

`StreamSession` is the one object the engine and the server hold; it puts together three parts and the worker's
side between them:
- its input (`streaming/session_input.py`): utterances, resampling, marks, how far ahead audio may run;
- its playout (`streaming/playout.py`): frames made and waiting, speech / idle clip / live idle, cross-fades,
  skips, the eyelids and the output picture;
- its state machine (`streaming/session_state.py`): idle -> speaking -> idle, closed; the interrupt epoch; events.
The worker's side is here: `prepare_job` and `complete_job` turn the input's audio (and, between utterances,
silence) into the denoiser's chunks; `deliver` hands the frames made to the playout.

Threads: `push_audio`, `end_utterance`, `mark`, `interrupt` and `read_frame` may be called from any thread (the
server's event loop); the worker thread calls `prepare_job`, `complete_job` (around its one wav2vec2 call for
every session), `deliver` and `fail`. One lock guards all three parts; model calls happen outside it, and events
go to listeners after it is released.

Output timing: the reader calls `read_frame()` once per frame period (the server paces it with a `FrameClock`,
server/media/clock.py); frame i plays at i/fps with audio samples [i*spf, (i+1)*spf). A reader that falls behind
skips frames (dropped, counted) instead of letting latency grow, and every queue is bounded.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import torch

from vexpress_rt.loader import VExpressModels

from .audio_features import FeatureSpan
from .audio_input import PcmInput, to_float_frames, validate_format
from .avatar import Avatar
from .controls import ControlChange, FrameControl, LiveControls, frame_rows
from .denoiser import ChunkJob, StreamDenoiser, StreamState
from .frames import AVFrame, Event
from .framing import FrameComposer, parse_background, parse_framing
from .playout import IDLE, FramePayload, Playout
from .pose import PoseFeatures
from .session_config import SessionConfig
from .session_input import MAX_MARKS_PER_UTTERANCE, SessionInput, Utterance
from .session_state import SessionLifecycle, SessionState
from .wav2vec2_batch import encode_spans

__all__ = [
    "IDLE",
    "MAX_MARKS_PER_UTTERANCE",
    "FramePayload",
    "PendingChunk",
    "SessionConfig",
    "SessionEngine",
    "SessionState",
    "StreamSession",
]

log = logging.getLogger(__name__)


@dataclass
class PendingChunk:
    """A session's next chunk of speech, waiting for the wav2vec2 runs of its new audio: the worker gathers every
    session's spans and runs them as one batch (`encode_spans`), then hands each its hidden states back."""

    utterance: Utterance
    stream: StreamState
    epoch: int
    spans: list[FeatureSpan]  # wav2vec2's inputs, in order (none when the tokens already made suffice)
    end_features: bool  # the utterance's features end with these spans


class SessionEngine(Protocol):
    """What a session asks of the engine that runs it (streaming.engine.Engine), named here so the session is
    typed without importing the engine (which imports the session)."""

    models: VExpressModels
    poses: PoseFeatures

    def wake(self) -> None: ...
    def new_stream(self, session: StreamSession) -> StreamState: ...
    def denoiser_for(self, session: StreamSession) -> StreamDenoiser: ...
    def silence_tokens(self, session: StreamSession) -> torch.Tensor: ...
    def motion(self, motion_id: str) -> np.ndarray: ...
    def release_session(self, session: StreamSession) -> None: ...


class StreamSession:
    def __init__(
        self, engine: SessionEngine, avatar: Avatar, config: SessionConfig, now: Callable[[], float] = time.monotonic
    ):
        self.id = "s" + secrets.token_hex(10)  # unguessable: ids appear in URLs (tokens still guard them)
        self.engine = engine
        self.avatar = avatar
        self.avatar_id = avatar.info.id
        self.config = config
        # the output frames: the generated crop composed into the avatar's photo as the session asked
        self.composer = FrameComposer(
            avatar.photo,
            parse_framing(config.framing),
            parse_background(config.background),
            (avatar.info.width, avatar.info.height),
            avatar.encoded.reference_kps,
        )
        self.width, self.height = self.composer.size  # of the frames out (the model's crop: avatar.info)
        self.samples_per_frame = config.samples_per_frame
        self.time_base = Fraction(1, config.fps)
        self.denoiser_settings = config.denoiser_settings()
        self._now = now
        self._lock = threading.RLock()
        # Live controls: weights, pose, blink rate; changed by `change_controls`, read per generated frame.
        self.controls = LiveControls(config.params, avatar.encoded.reference_kps, config.fps, engine.motion)
        self.lifecycle = SessionLifecycle(self.id)
        self.input = SessionInput(config, engine.models, now, self.id)
        self.playout = Playout(config, avatar, self.controls, self.composer, self.input, self.lifecycle)
        # the worker's side
        self._stream: StreamState | None = None  # the denoiser's state for this session's frames
        self._reset_stream = True
        self._idle_made = 0  # live idle frames submitted (their payload numbers)
        self.last_input = now()  # when audio or a control call last came in (the server's idle timeout)

    # -- state and figures --------------------------------------------------------------------------------------
    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    @property
    def closed(self) -> bool:
        return self.lifecycle.closed

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        self.lifecycle.add_listener(fn)

    def remove_listener(self, fn: Callable[[Event], None]) -> None:
        self.lifecycle.remove_listener(fn)

    @property
    def stream(self) -> StreamState | None:
        """The denoiser's state for this session (None until the worker first prepares a chunk)."""
        return self._stream

    @property
    def pending_utterances(self) -> int:
        """Utterances pushed and not yet played to their end."""
        return len(self.input.utterances)

    @property
    def ready_frames(self) -> int:
        """Frames made and waiting to be shown."""
        return len(self.playout.ready)

    @property
    def max_ready_frames(self) -> int:
        """The most frames made ahead of the reader (`max_ready_s`): generation waits beyond it."""
        return self.playout.max_ready

    @property
    def live_idle(self) -> bool:
        """Whether idle frames are generated live (the pose follows a motion: device work while idle) rather than
        taken from the pre-rendered idle clip."""
        return self.playout.live_idle_on

    @property
    def buffered_ms(self) -> float:
        """Pushed audio not played yet (what a bot pushing ahead of real time sees as its lead)."""
        with self._lock:
            return self.input.buffered_ms()

    @property
    def frames_out(self) -> int:
        return self.playout.frames_out

    @property
    def speech_frames_out(self) -> int:
        return self.playout.speech_frames_out

    @property
    def dropped_frames(self) -> int:
        return self.playout.dropped_frames

    @property
    def skipped_speech_pictures(self) -> int:
        """Speech frames a late reader skipped: pictures only, their audio was sent."""
        return self.playout.skipped_speech_pictures

    @property
    def underruns(self) -> int:
        return self.playout.underruns

    @property
    def live_dropped_ms(self) -> float:
        """Live input dropped to keep its lag bounded (max_live_lag_s)."""
        return self.input.live_dropped_ms

    @property
    def latencies_ms(self) -> deque[float]:
        """Audio pushed -> frame ready, the last 2000 speech frames."""
        return self.playout.latencies_ms

    @property
    def latency_count(self) -> int:
        return self.playout.latency_count

    def stats(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "state": self.state.value,
            "idle": "live" if self.live_idle else "clip",
            "frames_out": self.frames_out,
            "speech_frames_out": self.speech_frames_out,
            "dropped_frames": self.dropped_frames,
            "skipped_speech_pictures": self.skipped_speech_pictures,  # their audio was sent (a burst)
            "live_dropped_ms": round(self.live_dropped_ms, 1),  # live input dropped to keep its lag bounded
            "underruns": self.underruns,
            "ready_frames": self.ready_frames,
            "buffered_ms": round(self.buffered_ms, 1),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
        }

    # -- in: audio, marks, controls, interrupt (any thread) -----------------------------------------------------
    def push_audio(
        self, pcm: PcmInput, sample_rate: int | None = None, channels: int | None = None, live: bool = False
    ) -> None:
        """Audio in. `live`: a source that speaks in real time (a microphone): it keeps at most `max_live_lag_s`
        pushed ahead of playback, dropping the oldest audio not yet in generation; other sources (a bot pushing
        ahead of real time) may hold `max_buffer_s`."""
        self._touch()
        rate = self.config.input_sample_rate if sample_rate is None else sample_rate
        chans = self.config.input_channels if channels is None else channels
        validate_format(rate, chans)
        # Refuse bad or oversized audio before any state changes: a refused push must not leave its samples in
        # the resamplers (they would leak into the next push) nor open or end an utterance.
        samples = to_float_frames(pcm, chans)
        with self._lock:
            self.input.push(samples, rate, chans, live)
        self.engine.wake()

    def end_utterance(self) -> None:
        """The audio pushed so far is one utterance; its last partial frame is padded with silence."""
        self._touch()
        with self._lock:
            ended = self.input.end()
        if ended:
            self.engine.wake()

    def mark(self, name: str) -> None:
        """An Event("mark") fires when the audio pushed before it has been played."""
        self._touch()
        with self._lock:
            self.input.mark(name)

    def change_controls(self, changes: dict[str, Any]) -> ControlChange:
        """Change live controls (strength, pose source and amplitude, blink rate, ...) from the next frame made,
        ramped; an Event("control.applied", {"version"}) marks the first frame shown with it. Raises InputError
        for a bad or non-live field (nothing changes then)."""
        self._touch()
        change = self.controls.change(changes)
        self.engine.wake()
        return change

    def interrupt(self) -> None:
        """Flush every stage: pushed audio, tokens, frames in flight and queued. The next frame is idle."""
        self.last_input = self._now()
        with self._lock:
            self.lifecycle.interrupt()
            index = self.playout.next_index
            events = self.input.clear(index)
            self.playout.interrupt()
            self._reset_stream = True
            events += self.lifecycle.to(SessionState.IDLE, index)
        self.lifecycle.emit(events)

    def _touch(self) -> None:
        self.lifecycle.check_open()
        self.last_input = self._now()

    # -- out: frames (the reader), the end -----------------------------------------------------------------------
    def read_frame(self) -> AVFrame:
        """The next frame of the output stream; never blocks. Speech when it is ready, else idle."""
        with self._lock:
            frame, events = self.playout.read(self._now())
        self.lifecycle.emit(events)
        return frame

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            events = self.lifecycle.to(SessionState.CLOSED, self.playout.next_index)
            self.input.utterances.clear()
            self.playout.clear()
        self.lifecycle.emit(events)
        self.engine.release_session(self)

    def fail(self, code: str, message: str) -> None:
        """The worker (or the server) could not serve this session: an `error` event {code, message}, then the
        session ends; the others go on. Any thread."""
        self.lifecycle.emit([Event("error", {"code": code, "message": message}, self.playout.next_index)])
        self.close()

    # -- the worker's side ----------------------------------------------------------------------------------------
    def next_job(self) -> ChunkJob | None:
        """The next chunk on its own (features run for this session alone): `prepare_job`, wav2vec2,
        `complete_job`. The worker does the same for every session at once, with one wav2vec2 call."""
        prepared = self.prepare_job()
        if not isinstance(prepared, PendingChunk):
            return prepared
        hidden = encode_spans(self.engine.models, [span.audio for span in prepared.spans]) if prepared.spans else []
        return self.complete_job(prepared, hidden)

    def prepare_job(self) -> ChunkJob | PendingChunk | None:
        """The worker's call, on its thread, before any model compute: the next chunk when it needs no audio
        features (silence), or the wav2vec2 runs its new audio needs (`complete_job` makes the chunk from their
        hidden states); None when nothing is due or there is no room for more frames."""
        n = self.denoiser_settings.new_frames
        with self._lock:
            if self.closed:
                return None
            if self._reset_stream or self._stream is None:
                self._stream = self.engine.new_stream(self)
                self._reset_stream = False
            utt = self.input.next_to_generate()
            stream = self._stream
            if utt is None:
                silent = self._silent_chunk(stream)
            elif not self.playout.has_room(n):
                return None
            else:
                pcm, end_features = self.input.feed(utt, n)
                epoch = self.lifecycle.epoch
        if utt is None:
            return None if silent is None else self._silent_job(stream, *silent)
        # host work only (the features are this thread's): the spans of audio wav2vec2 runs on
        spans = utt.features.plan(pcm, end=end_features) if len(pcm) or end_features else []
        return PendingChunk(utt, stream, epoch, spans, end_features)

    def complete_job(self, pending: PendingChunk, hidden: list[torch.Tensor]) -> ChunkJob | None:
        """The worker's call after wav2vec2 ran on `pending.spans` (`hidden`: their hidden states, in order): the
        next chunk when its audio (plus lookahead) is in; else None."""
        utt, stream, epoch, end_features = pending.utterance, pending.stream, pending.epoch, pending.end_features
        tokens = [t.tokens for span, h in zip(pending.spans, hidden) for t in utt.features.tokens(span, h)]
        with self._lock:
            if epoch != self.lifecycle.epoch or not self.input.holds(utt):
                return None  # interrupted, or its audio dropped (live input behind) while the features ran
            utt.tokens += tokens
            utt.features_ended |= end_features
            n = self.denoiser_settings.new_frames
            if utt.frames_submitted == 0 and not utt.started:
                self._continue_from_screen(stream)
            available = len(utt.tokens)
            spf = self.samples_per_frame
            if available < n and not (utt.features_ended and available > 0):
                return None
            count = min(n, available)
            if (utt.frames_submitted + count) * spf > utt.out_total:
                return None  # the output-rate audio lags the model-rate audio by the resampler's delay
            controls = self.controls.next_frames(n)
            payloads: list[FramePayload | None] = []
            for control in controls[:count]:
                k = utt.frames_submitted
                audio = utt.out_audio.take(spf)
                arrival = self.input.arrival(utt, (k + 1) * spf)
                payloads.append(FramePayload(utt.id, k, audio, arrival, epoch, control.kps, control.version))
                utt.frames_submitted += 1
            chunk_tokens = torch.stack(utt.tokens[:count])
            del utt.tokens[:count]
            if count < n:  # the end of an utterance: pad to the static window with silent filler frames
                pad = self.engine.silence_tokens(self)[None].expand(n - count, -1, -1).to(chunk_tokens)
                chunk_tokens = torch.cat([chunk_tokens, pad])
                payloads += [None] * (n - count)
            trigger = utt.arrivals[-1][1] if utt.arrivals else self._now()
            meta = {"trigger": trigger}
        rows = self._rows(controls)  # the guider runs outside the lock
        return ChunkJob(stream, self.avatar.encoded, chunk_tokens, payloads, self.controls.params, meta, rows)

    def deliver(self, frames: list[tuple[FramePayload, np.ndarray, torch.Tensor]]) -> None:
        """The worker hands back a chunk's frames: (payload, uint8 image, clean latent) each, in order. Frames of an
        epoch that was interrupted since, or of a closed session, are dropped."""
        # Here, on the worker thread: reading a device tensor waits for the device, which the event loop that
        # calls read_frame() must never do.
        nearest = self.playout.nearest_idle([latent for _, _, latent in frames])
        with self._lock:
            if self.closed:
                return
            # On the session's clock, which stamped the audio and paces playback (a caller-given clock and the
            # worker's monotonic one must not mix: latencies and play_after would be meaningless).
            self.playout.deliver(frames, nearest, self._now(), self.lifecycle.epoch)

    def _silent_job(
        self,
        stream: StreamState,
        payloads: list[FramePayload | None],
        controls: list[FrameControl],
        meta: dict[str, float],
    ) -> ChunkJob:
        tokens = self.engine.silence_tokens(self)[None].expand(len(payloads), -1, -1)
        rows = self._rows(controls)  # the guider runs outside the lock
        return ChunkJob(stream, self.avatar.encoded, tokens, payloads, self.controls.params, meta, rows)

    def _rows(self, controls: list[FrameControl]) -> dict[str, torch.Tensor]:
        pose = self.engine.poses.features([c.kps for c in controls], self.avatar.info.width, self.avatar.info.height)
        return frame_rows([c.weights for c in controls], pose)

    def _silent_chunk(
        self, stream: StreamState
    ) -> tuple[list[FramePayload | None], list[FrameControl], dict[str, float]] | None:
        """Between utterances (under the lock): the next chunk driven by silence, or None. While the pose follows
        a motion, live idle frames, made when few are left to show: just ahead of the reader, so that speech
        starting now waits behind as few of them as possible. Otherwise silent fillers, only while staggered
        windows still hold real frames back (they push them out)."""
        n = self.denoiser_settings.new_frames
        now = self._now()
        playout = self.playout
        if not self.controls.posed:
            playout.live_idle_on = False  # the portrait's own pose: the idle clip takes over
            if stream.queue is None or stream.real_frames_queued == 0:
                return None
            return [None] * n, self.controls.next_frames(n), {}
        if len(playout.live_idle) > self.config.jitter_frames:
            return None
        if not playout.live_idle_on:
            self._continue_from_screen(stream)
            playout.live_idle_on = True
        controls = self.controls.next_frames(n)
        payloads: list[FramePayload | None] = []
        epoch = self.lifecycle.epoch
        for control in controls:
            payloads.append(
                FramePayload(IDLE, self._idle_made, playout.silence, now, epoch, control.kps, control.version)
            )
            self._idle_made += 1
        return payloads, controls, {"trigger": now}

    def _continue_from_screen(self, stream: StreamState) -> None:
        """Generation (speech, or live idle) continues from what is on screen: the idle clip's frames around the
        current position, unless the stream itself made the frames on screen."""
        if self.playout.continues_on_screen:
            return
        self.controls.start_from_rest()  # from the idle clip's pose into the motion
        c = self.denoiser_settings.context_frames
        if c == 0:
            return
        order = self.playout.idle_context(c)
        self.engine.denoiser_for(self).set_context(
            stream, self.avatar.idle_latents[:, order], self.engine.silence_tokens(self)[None].expand(c, -1, -1)
        )
