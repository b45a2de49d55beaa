"""The real-size modules, built on the meta device, have exactly the released checkpoints' keys and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from vexpress_rt.models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider
from vexpress_rt.weights import motion_module_keys


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir / "vexpress_checkpoint_manifest.json").read_text())


@pytest.fixture(scope="module")
def real_modules(reference_dir):
    cfg = UNetConfig.from_json(reference_dir / "sd15_unet_config.json")
    with torch.device("meta"):
        unet = DenoisingUNet(cfg)
        return {
            "denoising_unet": unet,
            "reference_net": ReferenceNet(cfg),
            "v_kps_guider": VKpsGuider(320),
            "audio_projection": AudioProjection(),
        }


def _shapes(module, keys=None):
    return {k: list(v.shape) for k, v in module.state_dict().items() if keys is None or k in keys}


@pytest.mark.parametrize("name", ["denoising_unet", "reference_net", "v_kps_guider", "audio_projection"])
def test_state_dict_matches_manifest(manifest, real_modules, name):
    expected = {k: shape for k, (shape, _dtype) in manifest[name]["keys"].items()}
    mine = _shapes(real_modules[name])
    assert sorted(set(expected) - set(mine)) == []
    assert sorted(set(mine) - set(expected)) == []
    assert {k: v for k, v in mine.items() if expected[k] != v} == {}
    assert len(mine) == manifest[name]["num_keys"]


def test_motion_module_file_is_the_motion_subset(manifest, real_modules):
    unet = real_modules["denoising_unet"]
    expected = {k: shape for k, (shape, _dtype) in manifest["motion_module"]["keys"].items()}
    assert _shapes(unet, motion_module_keys(unet)) == expected


def test_parameter_counts(manifest, real_modules):
    for name, module in real_modules.items():
        params = sum(p.numel() for p in module.parameters())
        buffers = sum(b.numel() for b in module.buffers())
        assert params == manifest[name]["num_parameters"], name
        assert buffers == manifest[name]["num_buffer_elements"], name


def test_released_geometry(real_modules):
    """21 motion modules and 16 spatial transformer blocks (= 16 reference banks), paired by module path."""
    unet, ref = real_modules["denoising_unet"], real_modules["reference_net"]
    assert len([k for k in unet.state_dict() if k.endswith("attention_blocks.0.pos_encoder.pe")]) == 21
    assert len(unet.transformer_block_names()) == 16
    assert unet.transformer_block_names() == ref.transformer_block_names()
