"""Floating-point operations per output video frame: the original offline pipeline vs the streaming engine.

Counted with `torch.utils.flop_counter.FlopCounterMode` by running the real-size modules' forwards on the meta
device (nothing is allocated, no weights needed): the denoising UNet and reference net from the SD-1.5
`sd15_unet_config.json`, the V-Kps guider and audio projection with the widths of the released checkpoints (read
from `vexpress_checkpoint_manifest.json`), wav2vec2-base (`Wav2Vec2Config()` defaults: 12 layers, 768 wide), the
sd-vae-ft-mse `AutoencoderKL` and, for the tiny decoder, diffusers' `AutoencoderTiny` (TAESD defaults).

What is counted: matrix products, convolutions and attention (a multiply-add is 2 FLOPs; on the meta device
scaled-dot-product attention runs its math path, two batched matmuls, which count the same as the fused kernels).
Not counted: normalisations, activations, softmax and other element-wise work (FlopCounterMode has no formula for
them); they are a few percent of the total.

Whole window calls of F frames are counted, not one frame times F: the motion modules attend across frames.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vexpress_rt.models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider
from vexpress_rt.pipeline import GenerationSettings, video_length_for

SAMPLE_RATE = 16000
TOKENS_PER_FRAME = 2  # wav2vec2 tokens per video frame after resampling
LEFT_CONTEXT_S = 2.0  # streaming wav2vec2 span: left context + the chunk's new audio + lookahead
LOOKAHEAD_S = 0.2
# The reference notes (sd15_unet_config.json) when VEXPRESS_REFERENCE names them; else the module classes'
# defaults, which are the released widths (tests/streaming/bench/test_flops.py checks that both count the same).
_named = os.environ.get("VEXPRESS_REFERENCE")
DEFAULT_REFERENCE: Path | None = Path(_named) if _named else None
META = torch.device("meta")


@dataclass(frozen=True)
class FlopBreakdown:
    unet: float  # denoising UNet, per output frame
    decoder: float  # VAE (or tiny) decode, per output frame
    audio: float  # wav2vec2 + audio projection, per output frame
    other: float  # guider, reference net, VAE encode amortised per frame (0 for the engine: pre-encoded)

    @property
    def total(self) -> float:
        return self.unet + self.decoder + self.audio + self.other


# -- the real-size modules, on the meta device -------------------------------------------------------------------


def _reference_dir(reference_dir: str | Path | None) -> str:
    """The reference notes' folder; "" when none was named and the default is absent (an installed package):
    the module classes' defaults are the released widths."""
    if reference_dir is None:
        if DEFAULT_REFERENCE is None or not (DEFAULT_REFERENCE / "sd15_unet_config.json").is_file():
            return ""
        reference_dir = DEFAULT_REFERENCE
    return str(Path(reference_dir).resolve())


def _manifest_shapes(manifest: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device=META) for k, (shape, _dtype) in manifest[name]["keys"].items()}


@cache
def _vexpress_modules(reference_dir: str) -> tuple[DenoisingUNet, ReferenceNet, VKpsGuider, AudioProjection]:
    import json

    if not reference_dir:
        with META:
            modules = (DenoisingUNet(UNetConfig()), ReferenceNet(UNetConfig()), VKpsGuider(), AudioProjection())
    else:
        ref = Path(reference_dir)
        cfg = UNetConfig.from_json(ref / "sd15_unet_config.json")
        manifest = json.loads((ref / "vexpress_checkpoint_manifest.json").read_text())
        with META:
            modules = (
                DenoisingUNet(cfg),
                ReferenceNet(cfg),
                VKpsGuider.from_state_dict_shapes(_manifest_shapes(manifest, "v_kps_guider")),
                AudioProjection.from_state_dict_shapes(_manifest_shapes(manifest, "audio_projection")),
            )
    for m in modules:
        m.eval().requires_grad_(False)
    return modules


# sd-vae-ft-mse, the VAE V-Express ships with (also what bench --gpu builds at real size)
SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)


