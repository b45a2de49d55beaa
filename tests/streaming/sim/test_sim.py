"""The simulated device (`--device sim:h100`, streaming/sim/): its profiles, their calibration from a GPU run, the
stand-in calls' timing and results, and the whole server on it at 512x512 with a real aiortc peer on loopback.

No model weights are needed: the simulator loads none.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time

import numpy as np
import pytest
import torch
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from kit.aiortc_viewer import loopback_pc
from kit.http_calls import bearer, create_session, http
from kit.media_synth import loud_seconds, voiced_pcm16, wav_of
from kit.served import ServerThread, make_config
from kit.waits import run, wait_for

from server.media import marks
from server.serving.engine_factory import build_simulated_engine
from server.settings.config import ConfigError, ServerConfig
from streaming.bench.gpu_bench import engine_figures
from streaming.sim.calibrate import profile_from_bench
from streaming.sim.device import SimulatedDevice, simulated_device
from streaming.sim.profile import Curve, DeviceProfile, ProfileError, load_profile

pytestmark = pytest.mark.timeout(120)


def _h100_json() -> dict:
    return copy.deepcopy(load_profile("h100").source)


# -- profiles ----------------------------------------------------------------------------------------------------
def test_the_h100_profile_holds_the_gpu_figures_with_their_sources():
    profile = load_profile("h100")
    assert (profile.dtype, profile.width, profile.height) == ("fp16", 512, 512)
    assert profile.unet.ms(2) == 28.0 and profile.unet.ms(8) == 58.0 and profile.unet.ms(32) == 209.0
    assert profile.decode["tiny"].ms(2) == 3.6 and profile.decode["full"].ms(8) == 121.0
    assert profile.audio_features.ms(2.4) == 9.4
    for point in profile.source["unet"]["points"]:
        assert "GPU.md" in point["source"]


def test_sizes_never_measured_are_never_cheaper_than_the_measurements_allow():
    curve = Curve(((2.0, 28.0), (8.0, 58.0), (32.0, 209.0)))
    assert curve.ms(1) == 28.0  # below the smallest: its time (small calls are launch-bound)
    assert curve.ms(5) == pytest.approx(43.0)  # between: linear
    slope = (209.0 - 58.0) / 24
    assert curve.ms(40) == pytest.approx(209.0 + 8 * slope)  # beyond: the steepest measured slope
    assert Curve(((2.4, 9.4),)).ms(4.8) == pytest.approx(18.8)  # one point: proportional above it
    profile = load_profile("h100")
    assert profile.unet_s(1, 8, 1024, 1024) == pytest.approx(16 * 0.058)  # 4x the pixels: 16x the time
    assert profile.unet_s(1, 8, 256, 256) == pytest.approx(0.058)  # smaller frames: no faster


@pytest.mark.parametrize(
    "broken, message",
    [
        (lambda p: p.pop("unet"), "missing fields unet"),
        (lambda p: p["decode"].pop("tiny"), "decode.tiny"),
        (lambda p: p["unet"]["points"][0].pop("source"), "needs x, ms and source"),
        (lambda p: p["audio_projection_ms"].pop("source"), "needs a source"),
        (lambda p: p.update(width=0), "width"),
    ],
)
def test_a_profile_with_missing_fields_is_refused(broken, message, tmp_path):
    data = _h100_json()
    broken(data)
    with pytest.raises(ProfileError, match=message):
        DeviceProfile.from_dict(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=message):
        simulated_device(f"sim:{path}", 512, 512)


def test_unknown_profiles_and_dtypes_are_refused():
    with pytest.raises(ProfileError, match="no device profile named 'a100'"):
        simulated_device("sim:a100", 512, 512)
    with pytest.raises(ProfileError, match="measured in fp16, not bf16"):
        simulated_device("sim:h100", 512, 512, "bf16")


def _gpu_bench_json() -> dict:
    """What `bench --gpu --json` prints, reduced to what calibration reads (figures of the H100 run's shape)."""
    components = []
    graph_ms = {(1, 1): 28.0, (1, 4): 57.0, (4, 1): 58.0, (4, 4): 209.0}  # 2, 8, 8, 32 frame-passes
    for (steps, batch), ms in graph_ms.items():
        components.append(
            {
                "steps": steps,
                "batch": batch,
                "window_frames": steps * 2,
                "unet_graph_ms": ms,
                "decode_ms": 40.0 if batch == 1 else 121.0,
            }
        )
    return {
        "settings": {"new_frames": 2},
        "gpu": {
            "device": "NVIDIA H100 80GB HBM3",
            "dtype": "fp16",
            "width": 512,
            "height": 512,
            "runs": [{"sessions": 1, "device_ms_per_frame": {"audio_features": 4.7}}],
            "components": components,
        },
    }


def test_a_gpu_run_recalibrates_the_simulator(tmp_path):
    decoders = {"frames_per_call": 2, "ms_per_frame": {"full": 20.0, "tiny": 1.8}}
    profile = profile_from_bench(_gpu_bench_json(), decoders, "gpu")
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(profile))
    sim = simulated_device(f"sim:{path}", 512, 512)  # the simulator takes it as it is
    assert sim.profile.unet.ms(2) == 28.0 and sim.profile.unet.ms(8) == 58.0  # one size measured twice: the slower
    assert sim.profile.unet.ms(32) == 209.0
    assert sim.profile.decode["tiny"].ms(2) == pytest.approx(3.6)
    assert sim.profile.decode["full"].ms(8) == 121.0
    assert sim.profile.features_s(2.36) == pytest.approx(0.0094)
    assert all(p["source"] for p in profile["unet"]["points"])
    no_components = _gpu_bench_json()
    del no_components["gpu"]["components"]
    with pytest.raises(ProfileError, match="components"):
        profile_from_bench(no_components, decoders, "gpu")
    with pytest.raises(ProfileError, match="tiny"):
        profile_from_bench(_gpu_bench_json(), {"ms_per_frame": {"full": 20.0}}, "gpu")


