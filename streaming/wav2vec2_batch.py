"""wav2vec2 over several streams' spans of audio in one model call, each span's hidden states equal to its own run.

The worker gathers every session's new audio and runs wav2vec2 once per turn (one launch sequence, not one per
session). Spans differ in length, so they are zero-padded to the longest, and the three places where wav2vec2 reads
across time are made to see each span alone:
- the first conv layer's GroupNorm (wav2vec2-base, `feat_extract_norm="group"`) normalises each channel over the
  whole time axis: here over each span's own frames;
- the positional convolution reads +-64 frames: the padded frames are zeroed before it, as the zero padding a span
  run alone gets;
- self-attention: padded keys are masked out.
Every other op is position-wise, or a convolution whose outputs inside a span read only that span. The masks are
made on the host from the lengths and uploaded once (pinned, non-blocking): no device value is read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vexpress_rt.loader import VExpressModels

from .device import upload

SAMPLE_RATE = 16000  # wav2vec2's input rate


@torch.no_grad()
def encode_spans(models: VExpressModels, spans: list[np.ndarray]) -> list[torch.Tensor]:
    """wav2vec2's last hidden states, (frames, hidden) on the model's device in its dtype, of each 16 kHz span:
    one model call for all of them (a single span: the model's own forward, as offline)."""
    values = [
        models.feature_extractor(span, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
        for span in spans
    ]
    encoder: Any = models.audio_encoder  # transformers' Wav2Vec2Model: its submodules are read by name
    if len(values) == 1:
        return [encoder(upload(values[0][None], models.device, models.dtype)).last_hidden_state[0]]
    if not _batchable(encoder):  # a variant whose padding this module does not handle: one run per span
        return [encoder(upload(v[None], models.device, models.dtype)).last_hidden_state[0] for v in values]
    lengths = [len(v) for v in values]
    padded = np.zeros((len(values), max(lengths)), np.float32)
    for row, v in zip(padded, values):
        row[: len(v)] = v
    x = upload(padded, models.device, models.dtype)[:, None]  # (spans, 1, samples)
    config = encoder.config
    for i, layer in enumerate(encoder.feature_extractor.conv_layers):
        lengths = [(n - config.conv_kernel[i]) // config.conv_stride[i] + 1 for n in lengths]
        if i == 0 and config.feat_extract_norm == "group":
            x = layer.activation(_group_norm_within(layer.layer_norm, layer.conv(x), _mask(lengths, models)))
        else:
            x = layer(x)
    hidden, _ = encoder.feature_projection(x.transpose(1, 2))  # (spans, frames, hidden)
    keep = _mask(lengths, models)[:, 0]  # (spans, frames)
    hidden = hidden * keep[..., None]
    transformer = encoder.encoder
    hidden = hidden + transformer.pos_conv_embed(hidden)
    if not config.do_stable_layer_norm:
        hidden = transformer.layer_norm(hidden)
    hidden = transformer.dropout(hidden)
    # additive mask (spans, 1, 1, keys): what both the eager and the SDPA attention read
    bias = ((1 - keep) * torch.finfo(hidden.dtype).min)[:, None, None, :]
    for layer in transformer.layers:
        hidden = layer(hidden, attention_mask=bias)
    if config.do_stable_layer_norm:
        hidden = transformer.layer_norm(hidden)
    return [hidden[k, :n] for k, n in enumerate(lengths)]


def _batchable(encoder: Any) -> bool:
    """The transformers `Wav2Vec2Model` in eval mode without an adapter (wav2vec2-base and its stable-layer-norm
    variant): what `encode_spans` reproduces from the model's own submodules."""
    config = encoder.config
    return (
        not encoder.training
        and config.feat_extract_norm in ("group", "layer")
        and not config.add_adapter
        and len(encoder.feature_extractor.conv_layers) == len(config.conv_kernel)
    )


def _mask(lengths: list[int], models: VExpressModels) -> torch.Tensor:
    """(spans, 1, frames) ones inside each span, zeros over its padding, in the model's dtype on its device."""
    mask = np.zeros((len(lengths), 1, max(lengths)), np.float32)
    for row, n in zip(mask, lengths):
        row[0, :n] = 1
    return upload(mask, models.device, models.dtype)


def _group_norm_within(norm: torch.nn.GroupNorm, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`norm(x)` with each span's statistics over its own frames only (`mask` (spans, 1, frames)), in float32 as
    the GroupNorm kernels accumulate; the padded frames come out finite (they are ignored later)."""
    b, c, t = x.shape
    g = norm.num_groups
    xs = x.float().reshape(b, g, c // g, t)
    m = mask.float().reshape(b, 1, 1, t)
    count = m.sum(dim=3, keepdim=True) * (c // g)
    mean = (xs * m).sum(dim=(2, 3), keepdim=True) / count
    var = ((xs - mean).pow(2) * m).sum(dim=(2, 3), keepdim=True) / count
    y = ((xs - mean) * torch.rsqrt(var + norm.eps)).reshape(b, c, t)
    if norm.affine:
        y = y * norm.weight.float()[None, :, None] + norm.bias.float()[None, :, None]
    return y.to(x.dtype)
