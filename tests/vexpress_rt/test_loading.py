"""Strict checkpoint loading (vexpress_rt.loader) and `vexpress-rt check-weights`.

A tiny random model folder in the released layout is built here (no fixtures needed) to check that every
module loads, that motion_module.bin wins over the motion-module values inside denoising_unet.bin, and that
each kind of broken file gives one WeightsError naming the file and the offending keys. check-weights and
load_models are run on (copies of) the golden fixtures.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vexpress_rt.cli import main
from vexpress_rt.errors import WeightsError
from vexpress_rt.loader import (
    load_audio_projection,
    load_denoising_unet,
    load_models,
    load_reference_net,
    load_v_kps_guider,
    read_unet_config,
)
from vexpress_rt.models import AudioProjection, DenoisingUNet, ReferenceNet, UNetConfig, VKpsGuider
from vexpress_rt.weights import ModelPaths

TINY_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": 8,
    "block_out_channels": [32, 32, 32, 64],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
}
VEXPRESS = ("denoising_unet", "reference_net", "v_kps_guider", "audio_projection", "motion_module")


def _fp16(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().half() for k, v in module.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny model folder in the released layout: unet config + the five v-express .bin files (fp16).

    motion_module.bin holds the motion-module keys with values different from those inside denoising_unet.bin.
    """
    root = tmp_path_factory.mktemp("tiny_model")
    cfg_path = root / "stable-diffusion-v1-5" / "unet" / "config.json"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(json.dumps(TINY_UNET_CONFIG, indent=2))
    cfg = UNetConfig.from_json(cfg_path)
    torch.manual_seed(0)
    modules = {
        "denoising_unet": DenoisingUNet(cfg),
        "reference_net": ReferenceNet(cfg),
        "v_kps_guider": VKpsGuider(embedding_channels=32),
        "audio_projection": AudioProjection(dim=16, depth=1, heads=2, embedding_dim=32, output_dim=768),
    }
    vexpress = root / "v-express"
    vexpress.mkdir()
    for name, module in modules.items():
        _save(_fp16(module), vexpress / f"{name}.bin")
    unet_state = _fp16(modules["denoising_unet"])
    # Every motion-module value (pos-encoder buffers included) differs from the one in denoising_unet.bin.
    motion = {
        k: (v.float() + 0.5 + torch.rand_like(v.float())).half() for k, v in unet_state.items() if "motion_module" in k
    }
    assert motion and len(motion) < len(unet_state)
    _save(motion, vexpress / "motion_module.bin")
    return root


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny folder, for tests that break a file."""
    dest = tmp_path / "model_ckpts"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def _paths(model_dir: Path) -> ModelPaths:
    return ModelPaths.from_model_dir(model_dir)


def _cfg(model_dir: Path) -> UNetConfig:
    return read_unet_config(_paths(model_dir).unet_config_path)


def _weights_error(fn, *args) -> str:
    with pytest.raises(WeightsError) as info:
        fn(*args)
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Loading a good folder


def test_tiny_folder_loads_and_motion_module_bin_wins(tiny_model_dir):
    paths = _paths(tiny_model_dir)
    cfg = _cfg(tiny_model_dir)
    assert cfg.block_out_channels == (32, 32, 32, 64) and cfg.layers_per_block == 1

    unet = load_denoising_unet(cfg, paths.denoising_unet_path, paths.motion_module_path)
    unet_file = _load(paths.denoising_unet_path)
    motion_file = _load(paths.motion_module_path)
    loaded = unet.state_dict()
    assert set(loaded) == set(unet_file)
    for key, value in loaded.items():
        source = motion_file if "motion_module" in key else unet_file
        torch.testing.assert_close(value, source[key].to(value.dtype), rtol=0, atol=0, msg=key)
        if "motion_module" in key:  # the two files really disagree, so the test tells them apart
            assert not torch.equal(unet_file[key], motion_file[key]), key

    ref = load_reference_net(cfg, paths.reference_net_path)
    ref_file = _load(paths.reference_net_path)
    assert set(ref.state_dict()) == set(ref_file)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(value, ref_file[key].float(), rtol=0, atol=0, msg=key)

    guider = load_v_kps_guider(paths.v_kps_guider_path)
    assert guider.conv_out.out_channels == 32  # widths are read from the file, not the released 320
    assert guider(torch.rand(1, 3, 2, 64, 128)).shape == (1, 32, 2, 8, 16)

    projection = load_audio_projection(paths.audio_projection_path)
    assert projection.pos_emb.weight.shape == (10, 32) and projection.latents.shape == (1, 5, 16)
    assert len(projection.layers) == 1
    assert projection(torch.randn(3, 10, 32)).shape == (3, 5, 768)
    torch.testing.assert_close(
        projection.proj_in.weight, _load(paths.audio_projection_path)["proj_in.weight"].float(), rtol=0, atol=0
    )


# ---------------------------------------------------------------------------------------------------------
# One WeightsError per problem, naming the file and the first offending keys


def test_missing_key_in_denoising_unet(tiny_copy):
    paths = _paths(tiny_copy)
    state = _load(paths.denoising_unet_path)
    removed = [k for k in state if "motion_module" not in k][:7]
    for key in removed:
        del state[key]
    _save(state, paths.denoising_unet_path)
    msg = _weights_error(load_denoising_unet, _cfg(tiny_copy), paths.denoising_unet_path, paths.motion_module_path)
    assert str(paths.denoising_unet_path) in msg
    assert "7 missing" in msg
    assert removed[0] in msg
    assert removed[6] not in msg  # only the first few keys are listed: the message stays readable


def test_unexpected_key_in_reference_net(tiny_copy):
    paths = _paths(tiny_copy)
    state = _load(paths.reference_net_path)
    state["conv_norm_out.weight"] = torch.ones(32, dtype=torch.float16)  # the SD head V-Express drops
    _save(state, paths.reference_net_path)
    msg = _weights_error(load_reference_net, _cfg(tiny_copy), paths.reference_net_path)
    assert str(paths.reference_net_path) in msg
    assert "1 unexpected" in msg and "conv_norm_out.weight" in msg
    assert "missing" not in msg


def test_wrong_shape_in_denoising_unet(tiny_copy):
    paths = _paths(tiny_copy)
    state = _load(paths.denoising_unet_path)
    state["conv_in.weight"] = torch.zeros(32, 8, 3, 3, dtype=torch.float16)  # 8 input channels instead of 4
    _save(state, paths.denoising_unet_path)
    msg = _weights_error(load_denoising_unet, _cfg(tiny_copy), paths.denoising_unet_path, paths.motion_module_path)
    assert str(paths.denoising_unet_path) in msg
    assert "wrong shape" in msg and "conv_in.weight" in msg
    assert "[32, 4, 3, 3]" in msg and "[32, 8, 3, 3]" in msg


def test_wrong_shape_in_v_kps_guider(tiny_copy):
    paths = _paths(tiny_copy)
    state = _load(paths.v_kps_guider_path)
    state["blocks.0.bias"] = torch.zeros(7, dtype=torch.float16)
    _save(state, paths.v_kps_guider_path)
    msg = _weights_error(load_v_kps_guider, paths.v_kps_guider_path)
    assert str(paths.v_kps_guider_path) in msg and "blocks.0.bias" in msg and "[7]" in msg


def test_missing_file(tiny_copy):
    paths = _paths(tiny_copy)
    paths.audio_projection_path.unlink()
    msg = _weights_error(load_audio_projection, paths.audio_projection_path)
    assert "not found" in msg and str(paths.audio_projection_path) in msg

    paths.motion_module_path.unlink()
    msg = _weights_error(load_denoising_unet, _cfg(tiny_copy), paths.denoising_unet_path, paths.motion_module_path)
    assert "not found" in msg and str(paths.motion_module_path) in msg


def test_corrupt_file(tiny_copy):
    paths = _paths(tiny_copy)
    paths.reference_net_path.write_bytes(os.urandom(4096))
    msg = _weights_error(load_reference_net, _cfg(tiny_copy), paths.reference_net_path)
    assert "cannot read checkpoint" in msg and str(paths.reference_net_path) in msg

    # A truncated download is reported the same way.
    data = paths.v_kps_guider_path.read_bytes()
    paths.v_kps_guider_path.write_bytes(data[: len(data) // 2])
    msg = _weights_error(load_v_kps_guider, paths.v_kps_guider_path)
    assert "cannot read checkpoint" in msg and str(paths.v_kps_guider_path) in msg


def test_checkpoint_with_objects_is_refused(tiny_copy):
    """The .bin files are read with weights_only=True: a pickle with arbitrary objects is not unpickled."""
    paths = _paths(tiny_copy)
    state = _load(paths.audio_projection_path)
    torch.save({**state, "note": datetime.date(2024, 1, 1)}, paths.audio_projection_path)
    msg = _weights_error(load_audio_projection, paths.audio_projection_path)
    assert "cannot read checkpoint" in msg and str(paths.audio_projection_path) in msg

    torch.save({**state, "step": 1000}, paths.audio_projection_path)  # loadable, but not a tensor dict
    msg = _weights_error(load_audio_projection, paths.audio_projection_path)
    assert "not a tensor state dict" in msg and str(paths.audio_projection_path) in msg


def test_motion_module_bin_with_a_non_motion_key(tiny_copy):
    paths = _paths(tiny_copy)
    motion = _load(paths.motion_module_path)
    motion["conv_in.weight"] = _load(paths.denoising_unet_path)["conv_in.weight"]
    _save(motion, paths.motion_module_path)
    msg = _weights_error(load_denoising_unet, _cfg(tiny_copy), paths.denoising_unet_path, paths.motion_module_path)
    assert str(paths.motion_module_path) in msg
    assert "1 unexpected" in msg and "conv_in.weight" in msg


def test_motion_module_bin_missing_a_motion_key(tiny_copy):
    paths = _paths(tiny_copy)
    motion = _load(paths.motion_module_path)
    dropped = next(k for k in motion if k.endswith("proj_out.weight"))
    del motion[dropped]
    _save(motion, paths.motion_module_path)
    msg = _weights_error(load_denoising_unet, _cfg(tiny_copy), paths.denoising_unet_path, paths.motion_module_path)
    assert str(paths.motion_module_path) in msg and "1 missing" in msg and dropped in msg


def test_files_swapped(tiny_copy):
    """A file of the wrong module (e.g. two files renamed into each other's place) is named as such."""
    paths = _paths(tiny_copy)
    msg = _weights_error(load_v_kps_guider, paths.audio_projection_path)
    assert str(paths.audio_projection_path) in msg and "not a V-Kps guider checkpoint" in msg
    msg = _weights_error(load_audio_projection, paths.v_kps_guider_path)
    assert str(paths.v_kps_guider_path) in msg and "not an audio projection checkpoint" in msg
    msg = _weights_error(load_reference_net, _cfg(tiny_copy), paths.denoising_unet_path)
    assert str(paths.denoising_unet_path) in msg and "unexpected" in msg and "attn1_5" in msg


def test_bad_unet_config(tiny_copy):
    paths = _paths(tiny_copy)
    paths.unet_config_path.write_text(json.dumps({**TINY_UNET_CONFIG, "use_linear_projection": True}))
    msg = _weights_error(read_unet_config, paths.unet_config_path)
    assert str(paths.unet_config_path) in msg and "use_linear_projection" in msg
    paths.unet_config_path.unlink()
    msg = _weights_error(read_unet_config, paths.unet_config_path)
    assert "not found" in msg and str(paths.unet_config_path) in msg


# ---------------------------------------------------------------------------------------------------------
# `vexpress-rt check-weights`


def _check_weights(capsys, *args: str) -> tuple[int, dict[str, str], list[str]]:
    code = main(["check-weights", *args])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    status = {}
    for line in lines[:-1]:
        head = line.split(":", 1)[0]
        word, item = head.split(None, 1)
        status[item] = word
    return code, status, lines


REQUIRED = (
    "unet config",
    "denoising_unet",
    "motion_module",
    "reference_net",
    "v_kps_guider",
    "audio_projection",
    "vae",
    "wav2vec2",
)


def test_check_weights_on_the_built_model(model_dir, capsys):
    code, status, lines = _check_weights(capsys, "--model_dir", str(model_dir))
    assert code == 0, lines
    assert {item: status.get(item) for item in REQUIRED} == dict.fromkeys(REQUIRED, "OK")
    assert status["insightface buffalo_l"] == "OPTIONAL"  # no detector: fine, with --reference_kps_path
    assert any("--reference_kps_path" in line for line in lines)
    assert lines[-1] == "All required model files are present and match."
    assert any(str(model_dir / "v-express" / "motion_module.bin") in line for line in lines)


def test_check_weights_names_missing_and_broken_files(model_dir, tmp_path, capsys):
    source, model_dir = model_dir, tmp_path / "model_ckpts"
    shutil.copytree(source, model_dir)
    (model_dir / "v-express" / "reference_net.bin").unlink()
    guider = model_dir / "v-express" / "v_kps_guider.bin"
    guider.write_bytes(guider.read_bytes()[:1000])

    code, status, lines = _check_weights(capsys, "--model_dir", str(model_dir))
    assert code == 1
    assert status["reference_net"] == "MISSING"
    assert status["v_kps_guider"] == "WRONG"
    assert any(line.startswith("MISSING") and "reference_net.bin" in line for line in lines)
    assert any(line.startswith("WRONG") and "v_kps_guider.bin" in line for line in lines)
    for item in ("unet config", "denoising_unet", "motion_module", "audio_projection", "vae", "wav2vec2"):
        assert status[item] == "OK", item
    assert "download-weights" in lines[-1] and str(model_dir) in lines[-1]


def test_check_weights_wrong_keys_and_per_file_override(model_dir, tmp_path, capsys):
    """A mismatched file is WRONG with its first keys named; --<name>_path points at a file elsewhere."""
    source, model_dir = model_dir, tmp_path / "model_ckpts"
    shutil.copytree(source, model_dir)
    motion_path = model_dir / "v-express" / "motion_module.bin"
    motion = _load(motion_path)
    motion["conv_in.weight"] = torch.zeros(32, 4, 3, 3, dtype=torch.float16)
    _save(motion, motion_path)
    moved = tmp_path / "elsewhere" / "ref.bin"
    moved.parent.mkdir()
    shutil.move(model_dir / "v-express" / "reference_net.bin", moved)

    code, status, lines = _check_weights(capsys, "--model_dir", str(model_dir), "--reference_net_path", str(moved))
    assert code == 1
    assert status["reference_net"] == "OK"
    assert any(str(moved) in line for line in lines)
    wrong = next(line for line in lines if line.startswith("WRONG"))
    assert "motion_module" in wrong and "1 unexpected" in wrong and "conv_in.weight" in wrong


def test_check_weights_on_an_empty_folder(tmp_path, capsys):
    model_dir = tmp_path / "nothing_here"
    model_dir.mkdir()
    code, status, lines = _check_weights(capsys, "--model_dir", str(model_dir))
    assert code == 1
    assert {item: status.get(item) for item in REQUIRED} == dict.fromkeys(REQUIRED, "MISSING")
    assert status["insightface buffalo_l"] == "OPTIONAL"
    assert "download-weights" in lines[-1] and str(model_dir) in lines[-1]


def test_check_weights_on_the_tiny_random_folder(tiny_model_dir, capsys):
    """Widths come from the folder's config and files: a non-released size checks OK."""
    code, status, _ = _check_weights(capsys, "--model_dir", str(tiny_model_dir))
    assert code == 1  # no VAE / wav2vec2 in this folder
    for item in ("unet config", "denoising_unet", "motion_module", "reference_net", "v_kps_guider", "audio_projection"):
        assert status[item] == "OK", item
    assert status["vae"] == "MISSING" and status["wav2vec2"] == "MISSING"


# ---------------------------------------------------------------------------------------------------------
# load_models


def test_load_models_without_wav2vec2(model_dir, tmp_path):
    source, model_dir = model_dir, tmp_path / "model_ckpts"
    shutil.copytree(source, model_dir, ignore=shutil.ignore_patterns("wav2vec2-base-960h"))
    with pytest.raises(WeightsError) as info:
        load_models(ModelPaths.from_model_dir(model_dir))
    msg = str(info.value)
    assert str(model_dir / "wav2vec2-base-960h") in msg
    assert "download-weights" in msg and str(model_dir) in msg


def test_load_models_on_the_built_model(model_dir):
    models = load_models(ModelPaths.from_model_dir(model_dir), dtype=torch.float32)
    assert models.unet_config.block_out_channels == (32, 32, 32, 64)
    assert models.vae_scale_factor == 8
    assert models.audio_projection.pos_emb.num_embeddings == 10
    assert models.v_kps_guider.conv_out.out_channels == 32
    for module in (models.denoising_unet, models.reference_net, models.vae, models.audio_encoder):
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
    motion_file = _load(model_dir / "v-express" / "motion_module.bin")
    key = next(k for k in motion_file if k.endswith("temporal_transformer.proj_out.weight"))
    torch.testing.assert_close(models.denoising_unet.state_dict()[key], motion_file[key].float(), rtol=0, atol=0)
