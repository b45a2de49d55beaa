"""The HTTP API over real HTTP: avatars, sessions, auth, capacity, metrics, info, errors (tiny model, CPU)."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
from kit.served import call, server_fixture

from streaming.params import GenerationParams, field_error
from vexpress_rt.errors import InputError

pytestmark = pytest.mark.fixtures


server = server_fixture()


def _create(srv, body=None, **kw):
    return call("POST", f"{srv.url}/v1/sessions", json=body if body is not None else {}, **kw)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_health_ready_info_page(server):
    assert call("GET", f"{server.url}/healthz").json == {"status": "ok"}
    ready = call("GET", f"{server.url}/readyz")
    assert ready.status == 200 and ready.json["status"] == "ready"
    info = call("GET", f"{server.url}/v1/info").json
    assert (info["width"], info["height"], info["fps"], info["steps"]) == (128, 64, 25, 2)
    assert info["codecs"] == {"video": ["VP8", "H264"], "audio": ["opus"]}
    # the model's crop, and the presenter framing options a session may ask for (docs/framing.md)
    assert info["crop"] == {"width": 128, "height": 64}
    assert {"crop", "portrait"} <= set(info["framing"]["framings"]) and "transparent" in info["framing"]["backgrounds"]
    assert info["ice_servers"] == [] and info["version"]
    default = [a for a in info["avatars"] if a["default"]]
    assert len(default) == 1 and default[0]["id"] == info["default_avatar_id"]
    page = call("GET", f"{server.url}/")
    assert page.status == 200 and "<html" in page.text.lower()
    assert call("GET", f"{server.url}/app.js").status == 200
    for path in ("/nope.js", "/%2e%2e/pyproject.toml", "/v1/nope"):
        missing = call("GET", f"{server.url}{path}")
        assert missing.status == 404 and missing.json["error"]["code"] == "not_found", path


def test_the_server_under_test_runs_on_uvloop(server):
    """Production serves on uvloop (server/cli.py): the tests exercise the same loop, not asyncio's default."""
    import asyncio

    import uvloop

    async def running_loop():
        return asyncio.get_running_loop()

    assert isinstance(server.call(running_loop()), uvloop.Loop)


def test_avatar_upload_get_delete(server, inputs_dir):
    image = (inputs_dir / "reference.png").read_bytes()
    form = aiohttp.FormData()
    form.add_field("image", image, filename="ref.png", content_type="image/png")
    form.add_field("kps", json.dumps({"kps": [[52.6, 25.0], [73.8, 24.8], [63.2, 30.7]]}))
    form.add_field("name", "fixture")
    made = call("POST", f"{server.url}/v1/avatars", data=form)
    assert made.status == 201, made.text
    avatar = made.json
    assert avatar["name"] == "fixture" and (avatar["width"], avatar["height"]) == (128, 64)
    assert made.headers["Location"] == f"/v1/avatars/{avatar['id']}"
    got = call("GET", f"{server.url}/v1/avatars/{avatar['id']}")
    assert got.status == 200 and got.json["id"] == avatar["id"]
    assert avatar["id"] in [a["id"] for a in call("GET", f"{server.url}/v1/avatars").json["avatars"]]
    # a session on it, then the avatar goes
    session = _create(server, {"avatar_id": avatar["id"]})
    assert session.status == 201 and session.json["avatar_id"] == avatar["id"]
    call("DELETE", f"{server.url}/v1/sessions/{session.json['id']}", headers=_bearer(session.json["token"]))
    assert call("DELETE", f"{server.url}/v1/avatars/{avatar['id']}").status == 204
    assert call("GET", f"{server.url}/v1/avatars/{avatar['id']}").status == 404
    assert call("DELETE", f"{server.url}/v1/avatars/{avatar['id']}").status == 404
    default_id = call("GET", f"{server.url}/v1/info").json["default_avatar_id"]
    assert call("DELETE", f"{server.url}/v1/avatars/{default_id}").status == 409


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"image": b"\x89PNG\r\n\x1a\n not really a png"}, "image"),
        ({"name": b"no image"}, "image"),
        ({"image": None, "kps": b"[[1, 2]]"}, "kps"),
        ({"image": None, "kps": b"{not json"}, "kps"),
    ],
)
def test_avatar_upload_bad_input_is_400(server, inputs_dir, fields, message):
    form = aiohttp.FormData()
    for name, value in fields.items():
        value = (inputs_dir / "reference.png").read_bytes() if value is None else value
        form.add_field(name, value, filename=f"{name}.bin")
    reply = call("POST", f"{server.url}/v1/avatars", data=form)
    assert reply.status == 400, reply.text
    assert message in reply.json["error"]["message"]


