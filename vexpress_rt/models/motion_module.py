"""AnimateDiff-v2 style motion module: temporal self-attention across the frames of one context window.

Checkpoint layout: `<...>.motion_modules.N.temporal_transformer.{norm, proj_in, transformer_blocks.0.{
attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0,pos_encoder.pe}, norms.{0,1}, ff.net.{0.proj,2}, ff_norm},
proj_out}`.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from .attention import Attention

PE_MAX_LEN = 32  # position-table length of the released model (inference_v2.yaml); windows must fit in it


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    """The standard sin/cos table (1, max_len, dim): even channels sin, odd channels cos."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class PositionalEncoding(nn.Module):
    pe: torch.Tensor  # the buffer

    def __init__(self, dim: int, max_len: int = PE_MAX_LEN):
        super().__init__()
        # A persistent buffer: the checkpoint stores it (rounded to fp16) and the original uses those values.
        self.register_buffer("pe", sinusoidal_table(max_len, dim))


class TemporalAttention(Attention):
    """Self-attention over frames at each spatial location; positions are relative to the window start."""

    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, dim // heads)
        self.pos_encoder = PositionalEncoding(dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:  # type: ignore[override]
        bf, hw, c = x.shape
        b = bf // num_frames
        x = x.reshape(b, num_frames, hw, c).transpose(1, 2).reshape(b * hw, num_frames, c)
        x = x + self.pe_for(num_frames, x.dtype)
        out = super().forward(x)
        return out.reshape(b, hw, num_frames, c).transpose(1, 2).reshape(bf, hw, c)

    def pe_for(self, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
        if num_frames > self.pos_encoder.pe.shape[1]:
            raise ValueError(f"a window of {num_frames} frames exceeds the motion module's {PE_MAX_LEN} positions")
        return self.pos_encoder.pe[:, :num_frames].to(dtype)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            attended: torch.Tensor = attention(norm(x), num_frames)
            x = x + attended
        fed: torch.Tensor = self.ff(self.ff_norm(x))
        return x + fed


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int = 8, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x: frames folded into the batch, (B*F, C, H, W)."""
        bf, c, h, w = x.shape
        hidden = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, num_frames)
        out: torch.Tensor = self.proj_out(hidden)
        return out.reshape(bf, h, w, c).permute(0, 3, 1, 2).contiguous() + x  # NCHW, see SpatialTransformer


class MotionModule(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        out: torch.Tensor = self.temporal_transformer(x, num_frames)
        return out
