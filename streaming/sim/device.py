"""The simulated device's stand-ins for the model's calls: each waits the time its profile gives for that call on
one serial device timeline (time.sleep: the GIL is released, as a thread waiting on a GPU releases it), then
returns a result of the right shape. No weights are loaded.

How the frames show the portrait: the stand-in VAE encoder makes a portrait's latent (its pixels averaged 8x8) and
keeps the portrait's picture with a "SIMULATED" band; the stand-in UNet predicts the v that takes each window row
straight to its avatar's latent (it reads the latent from the row's reference keys/values, which the stand-in
reference net and `reference_kv` make from the latent); the stand-in decoder shows the kept picture of the nearest
latent. Tensors that would stay on the GPU (pose features) are kept small, since their copies are device copies in
production and must not load this CPU.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from vexpress_rt.loader import VExpressModels, make_scheduler
from vexpress_rt.models import UNetConfig
from vexpress_rt.pipeline import VAE_SCALE

from ..decoder import FrameDecoder
from .profile import DeviceProfile, profile_of

SIM_KEY = "sim_latent"  # the one entry of a simulated avatar's reference K/V: its latent
POSE_CHANNELS = 4  # the stand-in guider's feature channels (the real one has 320; see the module doc)
HIDDEN = 768  # wav2vec2-base's hidden size
QUERIES = 5  # audio tokens per frame (AudioProjection's num_queries)
PORTRAITS_KEPT = 64  # pictures the stand-in decoder keeps (least recently registered first out)
MARK = "SIMULATED"


class DeviceTimeline:
    """One device that runs one call at a time: a call starts when the device is free and holds it for its
    duration; the caller sleeps until its call is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.busy_s = 0.0  # device seconds charged so far
        self.calls = 0

    def run(self, seconds: float) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            done = self._free_at
            self.busy_s += seconds
            self.calls += 1
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class Portraits:
    """The pictures of the portraits registered, by their latent: what the stand-in decoder shows."""

    def __init__(self, label: str):
        self.label = label
        self._lock = threading.Lock()
        self._kept: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def add(self, latent: torch.Tensor, pixels: torch.Tensor) -> None:
        """latent (4, h, w); pixels (3, H, W) in [-1, 1]: kept as a marked uint8 picture."""
        image = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        marked = torch.from_numpy(mark(image, self.label))
        key = latent.float().numpy().tobytes()
        with self._lock:
            self._kept.pop(key, None)
            self._kept[key] = (latent.float().clone(), marked)
            while len(self._kept) > PORTRAITS_KEPT:
                self._kept.popitem(last=False)

    def pictures(self, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """uint8 (F, H, W, 3): per latent the picture of the nearest registered one (none: the latent itself,
        enlarged, marked)."""
        with self._lock:
            kept = list(self._kept.values())
        if not kept:
            return torch.stack([_enlarged(z, width, height, self.label) for z in latents])
        stack = torch.stack([z for z, _ in kept])  # (K, 4, h, w)
        flat = latents.float().flatten(1)
        distance = torch.cdist(flat, stack.flatten(1))  # (F, K)
        return torch.stack([kept[int(i)][1] for i in distance.argmin(dim=1)])


def mark(image: np.ndarray, label: str) -> np.ndarray:
    """The picture with a visible band: "SIMULATED (<profile>)", so nobody takes it for the model's output."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    h = picture.height
    band = max(12, h // 10)
    draw.rectangle([0, h - band, picture.width, h], fill=(200, 0, 0))
    font = ImageFont.load_default(size=max(8, int(band * 0.7)))
    draw.text((band // 4, h - band + band // 8), f"{MARK} ({label})", fill=(255, 255, 255), font=font)
    marked: np.ndarray = np.asarray(picture).copy()
    return marked


def _enlarged(latent: torch.Tensor, width: int, height: int, label: str) -> torch.Tensor:
    rgb = latent[:3].float() / VAE_SCALE
    pixels = nn.functional.interpolate(rgb[None], size=(height, width), mode="nearest")[0]
    image = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return torch.from_numpy(mark(image, label))


class SimulatedVAE(nn.Module):
    """Encode: the portrait's pixels averaged over 8x8 blocks (3 colour channels + their mean) as its latent mean,
    and the portrait kept for the decoder. Registration is not part of the profile: no wait."""

    def __init__(self, portraits: Portraits):
        super().__init__()
        self.portraits = portraits
        self.encoder = nn.Identity()  # what the avatar cache's model fingerprint reads
        self.config = SimpleNamespace(block_out_channels=(128, 256, 512, 512), scaling_factor=VAE_SCALE)

    def encode(self, pixels: torch.Tensor) -> Any:
        rgb = nn.functional.avg_pool2d(pixels.float(), 8)
        mean = torch.cat([rgb, rgb.mean(dim=1, keepdim=True)], dim=1)  # (B, 4, h, w)
        for z, p in zip(mean, pixels):
            self.portraits.add(z * VAE_SCALE, p)  # the UNet's latents are scaled by VAE_SCALE
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


class SimulatedReferenceNet(nn.Module):
    """The reference net's "banks" are the latent itself (the stand-in UNet reads it back from the K/V)."""

    def forward(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        return {SIM_KEY: latent}


class SimulatedGuider(nn.Module):
    """Pose features: zeros of the V-Kps feature's layout with few channels, (1, C, F, H/8, W/8)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = pixels.shape
        return pixels.new_zeros((b, POSE_CHANNELS, f, h // 8, w // 8))


class SimulatedAudioEncoder(nn.Module):
    """wav2vec2: waits the profile's time for the span's length, returns zero hidden states (1, n, 768)."""

    def __init__(self, device: SimulatedDevice):
        super().__init__()
        self.device_ = device
        self.config = SimpleNamespace(num_hidden_layers=12, hidden_size=HIDDEN)

    def forward(self, values: torch.Tensor) -> Any:
        rows, samples = (values.shape[0] if values.ndim > 1 else 1), values.shape[-1]
        # a batch of spans: as one span of their summed length (the profile measured batch 1 only)
        self.device_.timeline.run(self.device_.profile.audio_features.ms(rows * samples / 16000) / 1000.0)
        hidden = max(0, (samples - 400) // 320 + 1)  # wav2vec2's frames: receptive field 400, stride 320
        return SimpleNamespace(last_hidden_state=values.new_zeros((rows, hidden, HIDDEN)))


class SimulatedAudioProjection(nn.Module):
    """The audio projection: waits the profile's time, returns zero tokens (F, 5, 768)."""

    def __init__(self, device: SimulatedDevice):
        super().__init__()
        self.device_ = device

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        self.device_.timeline.run(self.device_.profile.audio_projection_ms / 1000.0)
        return windows.new_zeros((windows.shape[0], QUERIES, HIDDEN))


class SimulatedUNet(nn.Module):
    """One batched UNet window call: waits the profile's time for its frame-passes, returns the v that takes each
    row to its avatar's latent (rows of a batch never mix, as in the real UNet)."""

    def __init__(self, device: SimulatedDevice):
        super().__init__()
        self.device_ = device
        self.conv_in = nn.Identity()  # what the avatar cache's model fingerprint reads
        self.alphas = make_scheduler().alphas_cumprod.to(torch.float32)

    def reference_kv(self, banks: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        latent = banks[SIM_KEY]
        return {SIM_KEY: (latent, latent)}

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        audio_tokens: torch.Tensor,
        reference_kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
        **rows: Any,
    ) -> torch.Tensor:
        b, _, f, h, w = sample.shape
        device = self.device_
        device.timeline.run(device.profile.unet_s(b, f, device.width, device.height))
        latents = reference_kv[SIM_KEY][0]  # one per run of identical consecutive rows
        target = latents.repeat_interleave(b // latents.shape[0], dim=0)[:, :, None].float()  # (B, 4, 1, h, w)
        t = torch.as_tensor(timestep).reshape(-1).long().cpu()
        a = self.alphas[t].to(sample.device)
        if a.numel() == b * f:
            a = a.reshape(b, 1, f, 1, 1)
        elif a.numel() == b:
            a = a.reshape(b, 1, 1, 1, 1)
        else:
            a = a.reshape(1, 1, 1, 1, 1)
        v = (a.sqrt() * sample.float() - target) / (1 - a).sqrt()  # DDIM's x0 = sqrt(a) x - sqrt(1-a) v = target
        out: torch.Tensor = v.to(sample.dtype)
        return out


class SimulatedDecoder(FrameDecoder):
    """A decoder whose call waits the profile's decode time for its frames and shows the registered portraits."""

    @property
    def sim(self) -> SimulatedDevice:
        device: SimulatedDevice = self.vae
        return device

    @torch.no_grad()
    def checked_images(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        sim = self.sim
        sim.timeline.run(sim.profile.decode_s(self.name, latents.shape[0], sim.width, sim.height))
        return sim.portraits.pictures(latents, sim.width, sim.height), None


class SimulatedDevice:
    """A profile, its timeline and the portraits it shows: what the stand-in modules share."""

    def __init__(self, profile: DeviceProfile, width: int, height: int, dtype: str | None = None):
        profile.check_dtype(dtype or profile.dtype)
        self.profile = profile
        self.width, self.height = width, height
        self.name = f"sim:{profile.name}"
        self.timeline = DeviceTimeline()
        self.portraits = Portraits(f"profile {profile.name}")

    def describe(self) -> dict[str, Any]:
        """What /v1/info, /metrics and the bench say about it."""
        return {
            "simulated": True,
            "profile": self.profile.name,
            "profiled_device": self.profile.device,
            "dtype": self.profile.dtype,
            "measured": self.profile.source.get("measured"),
            "rule": self.profile.rule,
        }

    def models(self) -> VExpressModels:
        """The model's modules as stand-ins on this CPU (float32 tensors; the profile's dtype sets the times)."""
        from transformers import Wav2Vec2FeatureExtractor

        extractor = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
        )
        return VExpressModels(
            UNetConfig(),
            SimulatedVAE(self.portraits),
            SimulatedReferenceNet(),  # type: ignore[arg-type]
            SimulatedUNet(self),  # type: ignore[arg-type]
            SimulatedGuider(),  # type: ignore[arg-type]
            SimulatedAudioProjection(self),  # type: ignore[arg-type]
            SimulatedAudioEncoder(self),
            extractor,
            torch.device("cpu"),
            torch.float32,
        )

    def decoders(self) -> dict[str, FrameDecoder]:
        """Both live decoders, timed by the profile."""
        return {name: SimulatedDecoder(name, self, VAE_SCALE if name == "full" else 1.0) for name in ("full", "tiny")}


def simulated_device(device: str, width: int, height: int, dtype: str | None = None) -> SimulatedDevice:
    """`sim:<profile name or path>` at this frame size (ProfileError for an unknown or incomplete profile)."""
    return SimulatedDevice(profile_of(device), width, height, dtype)
