"""The live decoder (streaming/decoder.py): TAESD (`AutoencoderTiny`) or the full VAE, per server and per session.

TAESD here is a tiny random `AutoencoderTiny` written in the diffusers layout (config.json + safetensors) into a
temporary `taesd/` folder; no test reaches the hub.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kit.served import call
from PIL import Image

from server.settings.config import ConfigError, ServerConfig, add_serve_arguments
from streaming.decoder import FrameDecoder, load_decoders
from streaming.denoiser import StreamDenoiser
from streaming.engine import Engine, EngineConfig
from streaming.params import GenerationParams
from streaming.session_config import SessionConfig
from vexpress_rt.cli import main
from vexpress_rt.errors import InputError, WeightsError
from vexpress_rt.pipeline import VAE_SCALE
from vexpress_rt.weights import TAESD_FILES, TAESD_REPO, download_plan, download_weights

# The released TAESD has 64 channels everywhere; 8 keeps the CPU tests quick with the same structure.
SMALL_TAESD = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8))


def _write_taesd(folder: Path) -> Path:
    torch.manual_seed(0)
    from diffusers import AutoencoderTiny

    AutoencoderTiny(**SMALL_TAESD).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory) -> Path:
    return _write_taesd(tmp_path_factory.mktemp("models") / "taesd")


@pytest.fixture(scope="module")
def decoders(tiny_models, taesd_dir):
    default, decoders = load_decoders(tiny_models, "auto", taesd_dir)
    assert default == "tiny" and set(decoders) == {"full", "tiny"}
    return decoders


# -- the tiny decoder ---------------------------------------------------------------------------------------------
def test_taesd_folder_is_the_diffusers_layout(taesd_dir):
    assert sorted(p.name for p in taesd_dir.iterdir()) == sorted(TAESD_FILES)
    assert json.loads((taesd_dir / "config.json").read_text())["_class_name"] == "AutoencoderTiny"


def test_tiny_decoder_frames(decoders):
    """uint8 (F, H, W, 3) at 8x the latent size, from the UNet's latents as they are (TAESD's scaling factor is
    1.0; the full VAE's 0.18215 would decode other images), TAESD's [-1, 1] mapped to 0..255. [-1, 1] is what it
    was trained for, not a bound (DecoderTiny maps its output x to 2x - 1 unclamped): the decoder clamps."""
    tiny = decoders["tiny"]
    assert tiny.latent_scale == 1.0 and decoders["full"].latent_scale == pytest.approx(0.18215)
    latents = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(1))
    frames = tiny(latents)
    assert frames.shape == (3, 64, 128, 3) and frames.dtype == np.uint8
    with torch.no_grad():
        raw = tiny.vae.decode(latents).sample
    expected = ((raw / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(frames, expected)
    assert (raw < -1).any() and (frames == 0).any()  # out of range with random weights: clamped, not wrapped
    assert frames.std() > 0 and not np.array_equal(frames, tiny(latents / 0.18215))
    assert np.array_equal(tiny(latents[:1]), frames[:1])  # batched = one at a time


@pytest.mark.parametrize("name", ["full", "tiny"])
def test_decoders_stay_on_the_models_device(name):
    """Built on `meta`, every tensor of a decode stays there: on CUDA nothing crosses devices until the uint8 copy."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    from streaming.bench.flops import SD_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG) if name == "full" else AutoencoderTiny()
    decoder = FrameDecoder(name, vae, VAE_SCALE) if name == "full" else FrameDecoder.tiny(vae)
    images = decoder.images(torch.zeros(2, 4, 8, 8))  # latents arrive from anywhere
    assert images.device.type == "meta" and images.dtype == torch.uint8 and images.shape == (2, 64, 64, 3)


