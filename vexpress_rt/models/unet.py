"""The two UNets of V-Express, as plain modules whose attribute paths are the checkpoint keys.

* `ReferenceNet`: the SD-1.5 2-D UNet (no `conv_norm_out`). Run once on the reference latent at t=0; each of
  its 16 spatial transformer blocks records a "bank": the `norm2` output (the tensor entering its cross-attention).
* `DenoisingUNet`: the same layout made 3-D: every frame goes through the 2-D layers independently (frames are
  folded into the batch), a motion module after every resnet(+transformer) mixes frames, each transformer block
  gains a reference attention `attn1_5` over its bank and its cross-attention `attn2` reads audio tokens, and the
  V-Kps feature is added after `conv_in`. Predicts v.

Both are built from the SD-1.5 `unet/config.json`; all widths come from that config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .attention import Attention, KeyValue
from .motion_module import MotionModule


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> UNetConfig:
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError("per-level attention head counts are not supported")
            heads = heads[0]
        if cfg.get("use_linear_projection"):
            raise ValueError("use_linear_projection=true is not the SD-1.5 layout V-Express uses")
        return cls(
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            attention_heads=int(heads),
            cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
            freq_shift=int(cfg.get("freq_shift", 0)),
            down_block_types=tuple(cfg.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(cfg.get("up_block_types", cls.up_block_types)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> UNetConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


@dataclass
class Conditioning:
    """What the blocks read (and the reference net writes) during one UNet forward."""

    num_frames: int = 1
    encoder_states: torch.Tensor | None = None  # (B*F, tokens, cross_attention_dim): audio tokens or zero text
    reference_kv: dict[str, KeyValue] | None = None  # per transformer block: attn1_5 keys/values of its bank
    # a float, or float32 (B*F, 1, 1): one weight per row of the batch (streaming sessions batched together)
    reference_attention_weight: float | torch.Tensor = 1.0
    audio_attention_weight: float | torch.Tensor = 1.0
    banks: dict[str, torch.Tensor] | None = None  # filled by the reference net's blocks


class _TransformerBlock(nn.Module):
    """The SD-1.5 BasicTransformerBlock layers: self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.name = ""  # module path, set by the UNet: banks are keyed by it
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")


class ReferenceTransformerBlock(_TransformerBlock):
    """Reference-net block: records its bank (the norm2 output) for the denoising UNet."""

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        normed: torch.Tensor = self.norm2(x)
        if cond.banks is not None:
            cond.banks[self.name] = normed
        x = x + self.attn2(normed, context=cond.encoder_states)
        fed: torch.Tensor = self.ff(self.norm3(x))
        return x + fed


