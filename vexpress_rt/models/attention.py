"""Multi-head attention with the checkpoint's parameter names (to_q, to_k, to_v, to_out.0).

Our own small module rather than diffusers' `Attention` because the streaming engine needs to project a
context to keys/values once (the reference bank) and reuse them for every frame and step; the math is the
same as diffusers' default processor (scaled-dot-product attention, no bias on q/k/v, bias on the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # A ModuleList so that the output projection is named `to_out.0` as in the checkpoints.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> KeyValue:
        """Keys and values of `context` (B, N, C) in head layout (B, heads, N, d)."""
        return self._split_heads(self.to_k(context)), self._split_heads(self.to_v(context))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv: KeyValue | None = None) -> torch.Tensor:
        """x: (B, N, C). Keys/values come from `kv` if given, else from `context`, else from `x`.

        `kv` may have a batch that divides x's batch: each of its entries then serves a run of consecutive
        queries (e.g. one reference bank for all frames of a video), without materialising copies.
        """
        b, n, _ = x.shape
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        q = self._split_heads(self.to_q(x))
        if k.shape[0] != b:
            groups = k.shape[0]
            # Fold the frames that share one key/value set into the query length: attention rows are
            # independent, so this is the same computation as repeating keys/values per frame.
            q = (
                q.reshape(groups, b // groups, self.heads, n, -1)
                .transpose(1, 2)
                .reshape(groups, self.heads, -1, q.shape[-1])
            )
            out = _attend(q, k, v)
            out = out.reshape(groups, self.heads, b // groups, n, -1).transpose(1, 2).reshape(b, self.heads, n, -1)
        else:
            out = _attend(q, k, v)
        projected: torch.Tensor = self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))
        return projected


SHORT_SEQUENCES = 1024  # query x key length below which plain matmuls beat the fused CPU kernel
# Sequences per attention call at most. The fused CUDA kernels put the batch in a grid dimension limited to 65535
# blocks; the motion modules attend over batch x H x W sequences (16 rows at 512x512: 16 x 64 x 64 = 65536), so
# larger batches run in slices of this many (the same math: sequences are independent).
MAX_ATTENTION_BATCH = 32768


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (B, heads, N, d), in slices of at most MAX_ATTENTION_BATCH sequences."""
    if q.shape[0] <= MAX_ATTENTION_BATCH:
        return _attend_slice(q, k, v)
    slices = zip(q.split(MAX_ATTENTION_BATCH), k.split(MAX_ATTENTION_BATCH), v.split(MAX_ATTENTION_BATCH))
    return torch.cat([_attend_slice(*qkv) for qkv in slices])


def _attend_slice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention. On the CPU, very short sequences (the motion modules: thousands of 8-frame sequences)
    run faster as two batched matmuls than through the fused kernel's per-sequence overhead; same math."""
    if q.is_cuda or q.shape[-2] * k.shape[-2] > SHORT_SEQUENCES:
        out: torch.Tensor = F.scaled_dot_product_attention(q, k, v)
        return out
    scale: float = q.shape[-1] ** -0.5
    weights = (q @ k.transpose(-1, -2)) * scale
    return weights.softmax(dim=-1) @ v
