"""A live session: pushed audio in, a never-stalling stream of frames paired with their audio out.

The session is the state machine (idle -> speaking -> idle, interrupt, closed) and the bookkeeping around the model
worker, which does all model compute (`streaming/worker.py`). Threads: `push_audio`, `end_utterance`, `mark`,
`interrupt` and `read_frame` may be called from any thread (the server's event loop); the worker thread calls
`prepare_job`, `complete_job` (around its one wav2vec2 call for every session), `deliver` and `fail`. One lock
guards the shared state; model calls happen outside it.

Output timing: the reader calls `read_frame()` once per frame period (the server paces it with a `FrameClock`);
frame i plays at i/fps with audio samples [i*spf, (i+1)*spf). A reader that falls behind skips frames (dropped,
counted) instead of letting latency grow, and every queue is bounded.
"""

from __future__ import annotations

import enum
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from vexpress_rt.errors import InputError
from vexpress_rt.loader import VExpressModels

from .audio_features import FeatureSpan, IncrementalAudioFeatures
from .audio_input import MODEL_RATE, AudioInput, PcmInput, SampleFifo, to_float_frames, validate_format
from .avatar import Avatar
from .controls import ControlChange, FrameControl, LiveControls, frame_rows
from .decoder import DECODERS
from .denoiser import ChunkJob, DenoiserSettings, StreamDenoiser, StreamState
from .frames import AVFrame, Event
from .framing import FrameComposer, parse_background, parse_framing
from .params import DEFAULTS, GenerationParams
from .pose import PoseFeatures
from .wav2vec2_batch import encode_spans

MAX_MARKS_PER_UTTERANCE = 1000  # marks waiting for one utterance's audio (each fires in O(1) when it has played)
IDLE = 0  # the utterance number of live idle frames (generated from silence while the head follows a motion)

log = logging.getLogger(__name__)


class SessionState(str, enum.Enum):
    IDLE = "idle"
    SPEAKING = "speaking"
    CLOSED = "closed"


