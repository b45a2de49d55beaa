"""Hostile input, property-based (hypothesis): random JSON to POST /v1/sessions, random bytes and corrupted real
pictures as portraits, random and mutated SDP to offer/WHEP, random text and binary messages on the bot and frames
websockets, truncated and corrupted audio files to speak. Every answer must be a 4xx (never a 5xx) or an `error`
event; a bystander session keeps receiving its frames throughout; afterwards a fresh session works; and the
server's log shows no unhandled exception. Bounded: about a minute on 2 CPU cores.

`pytest -s` prints how many inputs each fuzzer tried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.aiortc_viewer import viewer_offer
from kit.http_calls import (
    avatar_form,
    bearer,
    create_session,
    delete_session,
    http,
    unhandled_records,
    ws_messages,
    ws_url,
)
from kit.media_synth import image_bytes, longest_gap, mp3_bytes, wav_bytes
from kit.served import call, server_fixture
from kit.waits import run
from kit.ws_clients import Bystander
from PIL import Image

from server.api.avatars import decode_image
from server.api.sessions import SESSION_FIELDS
from server.errors import ApiError
from server.websockets.frames import MAX_CLIENT_MESSAGE_BYTES

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(300)]

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED: Counter = Counter()
EVENT_TYPES = {"session.ready", "playback.started", "playback.finished", "mark", "state", "buffer", "pong", "error"}


server = server_fixture({"max_sessions": 6, "max_ws_message_bytes": 8192, "max_buffer_s": 5.0})


@pytest.fixture(scope="module", autouse=True)
def _print_tried():
    yield
    print(f"\nfuzz inputs tried: {dict(TRIED)} (total {sum(TRIED.values())})")


@pytest.fixture(scope="module")
def bystander(server):
    """Watches the whole module: a frames websocket that must keep receiving while the others attack."""
    by = Bystander(server.url).start()
    yield by
    arrivals = by.stop()
    gap, span = longest_gap(arrivals), arrivals[-1] - arrivals[0]
    print(f"\nbystander: {len(arrivals)} frames in {span:.1f} s, longest gap {gap:.2f} s")
    assert gap < 2.0 and len(arrivals) >= 0.5 * 25 * span, (len(arrivals), span, gap)


@pytest.fixture
def clean_log(caplog, bystander):
    caplog.set_level(logging.INFO)
    yield
    bad = unhandled_records(caplog.records)
    assert not bad, "\n".join(bad)


def _healthy(server) -> None:
    """After the storm: a new session opens, reads back, and its websocket answers a ping."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            async with c.get(s["url"], headers=bearer(s["token"])) as r:
                assert r.status == 200
            ws = await c.ws_connect(ws_url(s))
            await ws.send_str('{"type": "ping", "id": "health"}')
            got = await ws_messages(ws, 3.0, until=lambda m: m == {"type": "pong", "id": "health"})
            await ws.close()
            await delete_session(c, s)
            return got

    got = run(main())
    assert {"type": "pong", "id": "health"} in got, got
    assert len(server.state.sessions) == 1  # only the bystander


# -- strategies --------------------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from([10**400, -(10**400), 1e308, 25, 4, 16000, "25", "", "\u0000", "\ud800"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
known_fields = st.fixed_dictionaries(
    {},
    optional={
        **{name: values for name in SESSION_FIELDS},
        "fps": st.integers(-5, 100) | values,
        "steps": st.integers(-2, 12) | values,
        "guidance_scale": st.floats() | st.integers(-3, 30),
        "audio": st.fixed_dictionaries(
            {}, optional={"sample_rate": st.integers(-1, 500_000) | values, "channels": st.integers(-1, 12) | values}
        )
        | values,
        "record": values,
    },
)


def _dump(value) -> str:
    return json.dumps(value, allow_nan=True)  # lone surrogates travel as \\ud800 escapes


session_bodies = st.one_of(
    known_fields.map(_dump),
    values.map(_dump),
    st.text(max_size=200),
    st.sampled_from(["[" * 3000, '{"fps": ' * 2000, '{"fps": 25', "NaN", '{"audio": {"sample_rate": 1e999}}']),
)


# -- HTTP: sessions -------------------------------------------------------------------------------------------------
@FUZZ
@given(body=session_bodies, raw=st.booleans())
def test_fuzz_create_session(server, clean_log, body, raw):
    TRIED["POST /v1/sessions"] += 1
    data = body.encode("utf-8", "surrogatepass") if raw else body.encode("utf-8", "replace")
    reply = call("POST", f"{server.url}/v1/sessions", data=data, headers={"Content-Type": "application/json"})
    assert reply.status in (201, 400, 404, 413), (body[:200], reply.status, reply.text[:300])
    assert reply.json["error" if reply.status != 201 else "id"]
    if reply.status == 201:
        call("DELETE", reply.json["url"], headers=bearer(reply.json["token"]))


