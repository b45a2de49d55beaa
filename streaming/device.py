"""Small device helpers shared by the engine and its benchmark: per-stream noise generators and timing syncs."""

from __future__ import annotations

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