@cache
def _vae() -> Any:  # diffusers is untyped
    from diffusers import AutoencoderKL

    with META:
        vae: Any = AutoencoderKL(**SD_VAE_CONFIG)
    return vae.eval().requires_grad_(False)


@cache
def _tiny_vae() -> Any:
    from diffusers import AutoencoderTiny

    with META:
        tiny: Any = AutoencoderTiny()
        return tiny.eval().requires_grad_(False)


@cache
def _wav2vec2() -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    with META:  # wav2vec2-base(-960h): the config defaults
        model: torch.nn.Module = Wav2Vec2Model(Wav2Vec2Config())
    return model.eval().requires_grad_(False)


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device=META)


def _count(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


# -- counts of single calls (cached) -----------------------------------------------------------------------------


@cache
def _reference_banks(reference_dir: str, height: int, width: int) -> dict[str, torch.Tensor]:
    _, reference_net, _, _ = _vexpress_modules(reference_dir)
    with torch.no_grad():
        banks: dict[str, torch.Tensor] = reference_net(_meta(1, 4, height // 8, width // 8))
    return banks


@cache
def _unet_call(reference_dir: str, height: int, width: int, frames: int, batch: int, project_kv: bool) -> float:
    unet, _, _, projection = _vexpress_modules(reference_dir)
    banks = _reference_banks(reference_dir, height, width)
    h, w = height // 8, width // 8
    sample = _meta(batch, 4, frames, h, w)
    kps = _meta(batch, unet.config.block_out_channels[0], frames, h, w)
    audio = _meta(batch * frames, projection.latents.shape[1], projection.norm_out.normalized_shape[0])
    timestep = torch.tensor(999, device=META)
    with torch.no_grad():  # the engine: projected once per avatar, outside the counted region
        precomputed = unet.reference_kv({k: v.expand(batch, -1, -1) for k, v in banks.items()})

    def call() -> None:
        kv = precomputed
        if project_kv:  # the original: the bank repeated over the batch and frames, projected in every call
            kv = unet.reference_kv({k: v.expand(batch * frames, -1, -1) for k, v in banks.items()})
        unet(sample, timestep, audio, kv, kps)

    return _count(call)


def unet_call_flops(
    frames: int,
    batch: int = 1,
    width: int = 512,
    height: int = 512,
    project_reference_kv: bool = False,
    reference_dir: str | Path | None = None,
) -> float:
    """One denoising-UNet call on a window of `frames` frames at batch `batch` (2 = CFG). With
    `project_reference_kv` the attn1_5 keys/values of the reference bank are projected inside the call, per
    batch element and frame, as the original does; otherwise they are precomputed (the engine)."""
    return _unet_call(_reference_dir(reference_dir), height, width, frames, batch, project_reference_kv)


@cache
def _reference_net(reference_dir: str, height: int, width: int) -> float:
    _, reference_net, _, _ = _vexpress_modules(reference_dir)
    return _count(lambda: reference_net(_meta(1, 4, height // 8, width // 8)))


@cache
def _guider_per_frame(reference_dir: str, height: int, width: int) -> float:
    _, _, guider, _ = _vexpress_modules(reference_dir)  # per-frame convolutions: exactly linear in frames
    return _count(lambda: guider(_meta(1, 3, 1, height, width)))


@cache
def _audio_projection(reference_dir: str, frames: int) -> float:
    _, _, _, projection = _vexpress_modules(reference_dir)
    width = TOKENS_PER_FRAME * (2 * GenerationSettings.num_pad_audio_frames + 1)  # +-2 frames: 10 tokens
    return _count(lambda: projection(_meta(frames, width, projection.proj_in.in_features)))


@cache
def _wav2vec2_call(num_samples: int) -> float:
    encoder = _wav2vec2()
    return _count(lambda: encoder(_meta(1, num_samples)).last_hidden_state)


@cache
def _vae_encode(height: int, width: int) -> float:
    vae = _vae()
    return _count(lambda: vae.encode(_meta(1, 3, height, width)).latent_dist.mean)


@cache
def _decode(decoder: str, height: int, width: int) -> float:
    if decoder not in ("vae", "tiny"):
        raise ValueError(f"decoder must be 'vae' or 'tiny', not {decoder!r}")
    vae = _vae() if decoder == "vae" else _tiny_vae()
    return _count(lambda: vae.decode(_meta(1, 4, height // 8, width // 8)).sample)


# -- per output frame --------------------------------------------------------------------------------------------


def original_flops_per_frame(
    width: int = 512,
    height: int = 512,
    fps: float = 30.0,
    steps: int = 25,
    guidance_scale: float = 3.5,
    context_frames: int = 24,
    context_overlap: int = 4,
    clip_seconds: float = 10.0,
    reference_dir: str | Path | None = None,
) -> FlopBreakdown:
    """The original `inference.py` on a clip of `clip_seconds`: windowed DDIM with CFG over all L frames."""
    ref = _reference_dir(reference_dir)
    num_samples = int(round(clip_seconds * SAMPLE_RATE))
    length = video_length_for(num_samples, fps, context_frames, context_overlap)
    frames = length.frames
    batch = 2 if guidance_scale > 1.0 else 1
    unet = steps * len(length.windows) * _unet_call(ref, height, width, context_frames, batch, True)
    audio = _wav2vec2_call(num_samples) + _audio_projection(ref, frames)
    other = _reference_net(ref, height, width) + frames * _guider_per_frame(ref, height, width)
    other += _vae_encode(height, width)
    decoder = frames * _decode("vae", height, width)
    return FlopBreakdown(unet / frames, decoder / frames, audio / frames, other / frames)


def engine_flops_per_frame(
    width: int = 512,
    height: int = 512,
    fps: float = 25.0,
    steps: int = 4,
    guidance_scale: float = 1.0,
    window_frames: int = 8,
    new_frames: int = 4,
    decoder: str = "vae",
    clip_seconds: float = 10.0,
    reference_dir: str | Path | None = None,
) -> FlopBreakdown:
    """The streaming engine in steady state: per chunk of `new_frames` new frames, `steps` UNet calls on a
    sliding window of `window_frames` frames, wav2vec2 over 2 s left context + the chunk + 0.2 s lookahead.

    The avatar is pre-encoded (reference K/V and fix_face feature): no reference net, guider or VAE encode.
    `clip_seconds` is accepted for symmetry with `original_flops_per_frame`; steady-state cost does not depend on
    it."""
    if not 0 < new_frames <= window_frames:
        raise ValueError(f"need 0 < new_frames ({new_frames}) <= window_frames ({window_frames})")
    del clip_seconds
    ref = _reference_dir(reference_dir)
    batch = 2 if guidance_scale > 1.0 else 1
    unet = steps * _unet_call(ref, height, width, window_frames, batch, False) / new_frames
    span = int(round((LEFT_CONTEXT_S + new_frames / fps + LOOKAHEAD_S) * SAMPLE_RATE))
    audio = (_wav2vec2_call(span) + _audio_projection(ref, new_frames)) / new_frames
    return FlopBreakdown(unet, _decode(decoder, height, width), audio, 0.0)


if __name__ == "__main__":  # python -m streaming.bench.flops
    rows = {
        "original (25 steps, CFG 3.5, 24/4 windows, 30 fps)": original_flops_per_frame(),
        "engine (4 steps, window 8, new 4, vae)": engine_flops_per_frame(),
        "engine (4 steps, window 8, new 4, tiny)": engine_flops_per_frame(decoder="tiny"),
        "engine (4 steps, window 4, new 4, vae)": engine_flops_per_frame(window_frames=4),
        "engine (2 steps, window 4, new 4, vae)": engine_flops_per_frame(steps=2, window_frames=4),
    }
    base = rows["engine (4 steps, window 8, new 4, vae)"].total
    heads = " ".join(f"{h:>8s}" for h in ("unet", "decoder", "audio", "other", "total"))
    print(f"{'TFLOP per output frame':52s} {heads}  ratio")
    for name, b in rows.items():
        cols = " ".join(f"{x / 1e12:8.3f}" for x in (b.unet, b.decoder, b.audio, b.other, b.total))
        print(f"{name:52s} {cols}  {b.total / base:5.1f}x")
