"""Audio -> per-frame audio tokens, as the original computes them offline (whole-clip wav2vec2).

waveform (16 kHz mono) -> feature-extractor normalisation over the whole clip (fp32) -> wav2vec2
`last_hidden_state` -> linear resampling in time to exactly 2 tokens per video frame (fp32) -> zero padding and a
+-num_pad-frame window per frame -> audio projection -> (frames, 5, 768).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .loader import VExpressModels

SAMPLE_RATE = 16000


@torch.no_grad()
def wav2vec_hidden_states(models: VExpressModels, waveform: np.ndarray) -> torch.Tensor:
    """(1, A, D) with A = floor((N - 400) / 320) + 1, in the models' dtype."""
    values = models.feature_extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]
    values = values.to(models.device, models.dtype)
    return models.audio_encoder(values).last_hidden_state


def frame_windows(hidden: torch.Tensor, video_length: int, num_pad_audio_frames: int = 2) -> torch.Tensor:
    """hidden (1, A, D) -> (L, 2*(2p+1), D): frame f gets resampled tokens 2(f-p) .. 2(f+p)+1, zeros outside."""
    dtype = hidden.dtype
    tokens = F.interpolate(hidden.float().transpose(1, 2), size=2 * video_length, mode="linear")[0].T
    tokens = tokens.to(dtype)
    pad = tokens.new_zeros(2 * num_pad_audio_frames, tokens.shape[1])
    tokens = torch.cat([pad, tokens, pad])
    width = 2 * (2 * num_pad_audio_frames + 1)
    return tokens.unfold(0, width, 2).transpose(1, 2)[:video_length].contiguous()


@torch.no_grad()
def audio_tokens(
    models: VExpressModels, waveform: np.ndarray, video_length: int, num_pad_audio_frames: int = 2
) -> torch.Tensor:
    """(L, num_queries, cross_attention_dim) tokens for the denoising UNet's audio attention."""
    windows = frame_windows(wav2vec_hidden_states(models, waveform), video_length, num_pad_audio_frames)
    return models.audio_projection(windows)
