"""Pose features of key points, computed on the fly and kept: the V-Kps guider's output for a frame's 3 points.

The guider is cheap, but a looping motion asks for the same poses again and again, and fix_face for one pose
only; features are kept by the exact points (and frame size), least recently used first out, within a byte
budget. The same drawing and guider math as the offline pipeline (`vexpress_rt.pipeline.kps_features`), so a
frame's feature equals the offline one for the same points.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from vexpress_rt.kps import draw_v_kps_image
from vexpress_rt.loader import VExpressModels

from .device import upload

# 512x512 fp16: 2.6 MB a pose; one 8 s procedural loop at 25 fps is 200 poses (524 MB). Keep two such loops: an
# LRU smaller than a loop would evict each pose just before it comes round again.
DEFAULT_POSE_CACHE_BYTES = 1 << 30


class PoseFeatures:
    def __init__(self, models: VExpressModels, budget_bytes: int = DEFAULT_POSE_CACHE_BYTES):
        self.models = models
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[tuple[int, int, bytes], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.computed = 0  # guider calls made (a test reads it)

    @torch.no_grad()
    def features(self, points: list[np.ndarray], width: int, height: int) -> torch.Tensor:
        """(F, C0, h, w) on the model's device for F frames' points (3, 2)."""
        return torch.stack([self._one(np.asarray(p, dtype=np.float32), width, height) for p in points])

    def _guide(self, image: np.ndarray) -> torch.Tensor:
        """The guider's feature (C0, h, w) of one drawn uint8 (H, W, 3) image: `kps_features`' math, the image
        uploaded as uint8 through pinned memory (a cache miss must not wait for the UNet call in flight)."""
        models = self.models
        pixels = upload(image, models.device).float().div(255).permute(2, 0, 1)[None, :, None]
        feature: torch.Tensor = models.v_kps_guider(pixels.to(models.dtype))[0, :, 0]
        return feature

    def _one(self, points: np.ndarray, width: int, height: int) -> torch.Tensor:
        key = (width, height, points.tobytes())
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept
        feature = self._guide(draw_v_kps_image(height, width, points))
        self.computed += 1
        size = feature.numel() * feature.element_size()
        with self._lock:
            if size <= self.budget_bytes and key not in self._kept:
                self._kept[key] = feature
                self._bytes += size
                while self._bytes > self.budget_bytes:
                    _, dropped = self._kept.popitem(last=False)
                    self._bytes -= dropped.numel() * dropped.element_size()
        return feature