def test_flop_counter_counts_the_decoder_in_use():
    """bench's FLOPs for the tiny decoder are those of the decode the engine runs (TAESD = AutoencoderTiny defaults)."""
    from diffusers import AutoencoderTiny
    from torch.utils.flop_counter import FlopCounterMode

    from streaming.bench.flops import _decode

    with torch.device("meta"):
        decoder = FrameDecoder.tiny(AutoencoderTiny())
    with FlopCounterMode(display=False) as counter:
        decoder.images(torch.empty(1, 4, 64, 64, device="meta"))
    assert counter.get_total_flops() == pytest.approx(_decode("tiny", 512, 512))
    assert _decode("tiny", 512, 512) < _decode("vae", 512, 512) / 5


# -- choosing the decoder ---------------------------------------------------------------------------------------------
def test_auto_falls_back_to_full_with_one_log_line(tiny_models, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="streaming.decoder"):
        default, decoders = load_decoders(tiny_models, "auto", tmp_path / "taesd")
    assert default == "full" and set(decoders) == {"full"}
    lines = [r for r in caplog.records if r.name == "streaming.decoder"]
    assert len(lines) == 1 and "full VAE" in lines[0].getMessage() and "download-weights" in lines[0].getMessage()


def test_tiny_without_weights_is_a_clear_error(tiny_models, tmp_path):
    with pytest.raises(WeightsError, match="--decoder tiny.*download-weights"):
        load_decoders(tiny_models, "tiny", tmp_path / "taesd")


def test_broken_taesd(tiny_models, taesd_dir, tmp_path, caplog):
    broken = tmp_path / "taesd"
    shutil.copytree(taesd_dir, broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(WeightsError, match="cannot load TAESD"):
        load_decoders(tiny_models, "tiny", broken)
    with caplog.at_level(logging.WARNING, logger="streaming.decoder"):
        assert load_decoders(tiny_models, "auto", broken)[0] == "full"
    assert "cannot load TAESD" in caplog.text


def test_full_keeps_tiny_for_sessions_that_ask(tiny_models, taesd_dir):
    default, decoders = load_decoders(tiny_models, "full", taesd_dir)
    assert default == "full" and set(decoders) == {"full", "tiny"}


def _serve_config(argv: list[str], environ: dict) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return ServerConfig.from_args(parser.parse_args(argv), environ)


def test_decoder_flag_and_environment():
    assert _serve_config([], {}).decoder == "auto"
    assert _serve_config(["--decoder", "tiny"], {}).decoder == "tiny"
    assert _serve_config([], {"VEXPRESS_DECODER": "full"}).decoder == "full"
    assert _serve_config(["--decoder", "tiny"], {"VEXPRESS_DECODER": "full"}).decoder == "tiny"  # the flag wins
    with pytest.raises(ConfigError, match="--decoder 'taesd'"):
        _serve_config([], {"VEXPRESS_DECODER": "taesd"})


def test_session_decoder_is_validated():
    with pytest.raises(InputError, match="decoder must be one of"):
        SessionConfig(decoder="fast").validate()
    SessionConfig(decoder="tiny").validate()


# -- weights: download plan and check-weights -------------------------------------------------------------------------
def test_download_plan_fetches_taesd_into_its_own_folder():
    plan = download_plan()
    assert [f.repo_id for f in plan] == ["tk93/V-Express", TAESD_REPO]
    taesd = plan[1]
    assert taesd.dest == "taesd" and set(taesd.patterns) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert [f.repo_id for f in download_plan(taesd_repo="")] == ["tk93/V-Express"]


def test_download_weights_lays_out_the_folder(fixtures_dir, taesd_dir, tmp_path):
    """A local fake of the hub: the released folder lands as is, TAESD's two files in taesd/, nothing else stays."""
    fetched = []

    def fake_snapshot(fetch, local_dir: Path) -> None:
        fetched.append(fetch.repo_id)
        if fetch.repo_id == TAESD_REPO:
            shutil.copytree(taesd_dir, local_dir)
            (local_dir / "README.md").write_text("not wanted")
        else:
            shutil.copytree(fixtures_dir / "model_ckpts", local_dir / "model_ckpts")

    target = download_weights(tmp_path / "models", snapshot=fake_snapshot)
    assert fetched == ["tk93/V-Express", TAESD_REPO]
    assert sorted(p.name for p in target.iterdir()) == sorted(
        [p.name for p in (fixtures_dir / "model_ckpts").iterdir()] + ["taesd"]
    )
    assert sorted(p.name for p in (target / "taesd").iterdir()) == sorted(TAESD_FILES)


def _check(capsys, *args) -> tuple[int, str, str]:
    code = main(["check-weights", *args])
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.split(":", 1)[0].split(None, 1)[-1] == "taesd")
    return code, line.split()[0], line


