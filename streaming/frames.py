"""What the engine hands out: video frames paired with their audio, and session events."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass
class AVFrame:
    """One video frame and exactly the 1/fps of audio it was generated from, on one clock.

    Frame `index` shows at `index / fps` seconds; its audio covers samples
    `[index * spf, (index + 1) * spf)` of one continuous output stream: the same instant (after a late reader's
    skip, preceded by the skipped frames' audio: `skipped_audio_frames`).
    """

    index: int
    time_base: Fraction  # 1 / fps
    image: np.ndarray  # uint8 (H, W, 3) RGB
    audio: np.ndarray  # int16 (samples_per_frame,) mono
    sample_rate: int
    speaking: bool
    utterance: int | None = None  # which utterance this frame plays, None while idle
    # A late reader skipped the pictures of this many frame periods just before this frame; their speech audio is
    # not lost: `audio` begins with it (a short burst), so it covers frames [index - skipped_audio_frames, index].
    skipped_audio_frames: int = 0
    # uint8 (H, W) opacity of `image` when the session's background is "transparent" (streaming/framing.py); None:
    # opaque. Sinks that cannot carry it show `image` (the photo's pixels behind the person).
    alpha: np.ndarray | None = None

    @property
    def pts(self) -> int:
        return self.index

    @property
    def samples_per_frame(self) -> int:
        return len(self.audio) // (1 + self.skipped_audio_frames)

    @property
    def audio_start(self) -> int:
        """The output stream's sample position where `audio` begins."""
        return (self.index - self.skipped_audio_frames) * self.samples_per_frame

    @property
    def seconds(self) -> float:
        return float(self.index * self.time_base)


@dataclass
class Event:
    """Something a client may want to know, stamped with the output frame at which it happened.

    Types: "playback.started" {"utterance"}, "playback.finished" {"utterance", "position_ms", "interrupted"},
    "mark" {"name"}, "state" {"state"}, "error" {"code", "message"}.
    """

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    frame_index: int = 0
