"""Attention in slices (vexpress_rt/models/attention.py): the motion modules attend over batch x H x W sequences of
a window's frames, 65536 at 16 rows of 512x512, past the 65535 grid blocks the fused CUDA kernels can launch for
the batch. A call larger than MAX_ATTENTION_BATCH runs in slices; it must give the numbers of the one call."""

from __future__ import annotations

import pytest
import torch

from vexpress_rt.models import attention
from vexpress_rt.models.motion_module import TemporalAttention


@pytest.mark.parametrize("frames", [4, 16])  # 16 x 16 > SHORT_SEQUENCES: the fused kernel's path on the CPU too
def test_motion_attention_in_slices_equals_one_call(monkeypatch, frames):
    torch.manual_seed(0)
    module = TemporalAttention(dim=16, heads=2).eval()
    x = torch.randn(2 * frames, 5 * 3, 16)  # 2 rows of `frames` frames, 5x3 latent: 30 sequences
    calls: list[int] = []
    one_slice = attention._attend_slice

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        calls.append(q.shape[0])
        return one_slice(q, k, v)

    monkeypatch.setattr(attention, "_attend_slice", counted)
    with torch.no_grad():
        whole = module(x, frames)
        assert calls == [30]
        monkeypatch.setattr(attention, "MAX_ATTENTION_BATCH", 8)
        calls.clear()
        sliced = module(x, frames)
    assert calls == [8, 8, 8, 6]  # never more than the bound per call
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)


def test_the_bound_is_under_the_grid_limit():
    assert attention.MAX_ATTENTION_BATCH < 65535