def test_avatar_upload_needs_multipart_and_a_size_limit(server):
    reply = call("POST", f"{server.url}/v1/avatars", json={"image": "x"})
    assert reply.status == 415 and reply.json["error"]["code"] == "unsupported_media_type"
    form = aiohttp.FormData()
    form.add_field("image", b"\0" * (21 * 2**20), filename="huge.png")
    too_big = call("POST", f"{server.url}/v1/avatars", data=form)
    assert too_big.status == 413 and too_big.json["error"]["code"] == "payload_too_large"


def test_session_lifecycle_and_tokens(server, tiny_engine):
    a, b = _create(server), _create(server, {"fps": 25, "steps": 2, "audio": {"sample_rate": 24000, "channels": 1}})
    assert a.status == 201 and b.status == 201, (a.text, b.text)
    body = a.json
    for key in ("id", "token", "offer_url", "ws_url", "whep_url"):
        assert body[key], key
    assert body["offer_url"].endswith(f"/v1/sessions/{body['id']}/offer") and body["ws_url"].startswith("ws://")
    assert b.json["steps"] == 2 and tiny_engine.get_session(b.json["id"]).config.input_sample_rate == 24000
    url = f"{server.url}/v1/sessions/{body['id']}"
    assert call("GET", url, headers=_bearer(body["token"])).status == 200
    assert call("GET", url, params={"token": body["token"]}).status == 401  # ?token= only on websockets, media
    for headers, params in (({}, {}), (_bearer("wrong"), {}), (_bearer(b.json["token"]), {}), ({}, {"token": "x"})):
        refused = call("GET", url, headers=headers, params=params)
        assert refused.status == 401 and refused.json["error"]["code"] == "unauthorized", (headers, params)
        assert "Bearer" in refused.headers["WWW-Authenticate"]
    assert call("POST", f"{url}/interrupt", headers=_bearer(b.json["token"])).status == 401
    interrupted = call("POST", f"{url}/interrupt", headers=_bearer(body["token"]))
    assert interrupted.status == 200 and interrupted.json["state"] == "idle"
    assert call("DELETE", url, headers=_bearer(body["token"])).status == 204
    assert call("GET", url, headers=_bearer(body["token"])).status == 404
    assert tiny_engine.get_session(body["id"]) is None  # the engine session is closed too
    call("DELETE", f"{server.url}/v1/sessions/{b.json['id']}", headers=_bearer(b.json["token"]))


def _schedule(srv, created) -> tuple:
    """(strategy, steps, new_frames, lookahead_s) of a created session, as GET /v1/sessions/{id} shows it."""
    assert created.status == 201, created.text
    shown = call("GET", created.json["url"], headers=_bearer(created.json["token"])).json
    call("DELETE", created.json["url"], headers=_bearer(created.json["token"]))
    params = shown["params"]
    return params["strategy"], params["steps"], params["new_frames"], shown["lookahead_s"]


