"""Access and limits over real HTTP, websockets and WebRTC (tiny model, loopback): who can reach what, browser
origins, and each limit's clear error (SECURITY.md)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time

import aiohttp
import pytest
from kit.aiortc_viewer import connect_viewer, viewer_offer
from kit.http_calls import avatar_form, bearer, create_session, delete_session, http, ws_messages, ws_url
from kit.media_synth import image_bytes, png_bomb, voiced_pcm16, wav_bytes
from kit.served import call, server_fixture
from kit.waits import free_port, run, wait_for
from PIL import Image
from yarl import URL

from server.access import auth
from server.settings.config import ConfigError, IceServer, ServerConfig

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(120)]

KEYS = ["key-one-s3cret", "key-two-s3cret"]
ORIGIN = "https://app.example.com"


# Two API keys, 2 sessions per key, one allowed origin, small limits (tests change the ones read per use).
server = server_fixture(
    {
        "api_key": list(KEYS),
        "max_sessions": 6,
        "max_sessions_per_key": 2,
        "allowed_origin": [ORIGIN],
        "max_sdp_bytes": 8192,
        "max_upload_mb": 1,
        "max_image_pixels": 1_000_000,
        "max_ws_message_bytes": 4096,
        "max_buffer_s": 2.0,
        "max_viewers": 1,
        "ice_server": [IceServer(("turn:turn.example.org:3478",), "alice", "turn-pass")],
        "output_allow": ["127.0.0.1"],  # the metrics test's output goes to a closed local port
    }
)


@pytest.fixture
def limits(server):
    """Change a limit for one test (those read when used: durations, avatars)."""
    saved = dict(server.state.config.__dict__)
    yield server.state.config
    server.state.config.__dict__.update(saved)


KEY = {"X-API-Key": KEYS[0]}


# -- access ------------------------------------------------------------------------------------------------------
def test_ids_and_tokens_are_unguessable(server):
    async def main():
        async with http() as c:
            made = [await create_session(c, server.url, headers=KEY) for _ in range(2)]
            for s in made:
                await delete_session(c, s)
            return made

    a, b = run(main())
    for s in (a, b):
        assert re.fullmatch(r"s[0-9a-f]{20}", s["id"]), s["id"]  # 80 random bits from `secrets`
        assert len(s["token"]) >= 32  # 192 bits
    assert a["id"] != b["id"] and a["token"] != b["token"]


def _near_misses(secret: str) -> list[str]:
    """Wrong secrets a guesser would try: same length with one character changed (first, last), a prefix, the
    secret with something appended, another case."""
    flip = {c: "0" if c != "0" else "1" for c in secret}
    return [
        flip[secret[0]] + secret[1:],
        secret[:-1] + flip[secret[-1]],
        secret[:-1],
        secret + "0",
        secret.swapcase() if secret.swapcase() != secret else secret + "x",
    ]


def test_a_wrong_token_of_the_right_length_is_refused(server, monkeypatch):
    """Only the exact token opens the session; each near miss is 401. The comparison of the given token with the
    session's goes through hmac.compare_digest (timing is not testable, the call site is)."""
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))

    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            statuses = {}
            for token in [*_near_misses(s["token"]), s["token"]]:
                async with c.get(s["url"], headers=bearer(token)) as r:
                    statuses[token] = r.status
            await delete_session(c, s)
            return s, statuses

    s, statuses = run(main())
    assert statuses.pop(s["token"]) == 200
    assert len(statuses) == 5 and set(statuses.values()) == {401}, statuses
    same_length = _near_misses(s["token"])[1]
    assert (same_length.encode(), s["token"].encode()) in compared or (same_length, s["token"]) in compared


def test_the_api_key_is_required_where_configured(server):
    """Creating a session: no key, a near miss of a configured key, or a session token instead: 401; either
    configured key works."""

    async def main():
        async with http() as c:
            statuses = []
            for headers in [{}, *({"X-API-Key": k} for k in _near_misses(KEYS[0])), bearer(KEYS[0][:-1] + "x")]:
                async with c.post(f"{server.url}/v1/sessions", json={}, headers=headers) as r:
                    statuses.append(r.status)
            s = await create_session(c, server.url, headers=KEY)
            async with c.post(f"{server.url}/v1/sessions", json={}, headers=bearer(s["token"])) as r:
                statuses.append(r.status)
            await delete_session(c, s)
            ok = []
            for headers in ({"X-API-Key": KEYS[1]}, bearer(KEYS[0])):
                made = await create_session(c, server.url, headers=headers)
                ok.append(made["id"])
                await delete_session(c, made)
            return statuses, ok

    statuses, ok = run(main())
    assert statuses == [401] * len(statuses) and len(statuses) == 8, statuses
    assert len(ok) == 2


