"""A pre-encoded avatar: everything the denoiser needs that depends only on the portrait, computed once.

Built from a portrait (and its 3 key points): the VAE latent, the reference attention keys/values of all 16
denoising transformer blocks (so the reference net is never run again), and the `fix_face` V-Kps feature.
Shared by every session of that avatar; saved to and loaded from disk, keyed by image hash, model and size.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vexpress_rt.kps import draw_v_kps_image
from vexpress_rt.loader import VExpressModels
from vexpress_rt.models.attention import KeyValue
from vexpress_rt.pipeline import encode_reference, kps_features, reference_tensor

from .framing import PortraitPhoto

FORMAT_VERSION = 1
DEFAULT_MEMORY_BYTES = 2 << 30  # pre-encoded avatars kept in memory for re-registration (512x512 fp16: ~60 MB each)
DEFAULT_DISK_BYTES = 8 << 30  # the same, kept on disk across restarts (--cache_dir)


def image_digest(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels and size (the same picture in two file formats is one avatar)."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def model_identity(models: VExpressModels) -> str:
    """A short fingerprint of the weights that shape an avatar (reference net, guider, VAE encoder, attn1_5)."""
    h = hashlib.sha256()
    for module in (models.reference_net, models.v_kps_guider, models.vae.encoder, models.denoising_unet.conv_in):
        for name, tensor in sorted(module.state_dict().items()):
            flat = tensor.detach().float().flatten()
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class PreEncodedAvatar:
    image_hash: str
    model_id: str
    width: int
    height: int
    reference_kps: np.ndarray  # (3, 2) float32, pixels of the W x H frame
    latent: torch.Tensor  # (1, 4, h, w)
    reference_kv: dict[str, KeyValue]  # per denoising transformer block, batch 1 (conditional branch)
    kps_feature: torch.Tensor  # (1, C, 1, h, w): the fix_face feature, the same for every frame

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PreEncodedAvatar:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return PreEncodedAvatar(
            self.image_hash,
            self.model_id,
            self.width,
            self.height,
            self.reference_kps,
            move(self.latent),
            {k: (move(a), move(b)) for k, (a, b) in self.reference_kv.items()},
            move(self.kps_feature),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT_VERSION,
            "image_hash": self.image_hash,
            "model_id": self.model_id,
            "size": [self.width, self.height],
            "reference_kps": torch.from_numpy(np.ascontiguousarray(self.reference_kps)),
            "latent": self.latent.cpu(),
            "kps_feature": self.kps_feature.cpu(),
            "reference_kv": {k: [a.cpu(), b.cpu()] for k, (a, b) in self.reference_kv.items()},
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)  # never leave a half-written cache entry

    @classmethod
    def load(cls, path: str | Path) -> PreEncodedAvatar:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: avatar format {payload.get('format')} is not {FORMAT_VERSION}")
        width, height = payload["size"]
        return cls(
            payload["image_hash"],
            payload["model_id"],
            int(width),
            int(height),
            payload["reference_kps"].numpy(),
            payload["latent"],
            {k: (a, b) for k, (a, b) in payload["reference_kv"].items()},
            payload["kps_feature"],
        )


@torch.no_grad()
def encode_avatar(
    models: VExpressModels, image: Image.Image, reference_kps: np.ndarray, width: int, height: int
) -> PreEncodedAvatar:
    """Run the portrait-only part of V-Express once (VAE encode, reference net, attn1_5 K/V, guider)."""
    tensor = reference_tensor(image.convert("RGB"), width, height)
    latent = encode_reference(models, tensor)
    banks = models.reference_net(latent)
    reference_kv = models.denoising_unet.reference_kv(banks)
    kps = np.asarray(reference_kps, dtype=np.float32)[:3]
    kps_feature = kps_features(models, draw_v_kps_image(height, width, kps)[None])
    return PreEncodedAvatar(
        image_digest(image), model_identity(models), width, height, kps, latent, reference_kv, kps_feature
    )


class AvatarStore:
    """In-memory and on-disk cache of pre-encoded avatars keyed by (image hash, model identity, size).

    Both caches are bounded in bytes and drop their least recently used entries beyond (`memory_bytes`,
    `disk_bytes`; an entry larger than the budget is used but not kept). The engine holds the avatars it
    has registered on its own, so evicting an entry here never takes an avatar from a session; `forget`
    drops a deleted avatar from both caches.
    """

    def __init__(
        self,
        models: VExpressModels,
        cache_dir: str | Path | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk_bytes: int = DEFAULT_DISK_BYTES,
    ):
        self.models = models
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self.model_id = model_identity(models)
        self._memory: OrderedDict[str, PreEncodedAvatar] = OrderedDict()
        self._lock = threading.Lock()  # registrations run in an executor; deletes come from the event loop

    def key(self, image: Image.Image, reference_kps: np.ndarray, width: int, height: int) -> str:
        kps = hashlib.sha256(np.asarray(reference_kps, dtype=np.float32)[:3].tobytes()).hexdigest()[:8]
        return f"{image_digest(image)[:24]}-{kps}-{self.model_id}-{width}x{height}"

    def get_or_encode(self, image: Image.Image, reference_kps: np.ndarray, width: int, height: int) -> PreEncodedAvatar:
        key = self.key(image, reference_kps, width, height)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            avatar = PreEncodedAvatar.load(path).to(self.models.device, self.models.dtype)
            path.touch()  # recently used: the disk cache evicts by modification time
        else:
            avatar = encode_avatar(self.models, image, reference_kps, width, height)
            if path is not None:
                avatar.save(path)
                self._trim_disk()
        with self._lock:
            self._memory[key] = avatar
            self._trim_memory()
        return avatar

    def forget(self, avatar: PreEncodedAvatar) -> None:
        """Drop `avatar` from memory and disk (a deleted avatar); sessions holding it keep it until they end."""
        with self._lock:
            keys = [k for k, v in self._memory.items() if v is avatar]
            for key in keys:
                del self._memory[key]
        if self.cache_dir is not None:
            pattern = f"{avatar.image_hash[:24]}-*-{avatar.model_id}-{avatar.width}x{avatar.height}.pt"
            for path in self.cache_dir.glob(pattern):
                path.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """What the caches hold: avatars, tensors and bytes in memory, files and bytes on disk."""
        with self._lock:
            entries = list(self._memory.values())
        files = self._disk_files()
        return {
            "memory_avatars": len(entries),
            "memory_tensors": sum(len(_tensors(a)) for a in entries),
            "memory_bytes": sum(avatar_bytes(a) for a in entries),
            "disk_files": len(files),
            "disk_bytes": sum(size for _, size, _ in files),
        }

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / f"{key}.pt" if self.cache_dir else None

    def _trim_memory(self) -> None:
        total = sum(avatar_bytes(a) for a in self._memory.values())
        while self._memory and total > self.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            total -= avatar_bytes(evicted)

    def _disk_files(self) -> list[tuple[float, int, Path]]:
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return []
        files = []
        for path in self.cache_dir.glob("*.pt"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        return files

    def _trim_disk(self) -> None:
        files = sorted(self._disk_files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= self.disk_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _tensors(avatar: PreEncodedAvatar) -> list[torch.Tensor]:
    return [avatar.latent, avatar.kps_feature, *(t for kv in avatar.reference_kv.values() for t in kv)]


def avatar_bytes(avatar: PreEncodedAvatar) -> int:
    """Bytes of the avatar's tensors (on whatever device they are)."""
    return sum(t.numel() * t.element_size() for t in _tensors(avatar))


# -- a registered avatar: what the engine keeps per portrait ------------------------------------------------------
@dataclass
class AvatarInfo:
    id: str
    name: str | None
    width: int
    height: int
    created: float
    kps: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Avatar:
    info: AvatarInfo
    encoded: PreEncodedAvatar
    idle_frames: dict[str, np.ndarray]  # per decoder name: uint8 (K, H, W, 3), all decoded from idle_latents
    idle_latents: torch.Tensor  # (4, K, h, w)
    photo: PortraitPhoto | None = None  # the whole photo the crop was cut from (framed outputs, streaming/framing.py)
