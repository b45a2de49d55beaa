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

SAMPLE_RATE = 16000
HOP = 320  # wav2vec2 feature stride (samples); receptive field 400
FIELD = 400
TOKENS_PER_FRAME = 2


@dataclass
class FrameTokens:
    index: int  # frame number since the stream started
    tokens: torch.Tensor  # (num_queries, cross_attention_dim): what the denoiser's audio attention reads


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
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        self._samples = np.concatenate([self._samples, pcm])
        self._total += len(pcm)
        return self._emit()

    def end(self) -> list[FrameTokens]:
        """End of the stream: frames whose window runs past the audio get zero tokens there, as offline."""
        self._ended = True
        return self._emit()

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

    @torch.no_grad()
    def _emit(self) -> list[FrameTokens]:
        stop = self._frames_ready()
        if stop <= self._next_frame or (stop - self._next_frame < self.min_frames and not self._ended):
            return []
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
        span = self._samples[start_sample - self._offset :]
        values = self.models.feature_extractor(span, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]
        # every upload here pinned and non-blocking (streaming/device.py): a pageable copy would wait for the UNet
        # call the worker launched before this session's features
        hidden = self.models.audio_encoder(upload(values, self.models.device, self.models.dtype)).last_hidden_state[0]
        hidden = hidden.float()
        base = start_sample // HOP
        # Offline, a clip of L frames has 2L tokens and zeros after them.
        total_tokens = TOKENS_PER_FRAME * int(self._total * self.fps / SAMPLE_RATE + 1e-9)
        # Each token interpolates linearly between two hidden states, all rows at once on the model's device.
        real = (tok_idx >= 0) & (src <= n_hidden - 1 + 1e-9)
        if self._ended:
            real &= tok_idx < total_tokens  # zero padding before the start and after the end, as offline
        floor = np.floor(src)
        i0 = np.clip(floor.astype(np.int64) - base, 0, hidden.shape[0] - 1)
        i1 = np.minimum(i0 + 1, hidden.shape[0] - 1)
        # The weights rounded to float32 from float64, as a Python-float scalar multiply does per row.
        weights = upload(np.stack([1 - (src - floor), src - floor]).astype(np.float32), hidden.device)
        w0, w1 = weights[0][:, None], weights[1][:, None]
        index = upload(np.stack([i0, i1]), hidden.device)
        rows = hidden[index[0]] * w0 + hidden[index[1]] * w1
        rows = torch.where(upload(real, hidden.device)[:, None], rows, torch.zeros_like(rows))
        rows = rows.to(self.models.dtype)
        width = TOKENS_PER_FRAME * (2 * self.pad + 1)
        windows = rows.unfold(0, width, TOKENS_PER_FRAME).transpose(1, 2)[: len(frames)]
        tokens = self.models.audio_projection(windows.to(self.models.device))
        self._next_frame = stop
        # Keep only what later frames can still read (their window start minus the left context).
        next_lo = int(np.floor(self._src(np.array(max(0, TOKENS_PER_FRAME * (stop - self.pad))))))
        keep_from = max(self._offset, next_lo * HOP - self.left_context)
        keep_from -= keep_from % HOP
        self._samples = self._samples[keep_from - self._offset :]
        self._offset = keep_from
        return [FrameTokens(int(f), tokens[k]) for k, f in enumerate(frames)]
