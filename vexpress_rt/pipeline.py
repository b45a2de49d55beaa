"""The offline V-Express pipeline, reproducing the original `inference.py` numerically.

Flow: reference image -> VAE latent -> reference net banks -> attn1_5 keys/values; kps images -> V-Kps guider;
audio -> tokens; noise -> windowed DDIM with classifier-free guidance -> per-frame VAE decode -> 3x3x3 median
filter -> uint8. The quirks reproduced on purpose are listed in docs/parity.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

from .audio_features import SAMPLE_RATE, audio_tokens
from .errors import InputError
from .loader import VExpressModels, make_scheduler
from .params import AUDIO_ATTENTION_WEIGHT, REFERENCE_ATTENTION_WEIGHT

VAE_SCALE = 0.18215  # hard-coded in the original (the VAE config's scaling_factor is ignored)
GUIDER_CHUNK = 16  # the original runs the guider 16 frames at a time (no numeric effect; bounds memory)


@dataclass
class GenerationSettings:
    width: int = 512
    height: int = 512
    fps: float = 30.0
    seed: int = 42
    num_inference_steps: int = 25
    guidance_scale: float = 3.5
    context_frames: int = 24
    context_overlap: int = 4
    reference_attention_weight: float = REFERENCE_ATTENTION_WEIGHT  # shared with the streaming sessions
    audio_attention_weight: float = AUDIO_ATTENTION_WEIGHT
    num_pad_audio_frames: int = 2


@dataclass
class VideoLength:
    frames: int  # L, the largest (n-1)(T-O)+T not above int(duration*fps)
    fps: Fraction  # L / duration: the rate the original writes, so the video lasts as long as the audio
    windows: list[list[int]]


def video_length_for(num_samples: int, fps: float, context_frames: int, context_overlap: int) -> VideoLength:
    if not 0 <= context_overlap < context_frames:
        raise InputError(
            f"context_overlap ({context_overlap}) must be >= 0 and below context_frames ({context_frames})"
        )
    duration = num_samples / SAMPLE_RATE
    initial = int(duration * fps)
    stride = context_frames - context_overlap
    n = (initial - context_frames) // stride + 1
    if n <= 0 or num_samples == 0:
        raise InputError(
            f"audio too short: {duration:.2f} s gives {initial} frames at {fps:g} fps, but one window needs "
            f"context_frames={context_frames} frames ({context_frames / fps:.2f} s)"
        )
    frames = (n - 1) * stride + context_frames
    windows = [list(range(i * stride, i * stride + context_frames)) for i in range(n)]
    return VideoLength(frames, Fraction(frames * SAMPLE_RATE, num_samples), windows)


def load_reference_image(path: str, width: int, height: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]. Two resizes, as the original: PIL bicubic to the size tuple (height, width) --
    width and height swapped -- then Lanczos to (width, height)."""
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except Exception as exc:
        raise InputError(f"cannot read the reference image {path}: {exc}") from None
    return reference_tensor(image, width, height)


def reference_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    image = image.resize((height, width))  # sic: the original passes (H, W) where PIL expects (W, H)
    image = image.resize((width, height), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)
    return (pixels * 2 - 1).permute(2, 0, 1)[None]


@torch.no_grad()
def encode_reference(models: VExpressModels, image: torch.Tensor) -> torch.Tensor:
    """The latent mean times 0.18215 (no sampling)."""
    image = image.to(models.device, models.dtype)
    return models.vae.encode(image).latent_dist.mean * VAE_SCALE


@torch.no_grad()
def kps_features(models: VExpressModels, kps_images: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) drawn kps images -> guider features (1, C, F, H/8, W/8); input in [0, 1].

    Several frames are kept on the CPU (at 512x512 a minute of video is GBs); windows move them as needed."""
    pixels = torch.from_numpy(kps_images).float().div(255).permute(3, 0, 1, 2)[None]
    keep_on = models.device if pixels.shape[2] == 1 else "cpu"
    chunks = [
        models.v_kps_guider(pixels[:, :, i : i + GUIDER_CHUNK].to(models.device, models.dtype)).to(keep_on)
        for i in range(0, pixels.shape[2], GUIDER_CHUNK)
    ]
    return torch.cat(chunks, dim=2)


def initial_noise(seed: int, wav2vec_layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The original's noise: the global CPU generator seeded, then one hidden torch.rand([]) per wav2vec2 layer
    (transformers 4.41 draws a LayerDrop coin even in eval mode), then one randn of the whole (1,4,L,h,w)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    for _ in range(wav2vec_layers):
        torch.rand([], generator=generator)
    return torch.randn(shape, generator=generator, dtype=dtype)


@torch.no_grad()
def denoise(
    models: VExpressModels,
    latents: torch.Tensor,
    reference_bank: dict[str, torch.Tensor],
    kps_feature: torch.Tensor,
    tokens: torch.Tensor,
    windows: list[list[int]],
    settings: GenerationSettings,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Windowed DDIM over all frames. Every window sees the pre-step latents; overlapping frames get the mean
    of their windows' guided v; then all frames step together (equal to the original's per-window stepping)."""
    unet, dtype, device = models.denoising_unet, models.dtype, models.device
    scheduler = make_scheduler()
    scheduler.set_timesteps(settings.num_inference_steps)
    cfg = settings.guidance_scale > 1.0
    if cfg:  # batch [uncond, cond]: the unconditional branch drops reference, audio and kps together
        reference_bank = {k: torch.cat([torch.zeros_like(v), v]) for k, v in reference_bank.items()}
    reference_kv = unet.reference_kv(reference_bank)
    batch = 2 if cfg else 1
    coverage = torch.zeros(latents.shape[2], dtype=dtype)
    for window in windows:
        coverage[window] += 1
    coverage = coverage.to(device)  # once: every window below reads its slice on the device
    latents = latents.to(device)
    for step, t in enumerate(scheduler.timesteps):
        v_sum = torch.zeros_like(latents)
        for window in windows:
            x = latents[:, :, window].repeat(batch, 1, 1, 1, 1)
            if kps_feature.shape[2] == 1:  # fix_face: one feature for every frame
                kps = kps_feature.expand(-1, -1, len(window), -1, -1)
            else:
                kps = kps_feature[:, :, window].to(device, dtype)
            audio = tokens[window].to(device, dtype)
            if cfg:
                kps = torch.cat([torch.zeros_like(kps), kps])
                audio = torch.cat([torch.zeros_like(audio), audio])
            v = unet(
                x,
                t,
                audio,
                reference_kv,
                kps,
                reference_attention_weight=settings.reference_attention_weight,
                audio_attention_weight=settings.audio_attention_weight,
            )
            if cfg:
                v_uncond, v_cond = v.chunk(2)
                v = v_uncond + settings.guidance_scale * (v_cond - v_uncond)
            v_sum[:, :, window] += v / coverage[window][None, None, :, None, None]
        latents = scheduler.step(v_sum, t, latents).prev_sample.to(dtype)
        if on_step is not None:
            on_step(step, latents)
    return latents


