"""Small device helpers shared by the engine and its benchmark: per-stream noise generators, timing syncs and the
copy of frames to the host."""

from __future__ import annotations

import threading

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
    return to_host_all([tensor])[0]


def to_host_all(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Several device tensors as host arrays, as `to_host`, behind one wait: the copies are queued in order on
    the current stream and one event after the last covers them all (e.g. the frames and their finite flags)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [tensor.cpu().numpy() for tensor in tensors]
    hosts = []
    for tensor in tensors:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        hosts.append(host)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(tensors[0].device))
    copied.synchronize()
    return [host.numpy() for host in hosts]


# One graph capture at a time in the whole process, and no cached-memory release during one: a capture on one
# device while another thread captures (another engine's warm-up) or empties the allocator's cache trips the
# caching allocator's assertions (streaming/unet_runner.py takes it around every capture).
CAPTURE_LOCK = threading.RLock()


def bind_thread(device: torch.device) -> None:
    """Make `device` the current CUDA device of the calling thread (every thread that touches CUDA calls it
    first): a new thread starts on device 0, where its default stream, events and allocations would go."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def release_cached_memory() -> None:
    """Give the allocator's cached blocks back (after running out of memory), never during a graph capture."""
    with CAPTURE_LOCK:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def upload(array: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host array on `device` without waiting for the device: on CUDA through pinned memory with
    `non_blocking=True` (a copy from pageable memory, or `torch.tensor(..., device=cuda)`, waits for everything
    queued on the stream: the host could not queue the next turn while the device runs this one). The caching
    host allocator keeps the pinned buffer until the copy is done."""
    host = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    if dtype is not None:
        host = host.to(dtype)  # on the host: a cast inside a host-to-device copy goes through pageable memory
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def device_values(values: list[float], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A few Python numbers as a 1-D tensor made on `device` by fill kernels: no host tensor, no copy from
    pageable memory (`torch.tensor(..., device=cuda)` waits for everything queued on the stream)."""
    first = values[0]
    if all(v == first for v in values):  # the usual case: one value for every frame or row
        return torch.full((len(values),), first, device=device, dtype=dtype)
    return torch.stack([torch.full((), v, device=device, dtype=dtype) for v in values])