# -- HTTP: portraits ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pictures(fixtures_dir) -> dict[str, bytes]:
    image = Image.open(fixtures_dir / "inputs" / "reference.png").convert("RGB")
    return {
        "png": (fixtures_dir / "inputs" / "reference.png").read_bytes(),
        "jpeg": image_bytes(image, "JPEG", quality=90),
        "webp": image_bytes(image, "WEBP"),
        "gif": image_bytes(image, "GIF"),
        "bmp": image_bytes(image, "BMP"),
    }


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_decode_image_mutations(pictures, data):
    """Truncated and corrupted real pictures, straight into the decoder: an RGB image or an ApiError (400/413)."""
    TRIED["decode_image(mutated picture)"] += 1
    kind = data.draw(st.sampled_from(sorted(pictures)))
    blob = bytearray(pictures[kind])
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        image = decode_image(bytes(blob[:cut]), 1_000_000)
    except ApiError as exc:
        assert exc.status in (400, 413), exc.message
    else:
        assert image.mode == "RGB" and image.width * image.height > 0


@FUZZ
@given(
    image=st.binary(max_size=3000),
    kps=st.none() | st.binary(max_size=100) | values.map(_dump),
    name=st.none() | st.text(st.characters(blacklist_categories=("Cs",)), max_size=300),
)
def test_fuzz_avatar_upload(server, clean_log, image, kps, name):
    TRIED["POST /v1/avatars"] += 1
    reply = call("POST", f"{server.url}/v1/avatars", data=avatar_form(image, kps, name))
    assert reply.status in (400, 413), (image[:40], reply.status, reply.text[:300])


def test_corrupt_and_truncated_pictures_over_http(server, clean_log, pictures):
    """Real PNG/JPEG/WebP files truncated and with bytes flipped: 201 when still a picture with a face, else 400."""
    rng = random.Random(6)
    statuses = Counter()
    kps = json.dumps([[52.6, 25.0], [73.8, 24.8], [63.2, 30.7]])
    for kind in ("png", "jpeg", "webp"):
        blob = pictures[kind]
        cases = [blob[: int(len(blob) * f)] for f in (0.0, 0.02, 0.3, 0.7, 0.98)]
        for _ in range(2):
            flipped = bytearray(blob)
            for _ in range(8):
                flipped[rng.randrange(len(flipped))] ^= 0xFF
            cases.append(bytes(flipped))
        for case in cases:
            TRIED["POST /v1/avatars (corrupt picture)"] += 1
            reply = call("POST", f"{server.url}/v1/avatars", data=avatar_form(case, kps))
            statuses[reply.status] += 1
            assert reply.status in (201, 400), (kind, len(case), reply.status, reply.text[:300])
            if reply.status == 201 and not reply.json["default"]:
                call("DELETE", f"{server.url}/v1/avatars/{reply.json['id']}")
    print(f"\ncorrupt pictures: {dict(statuses)}")
    assert statuses[400] >= 8


# -- HTTP: SDP -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_offer() -> str:
    async def make():
        pc, sdp = await viewer_offer()
        await pc.close()
        return sdp

    return asyncio.run(make())


_sdp_lines = st.one_of(
    st.builds(
        "m={} {} {} {}".format,
        st.sampled_from(["video", "audio", "application", "text", ""]),
        st.integers(-1, 70000),
        st.sampled_from(["UDP/TLS/RTP/SAVPF", "RTP/AVP", "x"]),
        st.lists(st.integers(-1, 300), max_size=4).map(lambda x: " ".join(map(str, x))),
    ),
    st.builds(
        "a=rtpmap:{} {}/{}".format,
        st.integers(-1, 300),
        st.sampled_from(["VP8", "H264", "opus", "?"]),
        st.integers(-1, 200000),
    ),
    st.builds("a=fmtp:{} {}".format, st.integers(-1, 300), st.text(max_size=30)),
    st.builds(
        "a=candidate:{} {} {} {} {} {} typ {}".format,
        st.text(max_size=5),
        st.integers(-1, 3),
        st.sampled_from(["udp", "tcp", "x"]),
        st.integers(),
        st.sampled_from(["127.0.0.1", "::1", "x", ""]),
        st.integers(-1, 70000),
        st.sampled_from(["host", "srflx", "relay", "x"]),
    ),
    st.builds(
        "a={}:{}".format,
        st.sampled_from(
            [
                "mid",
                "setup",
                "ice-ufrag",
                "ice-pwd",
                "fingerprint",
                "group",
                "ssrc",
                "msid",
                "rtcp-fb",
                "extmap",
                "sctp-port",
                "direction",
            ]
        ),
        st.text(max_size=40),
    ),
    st.sampled_from(
        [
            "a=sendrecv",
            "a=recvonly",
            "a=inactive",
            "a=rtcp-mux",
            "c=IN IP4 0.0.0.0",
            "t=0 0",
            "s=-",
            "o=- 0 0 IN IP4 127.0.0.1",
            "a=group:BUNDLE 0 1",
            "a=fingerprint:sha-256 00:11",
        ]
    ),
    st.text(max_size=60),
)