def test_one_sessions_token_cannot_reach_another(server):
    """Every session endpoint, HTTP and websocket, with another session's token: 401; unknown ids: 404."""

    async def main():
        async with http() as c:
            a = await create_session(c, server.url, headers=KEY)
            b = await create_session(c, server.url, headers={"X-API-Key": KEYS[1]})
            base = f"{server.url}/v1/sessions/{a['id']}"
            wrong = bearer(b["token"])
            requests = [
                ("GET", base, {}),
                ("DELETE", base, {}),
                ("POST", f"{base}/interrupt", {}),
                ("POST", f"{base}/offer", {"json": {"sdp": "v=0", "type": "offer"}}),
                ("POST", f"{base}/whep", {"data": "v=0", "headers": {"Content-Type": "application/sdp"}}),
                ("DELETE", f"{base}/whep/abc", {}),
                ("POST", f"{base}/speak", {"data": wav_bytes(0.2), "headers": {"Content-Type": "audio/wav"}}),
                ("POST", f"{base}/recording", {}),
                ("GET", f"{base}/recording", {}),
            ]
            statuses = {}
            for method, url, kw in requests:
                headers = {**kw.pop("headers", {}), **wrong}
                async with c.request(method, url, headers=headers, **kw) as r:
                    statuses[(method, url[len(base) :])] = r.status
                async with c.request(method, url, params={"token": b["token"]}, **kw) as r:
                    assert r.status == 401, (method, url)
            for path in ("ws", "frames"):
                for kw in ({"headers": wrong}, {"params": {"token": b["token"]}}, {}):
                    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                        await c.ws_connect(f"{base}/{path}", **kw)
                    assert err.value.status == 401
            unknown = f"{server.url}/v1/sessions/s{'0' * 20}"
            async with c.get(unknown, headers=bearer(a["token"])) as r:
                missing = r.status
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await c.ws_connect(f"{unknown}/ws", headers=bearer(a["token"]))
            assert err.value.status == 404
            # still there, and its own token works
            async with c.get(base, headers=bearer(a["token"])) as r:
                assert r.status == 200
            await delete_session(c, a)
            await delete_session(c, b)
            return statuses, missing

    statuses, missing = run(main())
    assert set(statuses.values()) == {401}, statuses
    assert missing == 404