@torch.no_grad()
def decode_latents(models: VExpressModels, latents: torch.Tensor) -> torch.Tensor:
    """(1, 4, F, h, w) -> float32 video (3, F, H, W) in [0, 1], one frame at a time."""
    frames = []
    for f in range(latents.shape[2]):
        z = latents[:, :, f].to(models.device, models.dtype) / VAE_SCALE
        image = models.vae.decode(z).sample
        frames.append((image / 2 + 0.5).clamp(0, 1).float().cpu()[0])
    return torch.stack(frames, dim=1)


def median_filter_3d(video: torch.Tensor, max_values: int = 1 << 26) -> torch.Tensor:
    """Per-channel 3x3x3 median over (time, y, x) with reflect padding (edge not repeated), video (C, T, H, W)."""
    c, t, h, w = video.shape
    padded = torch.nn.functional.pad(video[None], (1, 1, 1, 1, 1, 1), mode="reflect")[0]
    chunk = max(1, max_values // (c * h * w * 27))
    out = []
    for start in range(0, t, chunk):
        block = padded[:, start : start + min(chunk, t - start) + 2]
        windows = block.unfold(1, 3, 1).unfold(2, 3, 1).unfold(3, 3, 1)
        out.append(windows.reshape(*windows.shape[:4], 27).median(dim=-1).values)
    return torch.cat(out, dim=1)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [0, 1] -> uint8 (T, H, W, 3) by truncation of 255*x, as the original writes them."""
    return (video.permute(1, 2, 3, 0) * 255).numpy().astype(np.uint8)


@dataclass
class GenerationResult:
    frames: np.ndarray  # uint8 (L, H, W, 3), after the median filter: what the video holds
    fps: Fraction
    latents: torch.Tensor  # final latents (1, 4, L, h, w), before decoding
    initial_noise: torch.Tensor
    kps_sequence: np.ndarray  # (L, 3, 2) the points drawn for each frame
    unfiltered: np.ndarray | None = None  # uint8 frames before the median filter, when asked for


def generate(
    models: VExpressModels,
    settings: GenerationSettings,
    reference_image: torch.Tensor,
    reference_kps: np.ndarray,
    waveform: np.ndarray,
    retarget_strategy: str = "fix_face",
    driving_kps: np.ndarray | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    keep_unfiltered: bool = False,
    save_gpu_memory: bool = False,
) -> GenerationResult:
    """The whole offline generation for one portrait and one 16 kHz mono waveform."""
    from .kps import draw_v_kps_image, retarget

    length = video_length_for(len(waveform), settings.fps, settings.context_frames, settings.context_overlap)
    n = length.frames
    kps_sequence = retarget(retarget_strategy, reference_kps, driving_kps, n)
    if retarget_strategy == "fix_face":  # every frame identical: one guider pass serves them all
        kps_images = draw_v_kps_image(settings.height, settings.width, kps_sequence[0])[None]
    else:
        kps_images = np.stack([draw_v_kps_image(settings.height, settings.width, k) for k in kps_sequence])

    latent = encode_reference(models, reference_image)
    kps_feature = kps_features(models, kps_images)
    tokens = audio_tokens(models, waveform, n, settings.num_pad_audio_frames)
    bank = models.reference_net(latent)
    if save_gpu_memory:  # these are done with: make room for the denoising UNet
        _offload(models.v_kps_guider, models.audio_encoder, models.audio_projection, models.reference_net)
    scale = models.vae_scale_factor
    shape = (1, latent.shape[1], n, settings.height // scale, settings.width // scale)
    noise = initial_noise(settings.seed, models.wav2vec_layers, shape, models.dtype)
    latents = denoise(models, noise, bank, kps_feature, tokens, length.windows, settings, on_step)
    video = decode_latents(models, latents)
    frames = to_uint8_frames(median_filter_3d(video))
    unfiltered = to_uint8_frames(video) if keep_unfiltered else None
    return GenerationResult(frames, length.fps, latents.cpu(), noise, kps_sequence, unfiltered)


def _offload(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
