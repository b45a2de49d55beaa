"""A live session's input side: pushed audio grouped into utterances, resampled to the model's rate (its features)
and to the output rate (the frames' audio), the marks waiting on that audio, and the bounds on how far ahead it
may run.

Not thread-safe: the session (`streaming/session.py`) calls it under its lock.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from vexpress_rt.errors import InputError
from vexpress_rt.loader import VExpressModels

from .audio_features import IncrementalAudioFeatures
from .audio_input import MODEL_RATE, AudioInput, SampleFifo
from .frames import Event
from .session_config import SessionConfig

MAX_MARKS_PER_UTTERANCE = 1000  # marks waiting for one utterance's audio (each fires in O(1) when it has played)

log = logging.getLogger(__name__)


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

    @property
    def generated(self) -> bool:
        """Every frame of it has gone to the denoiser."""
        return self.ended and self.frames_submitted >= (self.frames_total or 0)

    @property
    def played(self) -> bool:
        """Every frame of it has been shown."""
        return self.ended and self.frames_played >= (self.frames_total or 0)


class SessionInput:
    """Utterances in push order (the head is the one playing or next), and the marks that wait for no audio."""

    def __init__(self, config: SessionConfig, models: VExpressModels, now: Callable[[], float], session_id: str):
        self.config = config
        self.models = models
        self.samples_per_frame = config.samples_per_frame
        self.session_id = session_id
        self._now = now
        self._ids = itertools.count(1)
        self.utterances: deque[Utterance] = deque()
        self.pending_marks: list[str] = []  # marks with no audio before them: they fire with the next frame
        self.live_dropped_ms = 0.0  # live input dropped to keep the lag bounded (max_live_lag_s)

    # -- audio in -----------------------------------------------------------------------------------------------
    def buffered_ms(self) -> float:
        """Pushed audio not played yet (what a bot pushing ahead of real time sees as its lead)."""
        samples = sum(u.out_total - u.frames_played * self.samples_per_frame for u in self.utterances)
        return max(0.0, 1000.0 * samples / self.config.output_sample_rate)

    def push(self, samples: np.ndarray, rate: int, channels: int, live: bool) -> None:
        """Float sample frames (checked by the caller) into the open utterance, opening one if needed. A live
        source past `max_live_lag_s` drops the oldest audio not yet in generation; any source past `max_buffer_s`
        is refused (InputError, nothing changed)."""
        pushed_ms = 1000.0 * len(samples) / rate
        if live and self.buffered_ms() + pushed_ms > 1000 * self.config.max_live_lag_s:
            self._drop_backlog()
        if self.buffered_ms() + pushed_ms > 1000 * self.config.max_buffer_s:
            raise InputError(f"audio buffer full: more than {self.config.max_buffer_s:g} s pushed ahead of playback")
        utt = self._open_utterance(rate, channels)
        pcm16k, out = utt.audio.push(samples, rate, channels)
        utt.in_samples += len(samples)
        self._append(utt, pcm16k, out, real=True)

    def end(self) -> bool:
        """The audio pushed so far is one utterance; its last partial frame is padded with silence. False when no
        utterance was open."""
        utt = self.utterances[-1] if self.utterances and not self.utterances[-1].ended else None
        if utt is None:
            return False
        pcm16k, out = utt.audio.flush()
        self._append(utt, pcm16k, out, real=True)
        spf = self.samples_per_frame
        frames = -(-utt.out_total // spf)  # whole frames, rounding up
        pad_16k = max(0, int(np.ceil(frames * MODEL_RATE / self.config.fps)) - utt.samples16k)
        self._append(utt, np.zeros(pad_16k, np.float32), np.zeros(frames * spf - utt.out_total, np.int16), real=False)
        utt.frames_total = frames
        utt.ended = True
        return True

    def mark(self, name: str) -> None:
        """A mark fires when the audio pushed before it has been played."""
        spf = self.samples_per_frame
        pending = [u for u in self.utterances if self._pushed_end(u) > u.frames_played * spf]
        waiting = len(pending[-1].marks) if pending else len(self.pending_marks)
        if waiting >= MAX_MARKS_PER_UTTERANCE:
            raise InputError(f"too many marks: at most {MAX_MARKS_PER_UTTERANCE} wait in one utterance")
        if pending:
            pending[-1].marks.append((self._pushed_end(pending[-1]), name))
        else:
            self.pending_marks.append(name)

    def clear(self, index: int) -> list[Event]:
        """An interrupt: every utterance goes; the events that say so (where each one stopped, its marks)."""
        events = []
        rate, spf = self.config.output_sample_rate, self.samples_per_frame
        for utt in self.utterances:
            if utt.started or utt.frames_submitted or utt.out_total:
                position = 1000.0 * min(utt.frames_played * spf, utt.real_samples) / rate
                data = {"utterance": utt.id, "position_ms": round(position, 1), "interrupted": True}
                events.append(Event("playback.finished", data, index))
            events += [Event("mark", {"name": name}, index) for _, name in utt.marks]
        self.utterances.clear()
        return events

    def _open_utterance(self, rate: int, channels: int) -> Utterance:
        if self.utterances and not self.utterances[-1].ended:
            utt = self.utterances[-1]
            if (utt.audio.sample_rate, utt.audio.channels) == (rate, channels):
                return utt
            self.end()  # a format change starts a new utterance
        cfg = self.config
        utt = Utterance(
            next(self._ids),
            AudioInput(rate, channels, cfg.output_sample_rate),
            IncrementalAudioFeatures(
                self.models, cfg.fps, cfg.left_context_s, cfg.lookahead_s, min_frames=cfg.params.new_frames
            ),
        )
        self.utterances.append(utt)
        return utt

    def _append(self, utt: Utterance, pcm16k: np.ndarray, out: np.ndarray, real: bool) -> None:
        if len(pcm16k):
            utt.pcm16k.append(pcm16k)
            utt.samples16k += len(pcm16k)
        if len(out):
            utt.out_audio.append(out)
            utt.out_total += len(out)
            if real:
                utt.real_samples += len(out)
            utt.arrivals.append((utt.out_total, self._now()))

    def _pushed_end(self, utt: Utterance) -> int:
        """Output-rate sample position where the audio pushed into `utt` so far ends: from the input count, not
        from what the resampler has let out yet (that lags by its filter delay, which would fire marks early)."""
        return -(-utt.in_samples * self.config.output_sample_rate // utt.audio.sample_rate)

    def _drop_backlog(self) -> None:
        """Live input fell behind: every utterance ends where its generation has reached (frames already submitted
        still play); the audio pushed beyond is dropped, and the next push starts a new utterance from the newest
        audio. An utterance with nothing submitted goes entirely."""
        spf = self.samples_per_frame
        rate = self.config.output_sample_rate
        kept: deque[Utterance] = deque()
        gone: list[Utterance] = []
        for utt in self.utterances:
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
        self.utterances = kept
        self.pending_marks += [name for u in gone for _, name in u.marks]
        log.debug("session %s: live input behind; %.0f ms dropped so far", self.session_id, self.live_dropped_ms)

    # -- the features' side (the worker's thread, under the session's lock) -------------------------------------
    def next_to_generate(self) -> Utterance | None:
        """The first utterance with frames still to go to the denoiser."""
        return next((u for u in self.utterances if not u.generated), None)

    def feed(self, utt: Utterance, new_frames: int) -> tuple[np.ndarray, bool]:
        """The next audio for `utt`'s features and whether they end after it. About two chunks of audio at a time:
        wav2vec2's span stays bounded however far ahead a bot has pushed."""
        cfg = self.config
        feed = 0 if len(utt.tokens) >= new_frames else int((2 * new_frames / cfg.fps + cfg.lookahead_s) * MODEL_RATE)
        pcm = utt.pcm16k.take(feed)
        return pcm, utt.ended and not utt.features_ended and utt.pcm16k.size == 0

    def arrival(self, utt: Utterance, sample_end: int) -> float:
        """When the output-rate sample `sample_end` of `utt` was pushed (a frame's latency starts there)."""
        while len(utt.arrivals) > 1 and utt.arrivals[1][0] < sample_end:
            utt.arrivals.popleft()
        for count, when in utt.arrivals:
            if count >= sample_end:
                return when
        return self._now()

    def holds(self, utt: Utterance) -> bool:
        """`utt` is still here (not interrupted nor dropped as live backlog)."""
        return any(u is utt for u in self.utterances)

    def find(self, uid: int) -> Utterance | None:
        return next((u for u in self.utterances if u.id == uid), None)
