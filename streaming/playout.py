"""A live session's playout: which picture and which audio each output frame gets.

Frames made by the worker wait here (speech, and live idle frames while the pose follows a motion); the reader
takes one per frame period. Speech plays when it is ready (after a short jitter margin), else the face holds (an
underrun, counted); between utterances the pre-rendered idle clip loops, cross-fading wherever one source hands
over to another; a reader that fell behind skips pictures, never speech audio. Each frame then gets the eyelids
(the blink rate) and is composed into the output picture (`streaming/framing.py`).

Not thread-safe: the session (`streaming/session.py`) calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
import torch

from .avatar import Avatar
from .controls import LiveControls
from .frames import AVFrame, Event
from .framing import FrameComposer
from .session_config import SessionConfig
from .session_input import SessionInput, Utterance
from .session_state import SessionLifecycle, SessionState

IDLE = 0  # the utterance number of live idle frames (generated from silence while the head follows a motion)


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
    """A generated frame waiting to be shown."""

    payload: FramePayload
    image: np.ndarray
    latent: torch.Tensor
    ready_time: float
    idle_pos: int  # the idle clip frame closest to this one (where the idle loop resumes after it)


class Playout:
    def __init__(
        self,
        config: SessionConfig,
        avatar: Avatar,
        controls: LiveControls,
        composer: FrameComposer,
        inputs: SessionInput,
        lifecycle: SessionLifecycle,
    ):
        self.config = config
        self.avatar = avatar
        self.controls = controls
        self.composer = composer
        self.inputs = inputs
        self.lifecycle = lifecycle
        self.time_base = Fraction(1, config.fps)
        self.samples_per_frame = config.samples_per_frame
        self.silence = np.zeros(self.samples_per_frame, np.int16)
        self.ready: deque[SpeechFrame] = deque()  # speech frames made and waiting to be shown
        self.max_ready = max(int(config.max_ready_s * config.fps), 2 * config.params.new_frames + config.jitter_frames)
        # Live idle: while the pose is not the portrait's own (a motion), idle frames are generated from silence
        # so that the head keeps following it; the pre-rendered idle clip holds the fix_face pose only.
        self.live_idle: deque[SpeechFrame] = deque()  # made and waiting to be shown
        self.live_idle_on = False  # the stream is generating idle frames (its context is those frames)
        self.next_index = 0
        self._t0: float | None = None
        self.idle_pos = 0  # where the idle clip plays (a position in its ping-pong loop)
        self.idle_dir = 1
        self._showing_live = False  # the frame on screen was generated live (speech or live idle), not the clip
        self._last_shown: np.ndarray | None = None  # the last idle image shown (what a cross-fade starts from)
        self._last_image: np.ndarray | None = None
        self._last_kps: np.ndarray | None = None  # the pose points of the last generated frame shown (for the lids)
        self.last_latent: torch.Tensor | None = None
        self._last_idle_pos = 0
        self._blend: tuple[np.ndarray, int] | None = None
        self._burst: list[np.ndarray] = []  # audio of frames whose pictures were skipped: sent with the next frame
        self._shown_version = 0  # the control change of the frame on screen
        self._acked_version = 0  # the last change acknowledged (control.applied)
        # figures
        self.frames_out = 0
        self.speech_frames_out = 0
        self.dropped_frames = 0
        self.skipped_speech_pictures = 0  # speech frames a late reader skipped: pictures only, their audio was sent
        self.underruns = 0
        self.latencies_ms: deque[float] = deque(maxlen=2000)  # audio pushed -> frame ready
        self.latency_count = 0  # frames whose latency was recorded (latencies_ms keeps the last 2000)

    # -- frames in (the worker) ---------------------------------------------------------------------------------
    def has_room(self, frames: int) -> bool:
        """Whether `frames` more speech frames fit ahead of the reader (`max_ready_s`)."""
        return len(self.ready) + frames <= self.max_ready

    def deliver(
        self, frames: list[tuple[FramePayload, np.ndarray, torch.Tensor]], nearest: list[int], now: float, epoch: int
    ) -> None:
        """A chunk's frames: (payload, uint8 image, clean latent) each, with the idle clip frame nearest to each;
        those of another epoch than `epoch` (made before an interrupt) are dropped."""
        for (payload, image, latent), idle_pos in zip(frames, nearest):
            if payload.epoch != epoch:
                continue
            if payload.utterance == IDLE:
                self.live_idle.append(SpeechFrame(payload, image, latent, now, idle_pos))
                continue
            self.ready.append(SpeechFrame(payload, image, latent, now, idle_pos))
            self.latencies_ms.append(1000.0 * (now - payload.audio_time))
            self.latency_count += 1
            utt = self.inputs.find(payload.utterance)
            if utt is not None and utt.play_after is None:
                utt.play_after = now + self.config.jitter_frames / self.config.fps

    def nearest_idle(self, latents: list[torch.Tensor]) -> list[int]:
        """The idle clip frame closest to each speech frame's latent: one search and one read for the whole
        chunk (worker or finisher thread, not under the lock: the read waits for the device), distances in float32
        (fp16 sums of squares overflow), by cdist's matrix product: no (F, 4, n, h, w) difference tensor (7x less
        CPU with the simulated device at 512x512, docs/simulator.md)."""
        if not latents:
            return []
        idle = self.avatar.idle_latents.to(latents[0].device, torch.float32)  # (4, n, h, w)
        frames = torch.stack(latents).to(torch.float32)  # (F, 4, h, w)
        distance = torch.cdist(frames.flatten(1), idle.transpose(0, 1).flatten(1))  # (F, n)
        return [int(i) for i in distance.argmin(dim=1).tolist()]

    @property
    def continues_on_screen(self) -> bool:
        """Generation's own context is already the frames on screen: live idle, or back-to-back speech."""
        return self.live_idle_on or (self.last_latent is not None and self.lifecycle.state == SessionState.SPEAKING)

    def idle_context(self, frames: int) -> list[int]:
        """The idle clip frames that lead up to the one on screen (generation continues from them)."""
        return [self._idle_index(self.idle_pos - self.idle_dir * (frames - 1 - i)) for i in range(frames)]

    def interrupt(self) -> None:
        """Nothing made plays any more; the idle loop cross-fades in from the frame on screen."""
        self.clear()
        self.live_idle_on = False
        self._start_blend()

    def clear(self) -> None:
        self.ready.clear()
        self.live_idle.clear()

    # -- frames out (the reader) --------------------------------------------------------------------------------
    def read(self, now: float) -> tuple[AVFrame, list[Event]]:
        """The frame due now and the events at it."""
        events: list[Event] = []
        if self._t0 is None:
            self._t0 = now
        due = int((now - self._t0) * self.config.fps)
        if due - self.next_index > self.config.max_reader_lag_frames:
            events += self._skip(due - self.next_index)
        index = self.next_index
        self.next_index += 1
        frame = self._speech_frame(index, now, events) or self._idle_frame(index)
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
        if self.inputs.pending_marks:
            events += [Event("mark", {"name": n}, index) for n in self.inputs.pending_marks]
            self.inputs.pending_marks.clear()
        self.frames_out += 1
        return frame, events

    def _speech_frame(self, index: int, now: float, events: list[Event]) -> AVFrame | None:
        utterances = self.inputs.utterances
        utt = utterances[0] if utterances else None
        if utt is None:
            return None
        if utt.played:
            self._finish(utt, index, events)  # e.g. its last frames were skipped by a late reader
            return None
        if not utt.started:
            complete = utt.ended and len(self.ready) >= (utt.frames_total or 0) - utt.frames_played
            waiting = utt.play_after is None or now < utt.play_after
            if not self.ready or (waiting and not complete):
                return None
            self._start(utt, index, events)
        rate = self.config.output_sample_rate
        if not (self.ready and self.ready[0].payload.utterance == utt.id):
            # Generation fell behind: hold the face and play silence (the rest shifts later, nothing is lost).
            self.underruns += 1
            if self._last_image is None:
                return None
            return AVFrame(index, self.time_base, self._last_image, self.silence, rate, True, utt.id)
        sf = self.ready.popleft()
        self._show_generated(sf)
        self._played(utt, index, events)
        self.speech_frames_out += 1
        if utt.played:
            self._finish(utt, index, events)
        return AVFrame(index, self.time_base, sf.image, sf.payload.audio, rate, True, utt.id)

    def _start(self, utt: Utterance, index: int, events: list[Event]) -> None:
        utt.started = True
        self.live_idle.clear()  # idle frames made before the speech: it plays as soon as it is ready
        events += self.lifecycle.to(SessionState.SPEAKING, index)
        events.append(Event("playback.started", {"utterance": utt.id}, index))

    def _played(self, utt: Utterance, index: int, events: list[Event]) -> None:
        """One more frame of `utt` has played (shown, or skipped with its audio sent): the marks it reached fire."""
        utt.frames_played += 1
        played = utt.frames_played * self.samples_per_frame
        while utt.marks and utt.marks[0][0] <= played:
            events.append(Event("mark", {"name": utt.marks.popleft()[1]}, index))

    def _show_generated(self, sf: SpeechFrame) -> None:
        self._last_image, self.last_latent, self._last_idle_pos = sf.image, sf.latent, sf.idle_pos
        self._last_kps = sf.payload.kps
        self._shown_version = max(self._shown_version, sf.payload.control_version)
        self._showing_live = True

    def _finish(self, utt: Utterance, index: int, events: list[Event]) -> None:
        if utt.started:
            position = 1000.0 * utt.real_samples / self.config.output_sample_rate
            data = {"utterance": utt.id, "position_ms": round(position, 1), "interrupted": False}
            events.append(Event("playback.finished", data, index))
        events += [Event("mark", {"name": name}, index) for _, name in utt.marks]
        utterances = self.inputs.utterances
        utterances.popleft()
        if not utterances or not utterances[0].started:
            if self.lifecycle.state == SessionState.SPEAKING and not self.ready:
                events += self.lifecycle.to(SessionState.IDLE, index)
                if not self.live_idle_on:  # else live idle frames go on from the speech's last frame
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
        if self._last_image is None or self.last_latent is None:
            return
        self.idle_pos = self._last_idle_pos
        self._blend = (self._last_image, 0)

    def _idle_frame(self, index: int) -> AVFrame:
        """A frame while nothing is spoken: a live idle frame when the pose follows a motion (the last one held
        while the next is late), else the pre-rendered idle clip, cross-fading wherever one source hands over to
        the other."""
        if self.live_idle:
            sf = self.live_idle.popleft()
            if not self._showing_live and self._last_shown is not None:
                self._blend = (self._last_shown, 0)  # from the idle clip into the live frames
            self._show_generated(sf)
            image = sf.image
        elif self.live_idle_on and self._showing_live and self._last_image is not None:
            self.underruns += 1  # generation fell behind: hold the face
            image = self._last_image
        else:
            if self._showing_live:  # live frames end (the pose is the portrait's again): back into the clip
                self._showing_live = False
                self._start_blend()
            image = self.avatar.idle_frames[self.config.decoder][self._idle_index(self.idle_pos)]
            self.idle_pos += 1
            self._shown_version = self.controls.version  # clip frames are shown now, with the controls of now
        if self._blend is not None:
            last, k = self._blend
            w = 1.0 - (k + 1) / (self.config.blend_frames + 1)
            image = cv2.addWeighted(last, w, image, 1.0 - w, 0.0)  # rounded; 8x less CPU than a float32 blend
            self._blend = (last, k + 1) if k + 1 < self.config.blend_frames else None
        self._last_shown = image
        return AVFrame(index, self.time_base, image, self.silence, self.config.output_sample_rate, False, None)

    def _skip(self, count: int) -> list[Event]:
        """The reader fell behind: skip the pictures of the missed frame periods, never their speech: the audio of
        the speech frames skipped goes out with the next frame (a short burst the receiver's jitter buffer
        absorbs), counted in `skipped_speech_pictures`."""
        events: list[Event] = []
        first = self.next_index
        self.next_index += count
        self.dropped_frames += count
        burst: list[np.ndarray] = []
        for k in range(count):
            if self.ready:
                sf = self.ready.popleft()
                utt = self.inputs.find(sf.payload.utterance)
                if utt is not None:
                    if not utt.started:
                        self._start(utt, first + k, events)
                    self._played(utt, first + k, events)
                burst.append(sf.payload.audio)
                self._show_generated(sf)  # the face continues from the last frame skipped
                self.skipped_speech_pictures += 1
            elif self.live_idle:
                self.live_idle.popleft()
            else:
                break
        if burst:  # the rest of the missed periods were silent
            self._burst = burst + [self.silence] * (count - len(burst))
        self.idle_pos += count
        return events