@dataclass
class SessionConfig:
    """A session's transport and audio settings, and its `GenerationParams` (validated when they were made).

    Validated once, when made (`__post_init__`); the engine and the session read it, they do not check it again."""

    fps: int = 25
    params: GenerationParams = DEFAULTS  # steps, guidance, attention weights, strategy, window, seed
    input_sample_rate: int = 16000
    input_channels: int = 1
    output_sample_rate: int = 48000
    decoder: str = "full"  # "tiny": TAESD, 11x cheaper on an H100 (streaming/decoder.py, docs/streaming.md)
    left_context_s: float = 2.0  # wav2vec2 context before the new audio
    lookahead_s: float = 0.0  # wav2vec2 context after it (0: measured, docs/streaming.md)
    jitter_frames: int = 2  # playback of an utterance starts this long after its first frames are ready
    max_buffer_s: float = 120.0  # pushed audio not yet played (a bot may push ahead of real time)
    # live input (a microphone: push_audio(live=True)) never builds a backlog: past this lag the oldest pushed audio
    # not yet in generation is dropped (counted: live_dropped_ms)
    max_live_lag_s: float = 2.0
    max_ready_s: float = 1.0  # decoded frames waiting to play
    max_reader_lag_frames: int = 2  # a reader further behind than this skips frames
    blend_frames: int = 4  # cross-fade from the last speech frame into the idle loop
    # the output picture (streaming/framing.py): "crop" (as generated), "portrait" or a "WxH" canvas ...
    framing: str = "crop"
    # ... over "photo", a "#rrggbb" colour, a "data:image/...;base64," image, or "transparent" (an alpha plane)
    background: str = "photo"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise InputError(msg)

        fps = self.fps
        if not isinstance(fps, int) or isinstance(fps, bool) or not 5 <= fps <= 60 or self.output_sample_rate % fps:
            bad(f"fps must be an integer 5..60 dividing the output rate {self.output_sample_rate}, got {self.fps!r}")
        if not isinstance(self.params, GenerationParams):
            bad(f"params must be GenerationParams, got {type(self.params).__name__}")
        validate_format(self.input_sample_rate, self.input_channels)
        if self.output_sample_rate not in (16000, 24000, 32000, 44100, 48000):
            bad(f"output_sample_rate must be one of 16000, 24000, 32000, 44100, 48000, got {self.output_sample_rate}")
        if self.decoder not in DECODERS:
            bad(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if not self.max_live_lag_s > 0:
            bad(f"max_live_lag_s must be positive, got {self.max_live_lag_s!r}")
        parse_framing(self.framing)  # InputError with the option's own message
        parse_background(self.background)

    def denoiser_settings(self) -> DenoiserSettings:
        return DenoiserSettings.of(self.params)

    def with_params(self, **changes: Any) -> SessionConfig:
        """This config with some generation parameters changed (validated, as every GenerationParams)."""
        return replace(self, params=replace(self.params, **changes))

    @property
    def samples_per_frame(self) -> int:
        return self.output_sample_rate // self.fps


@dataclass
class FramePayload:
    """What travels with a frame through the denoiser: its place in the utterance and its audio."""

    utterance: int
    number: int  # frame number within the utterance
    audio: np.ndarray  # int16 (spf,)
    audio_time: float  # when the last audio sample of this frame was pushed
    epoch: int
    kps: np.ndarray | None = None  # (3, 2) float32 pixels: the V-Kps points (pose) it is generated with
    control_version: int = 0  # the last live control change it was made with (LiveControls)


@dataclass
class SpeechFrame:
    payload: FramePayload
    image: np.ndarray
    latent: torch.Tensor
    ready_time: float
    idle_pos: int  # the idle clip frame closest to this one (where the idle loop resumes after it)


@dataclass
class Utterance:
    id: int
    audio: AudioInput
    features: IncrementalAudioFeatures
    pcm16k: SampleFifo = field(default_factory=lambda: SampleFifo(np.float32))  # not yet through the features
    samples16k: int = 0
    out_audio: SampleFifo = field(default_factory=SampleFifo)  # output-rate samples not yet given to frames
    out_total: int = 0
    arrivals: deque[tuple[int, float]] = field(default_factory=deque)  # (output-rate sample count, time pushed)
    tokens: list[torch.Tensor] = field(default_factory=list)
    frames_submitted: int = 0
    frames_total: int | None = None  # known once ended
    ended: bool = False
    features_ended: bool = False
    started: bool = False  # playback began
    play_after: float | None = None
    frames_played: int = 0
    real_samples: int = 0  # output-rate samples of real (unpadded) audio
    in_samples: int = 0  # input-rate sample frames pushed
    marks: deque[tuple[int, str]] = field(default_factory=deque)  # (output sample position, name), in order


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
        self._listeners: list[Callable[[Event], None]] = []
        self._state = SessionState.IDLE
        self._epoch = 0
        self._utterance_ids = itertools.count(1)
        self._utterances: deque[Utterance] = deque()  # in push order; the head is the one playing or next
        self._ready: deque[SpeechFrame] = deque()
        self._max_ready = max(int(config.max_ready_s * config.fps), 2 * config.params.new_frames + config.jitter_frames)
        self._next_index = 0
        self._t0: float | None = None
        self._stream: StreamState | None = None  # the worker's denoiser state
        self._reset_stream = True
        self._idle_pos = 0
        self._idle_dir = 1
        # Live idle: while the pose is not the portrait's own (a motion), idle frames are generated from silence
        # so that the head keeps following it; the pre-rendered idle clip holds the fix_face pose only.
        self._live_idle: deque[SpeechFrame] = deque()  # made and waiting to be shown
        self._live_idle_on = False  # the stream is generating idle frames (its context is those frames)
        self._idle_made = 0  # live idle frames submitted (their payload numbers)
        self._showing_live = False  # the frame on screen was generated live (speech or live idle), not the clip
        self._last_shown: np.ndarray | None = None  # the last idle image shown (what a cross-fade starts from)
        self._last_image: np.ndarray | None = None
        self._last_kps: np.ndarray | None = None  # the pose points of the last generated frame shown (for the lids)
        self._last_latent: torch.Tensor | None = None
        self._last_idle_pos = 0
        self._blend: tuple[np.ndarray, int] | None = None
        self._pending_marks: list[str] = []  # marks with no audio before them: fire on the next frame
        self._silence = np.zeros(self.samples_per_frame, np.int16)
        # figures
        self.frames_out = 0
        self.speech_frames_out = 0
        self.dropped_frames = 0
        self.skipped_speech_pictures = 0  # speech frames a late reader skipped: pictures only, their audio was sent
        self.live_dropped_ms = 0.0  # live input dropped to keep the lag bounded (max_live_lag_s)
        self._burst: list[np.ndarray] = []  # audio of frames whose pictures were skipped: sent with the next frame
        self.underruns = 0
        self.latencies_ms: deque[float] = deque(maxlen=2000)  # audio pushed -> frame ready
        self.latency_count = 0  # frames whose latency was recorded (latencies_ms keeps the last 2000)
        self.last_input = now()  # when audio or a control call last came in (the server's idle timeout)
        self.closed = False
        # Live controls: weights, pose, blink rate; changed by `change_controls`, read per generated frame.
        self.controls = LiveControls(config.params, avatar.encoded.reference_kps, config.fps, engine.motion)
        self._shown_version = 0  # the control change of the frame on screen
        self._acked_version = 0  # the last change acknowledged (control.applied)

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def state(self) -> SessionState:
        return self._state

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Event], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    @property
    def pending_utterances(self) -> int:
        """Utterances pushed and not yet played to their end."""
        return len(self._utterances)

    @property
    def ready_frames(self) -> int:
        """Frames made and waiting to be shown."""
        return len(self._ready)

    @property
    def max_ready_frames(self) -> int:
        """The most frames made ahead of the reader (`max_ready_s`): generation waits beyond it."""
        return self._max_ready

    @property
    def live_idle(self) -> bool:
        """Whether idle frames are generated live (the pose follows a motion: device work while idle) rather than
        taken from the pre-rendered idle clip."""
        return self._live_idle_on

    @property
    def buffered_ms(self) -> float:
        """Pushed audio not played yet (what a bot pushing ahead of real time sees as its lead)."""
        with self._lock:
            samples = sum(u.out_total - u.frames_played * self.samples_per_frame for u in self._utterances)
        return max(0.0, 1000.0 * samples / self.config.output_sample_rate)

    def push_audio(
        self, pcm: PcmInput, sample_rate: int | None = None, channels: int | None = None, live: bool = False
    ) -> None:
        """Audio in. `live`: a source that speaks in real time (a microphone): it keeps at most `max_live_lag_s`
        pushed ahead of playback, dropping the oldest audio not yet in generation; other sources (a bot pushing
        ahead of real time) may hold `max_buffer_s`."""
        self._check_open()
        self.last_input = self._now()
        rate = self.config.input_sample_rate if sample_rate is None else sample_rate
        chans = self.config.input_channels if channels is None else channels
        validate_format(rate, chans)
        # Refuse bad or oversized audio before any state changes: a refused push must not leave its samples in
        # the resamplers (they would leak into the next push) nor open or end an utterance.
        samples = to_float_frames(pcm, chans)
        with self._lock:
            if live and self.buffered_ms + 1000.0 * len(samples) / rate > 1000 * self.config.max_live_lag_s:
                self._drop_backlog()
            if self.buffered_ms + 1000.0 * len(samples) / rate > 1000 * self.config.max_buffer_s:
                raise InputError(
                    f"audio buffer full: more than {self.config.max_buffer_s:g} s pushed ahead of playback"
                )
            utt = self._open_utterance(rate, chans)
            pcm16k, out = utt.audio.push(samples, rate, chans)
            utt.in_samples += len(samples)
            self._append_audio(utt, pcm16k, out, real=True)
        self.engine.wake()

    def _drop_backlog(self) -> None:
        """(Under the lock) live input fell behind: every utterance ends where its generation has reached (frames
        already submitted still play); the audio pushed beyond is dropped, and the next push starts a new utterance
        from the newest audio. An utterance with nothing submitted goes entirely."""
        spf = self.samples_per_frame
        rate = self.config.output_sample_rate
        kept: deque[Utterance] = deque()
        gone: list[Utterance] = []
        for utt in self._utterances:
            dropped = max(0, utt.out_total - utt.frames_submitted * spf)
            if dropped == 0:
                kept.append(utt)
                continue
            self.live_dropped_ms += 1000.0 * dropped / rate
            if utt.frames_submitted == 0 and not utt.started:
                gone.append(utt)  # nothing of it generated: it goes (its marks fire now, their audio is gone)
                continue
            utt.pcm16k.take(utt.pcm16k.size)
            utt.out_audio.take(utt.out_audio.size)
            utt.tokens.clear()
            utt.out_total = utt.frames_submitted * spf
            utt.real_samples = min(utt.real_samples, utt.out_total)
            utt.frames_total = utt.frames_submitted
            utt.ended = utt.features_ended = True
            kept.append(utt)
        self._utterances = kept
        self._pending_marks += [name for u in gone for _, name in u.marks]
        log.debug("session %s: live input behind; %.0f ms dropped so far", self.id, self.live_dropped_ms)

    def end_utterance(self) -> None:
        """The audio pushed so far is one utterance; its last partial frame is padded with silence."""
        self._check_open()
        self.last_input = self._now()
        with self._lock:
            utt = self._utterances[-1] if self._utterances and not self._utterances[-1].ended else None
            if utt is None:
                return
            pcm16k, out = utt.audio.flush()
            self._append_audio(utt, pcm16k, out, real=True)
            frames = -(-utt.out_total // self.samples_per_frame)  # whole frames, rounding up
            pad_out = frames * self.samples_per_frame - utt.out_total
            pad_16k = max(0, int(np.ceil(frames * MODEL_RATE / self.config.fps)) - utt.samples16k)
            self._append_audio(utt, np.zeros(pad_16k, np.float32), np.zeros(pad_out, np.int16), real=False)
            utt.frames_total = frames
            utt.ended = True
        self.engine.wake()

    def mark(self, name: str) -> None:
        """An Event("mark") fires when the audio pushed before it has been played."""
        self._check_open()
        self.last_input = self._now()
        with self._lock:
            pending = [u for u in self._utterances if self._pushed_end(u) > u.frames_played * self.samples_per_frame]
            waiting = len(pending[-1].marks) if pending else len(self._pending_marks)
            if waiting >= MAX_MARKS_PER_UTTERANCE:
                raise InputError(f"too many marks: at most {MAX_MARKS_PER_UTTERANCE} wait in one utterance")
            if pending:
                pending[-1].marks.append((self._pushed_end(pending[-1]), name))
            else:
                self._pending_marks.append(name)

    def _pushed_end(self, utt: Utterance) -> int:
        """Output-rate sample position where the audio pushed into `utt` so far ends: from the input count, not
        from what the resampler has let out yet (that lags by its filter delay, which would fire marks early)."""
        return -(-utt.in_samples * self.config.output_sample_rate // utt.audio.sample_rate)

    def change_controls(self, changes: dict[str, Any]) -> ControlChange:
        """Change live controls (strength, pose source and amplitude, blink rate, ...) from the next frame made,
        ramped; an Event("control.applied", {"version"}) marks the first frame shown with it. Raises InputError
        for a bad or non-live field (nothing changes then)."""
        self._check_open()
        self.last_input = self._now()
        change = self.controls.change(changes)
        self.engine.wake()
        return change

    def interrupt(self) -> None:
        """Flush every stage: pushed audio, tokens, frames in flight and queued. The next frame is idle."""
        events = []
        self.last_input = self._now()
        with self._lock:
            self._epoch += 1
            for utt in self._utterances:
                if utt.started or utt.frames_submitted or utt.out_total:
                    position = 1000.0 * min(utt.frames_played * self.samples_per_frame, utt.real_samples)
                    events.append(
                        Event(
                            "playback.finished",
                            {
                                "utterance": utt.id,
                                "position_ms": round(position / self.config.output_sample_rate, 1),
                                "interrupted": True,
                            },
                            self._next_index,
                        )
                    )
                events += [Event("mark", {"name": name}, self._next_index) for _, name in utt.marks]
            self._utterances.clear()
            self._ready.clear()
            self._live_idle.clear()
            self._live_idle_on = False
            self._reset_stream = True
            self._start_blend()
            events += self._set_state(SessionState.IDLE)
        self._emit(events)

    def read_frame(self) -> AVFrame:
        """The next frame of the output stream; never blocks. Speech when it is ready, else idle."""
        events: list[Event] = []
        with self._lock:
            now = self._now()
            if self._t0 is None:
                self._t0 = now
            due = int((now - self._t0) * self.config.fps)
            if due - self._next_index > self.config.max_reader_lag_frames:
                events += self._skip(due - self._next_index)
            index = self._next_index
            self._next_index += 1
            frame = self._speech_frame(index, now, events) or self._idle_frame(index, events)
            if self._burst:  # the speech audio of the frames just skipped, before this frame's own
                frame.audio = np.concatenate([*self._burst, frame.audio])
                frame.skipped_audio_frames = len(self._burst)
                self._burst = []
            # The lids follow the head: a generated frame's own pose points, the portrait's on the idle clip.
            eyes = self.avatar.encoded.reference_kps
            if self._showing_live and self._last_kps is not None:
                eyes = self._last_kps
            frame.image = self.controls.blinks.apply(index, frame.image, eyes)  # at the controls' blink rate
            frame.image, frame.alpha = self.composer.compose(frame.image, eyes)
            if self._shown_version > self._acked_version:
                self._acked_version = self._shown_version
                events.append(Event("control.applied", {"version": self._shown_version}, index))
            if self._pending_marks:
                events += [Event("mark", {"name": n}, index) for n in self._pending_marks]
                self._pending_marks.clear()
            self.frames_out += 1
        self._emit(events)
        return frame

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._utterances.clear()
            self._ready.clear()
            self._live_idle.clear()
            events = self._set_state(SessionState.CLOSED)
        self._emit(events)
        self.engine.release_session(self)

    def fail(self, code: str, message: str) -> None:
        """The worker (or the server) could not serve this session: an `error` event {code, message}, then the
        session ends; the others go on. Any thread."""
        self._emit([Event("error", {"code": code, "message": message}, self._next_index)])
        self.close()

    def stats(self) -> dict[str, Any]:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "state": self._state.value,
            "idle": "live" if self._live_idle_on else "clip",
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

    # -- audio in ---------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise InputError(f"session {self.id} is closed")

    def _open_utterance(self, rate: int, channels: int) -> Utterance:
        if self._utterances and not self._utterances[-1].ended:
            utt = self._utterances[-1]
            if (utt.audio.sample_rate, utt.audio.channels) == (rate, channels):
                return utt
            self.end_utterance()  # a format change starts a new utterance
        cfg = self.config
        utt = Utterance(
            next(self._utterance_ids),
            AudioInput(rate, channels, cfg.output_sample_rate),
            IncrementalAudioFeatures(
                self.engine.models, cfg.fps, cfg.left_context_s, cfg.lookahead_s, min_frames=cfg.params.new_frames
            ),
        )
        self._utterances.append(utt)
        return utt

    def _append_audio(self, utt: Utterance, pcm16k: np.ndarray, out: np.ndarray, real: bool) -> None:
        if len(pcm16k):
            utt.pcm16k.append(pcm16k)
            utt.samples16k += len(pcm16k)
        if len(out):
            utt.out_audio.append(out)
            utt.out_total += len(out)
            if real:
                utt.real_samples += len(out)
            utt.arrivals.append((utt.out_total, self._now()))

    # -- the worker's side --------------------------------------------------------------------------------------
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
        with self._lock:
            if self.closed:
                return None
            if self._reset_stream or self._stream is None:
                self._stream = self.engine.new_stream(self)
                self._reset_stream = False
            utt = next(
                (u for u in self._utterances if not (u.ended and u.frames_submitted >= (u.frames_total or 0))), None
            )
            stream = self._stream
            if utt is None:
                silent = self._silent_chunk(stream)
            elif len(self._ready) + self.denoiser_settings.new_frames > self._max_ready:
                return None
            else:
                pcm, end_features, epoch = self._feed(utt)
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
            if epoch != self._epoch or not any(u is utt for u in self._utterances):
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
                arrival = self._arrival(utt, (k + 1) * spf)
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

    def _feed(self, utt: Utterance) -> tuple[np.ndarray, bool, int]:
        """(Under the lock) the next audio for `utt`'s features, whether they end after it, and the epoch. About
        two chunks of audio at a time: wav2vec2's span stays bounded however far ahead a bot has pushed."""
        cfg, n = self.config, self.denoiser_settings.new_frames
        feed = 0 if len(utt.tokens) >= n else int((2 * n / cfg.fps + cfg.lookahead_s) * MODEL_RATE)
        pcm = utt.pcm16k.take(feed)
        return pcm, utt.ended and not utt.features_ended and utt.pcm16k.size == 0, self._epoch

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
        if not self.controls.posed:
            self._live_idle_on = False  # the portrait's own pose: the idle clip takes over
            if stream.queue is None or stream.real_frames_queued == 0:
                return None
            return [None] * n, self.controls.next_frames(n), {}
        if len(self._live_idle) > self.config.jitter_frames:
            return None
        if not self._live_idle_on:
            self._continue_from_screen(stream)
            self._live_idle_on = True
        controls = self.controls.next_frames(n)
        payloads: list[FramePayload | None] = []
        for control in controls:
            payloads.append(
                FramePayload(IDLE, self._idle_made, self._silence, now, self._epoch, control.kps, control.version)
            )
            self._idle_made += 1
        return payloads, controls, {"trigger": now}

    def _arrival(self, utt: Utterance, sample_end: int) -> float:
        while len(utt.arrivals) > 1 and utt.arrivals[1][0] < sample_end:
            utt.arrivals.popleft()
        for count, when in utt.arrivals:
            if count >= sample_end:
                return when
        return self._now()

    def _continue_from_screen(self, stream: StreamState) -> None:
        """Generation (speech, or live idle) continues from what is on screen: the idle clip's frames around the
        current position, unless the stream itself made the frames on screen."""
        if self._live_idle_on or (self._last_latent is not None and self._state == SessionState.SPEAKING):
            return  # live idle or back-to-back speech: the stream's own context is already the frames on screen
        self.controls.start_from_rest()  # from the idle clip's pose into the motion
        idle = self.avatar.idle_latents
        c = self.denoiser_settings.context_frames
        if c == 0:
            return
        order = [self._idle_index(self._idle_pos - self._idle_dir * (c - 1 - i)) for i in range(c)]
        self.engine.denoiser_for(self).set_context(
            stream, idle[:, order], self.engine.silence_tokens(self)[None].expand(c, -1, -1)
        )

    def deliver(self, frames: list[tuple[FramePayload, np.ndarray, torch.Tensor]]) -> None:
        """The worker hands back a chunk's frames: (payload, uint8 image, clean latent) each, in order. Frames of an
        epoch that was interrupted since, or of a closed session, are dropped."""
        # Here, on the worker thread: reading a device tensor waits for the device, which the event loop that
        # calls read_frame() must never do.
        nearest = self._nearest_idle([latent for _, _, latent in frames])
        with self._lock:
            # On the session's clock, which stamped the audio and paces playback (a caller-given clock and the
            # worker's monotonic one must not mix: latencies and play_after would be meaningless).
            ready_time = self._now()
            for (payload, image, latent), idle_pos in zip(frames, nearest):
                if payload.epoch != self._epoch or self.closed:
                    continue  # interrupted while in flight
                if payload.utterance == IDLE:
                    self._live_idle.append(SpeechFrame(payload, image, latent, ready_time, idle_pos))
                    continue
                self._ready.append(SpeechFrame(payload, image, latent, ready_time, idle_pos))
                self.latencies_ms.append(1000.0 * (ready_time - payload.audio_time))
                self.latency_count += 1
                utt = self._utterance(payload.utterance)
                if utt is not None and utt.play_after is None:
                    utt.play_after = ready_time + self.config.jitter_frames / self.config.fps

    # -- frames out ---------------------------------------------------------------------------------------------
    def _utterance(self, uid: int) -> Utterance | None:
        return next((u for u in self._utterances if u.id == uid), None)

    def _speech_frame(self, index: int, now: float, events: list[Event]) -> AVFrame | None:
        utt = self._utterances[0] if self._utterances else None
        if utt is None:
            return None
        if utt.ended and utt.frames_played >= (utt.frames_total or 0):
            self._finish(utt, index, events)  # e.g. its last frames were skipped by a late reader
            return None
        if not utt.started:
            complete = utt.ended and len(self._ready) >= (utt.frames_total or 0) - utt.frames_played
            waiting = utt.play_after is None or now < utt.play_after
            if not self._ready or (waiting and not complete):
                return None
            utt.started = True
            self._live_idle.clear()  # idle frames made before the speech: it plays as soon as it is ready
            events += self._set_state(SessionState.SPEAKING, index)
            events.append(Event("playback.started", {"utterance": utt.id}, index))
        if not (self._ready and self._ready[0].payload.utterance == utt.id):
            # Generation fell behind: hold the face and play silence (the rest shifts later, nothing is lost).
            self.underruns += 1
            if self._last_image is None:
                return None
            return AVFrame(
                index, self.time_base, self._last_image, self._silence, self.config.output_sample_rate, True, utt.id
            )
        sf = self._ready.popleft()
        self._show_generated(sf)
        utt.frames_played += 1
        self.speech_frames_out += 1
        played = utt.frames_played * self.samples_per_frame
        while utt.marks and utt.marks[0][0] <= played:
            events.append(Event("mark", {"name": utt.marks.popleft()[1]}, index))
        if utt.ended and utt.frames_played >= (utt.frames_total or 0):
            self._finish(utt, index, events)
        return AVFrame(index, self.time_base, sf.image, sf.payload.audio, self.config.output_sample_rate, True, utt.id)

    def _show_generated(self, sf: SpeechFrame) -> None:
        self._last_image, self._last_latent, self._last_idle_pos = sf.image, sf.latent, sf.idle_pos
        self._last_kps = sf.payload.kps
        self._shown_version = max(self._shown_version, sf.payload.control_version)
        self._showing_live = True

    def _finish(self, utt: Utterance, index: int, events: list[Event]) -> None:
        if utt.started:
            position = 1000.0 * utt.real_samples / self.config.output_sample_rate
            data = {"utterance": utt.id, "position_ms": round(position, 1), "interrupted": False}
            events.append(Event("playback.finished", data, index))
        events += [Event("mark", {"name": name}, index) for _, name in utt.marks]
        self._utterances.popleft()
        if not self._utterances or not self._utterances[0].started:
            if self._state == SessionState.SPEAKING and not self._ready:
                events += self._set_state(SessionState.IDLE, index)
                if not self._live_idle_on:  # else live idle frames go on from the speech's last frame
                    self._start_blend()

    def _idle_index(self, pos: int) -> int:
        n = int(self.avatar.idle_frames[self.config.decoder].shape[0])
        if n == 1:
            return 0
        period = 2 * (n - 1)
        p = pos % period
        return p if p < n else period - p

    def _start_blend(self) -> None:
        """Enter the idle loop at the clip frame closest to the last speech frame, cross-fading into it."""
        if self._last_image is None or self._last_latent is None:
            return
        self._idle_pos = self._last_idle_pos
        self._blend = (self._last_image, 0)

    def _nearest_idle(self, latents: list[torch.Tensor]) -> list[int]:
        """The idle clip frame closest to each speech frame's latent: one search and one read for the whole
        chunk (worker or finisher thread: the read waits for the device), distances in float32 (fp16 sums of
        squares overflow), by cdist's matrix product: no (F, 4, n, h, w) difference tensor (7x less CPU with the
        simulated device at 512x512, docs/simulator.md)."""
        if not latents:
            return []
        idle = self.avatar.idle_latents.to(latents[0].device, torch.float32)  # (4, n, h, w)
        frames = torch.stack(latents).to(torch.float32)  # (F, 4, h, w)
        distance = torch.cdist(frames.flatten(1), idle.transpose(0, 1).flatten(1))  # (F, n)
        return [int(i) for i in distance.argmin(dim=1).tolist()]

    def _idle_frame(self, index: int, events: list[Event]) -> AVFrame:
        """A frame while nothing is spoken: a live idle frame when the pose follows a motion (the last one held
        while the next is late), else the pre-rendered idle clip, cross-fading wherever one source hands over to
        the other."""
        if self._live_idle:
            sf = self._live_idle.popleft()
            if not self._showing_live and self._last_shown is not None:
                self._blend = (self._last_shown, 0)  # from the idle clip into the live frames
            self._show_generated(sf)
            image = sf.image
        elif self._live_idle_on and self._showing_live and self._last_image is not None:
            self.underruns += 1  # generation fell behind: hold the face
            image = self._last_image
        else:
            if self._showing_live:  # live frames end (the pose is the portrait's again): back into the clip
                self._showing_live = False
                self._start_blend()
            image = self.avatar.idle_frames[self.config.decoder][self._idle_index(self._idle_pos)]
            self._idle_pos += 1
            self._shown_version = self.controls.version  # clip frames are shown now, with the controls of now
        if self._blend is not None:
            last, k = self._blend
            w = 1.0 - (k + 1) / (self.config.blend_frames + 1)
            image = cv2.addWeighted(last, w, image, 1.0 - w, 0.0)  # rounded; 8x less CPU than a float32 blend
            self._blend = (last, k + 1) if k + 1 < self.config.blend_frames else None
        self._last_shown = image
        return AVFrame(index, self.time_base, image, self._silence, self.config.output_sample_rate, False, None)

    def _skip(self, count: int) -> list[Event]:
        """The reader fell behind: skip the pictures of the missed frame periods, never their speech: the audio of
        the speech frames skipped goes out with the next frame (a short burst the receiver's jitter buffer
        absorbs), counted in `skipped_speech_pictures`."""
        events: list[Event] = []
        first = self._next_index
        self._next_index += count
        self.dropped_frames += count
        burst: list[np.ndarray] = []
        for k in range(count):
            if self._ready:
                sf = self._ready.popleft()
                utt = self._utterance(sf.payload.utterance)
                if utt is not None:
                    if not utt.started:
                        utt.started = True
                        self._live_idle.clear()
                        events += self._set_state(SessionState.SPEAKING, first + k)
                        events.append(Event("playback.started", {"utterance": utt.id}, first + k))
                    utt.frames_played += 1
                    played = utt.frames_played * self.samples_per_frame
                    while utt.marks and utt.marks[0][0] <= played:
                        events.append(Event("mark", {"name": utt.marks.popleft()[1]}, first + k))
                burst.append(sf.payload.audio)
                self._show_generated(sf)  # the face continues from the last frame skipped
                self.skipped_speech_pictures += 1
            elif self._live_idle:
                self._live_idle.popleft()
            else:
                break
        if burst:  # the rest of the missed periods were silent
            self._burst = burst + [self._silence] * (count - len(burst))
        self._idle_pos += count
        return events

    def _set_state(self, state: SessionState, index: int | None = None) -> list[Event]:
        if state == self._state:
            return []
        self._state = state
        return [Event("state", {"state": state.value}, self._next_index if index is None else index)]

    def _emit(self, events: list[Event]) -> None:
        for event in events:
            for fn in list(self._listeners):
                try:
                    fn(event)
                except Exception:  # a broken listener must not break the stream
                    log.exception("session %s: event listener failed", self.id)