@st.composite
def sdp_offers(draw, real: str):
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.text(max_size=300))
    if kind == 1:
        return "v=0\r\n" + "\r\n".join(draw(st.lists(_sdp_lines, max_size=20))) + "\r\n"
    lines = real.strip().split("\r\n")
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, draw(_sdp_lines))
        elif op == 2:
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            lines.insert(i, lines[i])
        if not lines:
            lines = ["v=0"]
    return "\r\n".join(lines) + "\r\n"


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_fuzz_offer_and_whep(server, clean_log, real_offer, data):
    TRIED["POST offer + WHEP (SDP)"] += 1
    sdp = data.draw(sdp_offers(real_offer))
    kind = data.draw(st.sampled_from(["offer", "answer", "pranswer", None, 7]))

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            auth_ = bearer(s["token"])
            try:
                async with c.post(s["offer_url"], json={"sdp": sdp, "type": kind}, headers=auth_) as r:
                    offer = (r.status, await r.text())
                headers = {**auth_, "Content-Type": "application/sdp"}
                async with c.post(s["whep_url"], data=sdp.encode("utf-8", "surrogatepass"), headers=headers) as r:
                    whep = (r.status, await r.text())
                async with c.post(f"{server.url}/offer", data=_dump({"sdp": sdp})) as r:
                    legacy = (r.status, await r.json())
            finally:
                await delete_session(c, s)
            if legacy[0] == 200:
                await delete_session(c, {"id": legacy[1]["session_id"], "token": legacy[1]["token"]}, server.url)
            return offer, whep, legacy

    offer, whep, legacy = run(main())
    assert offer[0] in (200, 400, 413), (sdp[:300], offer)
    assert whep[0] in (201, 400, 413), (sdp[:300], whep)
    assert legacy[0] in (200, 400, 413), (sdp[:300], legacy)


# -- websockets -------------------------------------------------------------------------------------------------------
ws_texts = st.one_of(
    st.text(max_size=200),
    values.map(_dump),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["audio.end", "interrupt", "mark", "ping", "nope", ""]) | values},
        optional={"name": values | st.text(max_size=300), "id": values},
    ).map(_dump),
    st.sampled_from(["[" * 60000, '{"type": "mark", "name": "' + "x" * 70000 + '"}', "{}", "null", '{"type": null}']),
)
ws_binary = st.one_of(st.binary(max_size=3000), st.integers(0, 20000).map(lambda n: bytes(n)))
ws_messages_strategy = st.lists(st.one_of(ws_texts, ws_binary), min_size=1, max_size=8)


@settings(FUZZ, max_examples=60)
@given(messages=ws_messages_strategy)
def test_fuzz_bot_websocket(server, clean_log, messages):
    TRIED["bot websocket messages"] += len(messages)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            try:
                ws = await c.ws_connect(ws_url(s), max_msg_size=0)
                for m in messages:
                    await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
                await ws.send_str('{"type": "ping", "id": "after"}')
                got = await ws_messages(ws, 5.0, until=lambda m: m == {"type": "pong", "id": "after"})
                await ws.close()
                return got
            finally:
                await delete_session(c, s)

    got = run(main())
    closed = [m for m in got if not isinstance(m, dict)]
    assert not closed, f"the socket closed: {closed} after {[str(m)[:80] for m in messages]}"
    for m in got:
        assert m["type"] in EVENT_TYPES, m
        if m["type"] == "error":
            assert isinstance(m["code"], str) and isinstance(m["message"], str), m
    assert {"type": "pong", "id": "after"} in got, got


def _size(message: str | bytes) -> int:
    return len(message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message)