def test_the_view_token_watches_and_does_nothing_else(server):
    """`view_url` (the OBS viewer page) carries the session's view-only token: the page loads, WHEP plays with it
    (offer, trickle PATCH, DELETE); every other session endpoint, HTTP and websocket, answers 403 `view_only`
    and the session goes on. The session's own token still watches too."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            view_url = URL(s["view_url"])
            view = view_url.query["token"]
            async with c.get(view_url) as r:
                page = r.status
            pc, counter, location = await connect_viewer(c, {**s, "token": view})
            await wait_for(lambda: counter.video >= 5, 20, "the view-only viewer playing")
            end = "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=end-of-candidates\r\n"
            trickle = {**bearer(view), "Content-Type": "application/trickle-ice-sdpfrag"}
            async with c.patch(f"{server.url}{location}", data=end, headers=trickle) as r:
                patched = r.status
            async with c.delete(f"{server.url}{location}", headers=bearer(view)) as r:
                left = r.status
            await counter.stop()
            await pc.close()
            base = s["url"]
            form = aiohttp.FormData()
            form.add_field("script", '{"items": [{"pause_s": 0.1}]}')
            requests = [
                ("GET", base, {}),
                ("PATCH", base, {"json": {"motion_amplitude": 0.5}}),
                ("POST", f"{base}/interrupt", {}),
                ("POST", f"{base}/offer", {"json": {"sdp": "v=0", "type": "offer"}}),
                ("POST", f"{base}/speak", {"data": wav_bytes(0.2), "headers": {"Content-Type": "audio/wav"}}),
                ("POST", f"{base}/outputs", {"json": {"url": "rtmp://127.0.0.1:9/live/key"}}),
                ("GET", f"{base}/outputs", {}),
                ("POST", f"{base}/script", {"data": form}),
                ("DELETE", f"{base}/script", {}),
                ("POST", f"{base}/recording", {}),
                ("GET", f"{base}/recording", {}),
                ("DELETE", base, {}),
            ]
            refused = {}
            for method, url, kw in requests:
                headers = {**kw.pop("headers", {}), **bearer(view)}
                async with c.request(method, url, headers=headers, **kw) as r:
                    refused[(method, url[len(base) :])] = (r.status, (await r.json())["error"]["code"])
            for path in ("ws", "frames"):
                for kw in ({"headers": bearer(view)}, {"params": {"token": view}}):
                    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                        await c.ws_connect(f"{base}/{path}", **kw)
                    refused[("WS", f"/{path} {list(kw)[0]}")] = (err.value.status, "view_only")
            async with c.get(base, headers=bearer(s["token"])) as r:
                alive = r.status
            pc, counter, _ = await connect_viewer(c, s)  # the full token watches too
            await wait_for(lambda: counter.video >= 5, 20, "the full token's viewer playing")
            await counter.stop()
            await pc.close()
            await delete_session(c, s)
            return view, s, page, patched, left, refused, alive

    view, s, page, patched, left, refused, alive = run(main())
    assert view and view != s["token"] and view == s["view_token"] and len(view) >= 32
    assert page == 200 and patched == 204 and left == 200
    assert set(refused.values()) == {(403, "view_only")}, refused
    assert alive == 200


def test_metrics_show_no_session_or_output_id(server):
    """/metrics needs no credential: with a session, a WHEP viewer and an output (to a closed port: it keeps
    reconnecting), no series names the session or the output; the output is counted by kind."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            pc, counter, _ = await connect_viewer(c, s)
            url = f"rtmp://127.0.0.1:{free_port()}/live/stream-key"
            async with c.post(f"{s['url']}/outputs", json={"url": url}, headers=bearer(s["token"])) as r:
                assert r.status == 201, await r.text()
                output = await r.json()
            async with c.get(f"{server.url}/metrics") as r:
                text = await r.text()
            await counter.stop()
            await pc.close()
            await delete_session(c, s)
            return s, output, text

    s, output, text = run(main())
    secrets = {"session id": s["id"], "output id": output["id"], "token": s["token"]}
    assert {name: text.count(value) for name, value in secrets.items()} == dict.fromkeys(secrets, 0)
    assert re.search(r'^vexpress_output_bitrate_bps\{kind="rtmp"\} ', text, re.MULTILINE), text
    assert re.search(r'^vexpress_outputs\{kind="rtmp",state="\w+"\} 1\.0$', text, re.MULTILINE), text


def test_several_api_keys_and_sessions_per_key(server):
    async def main():
        async with http() as c:
            one = [await create_session(c, server.url, headers=KEY) for _ in range(2)]
            async with c.post(f"{server.url}/v1/sessions", json={}, headers=KEY) as r:
                third = (r.status, await r.json(), r.headers.get("Retry-After"))
            other = await create_session(c, server.url, headers=bearer(KEYS[1]))  # the other key has its own quota
            async with c.post(f"{server.url}/v1/sessions", json={}, headers={"X-API-Key": "nope"}) as r:
                wrong_key = r.status
            await delete_session(c, one[0])
            again = await create_session(c, server.url, headers=KEY)  # a slot of this key is free again
            for s in (one[1], other, again):
                await delete_session(c, s)
            return third, wrong_key

    (status, body, retry), wrong_key = run(main())
    assert status == 429 and body["error"]["code"] == "session_quota" and int(retry) > 0, body
    assert "max_sessions_per_key" in body["error"]["message"]
    assert wrong_key == 401


def test_turn_credentials_only_for_key_holders(server):
    public = call("GET", f"{server.url}/v1/info").json["ice_servers"]
    assert public == [{"urls": ["turn:turn.example.org:3478"]}]
    private = call("GET", f"{server.url}/v1/info", headers=KEY).json["ice_servers"]
    assert private[0]["username"] == "alice" and private[0]["credential"] == "turn-pass"


