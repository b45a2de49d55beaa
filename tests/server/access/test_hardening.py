"""The holes of issue 12 ("Security and resource holes"), each shown closed: files on the server stay unread,
crop boxes stay bounded, deleted avatars are freed, failed peers leave nothing behind, the port answers at once,
and the limits that keep one client from taking the server hold.
"""

from __future__ import annotations

import asyncio
import io

import av
import numpy as np
import pytest
from kit.media_synth import mp3_bytes, voiced_pcm16, wav_bytes
from kit.waits import run

from server.errors import ApiError
from server.media.audio_file import decode_audio_bytes


# -- 1. speak opens only allow-listed audio containers, from memory ------------------------------------------------
def _encoded(fmt: str, codec: str, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        samples = np.frombuffer(voiced_pcm16(1.0, rate), "<i2")[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


@pytest.fixture
def secret_wav(tmp_path, monkeypatch):
    """A WAV file beside the server's working directory that no client may have read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "secret.wav").write_bytes(wav_bytes(1.0))
    return "sub/secret.wav"


@pytest.mark.parametrize(
    "body",
    [
        "ffconcat version 1.0\nfile {path}\n",
        "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{path}\n#EXT-X-ENDLIST\n",
        "[playlist]\nFile1={path}\n",
        "file:{path}",
    ],
    ids=["ffconcat", "hls", "pls", "url"],
)
def test_speak_never_reads_a_file_named_by_the_body(secret_wav, body):
    with pytest.raises(ApiError) as err:
        decode_audio_bytes(body.format(path=secret_wav).encode(), max_seconds=5.0)
    assert err.value.status == 415, err.value


@pytest.mark.parametrize(
    "make",
    [
        lambda: wav_bytes(1.0),
        lambda: mp3_bytes(1.0),
        lambda: _encoded("ogg", "libopus", 48000),
        lambda: _encoded("flac", "flac"),
        lambda: _encoded("webm", "libopus", 48000),
        lambda: _encoded("ipod", "aac"),  # .m4a
        lambda: _encoded("adts", "aac"),
    ],
    ids=["wav", "mp3", "opus", "flac", "webm", "m4a", "aac"],
)
def test_speak_decodes_every_allowed_container(make):
    decoded = decode_audio_bytes(make(), max_seconds=5.0)
    assert 900 <= decoded.duration_ms <= 1200, decoded.duration_ms


def test_speak_refuses_images_and_text_with_415():
    from kit.media_synth import image_bytes
    from PIL import Image

    for data in (image_bytes(Image.new("RGB", (64, 64)), "PNG"), b"hello world, not audio at all"):
        with pytest.raises(ApiError) as err:
            decode_audio_bytes(data, max_seconds=5.0)
        assert err.value.status == 415


# -- 2. the portrait crop stays bounded; key points that are no face are refused ------------------------------------
def test_the_issue_crop_bomb_is_refused_before_any_pixel_is_padded():
    """Eyes 1 px apart and a nose 999 px below them made a 6450x6450 padded copy (the issue's 40823x40823 at
    6324x6324): now an InputError (400), answered at once."""
    import time

    from PIL import Image

    from streaming.portrait import prepare_portrait
    from vexpress_rt.errors import InputError

    started = time.perf_counter()
    with pytest.raises(InputError, match="degenerate"):
        prepare_portrait(Image.new("RGB", (1000, 1000), "grey"), 128, 64, kps=[[0, 0], [1, 0], [0.5, 999]])
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "kps",
    [
        [[100, 100], [200, 100], [300, 100]],  # the nose on the eye line
        [[100, 100], [102, 100], [101, 102]],  # eyes 2 px apart
        [[100, 100], [140, 100], [120, 900]],  # a nose 35 eye distances below the eyes
        [[0, 0], [990, 0], [495, 560]],  # a face shape, but its crop is 16 times the photo
    ],
    ids=["collinear", "tiny-eyes", "far-nose", "crop-larger-than-photo"],
)
def test_key_points_that_are_no_face_in_the_photo_are_refused(kps):
    from PIL import Image

    from streaming.portrait import prepare_portrait
    from vexpress_rt.errors import InputError

    with pytest.raises(InputError):
        prepare_portrait(Image.new("RGB", (1000, 1000), "grey"), 128, 64, kps=kps)


def test_padding_a_face_in_a_corner_costs_the_crop_not_the_photo():
    """A face at the corner of a 2000x2000 photo: the crop (about 370 px) is padded, not the whole photo."""
    import tracemalloc

    from PIL import Image

    from streaming.portrait import prepare_portrait

    photo = Image.new("RGB", (2000, 2000), "grey")
    tracemalloc.start()
    try:
        crop, kps = prepare_portrait(photo, 128, 64, kps=[[10, 10], [110, 10], [60, 67]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert crop.size == (128, 64) and kps.shape == (3, 2)
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB (the photo alone is {3 * 2000 * 2000 / 2**20:.1f} MiB)"


# -- 3. deleted avatars are freed; the avatar caches are bounded ---------------------------------------------------
def _portrait(i: int):
    from PIL import Image

    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))


KPS = [[30, 40], [66, 40], [48, 61]]


def _live_tensors() -> int:
    import gc

    import torch

    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.fixture
def one_thread():
    """The tiny model is fastest on one thread here (2 shared cores: more threads only contend)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.fixtures
def test_upload_delete_cycles_leave_the_store_where_it_started(tiny_models, tmp_path, one_thread):
    """100 registrations and deletions, the way the engine does them (encode into the store, forget on delete)."""
    from streaming.avatar import AvatarStore
    from streaming.portrait import prepare_portrait

    store = AvatarStore(tiny_models, tmp_path)
    kept = store.get_or_encode(*prepare_portrait(_portrait(1000), 128, 64, kps=KPS), 128, 64)
    before, tensors_before = store.stats(), _live_tensors()
    for i in range(100):
        store.forget(store.get_or_encode(*prepare_portrait(_portrait(i), 128, 64, kps=KPS), 128, 64))
    after, tensors_after = store.stats(), _live_tensors()
    assert after == before and after["memory_avatars"] == 1, (before, after)
    assert tensors_after - tensors_before < 20, (tensors_before, tensors_after)  # not 100 avatars' (~40 each)
    assert store.get_or_encode(*prepare_portrait(_portrait(1000), 128, 64, kps=KPS), 128, 64) is kept


@pytest.mark.fixtures
def test_deleting_an_avatar_frees_its_tensors(tiny_models, tmp_path, one_thread):
    from streaming.engine import Engine, EngineConfig

    engine = Engine(tiny_models, EngineConfig(width=128, height=64, cache_dir=str(tmp_path), idle_seconds=0.2))
    kept = engine.add_avatar(_portrait(1000), KPS, "kept")
    before, tensors_before = engine.store.stats(), _live_tensors()
    for i in range(3):
        assert engine.remove_avatar(engine.add_avatar(_portrait(i), KPS).id)
    assert engine.store.stats() == before
    assert _live_tensors() - tensors_before < 10
    assert [a.id for a in engine.avatars()] == [kept.id]


@pytest.mark.fixtures
def test_avatar_caches_stay_within_their_byte_budgets(tiny_models, tmp_path, one_thread):
    from streaming.avatar import AvatarStore, avatar_bytes
    from streaming.portrait import prepare_portrait

    store = AvatarStore(tiny_models, tmp_path, memory_bytes=1, disk_bytes=1)
    one = prepare_portrait(_portrait(0), 128, 64, kps=KPS)
    size = avatar_bytes(store.get_or_encode(*one, 128, 64))
    store.memory_bytes, store.disk_bytes = int(2.5 * size), int(2.5 * (tmp_path.stat().st_size + size * 1.2))
    for i in range(6):
        store.get_or_encode(*prepare_portrait(_portrait(i), 128, 64, kps=KPS), 128, 64)
    stats = store.stats()
    assert stats["memory_avatars"] == 2 and stats["memory_bytes"] <= store.memory_bytes, stats
    assert 1 <= stats["disk_files"] <= 3 and stats["disk_bytes"] <= store.disk_bytes, stats


# -- 11. the port answers at once; /readyz says starting until the default portrait is ready -----------------------
class SlowPortraitEngine:
    """The shared engine, whose portrait registration waits for the test's signal (as a 512x512 portrait on a
    small CPU takes minutes): everything else is the real engine."""

    def __init__(self, engine, gate):
        self._engine, self._gate = engine, gate

    def add_avatar(self, *args, **kwargs):
        self._gate.wait(30)
        return self._engine.add_avatar(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.mark.fixtures
def test_healthz_answers_while_the_default_portrait_is_still_encoding(tiny_engine, serve):
    import threading
    import time

    from kit.served import call

    gate = threading.Event()
    started = time.perf_counter()
    server = serve(engine=SlowPortraitEngine(tiny_engine, gate), wait_ready=False)
    try:
        up_s = time.perf_counter() - started
        health, ready = call("GET", f"{server.url}/healthz"), call("GET", f"{server.url}/readyz")
        session = call("POST", f"{server.url}/v1/sessions", json={})
        gate.set()
        assert up_s < 10, f"the port opened after {up_s:.1f} s"
        assert health.status == 200
        assert ready.status == 503 and ready.json["status"] == "starting", ready.text
        assert session.status == 503 and "starting" in session.json["error"]["message"], session.text
        deadline = time.monotonic() + 60
        while call("GET", f"{server.url}/readyz").status != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert call("GET", f"{server.url}/readyz").json["status"] == "ready"
    finally:
        gate.set()


# -- 4. off loopback a key is required; the server answers only to Host names it was configured for ----------------
def test_serving_off_loopback_needs_an_api_key_or_an_explicit_insecure_flag():
    from server.settings.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match="--api-key"):
        ServerConfig(host="0.0.0.0").validate()
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        ServerConfig.from_env({"VEXPRESS_HOST": "192.0.2.10"})
    assert ServerConfig(host="0.0.0.0", api_key="k").validate().api_key == "k"
    assert ServerConfig.from_env({"VEXPRESS_HOST": "::", "VEXPRESS_INSECURE_NO_AUTH": "1"}).insecure_no_auth
    assert ServerConfig(host="127.0.0.1").validate().api_key is None  # loopback stays open


def test_the_serve_command_refuses_to_start_off_loopback_without_a_key(capsys):
    from server.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) != 0
    assert "--api-key" in capsys.readouterr().err


@pytest.mark.fixtures
def test_a_host_header_the_server_was_not_configured_for_is_refused(serve):
    """DNS rebinding: a page on evil.example, re-pointed at the server, is "same origin" for the browser."""
    from kit.served import call

    server = serve(allowed_host=["avatars.example"])
    port = server.url.rsplit(":", 1)[1]
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    assert call("GET", f"{server.url}/v1/info", headers=rebound).status == 403
    assert call("POST", f"{server.url}/v1/sessions", headers=rebound, json={}).status == 403
    assert call("GET", f"{server.url}/v1/info", headers={"Host": f"evil.example:{port}"}).status == 403
    configured = {"Host": f"avatars.example:{port}", "Origin": f"http://avatars.example:{port}"}
    assert call("GET", f"{server.url}/v1/info", headers=configured).status == 200
    assert call("GET", f"{server.url}/v1/info", headers={"Host": f"localhost:{port}"}).status == 200
    assert call("GET", f"{server.url}/healthz").status == 200


# -- 10. what an anonymous caller sees; where ?token= works; the recordings' disk quota ------------------------------
@pytest.mark.fixtures
def test_info_shows_avatars_and_model_folder_only_to_key_holders_and_the_real_device(tiny_engine, serve):
    from kit.served import call

    server = serve(api_key="k3y", device="cuda")
    anonymous = call("GET", f"{server.url}/v1/info").json
    keyed = call("GET", f"{server.url}/v1/info", headers={"X-API-Key": "k3y"}).json
    assert "avatars" not in anonymous and "model_dir" not in anonymous["model"], anonymous
    assert str(tiny_engine.models.device) == "cpu" and anonymous["model"]["device"] == "cpu"  # not the flag's cuda
    assert keyed["avatars"] and keyed["model"]["model_dir"]


@pytest.mark.fixtures
def test_query_tokens_work_on_websockets_and_media_only(serve):

    from kit.http_calls import create_session, delete_session, http, ws_url

    server = serve()

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            query = {"token": s["token"]}
            async with c.get(s["url"], params=query) as r:
                get_status = r.status
            async with c.post(f"{s['url']}/interrupt", params=query) as r:
                post_status = r.status
            async with c.get(s["recording_url"], params=query) as r:
                media_status = r.status  # 404: no recording yet, but the token was taken
            ws = await c.ws_connect(ws_url(s))
            await ws.close()
            await delete_session(c, s)
            return get_status, post_status, media_status

    get_status, post_status, media_status = run(main(), 60)
    assert (get_status, post_status) == (401, 401)
    assert media_status == 404


@pytest.mark.fixtures
def test_recordings_stop_at_the_disk_quota_and_new_ones_are_refused(tmp_path, serve):
    import time

    from kit.http_calls import bearer
    from kit.served import call

    from server.outputs.recording import RECORDINGS

    server = serve(recording_dir=str(tmp_path), recordings_quota_mb=0.005)
    s = call("POST", f"{server.url}/v1/sessions", json={"record": True}).json
    auth = bearer(s["token"])
    recording = server.app[RECORDINGS].recordings[s["id"]]
    deadline = time.monotonic() + 60
    while recording.state == "recording" and time.monotonic() < deadline:
        time.sleep(0.2)  # it must stop on its own, the session still open
    assert server.state.sessions.get(s["id"]) is not None
    done = call("DELETE", s["recording_url"], headers=auth).json
    other = call("POST", f"{server.url}/v1/sessions", json={}).json
    again = call("POST", other["recording_url"], headers=bearer(other["token"]))
    call("DELETE", s["url"], headers=auth)
    call("DELETE", other["url"], headers=bearer(other["token"]))
    assert "quota" in done.get("stop_reason", ""), done
    assert again.status == 507 and again.json["error"]["code"] == "recordings_quota", again.text


# -- 7. hostile uploads do not stall the frames of other sessions -------------------------------------------------
HOSTILE_UPLOADS = 4


@pytest.mark.fixtures
def test_a_bystander_keeps_its_frames_while_hostile_portraits_are_uploaded(serve):
    """40 MP flat PNGs (132 KB each) with key points that are no face: each is decoded, then refused. Decoding ran on
    the event loop and stalled every session's frames for as long as one decode takes, once per upload.

    Judged against yardsticks measured in this run, on this machine under its present load, rather than a fixed
    bound (a single longest gap of 0.53 s was seen on a loaded CPU with the fix, 0.78 s on an idle one without it):
    a stall is a frame gap longer than both half of what one such decode takes here and the longest gap of the calm
    period before the attack. The old code stalls once per upload (each stall lasts a whole decode); with decoding
    off the loop, scheduling noise may make one odd long gap, not one per upload."""
    import time

    from kit.http_calls import avatar_form
    from kit.media_synth import frame_gaps, image_bytes
    from kit.served import call
    from kit.ws_clients import Bystander
    from PIL import Image

    from server.api.avatars import decode_image

    server = serve(max_image_pixels=40_000_000, max_upload_mb=5)
    big = image_bytes(Image.new("RGB", (6324, 6324), "grey"), "PNG")
    decode_s = float("inf")
    for _ in range(2):  # what the old code held the loop for, per upload
        t0 = time.perf_counter()
        decode_image(big)
        decode_s = min(decode_s, time.perf_counter() - t0)
    bystander = Bystander(server.url).start()
    try:
        time.sleep(2.0)  # the bystander's frames before the attack
        calm = len(bystander.arrivals)
        statuses = []
        for _ in range(HOSTILE_UPLOADS):
            form = avatar_form(big, kps="[[0, 0], [1, 0], [0.5, 6323]]")
            statuses.append(call("POST", f"{server.url}/v1/avatars", data=form).status)
        time.sleep(0.5)
    finally:
        arrivals = bystander.stop()
    calm_gaps, attack_gaps = frame_gaps(arrivals[:calm]), frame_gaps(arrivals[calm - 1 :])
    bound = max(0.5 * decode_s, max(calm_gaps))
    stalls = sorted((g for g in attack_gaps if g > bound), reverse=True)
    print(
        f"\nbystander frame gaps: calm max {max(calm_gaps):.3f} s; one decode {decode_s:.3f} s; during "
        f"{HOSTILE_UPLOADS} hostile uploads max {max(attack_gaps):.3f} s, over {bound:.3f} s: {stalls}"
    )
    assert statuses == [400] * HOSTILE_UPLOADS
    assert len(calm_gaps) > 10 and len(attack_gaps) > 10, "the bystander received too few frames to judge"
    assert len(stalls) <= HOSTILE_UPLOADS // 2, (stalls, bound, decode_s)


# -- 9. limits hold under concurrent requests; a session whose frames stop is closed -------------------------------
@pytest.mark.fixtures
def test_concurrent_offers_and_uploads_cannot_exceed_their_limits(serve):

    from kit.aiortc_viewer import viewer_offer
    from kit.http_calls import avatar_form, bearer, create_session, delete_session, http
    from kit.media_synth import image_bytes

    server = serve(max_viewers=2, max_avatars=2)  # the default is one

    async def main():
        async with http(timeout=120) as c:
            s = await create_session(c, server.url)
            headers = {**bearer(s["token"]), "Content-Type": "application/sdp"}
            peers = [await viewer_offer() for _ in range(6)]

            async def offer(sdp):
                async with c.post(s["whep_url"], data=sdp, headers=headers) as r:
                    return r.status

            async def upload(i):
                form = avatar_form(image_bytes(_portrait(2000 + i), "PNG"), kps=str(KPS))
                async with c.post(f"{server.url}/v1/avatars", data=form) as r:
                    return r.status, (await r.json()).get("id")

            offers = await asyncio.gather(*(offer(sdp) for _, sdp in peers))
            uploads = await asyncio.gather(*(upload(i) for i in range(4)))
            viewers = len(server.state.sessions.get(s["id"]).peers)
            for pc, _ in peers:
                await pc.close()
            await delete_session(c, s)
            for status, avatar_id in uploads:
                if status == 201:
                    async with c.delete(f"{server.url}/v1/avatars/{avatar_id}"):
                        pass
            return offers, [status for status, _ in uploads], viewers

    offers, uploads, viewers = run(main(), 150)
    assert sorted(offers) == [201, 201, 429, 429, 429, 429] and viewers == 2, (offers, viewers)
    assert sorted(uploads) == [201, 409, 409, 409], uploads


@pytest.mark.fixtures
def test_a_session_whose_frames_stop_is_closed(serve):
    import time

    from kit.http_calls import bearer
    from kit.served import call

    server = serve()
    s = call("POST", f"{server.url}/v1/sessions", json={}).json
    engine_session = server.state.sessions.get(s["id"]).engine_session

    def broken_read_frame():
        raise RuntimeError("the device went away")

    engine_session.read_frame = broken_read_frame  # the fault: reading the engine fails
    assert (
        call(
            "POST",
            f"{s['url']}/speak",
            data=wav_bytes(0.5),
            headers={**bearer(s["token"]), "Content-Type": "audio/wav"},
        ).status
        == 202
    )  # starts the frame pump
    deadline = time.monotonic() + 10
    while server.state.sessions.get(s["id"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.state.sessions.get(s["id"]) is None, "the session outlived its frame pump"
    assert call("GET", s["url"], headers=bearer(s["token"])).status == 404


# -- 6. marks are bounded per utterance -------------------------------------------------------------------------
@pytest.mark.fixtures
def test_marks_beyond_the_bound_get_an_error_and_the_session_goes_on(serve):

    from kit.http_calls import create_session, delete_session, http, ws_messages, ws_url

    from streaming.session import MAX_MARKS_PER_UTTERANCE

    # 1000+ marks at once are over the message rate's burst (--max_ws_messages_per_s): raise it, this is about marks
    server = serve(max_ws_messages_per_s=5000)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            ws = await c.ws_connect(ws_url(s))
            await ws.send_bytes(voiced_pcm16(2.0))
            for i in range(MAX_MARKS_PER_UTTERANCE + 5):
                await ws.send_str(f'{{"type": "mark", "name": "m{i}"}}')
            await ws.send_str('{"type": "ping", "id": "after"}')
            got = await ws_messages(ws, 20.0, until=lambda m: m == {"type": "pong", "id": "after"})
            await ws.close()
            await delete_session(c, s)
            return got

    got = run(main(), 60)
    errors = [m for m in got if isinstance(m, dict) and m.get("type") == "error"]
    assert len(errors) == 5 and all("too many marks" in e["message"] for e in errors), errors[:2]
    assert {"type": "pong", "id": "after"} in got


# -- 8. websockets per session are bounded, refusals counted ---------------------------------------------------------
@pytest.mark.fixtures
def test_websockets_per_session_are_bounded_and_refusals_counted(serve):

    import aiohttp
    from kit.http_calls import create_session, delete_session, http, ws_url
    from kit.served import call

    server = serve(max_frames_sockets=2, max_bot_sockets=1)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            opened, refused = [], []
            for kind, count in (("frames", 4), ("ws", 3)):
                for _ in range(count):
                    try:
                        opened.append(await c.ws_connect(ws_url(s, kind)))
                    except aiohttp.WSServerHandshakeError as exc:
                        refused.append((kind, exc.status))
            await opened[0].close()  # a place frees when a socket ends
            await asyncio.sleep(0.2)
            again = await c.ws_connect(ws_url(s, "frames"))
            await again.close()
            for ws in opened[1:]:
                await ws.close()
            await delete_session(c, s)
            return len(opened), refused

    opened, refused = run(main(), 60)
    metrics = call("GET", f"{server.url}/metrics").text
    assert opened == 3 and refused == [("frames", 429), ("frames", 429), ("ws", 429), ("ws", 429)], refused
    assert 'vexpress_websockets_refused_total{kind="frames"} 2' in metrics
    assert 'vexpress_websockets_refused_total{kind="bot"} 2' in metrics


@pytest.mark.fixtures
def test_websocket_floods_are_rate_limited_closed_with_1008_and_counted(serve):
    """Tiny messages cost the loop ~100 us each: beyond --max_ws_messages_per_s (bursts of 2 s' worth) a connection's
    messages are dropped with an `error` event `rate_limited`, and one that keeps flooding is closed with 1008, on
    both websockets; the session goes on (a well-behaved bot connects and is answered)."""

    import aiohttp
    from kit.http_calls import create_session, delete_session, http, ws_messages, ws_url
    from kit.served import call

    server = serve(max_ws_messages_per_s=50)  # bursts of 100

    async def flood(ws) -> tuple[list, int | None]:
        for i in range(600):
            try:
                await ws.send_str(f'{{"type": "ping", "id": {i}}}')
            except (ConnectionError, RuntimeError):  # closed under us: the point
                break
        got = [m for m in await ws_messages(ws, 20.0) if not isinstance(m, bytes)]  # frames: only the JSON
        return got, ws.close_code

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            bot = await flood(await c.ws_connect(ws_url(s)))
            frames = await flood(await c.ws_connect(ws_url(s, "frames")))
            calm = await c.ws_connect(ws_url(s))
            await calm.send_str('{"type": "ping", "id": "calm"}')
            calm_got = await ws_messages(calm, 10.0, until=lambda m: m == {"type": "pong", "id": "calm"})
            await calm.close()
            await delete_session(c, s)
            return bot, frames, calm_got

    (bot_got, bot_code), (frames_got, frames_code), calm_got = run(main(), 90)
    metrics = call("GET", f"{server.url}/metrics").text
    for got in (bot_got, frames_got):
        errors = [m for m in got if isinstance(m, dict) and m.get("type") == "error"]
        assert errors and all(e["code"] == "rate_limited" for e in errors), got[-3:]
        assert "--max_ws_messages_per_s" in errors[0]["message"] and "closing" in errors[-1]["message"]
        assert got[-1] == aiohttp.WSMsgType.CLOSE, got[-3:]
    pongs = [m for m in bot_got if isinstance(m, dict) and m.get("type") == "pong"]
    assert 100 <= len(pongs) < 150, len(pongs)  # the burst, plus what the rate refilled meanwhile
    assert bot_code == frames_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert {"type": "pong", "id": "calm"} in calm_got
    for kind in ("bot", "frames"):
        assert f'vexpress_websockets_rate_closed_total{{kind="{kind}"}} 1.0' in metrics
        dropped = float(metrics.split(f'vexpress_websocket_messages_limited_total{{kind="{kind}"}} ')[1].split()[0])
        assert dropped >= 101, (kind, dropped)


@pytest.mark.fixtures
def test_a_nested_multipart_part_is_a_400_not_a_500(serve):
    """A form part that is itself multipart/mixed reached `read_chunk` of a reader that has none (500, an
    unhandled AttributeError): portraits and speak refuse it as a malformed body."""
    import aiohttp
    from kit.http_calls import bearer, create_session, delete_session, http

    server = serve()

    def nested(field: str) -> aiohttp.MultipartWriter:
        inner = aiohttp.MultipartWriter("mixed")
        inner.append(b"RIFF....", {"Content-Type": "audio/wav"})
        outer = aiohttp.MultipartWriter("form-data")
        outer.append(inner).set_content_disposition("form-data", name=field)
        return outer

    async def main():
        async with http() as c:
            async with c.post(f"{server.url}/v1/avatars", data=nested("image")) as r:
                avatar = (r.status, await r.json())
            s = await create_session(c, server.url)
            async with c.post(s["speak_url"], data=nested("audio"), headers=bearer(s["token"])) as r:
                speak = (r.status, await r.json())
            await delete_session(c, s)
            return avatar, speak

    avatar, speak = run(main(), 60)
    for status, body in (avatar, speak):
        assert status == 400 and "nested multipart" in body["error"]["message"], (status, body)
