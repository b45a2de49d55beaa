"""Every device of a machine (streaming/device_pool.py): two CPU workers stand in for two GPUs. Sessions go to the
device with the most headroom by the measured cost model, a full device refuses and the next session goes
elsewhere, a failing device's sessions end with an error event and new ones go to the other device, and the server
reports per device (/readyz, /metrics, /v1/info)."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from kit.http_calls import bearer, create_session, http
from kit.served import ServerThread, call, make_config
from kit.waits import run, wait_for

from server.settings.config import ConfigError, ServerConfig
from streaming import avatar as avatar_module
from streaming.denoiser import StreamDenoiser
from streaming.device_pool import DevicePool, device_names, parse_devices
from streaming.engine import CapacityError, Engine, EngineConfig
from vexpress_rt.loader import load_models
from vexpress_rt.weights import ModelPaths

SIZE = {"width": 128, "height": 64}


def _engine(model_dir, admission: bool, max_sessions: int = 4, cache_dir: str | None = None) -> Engine:
    """An engine with its own copy of the tiny model: what one device holds."""
    models = load_models(ModelPaths.from_model_dir(model_dir))
    config = EngineConfig(**SIZE, max_sessions=max_sessions, admission=admission, cache_dir=cache_dir)
    return Engine(models, config)


def _set_cost(engine: Engine, per_session_load: float) -> None:
    """Make the engine's cost model say that each session of the default settings takes `per_session_load` of its
    worker's time (no batching gain): what warm-up would measure on a device that fast."""
    settings = engine.config.default_session.denoiser_settings()
    calls_per_s = engine.config.default_session.fps / settings.new_frames
    for batch in range(1, engine.worker.max_batch + 1):
        for _ in range(80):  # the cost model averages (EMA): converge on the figure
            engine.worker.costs.record_call(settings, batch, batch * per_session_load / calls_per_s)


@pytest.fixture
def pool_of_two(model_dir, tiny_portrait):
    """Two devices with admission control on, a registered portrait, workers not started (no audio is pushed)."""
    pool = DevicePool([_engine(model_dir, admission=True), _engine(model_dir, admission=True)])
    avatar = pool.add_avatar(*tiny_portrait)
    yield pool, avatar.id
    pool.close()


