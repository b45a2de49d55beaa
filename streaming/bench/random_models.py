"""V-Express modules with random weights, built in memory: real size (same speed as the released weights, so
`bench --gpu` needs no model folder) or tiny (CPU tests and the CPU run of the engine bench).

Modules are built directly on the target device (initialising 900 M parameters on the GPU takes seconds, on the
CPU a minute); `meta` gives shape-only modules for the device-placement test.
"""

from __future__ import annotations

from typing import Any

import torch

from vexpress_rt.loader import VExpressModels
from vexpress_rt.models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider

from .flops import SD_VAE_CONFIG

SIZES = ("real", "tiny")

# The fixture model's shapes (../shared/fixtures/vexpress-tiny): a 4-level UNet 32..64 wide, 2-layer wav2vec2.
TINY_UNET = UNetConfig(block_out_channels=(32, 32, 32, 64), attention_heads=8, norm_num_groups=32)
TINY_VAE: dict[str, Any] = dict(
    SD_VAE_CONFIG, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8
)
TINY_WAV2VEC2: dict[str, Any] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
)


def random_models(
    size: str = "real", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> VExpressModels:
    """Every module of V-Express at `size` with random weights, on `device` in `dtype`, ready for the engine."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    device = torch.device(device)
    tiny = size == "tiny"
    cfg = TINY_UNET if tiny else UNetConfig()
    if device.type != "meta":
        torch.manual_seed(seed)
    with device:
        unet = DenoisingUNet(cfg)
        reference_net = ReferenceNet(cfg)
        guider = VKpsGuider(embedding_channels=cfg.block_out_channels[0])
        if tiny:
            projection = AudioProjection(dim=16, depth=2, dim_head=64, heads=12, embedding_dim=32, ff_mult=4)
        else:
            projection = AudioProjection()
        vae: Any = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE_CONFIG))
        encoder = Wav2Vec2Model(Wav2Vec2Config(**(TINY_WAV2VEC2 if tiny else {})))
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
    )
    diffusers_logging.set_verbosity_error()  # its note on casting the VAE with .to() is expected here
    modules: tuple[torch.nn.Module, ...] = (vae, reference_net, unet, guider, projection, encoder)
    for module in modules:
        module.to(dtype=dtype).eval().requires_grad_(False)
    return VExpressModels(cfg, vae, reference_net, unet, guider, projection, encoder, extractor, device, dtype)