def test_a_session_gets_the_shipped_schedule_or_the_low_latency_preset(server, tiny_engine):
    """The schedules measured on the simulated H100 (docs/streaming.md): by default staggered windows of 2 steps x
    4 new frames with no lookahead; `"preset": "low_latency"` 1 step x 2 new frames; a field named beside a preset
    wins over it, as over a style. The engine session runs what GET shows (its audio features' lookahead too)."""
    assert "low_latency" in call("GET", f"{server.url}/v1/info").json["presets"]
    assert 'id="preset"' in call("GET", f"{server.url}/").text  # the page's schedule picker (web_client/app.js)
    assert _schedule(server, _create(server)) == ("staggered", 2, 4, 0.0)
    assert _schedule(server, _create(server, {"preset": "default"})) == ("staggered", 2, 4, 0.0)
    low = _create(server, {"preset": "low_latency"})
    assert tiny_engine.get_session(low.json["id"]).config.lookahead_s == 0.0
    assert _schedule(server, low) == ("staggered", 1, 2, 0.0)
    both = _create(server, {"preset": "low_latency", "new_frames": 3, "style": "calm"})
    assert _schedule(server, both) == ("staggered", 1, 3, 0.0)


@pytest.mark.parametrize("preset", ["fast", 1, ""])
def test_an_unknown_preset_is_400_with_the_choices(server, preset):
    reply = _create(server, {"preset": preset})
    assert reply.status == 400, reply.text
    assert reply.json["error"]["message"].startswith("preset must be one of default, low_latency, got ")


def test_a_preset_cannot_change_during_a_session(server):
    """It fixes the denoiser's shapes: PATCH says to choose it when opening the session, and changes nothing."""
    created = _create(server).json
    reply = call("PATCH", created["url"], json={"preset": "low_latency"}, headers=_bearer(created["token"]))
    assert reply.status == 400 and "chosen when the session opens" in reply.json["error"]["message"]
    shown = call("GET", created["url"], headers=_bearer(created["token"])).json
    assert (shown["params"]["steps"], shown["control_version"]) == (2, 0)
    call("DELETE", created["url"], headers=_bearer(created["token"]))


@pytest.mark.parametrize(
    "body, status",
    [
        ({"avatar_id": "nope"}, 404),
        ({"fps": "25"}, 400),
        ({"fps": 7}, 400),  # 48 kHz / 7 is not whole samples per frame
        ({"steps": 0}, 400),
        ({"colour": "blue"}, 400),
        ({"audio": {"sample_rate": 100}}, 400),
        ({"audio_attention_weight": True}, 400),
        ([1, 2], 400),
    ],
)
def test_session_bad_input(server, body, status):
    reply = _create(server, body)
    assert reply.status == status, reply.text
    assert reply.json["error"]["message"]


def test_session_framing_and_background_travel_from_the_request(server):
    """`framing` and `background` in POST /v1/sessions reach the session: a 1280x720 cut-out session reports the
    frame size it streams; bad values are 400 with the option's own message."""
    made = _create(server, {"framing": "1280x720", "background": "#00b140"})
    assert made.status == 201, made.text
    assert (made.json["width"], made.json["height"]) == (1280, 720)
    call("DELETE", f"{server.url}/v1/sessions/{made.json['id']}", headers=_bearer(made.json["token"]))
    for body, words in (
        ({"framing": "1281x720"}, "even"),
        ({"framing": 720}, "framing must be a string"),
        ({"background": "green"}, "#rrggbb"),
    ):
        reply = _create(server, body)
        assert reply.status == 400 and words in reply.json["error"]["message"], reply.text


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", True),  # a boolean is not an integer
        ("steps", 9),
        ("steps", 2.0),
        ("guidance_scale", 0.5),
        ("guidance_scale", "2"),
        ("guidance_scale", float("inf")),  # JSON's Infinity
        ("reference_attention_weight", True),
        ("audio_attention_weight", 10.5),
        ("audio_attention_weight", float("nan")),
        ("strategy", "zigzag"),
        ("new_frames", 0),
        ("context_frames", -1),
        ("seed", -1),
    ],
)
def test_generation_params_are_refused_with_their_fields_message(server, field, value):
    """Each generation field has one message, the same from the API, `serve`'s flags and GenerationParams."""
    reply = _create(server, {field: value})
    assert reply.status == 400, reply.text
    assert reply.json["error"]["message"] == field_error(field, value)
    with pytest.raises(InputError) as refused:
        GenerationParams(**{field: value})
    assert str(refused.value) == reply.json["error"]["message"]


