"""Live controls over the real server (tiny model): styles, motions, PATCH and the bot websocket's control message."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import time

import aiohttp
import av
import numpy as np
import pytest
from kit.http_calls import bearer, create_session, delete_session, http
from kit.media_synth import tone
from kit.served import call, server_fixture
from kit.waits import run
from kit.ws_clients import Bot
from skimage.data import astronaut

from streaming.styles import BUILT_IN
from vexpress_rt_client import AvatarSession, SessionOptions

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def styles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("styles") / "styles.json"
    path.write_text(json.dumps({"whisper": {"audio_attention_weight": 1.0, "motion": "still", "blinks_per_minute": 5}}))
    return path


server = server_fixture(lambda request: {"styles": str(request.getfixturevalue("styles_file"))})


def test_styles_are_listed_and_a_session_picks_one_and_overrides_a_field(server):
    styles = call("GET", f"{server.url}/v1/styles").json["styles"]
    assert set(BUILT_IN) <= set(styles) and styles["whisper"]["blinks_per_minute"] == 5
    made = call("POST", f"{server.url}/v1/sessions", json={"style": "calm", "audio_attention_weight": 2.5})
    assert made.status == 201, made.text
    params = made.json["params"]
    assert params["motion"] == "subtle" and params["motion_amplitude"] == BUILT_IN["calm"]["motion_amplitude"]
    assert params["audio_attention_weight"] == 2.5  # the session's own field over the style's
    call("DELETE", made.json["url"], headers=bearer(made.json["token"]))
    bad = call("POST", f"{server.url}/v1/sessions", json={"style": "nope"})
    assert bad.status == 400 and "style must be one of" in bad.json["error"]["message"]


def test_patch_changes_live_controls_and_refuses_shape_fields(server, inputs_dir):
    motion = call(
        "POST",
        f"{server.url}/v1/motions",
        data=(inputs_dir / "kps.pth").read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert motion.status == 201, motion.text
    assert motion.json["id"] in [m["id"] for m in call("GET", f"{server.url}/v1/motions").json["motions"]]
    garbage = call("POST", f"{server.url}/v1/motions", data=b"not a kps file")
    assert garbage.status == 400
    made = call("POST", f"{server.url}/v1/sessions", json={}).json
    url, auth = made["url"], bearer(made["token"])
    try:
        assert made["control_version"] == 0 and made["idle"] == "clip"  # fix_face: the pre-rendered idle clip
        changed = call("PATCH", url, json={"style": "lively", "motion": motion.json["id"]}, headers=auth)
        assert changed.status == 200, changed.text
        assert changed.json["version"] == 1 and changed.json["params"]["motion"] == motion.json["id"]
        assert changed.json["params"]["audio_attention_weight"] == BUILT_IN["lively"]["audio_attention_weight"]
        current = call("GET", url, headers=auth).json
        assert current["params"]["motion"] == motion.json["id"] and current["control_version"] == 1
        deadline = time.monotonic() + 10  # a motion: idle frames are generated live from the worker's next turn
        while current["idle"] != "live" and time.monotonic() < deadline:
            time.sleep(0.05)
            current = call("GET", url, headers=auth).json
        assert current["idle"] == "live"
        for body, words in (
            ({"steps": 2}, "cannot change steps"),
            ({"audio_attention_weight": -1}, "audio_attention_weight"),
            ({"blinks_per_minute": 61}, "blinks_per_minute"),
            ({"motion": "m0123456789abcde"}, "no motion"),
        ):
            refused = call("PATCH", url, json=body, headers=auth)
            assert refused.status == 400 and words in refused.json["error"]["message"], refused.text
        assert call("PATCH", url, json={"motion_amplitude": 0.5}).status == 401  # the session's token is needed
    finally:
        call("DELETE", url, headers=auth)


def test_the_bot_changes_controls_while_speaking_and_hears_the_frame_it_took_effect_on(server, tiny_speech):
    async def main():
        async with http() as client:
            session = await create_session(client, server.url)
            bot = await Bot.connect(client, session)
            try:
                await bot.wait_type("session.ready")
                await bot.push(tone(1.0))
                await bot.send({"type": "audio.end"})
                started = await bot.wait_type("playback.started", timeout=60)
                await bot.send({"type": "control", "id": 7, "audio_attention_weight": 1.5, "motion": "nod"})
                accepted = await bot.wait_type("control.accepted", timeout=10)
                applied = await bot.wait_type("control.applied", timeout=60)
                await bot.send({"type": "control", "steps": 3})
                error = await bot.wait_type("error", timeout=10)
                return started, accepted, applied, error
            finally:
                await bot.close()
                await delete_session(client, session)

    started, accepted, applied, error = run(main(), timeout=150)
    assert accepted["id"] == 7 and accepted["version"] == 1 and accepted["params"]["motion"] == "nod"
    assert applied["version"] == 1 and applied["frame"] >= started["frame"]
    assert "cannot change steps" in error["message"]


def test_a_flood_of_control_changes_gets_429_after_the_burst_with_a_few_log_lines(server, caplog):
    """2000 PATCHes as fast as one client sends them: the burst (2 s' worth of --max_control_changes_per_s) and the
    rate go through, the rest get 429 `rate_limited` + Retry-After, nothing is logged per change at INFO (a few
    lines for the whole flood); the bot websocket's control messages share the session's allowance (error event
    `rate_limited`); after Retry-After changes go through again."""
    caplog.set_level(logging.INFO)

    async def main():
        async with http() as client:
            session = await create_session(client, server.url)
            auth = bearer(session["token"])
            statuses, retry_after, codes = [], set(), set()
            start = time.monotonic()
            for i in range(2000):
                body = {"motion_amplitude": round(0.5 + (i % 10) / 20, 2)}
                async with client.patch(session["url"], json=body, headers=auth) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        retry_after.add(r.headers.get("Retry-After"))
                        codes.add((await r.json())["error"]["code"])
            elapsed = time.monotonic() - start
            bot = await Bot.connect(client, session)
            try:
                await bot.wait_type("session.ready")
                await bot.send({"type": "control", "id": 1, "motion_amplitude": 0.9})
                bot_error = await bot.wait_type("error", timeout=10)
            finally:
                await bot.close()
            await asyncio.sleep(max(int(x) for x in retry_after))
            async with client.patch(session["url"], json={"motion_amplitude": 1.0}, headers=auth) as r:
                later = r.status
            await delete_session(client, session)
            return session["id"], statuses, elapsed, retry_after, codes, bot_error, later

    sid, statuses, elapsed, retry_after, codes, bot_error, later = run(main(), timeout=150)
    accepted = statuses.count(200)
    # the server's own log (the access log, one line a request, is the proxy's and the operator's to tune)
    lines = [r for r in caplog.records if sid in r.getMessage() and r.name != "aiohttp.access"]
    refused = statuses.count(429)
    print(f"\n2000 PATCH in {elapsed:.1f} s: {accepted} accepted, {refused} refused, {len(lines)} log lines")
    rate = server.config.max_control_changes_per_s
    assert set(statuses) == {200, 429} and statuses[: int(2 * rate)] == [200] * int(2 * rate)
    assert accepted <= 2 * rate + rate * elapsed + 1, (accepted, elapsed)
    assert codes == {"rate_limited"} and all(x is not None and int(x) >= 1 for x in retry_after), retry_after
    assert bot_error["code"] == "rate_limited" and "max_control_changes_per_s" in bot_error["message"]
    assert later == 200
    assert len(lines) <= 30, [r.getMessage() for r in lines][:30]


def test_echoed_values_are_cut_in_control_errors(server):
    """A long bad value or field name is not sent back whole: PATCH, POST /v1/sessions and the bot websocket."""
    long = "x" * 5000

    async def main():
        async with http() as client:
            session = await create_session(client, server.url)
            auth = bearer(session["token"])
            replies = {}
            for name, body in (
                ("style", {"style": long}),
                ("field", {long: 1}),
                ("fields", {f"{long[:500]}{i}": 1 for i in range(50)}),
                ("motion", {"motion": long}),
            ):
                async with client.patch(session["url"], json=body, headers=auth) as r:
                    replies[f"PATCH {name}"] = (r.status, (await r.json())["error"]["message"])
            for name, body in (("style", {"style": long}), ("field", {long: 1})):
                async with client.post(f"{server.url}/v1/sessions", json=body) as r:
                    replies[f"POST {name}"] = (r.status, (await r.json())["error"]["message"])
            bot = await Bot.connect(client, session)
            try:
                await bot.send({"type": long})
                replies["ws type"] = (400, (await bot.wait_type("error", timeout=10))["message"])
            finally:
                await bot.close()
            await delete_session(client, session)
            return replies

    replies = run(main(), timeout=60)
    for where, (status, message) in replies.items():
        assert status == 400 and "x" * 41 not in message and len(message) < 400, (where, len(message), message[:300])


def test_the_session_client_opens_with_a_style_and_changes_controls(server):
    async def main():
        client = AvatarSession(server.url, options=SessionOptions(style="presenter", motion_amplitude=0.8))
        await client.open()
        try:
            await client.control(style="calm", blinks_per_minute=30)
            seen = []
            async for event in client.events():
                seen.append(event)
                if event["type"] == "control.applied":
                    return client.info, seen
        finally:
            await client.close()

    info, seen = run(main(), timeout=120)
    assert info["params"]["motion"] == "nod" and info["params"]["motion_amplitude"] == 0.8
    accepted = next(e for e in seen if e["type"] == "control.accepted")
    assert accepted["params"]["motion"] == "subtle" and accepted["params"]["blinks_per_minute"] == 30
    assert seen[-1]["version"] == accepted["version"] == 1


def _video(frames: list, fps: int = 25, container: str = "mp4") -> bytes:
    """H.264 in `container` (PyAV, in memory) of RGB uint8 frames."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as video:
        stream = video.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            video.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        video.mux(stream.encode(None))
    return out.getvalue()


def _panning_astronaut(frames: int, step: int) -> list:
    """The astronaut's face in a 256x256 window that moves right by `step` px a frame: the face moves left."""
    image = astronaut()  # 512x512, the face around (x 170-260, y 60-160)
    return [image[20:276, 60 + i * step : 316 + i * step].copy() for i in range(frames)]


def test_a_video_upload_becomes_a_motion_that_follows_the_face(server):
    step = 4
    video = _video(_panning_astronaut(25, step))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        upload = pool.submit(
            call, "POST", f"{server.url}/v1/motions", data=video, headers={"Content-Type": "video/mp4"}
        )
        waits = []  # the server keeps answering while the frames are searched for the face (seconds)
        while not upload.done():
            start = time.perf_counter()
            assert call("GET", f"{server.url}/v1/styles").status == 200
            waits.append(time.perf_counter() - start)
            time.sleep(0.05)
        made = upload.result()
    assert len(waits) >= 5 and max(waits) < 0.5, waits
    assert made.status == 201, made.text
    assert made.json["frames"] == 25
    assert made.json["id"] in [m["id"] for m in call("GET", f"{server.url}/v1/motions").json["motions"]]
    eyes = server.engine.motion(made.json["id"])[:, :2]  # (25, 2 eyes, x y) in the video's pixels
    shift = eyes - eyes[0]
    expected = -step * np.arange(25)
    error = np.hypot(shift[..., 0] - expected[:, None], shift[..., 1]).max(axis=1)  # the window moves sideways only
    # The cascade detector (offline) misplaces an eye on the odd frame: nearly all must follow within 3 px.
    assert (error < 3).mean() >= 0.9, shift.round(1).tolist()

    session = call("POST", f"{server.url}/v1/sessions", json={"motion": made.json["id"]})
    assert session.status == 201, session.text
    assert session.json["params"]["motion"] == made.json["id"]
    call("DELETE", session.json["url"], headers=bearer(session.json["token"]))


def test_video_uploads_without_a_face_too_long_or_not_a_video_are_refused(server):
    grey = [np.full((128, 128, 3), 120, np.uint8)] * 5
    faceless = call("POST", f"{server.url}/v1/motions", data=_video(grey, container="matroska"))
    assert faceless.status == 400 and "no face found" in faceless.json["error"]["message"], faceless.text
    for container in ("mp4", "matroska"):  # MP4 declares its duration; Matroska's frames tell it as they come
        long = call("POST", f"{server.url}/v1/motions", data=_video(grey[:1] * 32, fps=1, container=container))
        assert long.status == 413 and "longer than 30 s" in long.json["error"]["message"], long.text
    text = call("POST", f"{server.url}/v1/motions", data=b"#EXTM3U\nhttp://example.com/a.ts\n")
    assert text.status == 400 and "or a video (MP4, MOV, WebM, MKV)" in text.json["error"]["message"], text.text
    # a form upload (curl -F motion=@clip.mkv) is read as the file it carries, not as a kps.pth
    form = aiohttp.FormData()
    form.add_field("motion", _video(grey, container="matroska"), filename="clip.mkv", content_type="video/x-matroska")
    multipart = call("POST", f"{server.url}/v1/motions", data=form)
    assert multipart.status == 400 and "no face found" in multipart.json["error"]["message"], multipart.text
    form = aiohttp.FormData()
    form.add_field("file", b"hello", filename="notes.txt", content_type="text/plain")
    other = call("POST", f"{server.url}/v1/motions", data=form)
    message = other.json["error"]["message"]
    assert other.status == 400 and "is not a kps.pth" in message and "weights_only" not in message, other.text