def test_check_weights_reports_taesd(fixtures_dir, taesd_dir, tmp_path, capsys):
    model_dir = str(fixtures_dir / "model_ckpts")
    code, status, line = _check(capsys, "--model_dir", model_dir, "--taesd_path", str(taesd_dir))
    assert (code, status) == (0, "OK")
    code, status, line = _check(capsys, "--model_dir", model_dir, "--taesd_path", str(tmp_path / "absent"))
    assert (code, status) == (0, "OPTIONAL") and "absent" in line  # the offline path does not need it
    broken = tmp_path / "taesd"
    shutil.copytree(taesd_dir, broken)
    (broken / "config.json").write_text("{not json")
    code, status, line = _check(capsys, "--model_dir", model_dir, "--taesd_path", str(broken))
    assert (code, status) == (1, "WRONG") and str(broken) in line


# -- sessions on either decoder ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_models, decoders):
    config = EngineConfig(
        width=128, height=64, admission=False, idle_seconds=0.4, default_session=SessionConfig(decoder="tiny")
    )
    engine = Engine(tiny_models, config, decoders)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def avatar(engine, fixtures_dir) -> str:
    image = Image.open(fixtures_dir / "inputs" / "reference.png").convert("RGB")
    kps = np.load(fixtures_dir / "inputs" / "reference_kps.npy")[:3].astype(np.float32)
    return engine.add_avatar(image, kps).id


def test_idle_clip_is_decoded_by_each_decoder(engine, avatar, decoders):
    clip = engine.avatar(avatar)
    assert set(clip.idle_frames) == {"full", "tiny"}
    latents = clip.idle_latents.transpose(0, 1)
    for name, frames in clip.idle_frames.items():
        assert frames.shape == (latents.shape[0], 64, 128, 3)
        assert np.array_equal(frames, decoders[name](latents))


def test_sessions_on_both_decoders_share_unet_calls(engine, avatar, decoders, tiny_speech, monkeypatch):
    """A tiny and a full session with equal settings: one UNet call for both, each frame from its own decoder,
    and idle frames from that same decoder."""
    batches = []
    real_run = StreamDenoiser.run

    def counting_run(self, jobs):
        batches.append(len(jobs))
        return real_run(self, jobs)

    monkeypatch.setattr(StreamDenoiser, "run", counting_run)
    clock = [1000.0]
    sessions = {
        name: engine.open_session(
            avatar, SessionConfig(params=GenerationParams(steps=2), decoder=name), now=lambda: clock[0]
        )
        for name in ("tiny", "full")
    }
    delivered = {name: [] for name in sessions}
    for name, session in sessions.items():
        real = session.deliver
        monkeypatch.setattr(
            session, "deliver", lambda frames, real=real, name=name: (delivered[name].extend(frames), real(frames))[1]
        )
    try:
        idle = {name: s.read_frame() for name, s in sessions.items()}
        for name, frame in idle.items():
            assert not frame.speaking and any(
                np.array_equal(frame.image, c) for c in engine.avatar(avatar).idle_frames[name]
            )
        for session in sessions.values():
            session.push_audio(tiny_speech[:6400])
            session.end_utterance()
        for _ in range(150):  # frame periods on the sessions' clock: the worker runs, each reader reads a frame
            while engine.worker.turn():
                pass
            for session in sessions.values():
                session.read_frame()
            clock[0] += 1 / 25
            if all(len(frames) >= 10 for frames in delivered.values()):
                break
    finally:
        for session in sessions.values():
            session.close()
    assert max(batches) == 2
    for name, frames in delivered.items():
        assert len(frames) >= 10
        latents = torch.stack([latent for _, _, latent in frames])
        images = np.stack([image for _, image, _ in frames])
        assert np.array_equal(images, decoders[name](latents)), name