class DenoisingTransformerBlock(_TransformerBlock):
    """Spatial self-attention, then reference attention over the bank, then audio cross-attention, then FF.

    The two weights scale the whole attention output, output bias included, as the original does.
    """

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__(dim, heads, context_dim)
        self.norm1_5 = nn.LayerNorm(dim)
        self.attn1_5 = Attention(dim, heads, dim // heads)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        assert cond.reference_kv is not None, "the denoising UNet reads the reference banks' keys/values"
        x = x + self.attn1(self.norm1(x))
        kv = cond.reference_kv[self.name]
        x = x + _weighted(cond.reference_attention_weight, self.attn1_5(self.norm1_5(x), kv=kv))
        x = x + _weighted(cond.audio_attention_weight, self.attn2(self.norm2(x), context=cond.encoder_states))
        fed: torch.Tensor = self.ff(self.norm3(x))
        return x + fed


def _weighted(weight: float | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """weight * out, in out's dtype. A per-row weight (B*F, 1, 1) is cast, not the attention output: a float32
    copy of every half-precision attention output cost two extra passes over it. On CUDA the half product is
    computed in float32 and rounded once, so it differs from a Python float weight only by the weight's own
    rounding to half (float32: the same numbers)."""
    if isinstance(weight, torch.Tensor):
        return out * weight.to(out.dtype)
    return weight * out


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) -> 1x1 conv -> one transformer block over the HxW tokens of a frame -> 1x1 conv."""

    def __init__(self, block_cls: type[nn.Module], channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([block_cls(channels, cfg.attention_heads, cfg.cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        bf, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        for block in self.transformer_blocks:
            hidden = block(hidden, cond)
        # contiguous (NCHW) as in the original: a channels-last result would switch later GroupNorms to a
        # kernel with different (less accurate) fp32 reductions
        out: torch.Tensor = self.proj_out(hidden.reshape(bf, h, w, c).permute(0, 3, 1, 2).contiguous())
        return out + x


def _resnet(in_ch: int, out_ch: int, cfg: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_ch,
        out_channels=out_ch,
        temb_channels=cfg.time_embed_dim,
        eps=cfg.norm_eps,
        groups=cfg.norm_num_groups,
    )


class _Stage(nn.Module):
    """One resolution level: per layer resnet -> [transformer] -> [motion module]."""

    def _init_layers(
        self, in_chs: list[int], out_ch: int, attention: bool, motion: bool, block_cls: type[nn.Module], cfg: UNetConfig
    ) -> None:
        self.resnets = nn.ModuleList([_resnet(c, out_ch, cfg) for c in in_chs])
        if attention:
            self.attentions = nn.ModuleList([SpatialTransformer(block_cls, out_ch, cfg) for _ in in_chs])
        if motion:
            self.motion_modules = nn.ModuleList([MotionModule(out_ch) for _ in in_chs])

    def _layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        out: torch.Tensor = self.resnets[i](x, temb)
        if hasattr(self, "attentions"):
            out = self.attentions[i](out, cond)
        if hasattr(self, "motion_modules"):
            out = self.motion_modules[i](out, cond.num_frames)
        return out


class DownStage(_Stage):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        attention: bool,
        downsample: bool,
        motion: bool,
        block_cls: type[nn.Module],
        cfg: UNetConfig,
    ):
        super().__init__()
        self._init_layers([in_ch] + [out_ch] * (cfg.layers_per_block - 1), out_ch, attention, motion, block_cls, cfg)
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, use_conv=True, out_channels=out_ch, name="op")])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, cond)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpStage(_Stage):
    def __init__(
        self,
        prev_ch: int,
        out_ch: int,
        skip_chs: list[int],
        attention: bool,
        upsample: bool,
        motion: bool,
        block_cls: type[nn.Module],
        cfg: UNetConfig,
    ):
        super().__init__()
        in_chs = [(prev_ch if i == 0 else out_ch) + skip for i, skip in enumerate(skip_chs)]
        self._init_layers(in_chs, out_ch, attention, motion, block_cls, cfg)
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch, use_conv=True, out_channels=out_ch)])

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, cond: Conditioning, skips: list[torch.Tensor]
    ) -> torch.Tensor:
        for i in range(len(self.resnets)):
            x = torch.cat([x, skips.pop()], dim=1)
            x = self._layer(i, x, temb, cond)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class MidStage(nn.Module):
    def __init__(self, ch: int, motion: bool, block_cls: type[nn.Module], cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(ch, ch, cfg), _resnet(ch, ch, cfg)])
        self.attentions = nn.ModuleList([SpatialTransformer(block_cls, ch, cfg)])
        if motion:
            self.motion_modules = nn.ModuleList([MotionModule(ch)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, cond)
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[0](x, cond.num_frames)
        out: torch.Tensor = self.resnets[1](x, temb)
        return out


class _UNet(nn.Module):
    block_cls: type[nn.Module]
    motion: bool

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_proj = Timesteps(chs[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]
        prev = chs[0]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(chs) - 1
            self.down_blocks.append(
                DownStage(prev, chs[i], _has_attention(kind), not last, self.motion, self.block_cls, cfg)
            )
            skip_chs += [chs[i]] * cfg.layers_per_block + ([] if last else [chs[i]])
            prev = chs[i]

        self.mid_block = MidStage(chs[-1], self.motion, self.block_cls, cfg)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chs))
        prev = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            level_skips = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            last = i == len(rev) - 1
            self.up_blocks.append(
                UpStage(
                    prev,
                    rev[i],
                    level_skips,
                    _has_attention(kind),
                    not last,
                    self.motion,
                    self.block_cls,
                    cfg,
                )
            )
            prev = rev[i]

        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        for name, module in self.named_modules():
            if isinstance(module, self.block_cls):
                module.name = name

    def transformer_block_names(self) -> list[str]:
        return [name for name, m in self.named_modules() if isinstance(m, self.block_cls)]

    def time_embedding_for(self, timestep: torch.Tensor | int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=self.conv_in.weight.device).reshape(-1).expand(batch)
        # The sinusoid is computed in fp32 and cast before the MLP, as the original does.
        temb: torch.Tensor = self.time_embedding(self.time_proj(t).to(dtype))
        return temb

    def _run(self, x: torch.Tensor, temb: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, cond)
            skips += block_skips
        x = self.mid_block(x, temb, cond)
        for block in self.up_blocks:
            x = block(x, temb, cond, skips)
        return x


def _has_attention(kind: str) -> bool:
    if kind.startswith("CrossAttn"):
        return True
    if kind in ("DownBlock2D", "UpBlock2D"):
        return False
    raise ValueError(f"unsupported UNet block type {kind!r}")


class ReferenceNet(_UNet):
    block_cls = ReferenceTransformerBlock
    motion = False

    @torch.no_grad()
    def forward(
        self, latent: torch.Tensor, timestep: int = 0, encoder_states: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns the banks {block path: (B, H*W, C)}. The network's own output is never used (no conv_out)."""
        b = latent.shape[0]
        dtype = self.conv_in.weight.dtype
        if encoder_states is None:
            # The original feeds an all-zero 1x768 "text" context.
            encoder_states = torch.zeros(b, 1, self.config.cross_attention_dim, dtype=dtype, device=latent.device)
        banks: dict[str, torch.Tensor] = {}
        cond = Conditioning(num_frames=1, encoder_states=encoder_states, banks=banks)
        temb = self.time_embedding_for(timestep, b, dtype)
        self._run(self.conv_in(latent), temb, cond)
        return banks


class DenoisingUNet(_UNet):
    block_cls = DenoisingTransformerBlock
    motion = True

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, cfg.block_out_channels[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()

    def reference_kv(self, banks: dict[str, torch.Tensor]) -> dict[str, KeyValue]:
        """Project each block's bank (B, HW, C) to its attn1_5 keys/values once; reused for all frames/steps."""
        out = {}
        for name, module in self.named_modules():
            if isinstance(module, DenoisingTransformerBlock):
                bank = banks[name].to(self.conv_in.weight.dtype)
                out[name] = module.attn1_5.project_kv(bank)
        return out

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        audio_tokens: torch.Tensor,
        reference_kv: dict[str, KeyValue],
        kps_features: torch.Tensor | None = None,
        reference_attention_weight: float | torch.Tensor = 1.0,
        audio_attention_weight: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """sample (B, 4, F, h, w); timestep a scalar, (B,) or per frame (B*F,) in (batch, frame) order;
        audio_tokens (B*F, n, 768) in (batch, frame) order; kps_features
        (B, C0, F, h, w) or None; reference_kv from `reference_kv()` with batch B (or 1, shared); the attention
        weights a float, or float32 (B,) one per row or (B, F) one per frame. Returns v."""
        b, c, f, h, w = sample.shape
        x = sample.transpose(1, 2).reshape(b * f, c, h, w)
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() == b * f and f > 1:  # one timestep per frame (a streaming window at staggered noise levels)
            temb = self.time_embedding_for(t, b * f, x.dtype)
        else:
            temb = self.time_embedding_for(timestep, b, x.dtype).repeat_interleave(f, dim=0)
        cond = Conditioning(
            num_frames=f,
            encoder_states=audio_tokens,
            reference_kv=reference_kv,
            reference_attention_weight=_per_frame(reference_attention_weight, b, f),
            audio_attention_weight=_per_frame(audio_attention_weight, b, f),
        )
        x = self.conv_in(x)
        if kps_features is not None:
            x = x + kps_features.transpose(1, 2).reshape(b * f, -1, h, w)
        x = self._run(x, temb, cond)
        v: torch.Tensor = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return v.reshape(b, f, -1, h, w).transpose(1, 2)


def _per_frame(weight: float | torch.Tensor, b: int, f: int) -> float | torch.Tensor:
    """A per-row weight (B,) or per-frame weight (B, F) as (B*F, 1, 1), broadcasting over the (batch,
    frame)-ordered attention rows (per frame: a live change ramps within a window)."""
    if isinstance(weight, torch.Tensor):
        return weight.reshape(b, -1).expand(b, f).reshape(b * f, 1, 1)
    return weight
