"""Incremental audio features: push 16 kHz mono PCM in any chunk sizes, get per-frame audio tokens as soon as
the lookahead allows.

The offline pipeline runs wav2vec2 once over the whole clip, normalised over the whole clip. Here wav2vec2 runs on
a bounded span (left context + new audio + lookahead), normalised over that span, and each frame takes the same
+-2-frame window of tokens as offline. With a context covering the whole clip the tokens equal the offline ones;
with the default bounded context they approximate them (measured by `vexpress-rt bench`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vexpress_rt.loader import VExpressModels

from .device import upload
from .wav2vec2_batch import SAMPLE_RATE, encode_spans

HOP = 320  # wav2vec2 feature stride (samples); receptive field 400
FIELD = 400
TOKENS_PER_FRAME = 2


@dataclass
class FrameTokens:
    index: int  # frame number since the stream started
    tokens: torch.Tensor  # (num_queries, cross_attention_dim): what the denoiser's audio attention reads


@dataclass
class FeatureSpan:
    """One wav2vec2 run planned by `IncrementalAudioFeatures.plan` (host arrays): the audio it reads and where
    its frames' tokens sit in the hidden states wav2vec2 gives for it."""

    audio: np.ndarray  # float32 16 kHz samples: wav2vec2's input
    frames: np.ndarray  # the frame numbers whose tokens it gives
    src: np.ndarray  # (tokens,) fractional absolute hidden index of each token the frames read
    base: int  # absolute hidden index of the span's first hidden state
    real: np.ndarray  # (tokens,) bool: tokens inside the audio (zeros before the start and after the end)