def test_info_serves_the_generation_limits(server):
    """The page takes its ranges and defaults from here (web_client/app.js), as the API checks them."""
    generation = call("GET", f"{server.url}/v1/info").json["generation"]
    assert generation == GenerationParams().limits()
    assert generation["steps"] == {"default": 2, "type": "integer", "min": 1, "max": 8}
    assert generation["strategy"]["choices"] == ["chunked", "staggered"]
    page = call("GET", f"{server.url}/app.js").text + call("GET", f"{server.url}/").text
    assert "generation" in page and 'max="50"' not in page


def test_expression_strength_travels_from_the_request_to_the_attention(server, tiny_engine, monkeypatch):
    """`audio_attention_weight` from `POST /v1/sessions` to the UNet's attention: the session holds the very
    GenerationParams the engine would be called with, and the worker's batched UNet call scales the audio
    attention of that session's rows by it (one value per row, whoever else is in the batch)."""
    import numpy as np
    import torch

    from vexpress_rt.models import unet as unet_module

    seen: list[list[float]] = []
    weighted = unet_module._weighted

    def spy(weight, out):
        if isinstance(weight, torch.Tensor):
            seen.append(sorted(set(weight.flatten().tolist())))
        return weighted(weight, out)

    monkeypatch.setattr(unet_module, "_weighted", spy)
    reply = _create(server, {"audio_attention_weight": 1.25, "reference_attention_weight": 0.5, "steps": 2})
    assert reply.status == 201, reply.text
    session = tiny_engine.get_session(reply.json["id"])
    expected = GenerationParams(steps=2, audio_attention_weight=1.25, reference_attention_weight=0.5)
    assert session.config.params == expected
    assert reply.json["params"] == session.config.params.to_dict()
    session.push_audio(np.zeros(3200, np.int16))
    session.end_utterance()
    deadline = time.monotonic() + 60
    while not any(1.25 in row for row in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(1.25 in row for row in seen) and any(0.5 in row for row in seen), seen[:4]
    call("DELETE", reply.json["url"], headers=_bearer(reply.json["token"]))


def test_malformed_json_and_sdp_are_400(server):
    assert call("POST", f"{server.url}/v1/sessions", data="{bad").json["error"]["code"] == "invalid_json"
    session = _create(server).json
    auth = _bearer(session["token"])
    offer_url = f"{server.url}/v1/sessions/{session['id']}/offer"
    garbage = [
        "{not json",
        json.dumps({"sdp": 42, "type": "offer"}),
        json.dumps({"sdp": "hello", "type": "offer"}),
        json.dumps({"sdp": "v=0\r\nm=video\r\n", "type": "offer"}),
        json.dumps({"sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"}),
        json.dumps({"sdp": "v=0\r\nm=video", "type": "answer"}),
    ]
    for text in garbage:
        reply = call("POST", offer_url, data=text, headers=auth)
        assert reply.status == 400, (text, reply.status, reply.text)
    whep = f"{server.url}/v1/sessions/{session['id']}/whep"
    wrong_type = call("POST", whep, data="v=0", headers={**auth, "Content-Type": "text/plain"})
    assert wrong_type.status == 415
    bad_sdp = call("POST", whep, data="v=0\r\nm=video x\r\n", headers={**auth, "Content-Type": "application/sdp"})
    assert bad_sdp.status == 400
    assert call("POST", f"{server.url}/offer", data=json.dumps({"sdp": "nope", "type": "offer"})).status == 400
    state = server.state.sessions.get(session["id"])
    assert state is not None and state.peers == {}  # failed offers leave nothing behind
    assert call("DELETE", f"{server.url}/v1/sessions/{session['id']}/whep/xyz", headers=auth).status == 404
    call("DELETE", f"{server.url}/v1/sessions/{session['id']}", headers=auth)


def test_metrics(server):
    session = _create(server).json
    reply = call("GET", f"{server.url}/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for series in (
        "vexpress_sessions ",
        "vexpress_sessions_max 4",
        "vexpress_fps ",
        'vexpress_latency_ms{quantile="0.95"}',
        'vexpress_queue_depth{stat="max"}',
        'vexpress_dropped_frames_total{stage="track_queue"}',
        'vexpress_dropped_frames_total{stage="engine"}',
        "vexpress_frames_sent_total",
        "# TYPE vexpress_sessions_created_total counter",
        "vexpress_audio_to_frame_seconds_bucket",  # histograms: percentiles across servers
        "vexpress_engine_compute_seconds_count",
        "vexpress_engine_turn_seconds_bucket",
        "vexpress_track_queue_depth_frames_bucket",
        "vexpress_process_resident_memory_bytes",
        "vexpress_process_open_fds",
    ):
        assert series in reply.text, series
    sessions = next(line for line in reply.text.splitlines() if line.startswith("vexpress_sessions "))
    assert float(sessions.split()[1]) >= 1
    call("DELETE", f"{server.url}/v1/sessions/{session['id']}", headers=_bearer(session["token"]))


def test_capacity_readyz_and_retry_after(tiny_engine, serve):
    srv = serve(max_sessions=1)
    first = _create(srv)
    assert first.status == 201
    ready = call("GET", f"{srv.url}/readyz")
    assert ready.status == 503 and int(ready.headers["Retry-After"]) > 0 and ready.json["status"] == "full"
    second = _create(srv)
    assert second.status == 503 and int(second.headers["Retry-After"]) > 0
    assert second.json["error"]["code"] == "capacity"
    assert call("POST", f"{srv.url}/offer", json={"sdp": "v=0\r\nm=video 9 x\r\n", "type": "offer"}).status == 503
    call("DELETE", f"{srv.url}/v1/sessions/{first.json['id']}", headers=_bearer(first.json["token"]))
    assert call("GET", f"{srv.url}/readyz").status == 200
    assert _create(srv).status == 201  # left open: the shutdown closes it
    open_ids = [s.id for s in srv.state.sessions]
    srv.stop()
    assert open_ids and all(tiny_engine.get_session(sid) is None for sid in open_ids)


def test_api_key(serve):
    srv = serve(api_key="s3cret")
    assert call("GET", f"{srv.url}/healthz").status == 200
    assert call("GET", f"{srv.url}/v1/info").json["auth"] == {"api_key": True}
    for headers in ({}, {"X-API-Key": "wrong"}, _bearer("wrong")):
        refused = _create(srv, headers=headers)
        assert refused.status == 401, headers
    assert call("GET", f"{srv.url}/v1/avatars").status == 401
    assert _create(srv, params={"token": "s3cret"}).status == 401  # the key only travels in headers
    made = _create(srv, headers={"X-API-Key": "s3cret"})
    assert made.status == 201
    other = _create(srv, headers=_bearer("s3cret")).json
    url = f"{srv.url}/v1/sessions/{made.json['id']}"
    assert call("GET", url, headers=_bearer(made.json["token"])).status == 200  # its token
    assert call("GET", url, headers={"X-API-Key": "s3cret"}).status == 200  # or the key
    assert call("GET", url, headers=_bearer(other["token"])).status == 401  # not another session's token


def test_session_nobody_connects_to_is_closed(tiny_engine, serve):
    srv = serve(connect_timeout_s=0.3)
    session = _create(srv).json
    deadline = time.monotonic() + 10
    while srv.state.sessions.get(session["id"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.state.sessions.get(session["id"]) is None
    assert tiny_engine.get_session(session["id"]) is None
