"""Audio projection: a Perceiver resampler from a +-2-frame window of wav2vec2 tokens to 5 tokens per frame."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs ; latents]; q and k each scaled by dim_head^-1/4; softmax in fp32."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n_lat, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = self.dim_head**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out: torch.Tensor = self.to_out((weight @ v).transpose(1, 2).reshape(b, n_lat, -1))
        return out


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indexed 0..3 to match the checkpoint keys `layers.N.1.{0,1,3}`.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class AudioProjection(nn.Module):
    def __init__(
        self,
        dim: int = 768,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_queries: int = 5,
        embedding_dim: int = 768,
        output_dim: int = 768,
        ff_mult: int = 4,
        max_seq_len: int = 10,
    ):
        super().__init__()
        self.pos_emb = nn.Embedding(max_seq_len, embedding_dim)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    @classmethod
    def from_state_dict_shapes(cls, sd: dict[str, torch.Tensor], dim_head: int = 64) -> AudioProjection:
        """Widths read from the checkpoint; heads = inner width / 64 as in the released model (12 x 64)."""
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        dim = sd["latents"].shape[-1]
        return cls(
            dim=dim,
            depth=depth,
            dim_head=dim_head,
            heads=sd["layers.0.0.to_q.weight"].shape[0] // dim_head,
            num_queries=sd["latents"].shape[1],
            embedding_dim=sd["pos_emb.weight"].shape[1],
            output_dim=sd["proj_out.weight"].shape[0],
            ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim,
            max_seq_len=sd["pos_emb.weight"].shape[0],
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (N, 10, Dw) -> (N, num_queries, output_dim)."""
        x = windows + self.pos_emb.weight[: windows.shape[1]]
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for layer in self.layers:
            attention, ff = cast(nn.ModuleList, layer)
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        out: torch.Tensor = self.norm_out(self.proj_out(latents))
        return out
