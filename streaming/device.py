"""Small device helpers shared by the engine and its benchmark: per-stream noise generators, timing syncs and the
copy of frames to the host."""

from __future__ import annotations

import numpy as np
import torch


def noise_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator that draws directly on `device` (no host draw and copy per call). The meta device
    (shape-only tests) has no generators; draws there ignore the CPU one it gets."""
    device = torch.device(device)
    return torch.Generator("cpu" if device.type == "meta" else device).manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers the compute it launched."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a host array. On CUDA: copied into pinned memory without blocking, then waiting for that
    copy's event only, not for the whole device (the finisher's copy must not wait for the next UNet call the
    worker has launched meanwhile on another stream). Elsewhere the tensor's own memory (no copy on the CPU)."""
    if tensor.device.type != "cuda":
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensor.device))
    copied.synchronize()
    return host.numpy()
