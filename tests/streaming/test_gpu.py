"""The engine and the offline pipeline end to end on CUDA (skipped without a CUDA device).

Random tiny models built in memory, so these need neither the fixtures nor a model folder (the GPU machine has
neither); `scripts/gpu_check.sh` runs them there with `pytest -m gpu`."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def cuda_models(request):
    from streaming.bench.random_models import random_models

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[request.param]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this device")
    return random_models("tiny", device="cuda", dtype=dtype)


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
def test_engine_serves_a_session_on_cuda(cuda_models, strategy):
    from streaming.engine import Engine, EngineConfig
    from streaming.params import GenerationParams
    from streaming.portrait import load_default_portrait
    from streaming.session_config import SessionConfig

    engine = Engine(cuda_models, EngineConfig(width=128, height=128, admission=False))
    image, kps = load_default_portrait()
    info = engine.add_avatar(image, kps)  # crashed on CUDA before: schedule alphas left on the CPU
    assert engine.avatar(info.id).idle_latents.device.type == "cuda"
    engine.start()
    try:
        session = engine.open_session(info.id, SessionConfig(params=GenerationParams(strategy=strategy)))
        t = np.arange(16000) / 16000
        session.push_audio((8000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16))
        session.end_utterance()
        images, deadline = [], time.monotonic() + 60
        while session.speech_frames_out < 20 and time.monotonic() < deadline:
            images.append(session.read_frame().image)
            time.sleep(0.01)
        assert engine.worker.errors == 0
        assert session.speech_frames_out >= 20, f"only {session.speech_frames_out} speech frames in 60 s"
        assert all(im.shape == (128, 128, 3) and im.dtype == np.uint8 for im in images)
        session.close()
    finally:
        engine.close()


def test_offline_generate_on_cuda(cuda_models):
    from vexpress_rt.pipeline import GenerationSettings, generate

    settings = GenerationSettings(width=64, height=64, num_inference_steps=2, context_frames=4, context_overlap=1)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    kps = np.array([[20, 24], [44, 24], [32, 44]], np.float32)
    waveform = np.random.default_rng(0).standard_normal(16000 // 2).astype(np.float32) * 0.1
    result = generate(cuda_models, settings, image, kps, waveform)
    assert result.frames.shape[1:] == (64, 64, 3) and result.frames.shape[0] == result.latents.shape[2] >= 4


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
def test_cuda_graph_replays_make_the_eager_frames(cuda_models, strategy):
    """Three sessions on two avatars, three calls (a padded bucket of 4, then the rows changing avatars): frames
    from graph replays equal the eager ones (fp16/bf16 kernel differences only)."""
    from streaming.avatar import PreEncodedAvatar
    from streaming.denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
    from streaming.params import GenerationParams
    from streaming.unet_runner import CudaGraphBackend

    m = cuda_models
    h, w = 16, 16

    def avatar(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        latent = torch.randn(1, 4, h, w, device="cuda", generator=g).to(m.dtype)
        with torch.no_grad():
            kv = m.denoising_unet.reference_kv(m.reference_net(latent))
            kps = m.v_kps_guider(torch.rand(1, 3, 1, 8 * h, 8 * w, device="cuda", generator=g).to(m.dtype))
        return PreEncodedAvatar(f"a{seed}", "random", 8 * w, 8 * h, np.zeros((3, 2), np.float32), latent, kv, kps)

    a, b = avatar(0), avatar(1)
    settings = DenoiserSettings.of(GenerationParams(steps=2, new_frames=2, context_frames=2, strategy=strategy))
    silence = torch.zeros(5, m.unet_config.cross_attention_dim, device="cuda", dtype=m.dtype)
    frames = []
    for graphs in (None, CudaGraphBackend("cuda")):
        denoiser = StreamDenoiser(m, settings, graphs)
        states = [denoiser.new_state(r, seed=i, silence=silence) for i, r in enumerate([a, b, a])]
        out = []
        for turn, refs in enumerate([[a, b, a], [a, b, a], [b, a]]):
            tokens = torch.randn(
                2, 5, silence.shape[1], device="cuda", generator=torch.Generator("cuda").manual_seed(turn)
            )
            jobs = [ChunkJob(s, r, tokens.to(m.dtype), [(turn, k) for k in range(2)]) for s, r in zip(states, refs)]
            out += [lat.float() for job_out in denoiser.run(jobs) for _, lat in job_out]
        frames.append(torch.stack(out))
        if graphs is not None:
            assert denoiser.unet.graphs == 2  # buckets 4 and 2, each captured once
    torch.testing.assert_close(frames[1], frames[0], atol=2e-2, rtol=2e-2)


def test_the_pipelined_worker_is_the_cuda_default_and_makes_the_serial_frames(cuda_models):
    """On CUDA the worker is pipelined by default (decode and host copy on the finisher's stream); driven turn by
    turn, it makes the serial worker's frames for the same seed and audio (same kernels on another stream)."""
    from streaming.engine import Engine, EngineConfig
    from streaming.params import GenerationParams
    from streaming.portrait import load_default_portrait
    from streaming.session_config import SessionConfig

    image, kps = load_default_portrait()
    t = np.arange(16000) / 16000
    pcm = (8000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16)
    images = {}
    clock = [1000.0]  # a frame period per read: no frame skipped however long a turn takes
    for pipelined in (None, False):
        engine = Engine(cuda_models, EngineConfig(width=128, height=128, admission=False, pipelined=pipelined))
        try:
            assert engine.worker.pipelined is (pipelined is None)
            info = engine.add_avatar(image, kps)
            clock[0] = 1000.0
            config = SessionConfig(params=GenerationParams(steps=2, seed=7))
            session = engine.open_session(info.id, config, now=lambda: clock[0])
            session.push_audio(pcm)
            session.end_utterance()
            frames = []
            for _ in range(200):  # bounded: one frame period each
                for _ in range(50):
                    if not engine.worker.turn():
                        break
                assert engine.worker.drain(30)
                frames.append(session.read_frame())
                clock[0] += 1 / config.fps
                if session.speech_frames_out >= 20:
                    break
            session.close()
            assert engine.worker.errors == 0
            images[pipelined] = np.stack([f.image for f in frames if f.speaking][:20])
        finally:
            engine.close()
    assert images[None].shape == images[False].shape == (20, 128, 128, 3)
    assert np.abs(images[None].astype(int) - images[False].astype(int)).max() <= 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_graphs_on_the_second_gpu_replay_the_eager_frames():
    """Graphs captured for a model on cuda:1, from a thread whose current device is cuda:0 (nobody called
    set_device): the backend captures on its own device and stream, so replays equal eager calls (with PyTorch's
    shared capture stream of device 0 the graph recorded nothing and every replay returned the capture's output)."""
    import threading

    from streaming.bench.random_models import random_models
    from streaming.denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
    from streaming.engine import Engine, EngineConfig
    from streaming.params import GenerationParams
    from streaming.portrait import load_default_portrait
    from streaming.unet_runner import CudaGraphBackend, GraphBank

    m = random_models("tiny", device="cuda:1", dtype=torch.float16)
    engine = Engine(m, EngineConfig(width=128, height=128, admission=False, graphs=False))
    avatar = engine.store.get_or_encode(*_portrait_128(load_default_portrait), 128, 128)
    settings = DenoiserSettings.of(GenerationParams(steps=2, new_frames=2, context_frames=2, strategy="staggered"))
    silence = engine.silence_tokens_for(25)
    frames: list[torch.Tensor] = []

    def run(graphs) -> None:
        denoiser = StreamDenoiser(m, settings, graphs)
        states = [denoiser.new_state(avatar, seed=i, silence=silence) for i in range(3)]
        out = []
        for turn in range(3):
            g = torch.Generator("cuda:1").manual_seed(turn)
            tokens = torch.randn(2, *silence.shape, device="cuda:1", generator=g).to(m.dtype)
            jobs = [ChunkJob(s, avatar, tokens, [(turn, k) for k in range(2)]) for s in states]
            out += [lat.float().cpu() for job_out in denoiser.run(jobs) for _, lat in job_out]
        frames.append(torch.stack(out))

    for graphs in (None, GraphBank(CudaGraphBackend("cuda:1"))):
        thread = threading.Thread(target=run, args=(graphs,))  # a new thread: current device cuda:0
        thread.start()
        thread.join(300)
    assert len(frames) == 2
    torch.testing.assert_close(frames[1], frames[0], atol=2e-2, rtol=2e-2)
    assert not torch.equal(frames[1][:6], frames[1][-6:])  # replays follow their inputs, not a stale output


def _portrait_128(load):
    from streaming.portrait import prepare_portrait

    image, kps = load()
    return prepare_portrait(image, 128, 128, kps, None)


def test_a_worker_turn_never_waits_for_the_device(cuda_models, monkeypatch):
    """The pipelined worker's turn (audio features, controls, the UNet call) under
    torch.cuda.set_sync_debug_mode("error"): any hidden host sync (a pageable upload, torch.tensor(...,
    device=cuda), .item()) raises. The finisher's work (decode, host copy: syncs by design) is held back and run
    after the mode is reset."""
    from streaming.engine import Engine, EngineConfig
    from streaming.params import GenerationParams
    from streaming.portrait import load_default_portrait
    from streaming.session_config import SessionConfig

    engine = Engine(cuda_models, EngineConfig(width=128, height=128, admission=False, pipelined=True))
    held = []
    finisher = engine.worker._finisher
    submit = finisher.submit
    try:
        info = engine.add_avatar(*load_default_portrait())
        engine.warm_up(info.id)
        for cfg in (False, True):
            session = engine.open_session(info.id, SessionConfig(params=GenerationParams(steps=2, cfg=cfg)))
            t = np.arange(32000) / 16000
            session.push_audio((8000 * np.sin(2 * np.pi * 150 * t)).astype(np.int16))
            assert engine.worker.turn()  # caches filled (silence tokens, pose), eager paths warmed
            assert engine.worker.drain(30)
            monkeypatch.setattr(finisher, "submit", lambda run, ready, timeout=60.0: held.append(run) or True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                worked = [engine.worker.turn() for _ in range(3)]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            monkeypatch.setattr(finisher, "submit", submit)
            assert any(worked) and engine.worker.errors == 0
            for run in held:
                run()
            held.clear()
            session.close()
    finally:
        engine.close()


def test_motion_attention_past_the_grid_limit_on_cuda(monkeypatch):
    """16 rows at 512x512 attend over 65536 temporal sequences in one motion-module call: past the 65535 grid
    blocks of the fused kernels. Sliced (MAX_ATTENTION_BATCH), it runs and gives the numbers of smaller slices."""
    from vexpress_rt.models import attention
    from vexpress_rt.models.motion_module import TemporalAttention

    torch.manual_seed(0)
    module = TemporalAttention(dim=64, heads=8).to("cuda", torch.float16).eval()
    x = torch.randn(16 * 8, 64 * 64, 64, device="cuda", dtype=torch.float16)  # 16 rows x 8 frames, 64x64 latent
    with torch.no_grad():
        out = module(x, 8)
        monkeypatch.setattr(attention, "MAX_ATTENTION_BATCH", 4096)
        smaller = module(x, 8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, smaller)


def test_half_precision_vae_nan_frames_fall_back_to_float32_on_cuda():
    """On CUDA the finite flags ride with the frames' pinned copy; an overflowing frame is decoded again in
    float32 and counted, the others stay the half-precision frames."""
    from streaming.bench.random_models import random_models
    from streaming.decoder import FrameDecoder
    from streaming.engine import Engine, EngineConfig
    from vexpress_rt.pipeline import VAE_SCALE

    models = random_models("tiny", device="cuda", dtype=torch.float16)
    half = FrameDecoder("full", models.vae, VAE_SCALE)
    latents = torch.randn(3, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    latents[1] *= 1e4  # fits fp16; the first convolution's output does not
    engine = Engine(models, EngineConfig(width=128, height=128, admission=False), {"full": half})
    try:
        frames = engine.decode(latents)
        assert engine.stats()["decode_fp32_fallback_frames"] == 1
        assert np.array_equal(frames[[0, 2]], half(latents[[0, 2]]))
        assert frames[1].std() > 0
    finally:
        engine.close()
