"""Build every module and load the released files into it, strictly, with one clear error per problem."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import logging as diffusers_logging

from .errors import WeightsError
from .models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider
from .weights import HOW_TO_GET, ModelPaths, load_strict, motion_module_keys, read_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}

# The sampler of inference_v2.yaml: DDIM, v-prediction, zero terminal SNR, trailing timesteps.
SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


def make_scheduler() -> Any:  # a diffusers DDIMScheduler (diffusers is untyped)
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_KWARGS)


@dataclass
class VExpressModels:
    unet_config: UNetConfig
    vae: Any  # diffusers' AutoencoderKL (diffusers ships no type information)
    reference_net: ReferenceNet
    denoising_unet: DenoisingUNet
    v_kps_guider: VKpsGuider
    audio_projection: AudioProjection
    audio_encoder: torch.nn.Module
    feature_extractor: Any  # transformers' Wav2Vec2FeatureExtractor: called on raw audio
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def wav2vec_layers(self) -> int:
        return int(self.audio_encoder.config.num_hidden_layers)


def read_unet_config(path: Path) -> UNetConfig:
    if not path.is_file():
        raise WeightsError(f"UNet config not found: {path}")
    try:
        return UNetConfig.from_json(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"bad UNet config {path}: {exc}") from exc


def load_denoising_unet(cfg: UNetConfig, unet_path: Path, motion_path: Path) -> DenoisingUNet:
    """denoising_unet.bin holds the full 3-D UNet; motion_module.bin is applied on top of it, as the original
    does, so the motion-module values come from motion_module.bin."""
    unet = DenoisingUNet(cfg)
    load_strict(unet, read_checkpoint(unet_path), unet_path)
    load_strict(unet, read_checkpoint(motion_path), motion_path, keys=motion_module_keys(unet))
    return unet


def load_reference_net(cfg: UNetConfig, path: Path) -> ReferenceNet:
    net = ReferenceNet(cfg)
    load_strict(net, read_checkpoint(path), path)
    return net


def load_v_kps_guider(path: Path) -> VKpsGuider:
    state = read_checkpoint(path)
    try:
        guider = VKpsGuider.from_state_dict_shapes(state)
    except KeyError as exc:
        raise WeightsError(f"{path} is not a V-Kps guider checkpoint (no {exc})") from exc
    load_strict(guider, state, path)
    return guider


def load_audio_projection(path: Path) -> AudioProjection:
    state = read_checkpoint(path)
    try:
        projection = AudioProjection.from_state_dict_shapes(state)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{path} is not an audio projection checkpoint ({exc})") from exc
    load_strict(projection, state, path)
    return projection


def _low_memory_loading() -> dict[str, bool]:
    """diffusers loads with `low_cpu_mem_usage` only through `accelerate`, and without it prints a "pip install
    accelerate" warning on every load; ask for the plain load explicitly when it is not installed."""
    return {} if importlib.util.find_spec("accelerate") is not None else {"low_cpu_mem_usage": False}


def load_vae(path: Path):
    from diffusers import AutoencoderKL

    if not (path / "config.json").is_file():
        raise WeightsError(f"VAE folder missing or incomplete (no config.json): {path}")
    try:
        return AutoencoderKL.from_pretrained(path, **_low_memory_loading())
    except Exception as exc:
        raise WeightsError(f"cannot load the VAE from {path}: {exc}") from exc


def load_tiny_vae(path: Path):
    """TAESD (diffusers `AutoencoderTiny`): the live server's fast decoder; the offline pipeline never uses it."""
    from diffusers import AutoencoderTiny

    if not (path / "config.json").is_file():
        raise WeightsError(f"TAESD folder missing or incomplete (no config.json): {path}")
    try:
        return AutoencoderTiny.from_pretrained(path, **_low_memory_loading()).eval().requires_grad_(False)
    except Exception as exc:
        raise WeightsError(f"cannot load TAESD from {path}: {exc}") from exc


def load_audio_encoder(path: Path):
    """wav2vec2 (transformers) and its feature extractor (the processor's normalisation settings)."""
    import transformers
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    for name in ("config.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise WeightsError(f"wav2vec2 folder missing or incomplete (no {name}): {path}")
    transformers.logging.set_verbosity_error()  # the CTC head is unused; its "unexpected keys" note is noise
    transformers.logging.disable_progress_bar()
    try:
        encoder = Wav2Vec2Model.from_pretrained(path)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(path)
    except Exception as exc:
        raise WeightsError(f"cannot load wav2vec2 from {path}: {exc}") from exc
    return encoder.eval(), extractor


def load_models(paths: ModelPaths, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load everything in the released layout; every failure is a WeightsError naming what and how to fix."""
    try:
        cfg = read_unet_config(paths.unet_config_path)
        denoising_unet = load_denoising_unet(cfg, paths.denoising_unet_path, paths.motion_module_path)
        reference_net = load_reference_net(cfg, paths.reference_net_path)
        guider = load_v_kps_guider(paths.v_kps_guider_path)
        projection = load_audio_projection(paths.audio_projection_path)
        vae = load_vae(paths.vae_path)
        encoder, extractor = load_audio_encoder(paths.audio_encoder_path)
    except WeightsError as exc:
        model_dir = paths.denoising_unet_path.parent.parent
        raise WeightsError(f"{exc}\n{HOW_TO_GET.format(d=model_dir)}") from None
    if guider.conv_out.out_channels != cfg.block_out_channels[0]:
        raise WeightsError(
            f"{paths.v_kps_guider_path}: guider width {guider.conv_out.out_channels} does not match the UNet's "
            f"conv_in width {cfg.block_out_channels[0]}"
        )
    device = torch.device(device)
    diffusers_logging.set_verbosity_error()  # its note on casting the VAE with .to() is expected here
    modules = [vae, reference_net, denoising_unet, guider, projection, encoder]
    for m in modules:
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return VExpressModels(
        cfg, vae, reference_net, denoising_unet, guider, projection, encoder, extractor, device, dtype
    )