def test_serve_refuses_an_unknown_profile_before_loading_anything():
    ServerConfig(device="sim:h100").validate()
    with pytest.raises(ConfigError, match="no device profile named 'nope'"):
        ServerConfig(device="sim:nope").validate()
    with pytest.raises(ConfigError, match="sim:nope"):
        ServerConfig(devices="sim:h100,sim:nope").validate()


def test_the_engine_bench_runs_on_the_simulated_device_and_says_so():
    """`bench --gpu --device sim:h100`: the same session ramp, on the simulated device (figures are printed by the
    command; here only that it runs and labels them)."""
    out = engine_figures(device="sim:h100", sessions=(1,), seconds=2.0, components=False)
    assert out["mode"] == "simulated" and out["simulated"]["profile"] == "h100"
    assert out["device"].startswith("sim:h100 (simulated")
    (run_1,) = out["runs"]
    assert run_1["sessions"] == 1 and run_1["frames_generated"] > 0
    assert out["simulated_device_busy_s"] > 0 and len(out["host_load_average"]) == 3


# -- the stand-in calls --------------------------------------------------------------------------------------------
def test_a_unet_call_waits_its_profile_time_and_leads_each_row_to_its_avatar():
    sim = SimulatedDevice(load_profile("h100"), 512, 512)
    models = sim.models()
    unet = models.denoising_unet
    latents = torch.randn(2, 4, 64, 64)
    kv = {name: (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for name, a, b in _kvs(unet, latents)}
    x = torch.randn(2, 4, 8, 64, 64)
    t = torch.tensor([999, 749, 499, 249]).repeat_interleave(2).repeat(2)
    start = time.perf_counter()
    v = unet(x, t, torch.zeros(16, 5, 768), kv)
    waited = time.perf_counter() - start
    assert v.shape == x.shape
    expected = (58.0 + 8 * (209.0 - 58.0) / 24) / 1000  # 16 frame-passes: between the 8- and 32-pass points
    assert sim.timeline.busy_s == pytest.approx(expected) and sim.timeline.calls == 1
    assert waited >= expected  # the caller waited for the device (no upper bound: the machine may be loaded)
    alphas = unet.alphas[t].reshape(2, 1, 8, 1, 1)
    x0 = alphas.sqrt() * x - (1 - alphas).sqrt() * v  # DDIM's clean estimate: each row's own avatar latent
    torch.testing.assert_close(x0, latents[:, :, None].expand_as(x0), atol=1e-4, rtol=1e-4)


def _kvs(unet, latents):
    a = unet.reference_kv({"sim_latent": latents[:1]})
    b = unet.reference_kv({"sim_latent": latents[1:]})
    return [(name, a[name], b[name]) for name in a]


# -- the whole server on the simulated device, one real peer --------------------------------------------------------
@pytest.fixture(scope="module")
def sim_server():
    # admission off: its cost model measures the host too, and this shared CI machine may be loaded
    config = make_config(width=512, height=512, device="sim:h100", mark_frames=True, admission=False)
    engine = build_simulated_engine(config, "sim:h100")
    engine.start()
    srv = ServerThread(config, engine).start()
    yield srv
    srv.stop()
    engine.close()


def test_the_server_on_the_simulated_device_serves_512x512_frames_with_their_audio(sim_server):
    """One aiortc viewer on loopback (WHEP) while the session speaks 2 s: the video frames are 512x512, marked
    SIMULATED, their index barcode counts up; the audio comes at the video's rate and carries the speech."""
    info = json.loads(_get(sim_server.url + "/v1/info"))
    assert info["model"]["device"] == "sim:h100" and info["model"]["simulated"]["profile"] == "h100"
    assert 'vexpress_device_simulated{device="sim:h100"} 1.0' in _get(sim_server.url + "/metrics")

    async def scenario():
        video, audio = [], []
        async with http() as client:
            session = await create_session(client, sim_server.url)
            pc = loopback_pc()
            pc.addTransceiver("video", direction="recvonly")
            pc.addTransceiver("audio", direction="recvonly")
            tasks = []

            async def consume(track):
                try:
                    while True:
                        frame = await track.recv()
                        if track.kind == "video":
                            video.append(frame.to_ndarray(format="rgb24"))
                        else:
                            audio.append(frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0])
                except MediaStreamError:
                    pass

            pc.on("track", lambda track: tasks.append(asyncio.ensure_future(consume(track))))
            await pc.setLocalDescription(await pc.createOffer())
            headers = {**bearer(session["token"]), "Content-Type": "application/sdp"}
            async with client.post(session["whep_url"], data=pc.localDescription.sdp, headers=headers) as r:
                assert r.status == 201, await r.text()
                answer = await r.text()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_for(lambda: len(video) >= 5, 20, "video from the server")
            wav = wav_of(np.frombuffer(voiced_pcm16(2.0), "<i2").astype(np.float32) / 32768.0)
            async with client.post(session["speak_url"], data=wav, headers=bearer(session["token"])) as r:
                assert r.status in (200, 202), await r.text()
            first = len(video)
            # until the 2 s of speech and some idle after it have come through (bounded; a loaded machine is slow)
            await wait_for(
                lambda: sum(len(a) for a in audio) >= 48000 * 4.0, 40, "4 s of audio (the speech and idle after it)"
            )
            count = len(video) - first
            for task in tasks:
                task.cancel()
            await pc.close()
        return video, audio, count

    video, audio, count = run(scenario(), timeout=90)
    assert all(frame.shape == (512, 512, 3) for frame in video)
    band = video[-1][-20:, :, :].astype(int)  # the red SIMULATED band at the bottom
    assert band[..., 0].mean() > 120 and band[..., 1].mean() < 90
    indices = [marks.read_index(frame) for frame in video[-50:]]
    assert all(b > a for a, b in zip(indices, indices[1:])), indices
    samples = np.concatenate(audio).astype(np.float32) / 32768.0
    assert len(samples) >= 48000 * 4.0, len(samples) / 48000  # the audio track flowed
    assert count >= 25  # frames kept coming while the speech played
    assert 1.5 <= loud_seconds(samples, 48000) <= 2.5  # the 2 s of speech, once


def _get(url: str) -> str:
    async def get():
        async with http() as client:
            async with client.get(url) as r:
                return await r.text()

    return run(get())