class IncrementalAudioFeatures:
    def __init__(
        self,
        models: VExpressModels,
        fps: float = 25.0,
        left_context_s: float = 2.0,
        lookahead_s: float = 0.2,
        num_pad_audio_frames: int = 2,
        min_frames: int = 1,
    ):
        self.models = models
        self.fps = fps
        self.pad = num_pad_audio_frames
        self.min_frames = min_frames  # run wav2vec2 only once this many frames are ready (one per denoiser call)
        self.left_context = int(left_context_s * SAMPLE_RATE)
        self.lookahead_hidden = int(round(lookahead_s * SAMPLE_RATE / HOP))
        self._samples = np.zeros(0, dtype=np.float32)
        self._offset = 0  # absolute index of self._samples[0]
        self._total = 0  # samples pushed so far
        self._next_frame = 0
        self._ended = False

    # -- token geometry: token j of the 2-per-frame grid sits at fractional hidden index src(j) ---------------
    def _src(self, j: np.ndarray) -> np.ndarray:
        ratio = (SAMPLE_RATE / HOP) / (TOKENS_PER_FRAME * self.fps)
        return np.maximum((j + 0.5) * ratio - 0.5, 0.0)

    def _hidden_available(self) -> int:
        return 0 if self._total < FIELD else (self._total - FIELD) // HOP + 1

    @property
    def held_samples(self) -> int:
        """16 kHz samples kept for wav2vec2's context: bounded however long the stream (a memory figure)."""
        return len(self._samples)

    def push(self, pcm: np.ndarray) -> list[FrameTokens]:
        """Push audio; the tokens of the frames now ready (wav2vec2 run for this stream alone)."""
        return self._run(self.plan(pcm))

    def end(self) -> list[FrameTokens]:
        """End of the stream: frames whose window runs past the audio get zero tokens there, as offline."""
        return self._run(self.plan(np.zeros(0, np.float32), end=True))

    def _run(self, spans: list[FeatureSpan]) -> list[FrameTokens]:
        return [frame for span in spans for frame in self.tokens(span, encode_spans(self.models, [span.audio])[0])]

    def plan(self, pcm: np.ndarray, end: bool = False) -> list[FeatureSpan]:
        """Take `pcm` (and, with `end`, the end of the stream) and plan the wav2vec2 runs that give the frames now
        ready: host work only. The caller runs wav2vec2 on each span's audio (`encode_spans`, batched with other
        streams' spans) and passes the hidden states to `tokens`, in order. Two spans at most: the frames ready
        before the end, then the rest (each as `push` and `end` would run them)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if len(pcm):
            self._samples = np.concatenate([self._samples, pcm])
            self._total += len(pcm)
        spans = [self._plan()] if len(pcm) or not end else []
        if end:
            self._ended = True
            spans.append(self._plan())
        return [span for span in spans if span is not None]

    def _frames_ready(self) -> int:
        """Frames (exclusive bound) whose whole window of tokens, plus the lookahead, is computable now."""
        whole_frames = int(self._total * self.fps / SAMPLE_RATE + 1e-9)
        if self._ended:
            return whole_frames
        available = self._hidden_available() - self.lookahead_hidden
        ready = self._next_frame
        while ready < whole_frames:
            last_token = TOKENS_PER_FRAME * (ready + self.pad) + TOKENS_PER_FRAME - 1
            if int(np.ceil(self._src(np.array(last_token)))) >= available:
                break
            ready += 1
        return ready

    def _plan(self) -> FeatureSpan | None:
        stop = self._frames_ready()
        if stop <= self._next_frame or (stop - self._next_frame < self.min_frames and not self._ended):
            return None
        frames = np.arange(self._next_frame, stop)
        # Tokens these frames read (with their +-pad window), as absolute token indices.
        first_tok = TOKENS_PER_FRAME * (frames[0] - self.pad)
        last_tok = TOKENS_PER_FRAME * (frames[-1] + self.pad) + TOKENS_PER_FRAME - 1
        tok_idx = np.arange(first_tok, last_tok + 1)
        n_hidden = self._hidden_available()
        src = self._src(np.clip(tok_idx, 0, None))
        lo = int(np.floor(src[tok_idx >= 0].min())) if (tok_idx >= 0).any() else 0
        # wav2vec2 over [lo - left context, everything available]: hidden index h starts at sample h*HOP.
        start_sample = max(self._offset, lo * HOP - self.left_context)
        start_sample -= start_sample % HOP
        audio = self._samples[start_sample - self._offset :]
        # Offline, a clip of L frames has 2L tokens and zeros after them.
        total_tokens = TOKENS_PER_FRAME * int(self._total * self.fps / SAMPLE_RATE + 1e-9)
        real = (tok_idx >= 0) & (src <= n_hidden - 1 + 1e-9)
        if self._ended:
            real &= tok_idx < total_tokens  # zero padding before the start and after the end, as offline
        self._next_frame = stop
        # Keep only what later frames can still read (their window start minus the left context).
        next_lo = int(np.floor(self._src(np.array(max(0, TOKENS_PER_FRAME * (stop - self.pad))))))
        keep_from = max(self._offset, next_lo * HOP - self.left_context)
        keep_from -= keep_from % HOP
        self._samples = self._samples[keep_from - self._offset :]
        self._offset = keep_from
        return FeatureSpan(audio, frames, src, start_sample // HOP, real)

    @torch.no_grad()
    def tokens(self, span: FeatureSpan, hidden: torch.Tensor) -> list[FrameTokens]:
        """The frame tokens of a planned span from wav2vec2's hidden states of its audio, (frames, width) on the
        model's device: each token interpolates linearly between two hidden states, all rows at once there."""
        hidden = hidden.float()
        floor = np.floor(span.src)
        i0 = np.clip(floor.astype(np.int64) - span.base, 0, hidden.shape[0] - 1)
        i1 = np.minimum(i0 + 1, hidden.shape[0] - 1)
        # every upload here pinned and non-blocking (streaming/device.py): a pageable copy would wait for the UNet
        # call the worker launched before these features
        # The weights rounded to float32 from float64, as a Python-float scalar multiply does per row.
        weights = upload(np.stack([1 - (span.src - floor), span.src - floor]).astype(np.float32), hidden.device)
        w0, w1 = weights[0][:, None], weights[1][:, None]
        index = upload(np.stack([i0, i1]), hidden.device)
        rows = hidden[index[0]] * w0 + hidden[index[1]] * w1
        rows = torch.where(upload(span.real, hidden.device)[:, None], rows, torch.zeros_like(rows))
        rows = rows.to(self.models.dtype)
        width = TOKENS_PER_FRAME * (2 * self.pad + 1)
        windows = rows.unfold(0, width, TOKENS_PER_FRAME).transpose(1, 2)[: len(span.frames)]
        tokens = self.models.audio_projection(windows.to(self.models.device))
        return [FrameTokens(int(f), tokens[k]) for k, f in enumerate(span.frames)]
