"""The attention's cost on a GPU, checked on the CPU.

Attention in slices (vexpress_rt/models/attention.py): the motion modules attend over batch x H x W sequences of
a window's frames, 65536 at 16 rows of 512x512, past the 65535 grid blocks the fused CUDA kernels can launch for
the batch. A call larger than MAX_ATTENTION_BATCH runs in slices; it must give the numbers of the one call.
The per-row attention weights scale the output in its own dtype (vexpress_rt/models/unet.py `_weighted`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vexpress_rt.models import attention
from vexpress_rt.models.motion_module import TemporalAttention
from vexpress_rt.models.unet import _weighted


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_row_attention_weight_stays_in_the_outputs_dtype(dtype):
    """The per-row weights of a batched UNet call (streaming sessions with their own expression strength) scale
    the attention output in its own dtype: no float32 copy of a half-precision output. In float32 the numbers
    are those of the Python float weight the offline pipeline uses."""
    out = torch.randn(6, 10, 8).to(dtype)
    weight = torch.tensor([0.5, 1.25, 3.0], dtype=torch.float32).repeat_interleave(2).reshape(6, 1, 1)
    made: list[torch.dtype] = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() == out.numel():
                made.append(result.dtype)
            return result

    with Dtypes():
        scaled = _weighted(weight, out)
    assert scaled.dtype == dtype and made == [dtype]  # one full-size result: the product, in out's dtype
    for row, w in enumerate([0.5, 0.5, 1.25, 1.25, 3.0, 3.0]):
        expected = _weighted(w, out[row])
        if dtype == torch.float32:
            assert torch.equal(scaled[row], expected)
        else:
            torch.testing.assert_close(scaled[row], expected)