@settings(FUZZ, max_examples=15)
@given(messages=ws_messages_strategy)
def test_fuzz_frames_websocket(server, clean_log, messages):
    TRIED["frames websocket messages"] += len(messages)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            try:
                ws = await c.ws_connect(ws_url(s, "frames"), max_msg_size=0)
                for m in messages:
                    await (ws.send_str(m) if isinstance(m, str) else ws.send_bytes(m))
                    if _size(m) > MAX_CLIENT_MESSAGE_BYTES:
                        break  # the server closes on it (1009): a later send would race the close
                got = await ws_messages(ws, 2.0, until=lambda m, seen=[]: seen.append(1) or len(seen) >= 8)
                code = ws.close_code
                await ws.close()
                return got, code
            finally:
                await delete_session(c, s)

    got, code = run(main())
    frames = [m for m in got if isinstance(m, bytes)]
    # What the client sends is ignored, unless a message is over the frames websocket's limit: then (only then)
    # the socket closes with 1009; otherwise the frames flow
    limit = MAX_CLIENT_MESSAGE_BYTES
    too_big = any(_size(m) > limit for m in messages)
    if too_big:
        assert got[-1] == aiohttp.WSMsgType.CLOSE and code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG, (code, got[-3:])
    else:
        assert len(frames) >= 5 and aiohttp.WSMsgType.CLOSE not in got, (code, got[:3])
    assert all(m != aiohttp.WSMsgType.ERROR for m in got)


# -- audio files -----------------------------------------------------------------------------------------------------
def test_corrupt_and_truncated_audio_files(server, clean_log):
    """WAV and MP3 files cut short and with bytes flipped, to speak: 202 when still audio, else 400/415."""
    rng = random.Random(7)
    statuses = Counter()

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            headers = bearer(s["token"])
            for kind, blob, ctype in (("wav", wav_bytes(1.0), "audio/wav"), ("mp3", mp3_bytes(1.0), "audio/mpeg")):
                cases = [blob[: int(len(blob) * f)] for f in (0.01, 0.05, 0.3, 0.9)]
                cases += [b"RIFF" + bytes(40), b"ID3" + bytes(100), bytes(rng.randrange(256) for _ in range(500))]
                for _ in range(4):
                    flipped = bytearray(blob)
                    for _ in range(16):
                        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
                    cases.append(bytes(flipped))
                for case in cases:
                    TRIED["POST speak (corrupt audio)"] += 1
                    async with c.post(s["speak_url"], data=case, headers={**headers, "Content-Type": ctype}) as r:
                        statuses[r.status] += 1
                        assert r.status in (202, 400, 409, 413, 415), (kind, len(case), r.status, await r.text())
                    async with c.post(f"{s['url']}/interrupt", headers=headers):
                        pass
            await delete_session(c, s)

    run(main(), timeout=120)
    print(f"\ncorrupt audio files: {dict(statuses)}")
    assert statuses[400] + statuses[415] >= 4


# -- valid containers, hostile content ----------------------------------------------------------------------------
@pytest.fixture(scope="class")
def long_session(server):
    """One session that lives through every hostile speak below, so what a case leaks stays to be counted."""

    async def open_():
        async with http() as c:
            return await create_session(c, server.url)

    session = run(open_())
    served = server.state.sessions.get(session["id"])
    yield session, served
    call("DELETE", session["url"], headers=bearer(session["token"]))


PLAYLISTS = [
    "ffconcat version 1.0\nfile {path}\n",
    "ffconcat version 1.0\nfile 'file:{path}'\nduration 1\n",
    "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\n{path}\n#EXT-X-ENDLIST\n",
    "#EXTM3U\n#EXTINF:-1,x\n{path}\n",
    "[playlist]\nNumberOfEntries=1\nFile1={path}\n",
    "<?xml version='1.0'?><smil><body><audio src='{path}'/></body></smil>",
    "{path}",
]
TARGETS = [
    "sub/secret.wav",
    "./sub/secret.wav",
    "sub/../sub/secret.wav",
    "file:sub/secret.wav",
    "subfile:,start,0,end,0,,:sub/secret.wav",
    "concat:sub/secret.wav|sub/secret.wav",
    "http://127.0.0.1:9/x.wav",
    "/dev/zero",
    "/proc/self/environ",
]