def test_server_session_decoder_field(engine, avatar, serve):
    engine.start()
    srv = serve(engine=engine)
    try:
        info = call("GET", srv.url + "/v1/info").json
        assert info["decoder"] == "tiny" and sorted(info["decoders"]) == ["full", "tiny"]
        for asked, got in ((None, "tiny"), ("full", "full"), ("tiny", "tiny")):
            body = {"avatar_id": avatar} | ({"decoder": asked} if asked else {})
            reply = call("POST", srv.url + "/v1/sessions", json=body)
            assert reply.status == 201 and reply.json["decoder"] == got, reply.text
            headers = {"Authorization": f"Bearer {reply.json['token']}"}
            assert call("DELETE", reply.json["url"], headers=headers).status == 204
        for bad in ("taesd", 3):
            reply = call("POST", srv.url + "/v1/sessions", json={"decoder": bad})
            assert reply.status == 400 and "decoder" in reply.json["error"]["message"], reply.text
    finally:
        srv.stop()
        engine.worker.stop()


def test_a_decoder_the_server_lacks_is_refused(tiny_models):
    full_only = Engine(tiny_models, EngineConfig(width=128, height=64, admission=False))
    with pytest.raises(InputError, match="decoder 'tiny' is not available"):
        full_only.open_session("a0", SessionConfig(decoder="tiny"))
    assert full_only.sessions() == []
    with pytest.raises(Exception, match="default session decoder 'tiny' is not loaded"):
        Engine(tiny_models, EngineConfig(default_session=SessionConfig(decoder="tiny")))


# -- half precision: non-finite frames decoded again in float32 ------------------------------------------------------
def test_half_precision_non_finite_frames_fall_back_to_float32(tiny_models, caplog):
    """In fp16 an activation past 65504 becomes inf, then NaN in the next GroupNorm, and the frame went out black.
    The engine reads a per-frame finite flag with the frames' host copy and decodes those frames again in float32
    (one log line, counted in the stats); the other frames are the half-precision ones, unchanged."""
    half = FrameDecoder("full", copy.deepcopy(tiny_models.vae).half(), VAE_SCALE)
    float32 = FrameDecoder("full", copy.deepcopy(half.vae).float(), VAE_SCALE)  # the same (rounded) weights
    latents = torch.randn(3, 4, 8, 16, generator=torch.Generator().manual_seed(2))
    latents[1] *= 1e4  # fits fp16, but the first convolution's output does not
    images, finite = half.checked_images(latents)
    assert finite is not None and finite.tolist() == [True, False, True]
    with torch.no_grad():
        assert not torch.isfinite(half.vae.decode(latents[1:2].half() / VAE_SCALE).sample).all()  # the old frame
    assert float32.checked_images(latents)[1] is None  # float32 decoders skip the check
    engine = Engine(tiny_models, EngineConfig(width=128, height=64, admission=False), {"full": half})
    try:
        with caplog.at_level(logging.WARNING, logger="streaming.decoder"):
            frames = engine.decode(latents)
            again = engine.decode(latents[1:2])
        assert frames.shape == (3, 64, 128, 3) and frames.dtype == np.uint8
        assert np.array_equal(frames[1], float32(latents[1:2])[0]) and frames[1].std() > 0
        assert np.array_equal(frames[[0, 2]], half(latents[[0, 2]]))
        assert np.array_equal(again[0], frames[1])
        assert engine.stats()["decode_fp32_fallback_frames"] == 2
        assert len([r for r in caplog.records if "float32" in r.getMessage()]) == 1  # logged once
    finally:
        engine.close()
