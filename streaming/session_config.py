"""A live session's settings: transport, audio, playout margins, output picture, and its `GenerationParams`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vexpress_rt.errors import InputError

from .audio_input import validate_format
from .decoder import DECODERS
from .denoiser import DenoiserSettings
from .framing import parse_background, parse_framing
from .params import DEFAULTS, GenerationParams


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