def test_devices_flag():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("all") == ["all"]
    assert device_names(["cpu", "cpu"]) == ["cpu#0", "cpu#1"]
    assert device_names(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    for bad in ("", "tpu", "cuda:x", "meta"):
        with pytest.raises(ConfigError, match="--devices"):
            ServerConfig(devices=bad).validate()


def _worker_threads() -> int:
    return sum(t.name == "vexpress-model-worker" for t in threading.enumerate())


def test_serve_devices_cpu_cpu_runs_one_engine_per_device(model_dir, serve):
    """`serve --devices cpu,cpu`: the app builds one engine per device, each with its own weights and worker, and
    /readyz and /v1/info list both, ready once both are warm."""
    config = make_config(model_dir=str(model_dir), devices="cpu,cpu", dtype="fp32", admission=False)
    workers_before = _worker_threads()
    server = serve(engine=None, config=config)  # no engine: the in-process server builds (and owns) the pool
    # (admission off: the tiny model on a shared CPU is slower than real time, /readyz would say "full")
    pool = server.state.engine
    assert pool.names == ["cpu#0", "cpu#1"]
    first, second = pool.engines
    assert first.models is not second.models and first.worker is not second.worker
    ready = call("GET", f"{server.url}/readyz")
    assert ready.status == 200, ready.text
    assert [(d["name"], d["state"]) for d in ready.json["devices"]] == [("cpu#0", "ready"), ("cpu#1", "ready")]
    assert all(d["headroom"] is not None for d in ready.json["devices"]), "warm-up measured every device"
    info = call("GET", f"{server.url}/v1/info").json
    assert len(info["devices"]) == 2
    server.stop()
    assert _worker_threads() == workers_before, "the server closed the pool it built (its workers stopped)"


def test_avatars_are_encoded_on_every_device(pool_of_two):
    pool, avatar_id = pool_of_two
    for engine in pool.engines:
        encoded = engine.avatar(avatar_id).encoded
        assert encoded.latent.device == engine.models.device
        assert all(k.device == engine.models.device for k, _ in encoded.reference_kv.values())
    assert [a.id for a in pool.avatars()] == [avatar_id]
    assert pool.remove_avatar(avatar_id)
    assert pool.get_avatar(avatar_id) is None and all(not e.avatars() for e in pool.engines)


def test_with_a_disk_cache_one_device_encodes_and_the_others_load(model_dir, tiny_portrait, tmp_path, monkeypatch):
    cache = str(tmp_path / "avatars")
    pool = DevicePool([_engine(model_dir, False, cache_dir=cache), _engine(model_dir, False, cache_dir=cache)])
    encodes = []
    real_encode = avatar_module.encode_avatar
    monkeypatch.setattr(avatar_module, "encode_avatar", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    try:
        avatar_id = pool.add_avatar(*tiny_portrait).id
        assert all(e.get_avatar(avatar_id) for e in pool.engines)
        assert len(encodes) == 1 and [e.store.stats()["disk_files"] for e in pool.engines] == [1, 1]
        first, second = (e.avatar(avatar_id).encoded for e in pool.engines)
        assert first is not second and bool((first.latent == second.latent).all())
    finally:
        pool.close()


def test_sessions_go_where_the_headroom_is_and_a_full_device_refuses(pool_of_two):
    """Device 0 serves one session in real time (each takes half its worker), device 1 three (a quarter each),
    under the 0.9 margin. Placement follows the headroom, not the session count."""
    pool, avatar_id = pool_of_two
    slow, fast = pool.engines
    _set_cost(slow, 0.5)
    _set_cost(fast, 0.25)
    placed = [pool.device_of(pool.open_session(avatar_id).id) for _ in range(4)]
    # 1st: the fast device (0.65 left vs 0.4); 2nd: a tie at 0.4, the empty device; then the slow one is full
    assert placed == ["cpu#1", "cpu#0", "cpu#1", "cpu#1"]
    assert not slow.can_admit() and pool.can_admit() is False
    with pytest.raises(CapacityError, match="none of the 2 devices"):
        pool.open_session(avatar_id)
    # a session on the fast device ends: its place is taken again there
    next(s for s in fast.sessions()).close()
    assert pool.device_of(pool.open_session(avatar_id).id) == "cpu#1"
    status = {d.name: d for d in pool.status()}
    assert status["cpu#0"].sessions == 1 and status["cpu#1"].sessions == 3
    assert not status["cpu#0"].admits and status["cpu#0"].headroom == pytest.approx(-0.1, abs=1e-3)


def test_session_slots_count_per_device(model_dir, tiny_portrait):
    """Without a cost measurement, slots decide: the emptier device first, a device with no slot left is skipped."""
    pool = DevicePool([_engine(model_dir, admission=False, max_sessions=1), _engine(model_dir, admission=False)])
    try:
        avatar_id = pool.add_avatar(*tiny_portrait).id
        placed = [pool.device_of(pool.open_session(avatar_id).id) for _ in range(3)]
        assert placed.count("cpu#0") == 1 and placed.count("cpu#1") == 2
    finally:
        pool.close()


def _speech_pcm16(tiny_speech) -> np.ndarray:
    return (np.clip(tiny_speech, -1, 1) * 32767).astype(np.int16)


def _fail_device(monkeypatch, engine: Engine) -> None:
    """Every UNet call on `engine`'s device raises, as after a CUDA error; the other device is untouched."""
    real = StreamDenoiser.run

    def run_or_fail(self, jobs):
        if self.models is engine.models:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real(self, jobs)

    monkeypatch.setattr(StreamDenoiser, "run", run_or_fail)


def test_a_failed_device_ends_its_sessions_and_the_other_serves(model_dir, tiny_portrait, tiny_speech, monkeypatch):
    pool = DevicePool([_engine(model_dir, admission=False), _engine(model_dir, admission=False)])
    try:
        avatar_id = pool.add_avatar(*tiny_portrait).id
        for engine in pool.engines:
            _set_cost(engine, 0.1)  # equal devices: two sessions each
        sessions = [pool.open_session(avatar_id) for _ in range(4)]
        good, bad = pool.engines
        assert sorted(pool.device_of(s.id) for s in sessions) == ["cpu#0", "cpu#0", "cpu#1", "cpu#1"]
        events: dict[str, list] = {s.id: [] for s in sessions}
        for s in sessions:
            s.add_listener(lambda e, sid=s.id: events[sid].append(e))
        _fail_device(monkeypatch, bad)
        pool.start()
        frames0 = good.worker.frames_generated
        pcm = _speech_pcm16(tiny_speech)
        for s in sessions:
            s.push_audio(pcm)
            s.end_utterance()
        on_bad = [s for s in sessions if s.engine is bad]
        run(
            wait_for(
                lambda: all(s.closed for s in on_bad) and not pool.healthy(bad),
                60.0,
                "the bad device's sessions closed",
            )
        )
        for s in on_bad:
            errors = [e for e in events[s.id] if e.type == "error"]
            assert errors and errors[0].data["code"] == "model_error", events[s.id]
            assert "illegal memory access" in errors[0].data["message"]
        run(wait_for(lambda: good.worker.frames_generated > frames0, 60.0, "the healthy device serving on"))
        assert not any(e.type == "error" for s in sessions if s.engine is good for e in events[s.id])
        # new sessions go to the healthy device although it is the busier one
        assert pool.device_of(pool.open_session(avatar_id).id) == "cpu#0"
        status = {d.name: d.state for d in pool.status()}
        assert status["cpu#1"] == "failed" and pool.can_admit()
        stats = pool.stats()  # the engine figures of /metrics: summed counts over the devices
        assert stats["devices"] == 2 and stats["healthy_devices"] == 1 and stats["sessions"] == 3
        assert stats["worker_errors"] == sum(e.worker.errors for e in pool.engines) >= 2
    finally:
        pool.close()


# -- the server over a pool ----------------------------------------------------------------------------------------
def _metric(text: str, name: str, device: str) -> float:
    match = re.search(rf'^vexpress_{name}{{device="{re.escape(device)}"}} (\S+)$', text, re.M)
    assert match, f"no {name} for {device}"
    return float(match.group(1))


def test_server_reports_per_device_and_stays_ready_while_one_is_healthy(
    model_dir, tiny_portrait, tiny_speech, monkeypatch
):
    pool = DevicePool([_engine(model_dir, admission=False), _engine(model_dir, admission=False)])
    pool.start()
    server = ServerThread(make_config(max_sessions=8), pool).start()
    try:
        ready = call("GET", f"{server.url}/readyz")
        assert ready.status == 200 and ready.json["status"] == "ready", ready.text
        assert [d["name"] for d in ready.json["devices"]] == ["cpu#0", "cpu#1"]
        assert all(d["state"] == "ready" and d["healthy"] for d in ready.json["devices"])
        info = call("GET", f"{server.url}/v1/info").json
        assert [d["device"] for d in info["devices"]] == ["cpu", "cpu"] and info["model"]["device"] == "cpu"
        for engine in pool.engines:
            _set_cost(engine, 0.1)

        async def open_two():
            async with http() as c:
                return [await create_session(c, server.url) for _ in range(2)]

        first, second = run(open_two())
        assert {first["device"], second["device"]} == {"cpu#0", "cpu#1"}
        assert [pool.device_of(first["id"]), pool.device_of(second["id"])] == [first["device"], second["device"]]
        metrics = call("GET", f"{server.url}/metrics").text
        assert _metric(metrics, "device_sessions", "cpu#0") == 1 and _metric(metrics, "device_sessions", "cpu#1") == 1
        assert _metric(metrics, "device_healthy", "cpu#1") == 1

        # device cpu#1 fails: its session ends (the server session too), the server stays ready on cpu#0
        bad, kept = (first, second) if pool.device_of(first["id"]) == "cpu#1" else (second, first)
        _fail_device(monkeypatch, pool.engines[1])
        doomed = [pool.get_session(bad["id"]), pool.engines[1].open_session(pool.avatars()[0].id)]
        for session in doomed:  # two failed sessions in a row mark the device failed
            session.push_audio(_speech_pcm16(tiny_speech))
            session.end_utterance()
        run(
            wait_for(
                lambda: all(s.closed for s in doomed) and not pool.healthy(pool.engines[1]),
                60.0,
                "the failed device's sessions closed",
            )
        )
        run(wait_for(lambda: len(server.state.sessions) == 1, 10.0, "the failed device's session ended"))
        gone = call("GET", f"{server.url}/v1/sessions/{bad['id']}", headers=bearer(bad["token"]))
        assert gone.status == 404, gone.text
        ready = call("GET", f"{server.url}/readyz")
        assert ready.status == 200, ready.text
        assert {d["name"]: d["state"] for d in ready.json["devices"]} == {"cpu#0": "ready", "cpu#1": "failed"}
        metrics = call("GET", f"{server.url}/metrics").text
        assert _metric(metrics, "device_healthy", "cpu#1") == 0 and _metric(metrics, "device_ready", "cpu#0") == 1
        assert call("GET", f"{server.url}/healthz").status == 200

        async def open_one():
            async with http() as c:
                return await create_session(c, server.url)

        fresh = run(open_one())
        assert pool.device_of(fresh["id"]) == "cpu#0" == pool.device_of(kept["id"])
    finally:
        server.stop()
        pool.close()


def test_every_device_failed_is_not_live(model_dir, tiny_portrait, tiny_speech, monkeypatch):
    """A pool whose every device failed is neither ready nor live: the orchestrator restarts it."""
    pool = DevicePool([_engine(model_dir, admission=False)])
    pool.start()
    server = ServerThread(make_config(), pool).start()
    try:
        _fail_device(monkeypatch, pool.engines[0])
        avatar_id = pool.avatars()[0].id
        deadline = time.monotonic() + 60
        while pool.healthy(pool.engines[0]) and time.monotonic() < deadline:
            session = pool.open_session(avatar_id)
            session.push_audio(_speech_pcm16(tiny_speech))
            session.end_utterance()
            run(wait_for(lambda s=session: s.closed, 60.0, "the session closed"))
        ready = call("GET", f"{server.url}/readyz")
        assert ready.status == 503 and ready.json["status"] == "failed", ready.text
        assert call("GET", f"{server.url}/healthz").status == 503
        with pytest.raises(CapacityError, match="every device"):
            pool.open_session(avatar_id)
    finally:
        server.stop()
        pool.close()