def test_browser_origins(server):
    """Same origin and listed origins pass (with CORS headers, preflight answered); others get 403, websocket
    upgrades included; requests without Origin (curl, bots) are not affected."""
    url = f"{server.url}/v1/sessions"
    port = server.url.rsplit(":", 1)[1]
    own = f"http://127.0.0.1:{port}"
    allowed = call("POST", url, json={}, headers={**KEY, "Origin": ORIGIN})
    assert allowed.status == 201 and allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in allowed.headers["Vary"] and "Location" in allowed.headers["Access-Control-Expose-Headers"]
    session = allowed.json
    denied_key = call("POST", url, json={}, headers={"Origin": ORIGIN})  # errors carry CORS too: the page can read
    assert denied_key.status == 401 and denied_key.headers["Access-Control-Allow-Origin"] == ORIGIN
    preflight = call(
        "OPTIONS",
        url,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    same = call("GET", f"{server.url}/v1/info", headers={"Origin": own})
    assert same.status == 200 and same.headers["Access-Control-Allow-Origin"] == own
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}", ORIGIN + ".evil.example"):
        refused = call("POST", url, json={}, headers={**KEY, "Origin": origin})
        assert refused.status == 403 and refused.json["error"]["code"] == "origin_not_allowed", origin
        assert "Access-Control-Allow-Origin" not in refused.headers
        pre = call("OPTIONS", url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert pre.status == 403, origin
    # DNS rebinding: an evil name resolving to 127.0.0.1 makes Host and Origin agree; a loopback server refuses it
    rebound = call(
        "POST", url, json={}, headers={**KEY, "Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"}
    )
    assert rebound.status == 403
    plain = call("POST", url, data="{}", headers=KEY)  # no Origin: an API client, not a browser page
    assert plain.status == 201 and "Access-Control-Allow-Origin" not in plain.headers
    call("DELETE", plain.json["url"], headers=KEY)

    async def sockets():
        async with http() as c:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await c.ws_connect(ws_url(session), headers={"Origin": "https://evil.example"})
            assert err.value.status == 403
            ws = await c.ws_connect(ws_url(session), headers={"Origin": ORIGIN})
            first = await ws.receive_json(timeout=10)
            await ws.close()
            await delete_session(c, session)
            return first

    assert run(sockets())["type"] == "session.ready"
    for s in list(server.state.sessions):
        call("DELETE", f"{server.url}/v1/sessions/{s.id}", headers=KEY)


def test_tokens_never_reach_the_access_log(server, caplog):
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    session = call("POST", f"{server.url}/v1/sessions", json={}, headers=KEY).json
    # ?token= is taken only where a browser cannot set a header (websockets, the recording download)
    recording = call("GET", session["recording_url"], params={"token": session["token"]})
    assert recording.status not in (401, 403), recording.text  # accepted; there is just no recording yet
    call("DELETE", session["url"], headers={"Authorization": f"Bearer {session['token']}"})
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("token=<redacted>" in line for line in access), access
    assert not any(session["token"] in r.getMessage() for r in caplog.records)
    assert not any(k in r.getMessage() for r in caplog.records for k in KEYS)


def test_origin_and_key_settings():
    config = ServerConfig.from_env(
        {
            "VEXPRESS_ALLOWED_ORIGIN": "https://A.example/ http://b.example:8080",
            "VEXPRESS_API_KEY": "k1,k2",
            "VEXPRESS_IDLE_TIMEOUT_S": "0",
        }
    )
    assert config.allowed_origin == ["https://a.example", "http://b.example:8080"]
    assert config.api_key == ["k1", "k2"] and config.idle_timeout_s == 0
    for bad in (
        {"VEXPRESS_ALLOWED_ORIGIN": "https://a.example/path"},
        {"VEXPRESS_MAX_VIEWERS": "0"},
        {"VEXPRESS_MAX_SESSION_S": "-1"},
    ):
        with pytest.raises(ConfigError):
            ServerConfig.from_env(bad)


# -- limits -----------------------------------------------------------------------------------------------------
def test_upload_and_image_limits(server, inputs_dir):
    url = f"{server.url}/v1/avatars"
    too_big = call("POST", url, data=avatar_form(b"\0" * ((1 << 20) + 1)), headers=KEY)
    assert too_big.status == 413 and too_big.json["error"]["code"] == "payload_too_large"
    wide = image_bytes(Image.new("RGB", (2000, 1000), (90, 80, 70)), "PNG")  # 2 MP, a few KiB compressed
    assert len(wide) < 1 << 20
    pixels = call("POST", url, data=avatar_form(wide), headers=KEY)
    assert pixels.status == 413 and pixels.json["error"]["code"] == "image_too_large"
    assert "max_image_pixels" in pixels.json["error"]["message"]
    for w, h in ((100_000, 100_000), (2**31 - 1, 1)):  # a bomb: refused from its header, nothing decoded
        bomb = call("POST", url, data=avatar_form(png_bomb(w, h)), headers=KEY)
        assert bomb.status == 413, bomb.text
    tiff = image_bytes(Image.open(inputs_dir / "reference.png").convert("RGB"), "TIFF")
    assert call("POST", url, data=avatar_form(tiff), headers=KEY).status == 400  # decoders we do not expose


def test_avatar_count_limit(server, limits, inputs_dir):
    limits.max_avatars = len(server.engine.avatars())
    png = (inputs_dir / "reference.png").read_bytes()
    full = call("POST", f"{server.url}/v1/avatars", data=avatar_form(png), headers=KEY)
    assert full.status == 409 and full.json["error"]["code"] == "avatar_limit", full.text


def test_json_and_sdp_limits(server):
    session = call("POST", f"{server.url}/v1/sessions", json={}, headers=KEY).json
    auth_ = bearer(session["token"])
    sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n" + "a=x-pad:" + "x" * 9000 + "\r\n"
    offer = call("POST", f"{session['url']}/offer", json={"sdp": sdp, "type": "offer"}, headers=auth_)
    assert offer.status == 413 and offer.json["error"]["code"] == "sdp_too_large"
    whep = call("POST", session["whep_url"], data=sdp, headers={**auth_, "Content-Type": "application/sdp"})
    assert whep.status == 413 and whep.json["error"]["code"] == "sdp_too_large"
    legacy = call("POST", f"{server.url}/offer", json={"sdp": sdp, "type": "offer"}, headers=KEY)
    assert legacy.status == 413
    huge = call("POST", f"{server.url}/v1/sessions", data="{" + " " * 100_000 + "}", headers=KEY)
    assert huge.status == 413 and huge.json["error"]["code"] == "payload_too_large"
    not_utf8 = call("POST", f"{server.url}/v1/sessions", data=b'{"fps": "\xff"}', headers=KEY)
    assert not_utf8.status == 400 and not_utf8.json["error"]["code"] == "invalid_json"
    deep = call("POST", f"{server.url}/v1/sessions", data="[" * 5000 + "]" * 5000, headers=KEY)
    assert deep.status == 400
    call("DELETE", session["url"], headers=auth_)


@pytest.mark.parametrize(
    "audio, message",
    [
        ({"sample_rate": 4000}, "sample rate"),
        ({"sample_rate": 400_000}, "sample rate"),
        ({"channels": 9}, "channel"),
        ({"channels": 0}, "channel"),
    ],
)
def test_audio_format_limits(server, audio, message):
    reply = call("POST", f"{server.url}/v1/sessions", json={"audio": audio}, headers=KEY)
    assert reply.status == 400 and message in reply.json["error"]["message"], reply.text


def test_pushed_audio_buffer_and_websocket_message_limits(server):
    """--max_buffer_s 2: a bot pushing 3 s at once gets `buffer_full`; a speak file longer than the buffer is
    refused; a websocket message over --max_ws_message_bytes gets `message_too_large`; the session goes on."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            ws = await c.ws_connect(ws_url(s))
            await ws.receive_json(timeout=10)  # session.ready
            await ws.send_bytes(voiced_pcm16(0.1))  # fine
            await ws.send_bytes(b"\0" * 5000)  # over 4096 bytes
            for _ in range(40):  # 0.1 s each: 4 s, past the 2 s buffer
                await ws.send_bytes(voiced_pcm16(0.1))
            await ws.send_str('{"type": "ping", "id": 7}')
            got = await ws_messages(ws, 3.0)
            headers = {**bearer(s["token"]), "Content-Type": "audio/wav"}
            async with c.post(s["speak_url"], data=wav_bytes(3.0), headers=headers) as r:
                speak = (r.status, await r.json())
            await ws.close()
            await delete_session(c, s)
            return got, speak

    got, (speak_status, speak_body) = run(main())
    codes = [m.get("code") for m in got if isinstance(m, dict) and m.get("type") == "error"]
    assert "message_too_large" in codes and "buffer_full" in codes, got
    assert any(isinstance(m, dict) and m.get("type") == "pong" for m in got), "the socket stays usable"
    assert speak_status in (409, 413) and speak_body["error"]["code"] in ("buffer_full", "payload_too_large")


def test_viewers_per_session(server):
    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            pc, counter, _ = await connect_viewer(c, s)
            second, sdp = await viewer_offer()
            headers = {**bearer(s["token"]), "Content-Type": "application/sdp"}
            async with c.post(s["whep_url"], data=sdp, headers=headers) as r:
                refused = (r.status, await r.json())
            await second.close()
            await counter.stop()
            await pc.close()
            await delete_session(c, s)
            return refused

    status, body = run(main())
    assert status == 429 and body["error"]["code"] == "viewer_limit"


def test_session_max_duration_and_idle_timeout(server, limits):
    """A session past --max_session_s, and one with no input for --idle_timeout_s, end with an `error` event on
    their websocket, which then closes; a session that keeps pushing audio outlives the idle timeout."""

    async def main():
        async with http() as c:
            limits.max_session_s, limits.idle_timeout_s = 2.0, 0.0
            timed = await create_session(c, server.url, headers=KEY)
            ws = await c.ws_connect(ws_url(timed))
            expired = await ws_messages(ws, 8.0)
            limits.max_session_s, limits.idle_timeout_s = 0.0, 1.5
            idle = await create_session(c, server.url, headers=KEY)
            busy = await create_session(c, server.url, headers=bearer(KEYS[1]))
            ws_idle = await c.ws_connect(ws_url(idle))
            ws_busy = await c.ws_connect(ws_url(busy))
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                await ws_busy.send_bytes(voiced_pcm16(0.02))
                await asyncio.sleep(0.1)
            went_idle = await ws_messages(ws_idle, 5.0)
            alive = server.state.sessions.get(busy["id"]) is not None
            await ws_busy.close()
            await delete_session(c, busy)
            return timed, expired, idle, went_idle, alive

    timed, expired, idle, went_idle, alive = run(main())
    for session, messages, code in ((timed, expired, "max_duration"), (idle, went_idle, "idle_timeout")):
        errors = [m for m in messages if isinstance(m, dict) and m.get("type") == "error"]
        assert errors and errors[0]["code"] == code, messages
        assert messages[-1] == aiohttp.WSMsgType.CLOSE or messages[-1] == aiohttp.WSMsgType.CLOSED, messages
        assert server.state.sessions.get(session["id"]) is None
        assert server.engine.get_session(session["id"]) is None
    assert alive, "a session receiving audio is not idle"


def test_engine_session_ending_on_its_own_ends_the_served_session(server):
    """The engine ends a session (e.g. the worker failed it): the server releases its peers, pump and tasks."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url, headers=KEY)
            served = server.state.sessions.get(s["id"])
            pc, counter, _ = await connect_viewer(c, s)
            await wait_for(lambda: counter.video > 5, 15, "the viewer playing")
            served.engine_session.fail("model_error", "simulated")  # what the worker does (any thread)
            await wait_for(lambda: served.closed and not served.peers, 5, "the failed session closed, its peers gone")
            await counter.stop()
            await pc.close()
            return served

    served = run(main())
    assert server.state.sessions.get(served.id) is None
    assert served.pump._task is None or served.pump._task.done()
    assert not served._tasks


def test_idle_for_counts_requests_and_audio(server):
    session = call("POST", f"{server.url}/v1/sessions", json={}, headers=KEY).json
    served = server.state.sessions.get(session["id"])
    served.last_activity -= 100
    served.engine_session.last_input -= 100
    assert served.idle_for() > 99
    call("GET", session["url"], headers=bearer(session["token"]))
    assert served.idle_for() < 5
    call("DELETE", session["url"], headers=bearer(session["token"]))