def _patched_wav(rate: int, channels: int, bits: int, data_size: int) -> bytes:
    import struct

    blob = bytearray(wav_bytes(0.2))
    byte_rate, align = (rate * channels * bits // 8) & 0xFFFFFFFF, (channels * bits // 8) & 0xFFFF
    struct.pack_into("<HIIHH", blob, 22, channels, rate, byte_rate, align, bits)
    struct.pack_into("<I", blob, 40, data_size)
    return bytes(blob)


class TestHostileAudioOnOneLongLivedSession:
    """Every case goes to the same session (torn down after the class), so what a case leaks stays to be seen."""

    @settings(FUZZ, max_examples=60)
    @given(
        template=st.sampled_from(PLAYLISTS),
        target=st.sampled_from(TARGETS),
        prefix=st.sampled_from(["", "\ufeff", " ", "\n"]),
        ctype=st.sampled_from(["audio/wav", "audio/x-mpegurl", "application/octet-stream", "audio/ogg"]),
    )
    def test_fuzz_speak_playlists_never_read_server_files(
        self, server, clean_log, long_session, tmp_path, monkeypatch, template, target, prefix, ctype
    ):
        """ffconcat, HLS, PLS, SMIL and protocol URLs naming a WAV beside the server's working directory: FFmpeg would
        open the file (or the URL) and play it. Every one must be refused (415) and nothing must reach the session."""
        TRIED["POST speak (playlist)"] += 1
        monkeypatch.chdir(tmp_path)
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / "secret.wav").write_bytes(wav_bytes(1.0))
        session, served = long_session
        body = (prefix + template.format(path=target)).encode()
        headers = {**bearer(session["token"]), "Content-Type": ctype}
        reply = call("POST", session["speak_url"], data=body, headers=headers)
        assert reply.status == 415, (body, reply.status, reply.text[:300])
        assert served.engine_session.buffered_ms == 0 and not served.closed

    @settings(FUZZ, max_examples=40)
    @given(
        rate=st.sampled_from([0, 1, 7999, 16000, 192001, 2**31 - 1, 2**32 - 1]),
        channels=st.sampled_from([0, 1, 2, 9, 255, 65535]),
        bits=st.sampled_from([0, 8, 16, 24, 33, 65535]),
        data_size=st.sampled_from([0, 6400, 2**31, 2**32 - 1]),
    )
    def test_fuzz_speak_wav_headers_that_lie(self, server, clean_log, long_session, rate, channels, bits, data_size):
        """A real WAV container whose header claims absurd rates, channel counts, sample sizes and lengths."""
        TRIED["POST speak (lying WAV header)"] += 1
        session, served = long_session
        headers = {**bearer(session["token"]), "Content-Type": "audio/wav"}
        reply = call("POST", session["speak_url"], data=_patched_wav(rate, channels, bits, data_size), headers=headers)
        assert reply.status in (202, 400, 409, 413, 415), (rate, channels, bits, data_size, reply.status, reply.text)
        call("POST", f"{session['url']}/interrupt", headers=bearer(session["token"]))
        assert not served.closed and len(served.pump.queue_depths()) == 0


@settings(FUZZ, max_examples=30)
@given(size=st.sampled_from([(64, 64), (200, 120), (2000, 2000)]), data=st.data())
def test_fuzz_valid_portraits_with_hostile_kps(server, clean_log, size, data):
    """Real PNGs with key points anywhere inside them: coincident, collinear, 1 px apart, a nose thousands of
    pixels away, a face far larger than the photo. Each answer is 201 or 400, quickly, without a memory jump."""
    import time

    w, h = size
    coord = st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1))
    points = data.draw(st.lists(st.tuples(coord, coord), min_size=3, max_size=3))
    kps = [[round(x * w, 2), round(y * h, 2)] for x, y in points]
    if data.draw(st.booleans()):  # the shapes that used to make giant crops: two eyes close, the nose far away
        kps = [[0, 0], [data.draw(st.sampled_from([0.5, 1, 3, 10])), 0], [0.5, h - 1]]
    TRIED["POST /v1/avatars (hostile kps)"] += 1
    image = image_bytes(Image.new("RGB", size, "grey"), "PNG")
    rss_before = _peak_rss_bytes()
    started = time.perf_counter()
    reply = call("POST", f"{server.url}/v1/avatars", data=avatar_form(image, json.dumps(kps)))
    took = time.perf_counter() - started
    assert reply.status in (201, 400), (kps, reply.status, reply.text[:300])
    if reply.status == 201:
        assert call("DELETE", f"{server.url}/v1/avatars/{reply.json['id']}").status == 204
    assert took < 20, (kps, took)
    assert _peak_rss_bytes() - rss_before < 512 * 2**20, kps


def _peak_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def test_healthy_after_the_fuzzing(server, clean_log):
    _healthy(server)
    metrics = call("GET", f"{server.url}/metrics").text
    assert "vexpress_process_open_fds" in metrics and "vexpress_event_loop_tasks" in metrics
