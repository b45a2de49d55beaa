"""Latents -> video frames: the full sd-vae-ft-mse decoder or TAESD (diffusers `AutoencoderTiny`), chosen per session.

Both decoders read the UNet's latents (SD-1.x space, already multiplied by 0.18215) and return images in [-1, 1]:
the full VAE wants them divided by 0.18215 first (the original hard-codes it), TAESD's `scaling_factor` is 1.0
(its decoder clamps the latents, works in [0, 1] and maps its output to [-1, 1] itself). On an H100 the full
decoder costs 20 ms a frame and TAESD 1.8 ms (docs/streaming.md): TAESD is the live default when installed.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vexpress_rt.errors import WeightsError
from vexpress_rt.loader import VExpressModels, load_tiny_vae
from vexpress_rt.pipeline import VAE_SCALE

log = logging.getLogger(__name__)

DECODERS = ("full", "tiny")
DECODER_CHOICES = ("auto", *DECODERS)  # auto: tiny when its weights are there, else full


@dataclass
class _Fallback:
    """A decoder's float32 copy (made on the first non-finite frame) and how many frames it decoded."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    vae: Any = None
    frames: int = 0


@dataclass(frozen=True)
class FrameDecoder:
    """One VAE decoder and the factor its latents are divided by."""

    name: str
    vae: Any  # diffusers' AutoencoderKL or AutoencoderTiny (untyped): `.decode(z).sample`
    latent_scale: float
    fallback: _Fallback = field(default_factory=_Fallback, repr=False, compare=False)

    @classmethod
    def full(cls, models: VExpressModels) -> FrameDecoder:
        return cls("full", models.vae, VAE_SCALE)

    @classmethod
    def tiny(cls, tiny_vae: Any) -> FrameDecoder:
        return cls("tiny", tiny_vae, float(tiny_vae.config.scaling_factor))

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """(F, 4, h, w) latents -> uint8 (F, H, W, 3) on the decoder's device, in one batched call."""
        return self.checked_images(latents)[0]

    @torch.no_grad()
    def checked_images(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frames as `images`, and for a half-precision decoder whether each one is finite (a bool per frame,
        on the device: read with the frames' host copy, no sync of its own). In fp16 an activation past 65504
        becomes inf, then NaN in the next norm, and a NaN frame leaves as a black picture without a word."""
        weight = next(self.vae.parameters())
        images = self._decode(self.vae, latents.to(weight.device, weight.dtype))
        finite = None if weight.dtype == torch.float32 else torch.isfinite(images).flatten(1).all(dim=1)
        return _to_uint8(images), finite

    def repair(self, latents: torch.Tensor, frames: np.ndarray, finite: np.ndarray) -> np.ndarray:
        """`frames` with those that were not finite decoded again in float32 (a copy of the decoder, made once;
        logged once). Counted in `fallback.frames`."""
        bad = np.flatnonzero(~finite)
        if bad.size == 0:
            return frames
        with self.fallback.lock:
            if self.fallback.vae is None:
                log.warning(
                    "decoder %s: a half-precision decode gave non-finite pixels; those frames are decoded again in "
                    "float32 (counted in the engine's stats: decode_fp32_fallback_frames)",
                    self.name,
                )
                self.fallback.vae = copy.deepcopy(self.vae).float()
            vae32 = self.fallback.vae
            self.fallback.frames += int(bad.size)
        with torch.no_grad():
            index = torch.from_numpy(bad).to(latents.device)
            again = _to_uint8(self._decode(vae32, latents.index_select(0, index).float())).cpu().numpy()
        frames = frames.copy()
        frames[bad] = again
        return frames

    def _decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        images: torch.Tensor = vae.decode(latents / self.latent_scale).sample
        return images

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return self.images(latents).cpu().numpy()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW images -> uint8 NHWC, before leaving the device: a quarter of the bytes to copy."""
    return (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)


def load_decoders(models: VExpressModels, choice: str, taesd_path: Path | None) -> tuple[str, dict[str, FrameDecoder]]:
    """The decoders a server offers and its default one. The full VAE is always there; TAESD when its folder
    loads (on the models' device and dtype). `choice` "tiny" without TAESD is a WeightsError; "auto" falls back
    to the full decoder with one log line."""
    if choice not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {DECODER_CHOICES}, got {choice!r}")
    decoders = {"full": FrameDecoder.full(models)}
    problem = None
    if taesd_path is None or not (taesd_path / "config.json").is_file():
        problem = f"no TAESD weights at {taesd_path}"
    else:
        try:
            tiny_vae = load_tiny_vae(taesd_path).to(models.device, models.dtype)
            decoders["tiny"] = FrameDecoder.tiny(tiny_vae)
        except WeightsError as exc:
            problem = str(exc)
    if choice == "tiny" and problem:
        raise WeightsError(f"--decoder tiny: {problem}; get it with `vexpress-rt download-weights`")
    if choice == "auto":
        choice = "tiny" if "tiny" in decoders else "full"
        if problem:
            log.warning(
                "decoder auto: using the full VAE decoder (%s; `vexpress-rt download-weights` fetches it)", problem
            )
    elif problem and choice == "full":
        log.debug("TAESD not offered to sessions: %s", problem)
    return choice, decoders
