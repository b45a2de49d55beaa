"""Cleanup and soak (tiny model, loopback): 200 sessions opened and closed through the HTTP API, some with a WebRTC
viewer, a bot websocket or a frames websocket, leave no tasks, file descriptors, threads or memory behind; and a
short run of the soak command reports its figures. `pytest -s` prints them."""

from __future__ import annotations

import asyncio
import gc
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from kit.aiortc_viewer import connect_viewer
from kit.http_calls import bearer, create_session, delete_session, http, ws_messages, ws_url
from kit.media_synth import voiced_pcm16
from kit.served import make_config, server_fixture
from kit.waits import run, wait_for
from PIL import Image

from server import metrics
from server.commands import soak as soak_module
from server.commands.soak import load_speech, run_soak
from server.session import lifetime
from server.settings.config import DEFAULT_AVATAR
from server.websockets.sockets import OPEN_SOCKETS
from streaming import engine as engine_module

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(240)]

WARMUP, SESSIONS, AT_ONCE = 20, 200, 4


server = server_fixture({"max_sessions": 8})


def _figures(server) -> dict:
    async def tasks():
        return metrics.loop_tasks()

    gc.collect()
    process = metrics.process_figures()
    return {
        "tasks": server.call(tasks()),
        "fds": process["process_open_fds"],
        "rss_mb": round(process["process_resident_memory_bytes"] / 2**20, 1),
        "threads": threading.active_count(),
    }


async def _one(c, server, i: int) -> str:
    """One session's life; every 10th has a WebRTC viewer, a bot websocket or a frames websocket."""
    s = await create_session(c, server.url)
    kind = ("webrtc", "plain", "plain", "frames", "plain", "bot", "plain", "plain", "plain", "plain")[i % 10]
    try:
        if kind == "webrtc":
            pc, seen, _ = await connect_viewer(c, s)
            await wait_for(lambda: seen.video >= 3, 20, "frames for the WebRTC viewer")
            await seen.stop()
            await pc.close()
        elif kind == "bot":
            ws = await c.ws_connect(ws_url(s))
            await ws.send_bytes(voiced_pcm16(0.2))
            await ws.send_str('{"type": "ping"}')
            assert (await ws_messages(ws, 10, until=lambda m: m.get("type") == "pong"))[-1]["type"] == "pong"
            await ws.close()
        elif kind == "frames":
            ws = await c.ws_connect(ws_url(s, "frames"))
            await ws_messages(ws, 10, until=lambda m: isinstance(m, bytes))
            await ws.close()
        else:
            async with c.get(s["url"], headers=bearer(s["token"])) as r:
                assert r.status == 200
    finally:
        assert await delete_session(c, s) in (204, 404)  # 404: it ended with its publisher
    return kind


def test_200_sessions_leave_nothing_behind(server, tiny_engine):
    async def cycles(start: int, count: int, c) -> list[str]:
        kinds = []
        for i in range(start, start + count, AT_ONCE):
            kinds += await asyncio.gather(*(_one(c, server, j) for j in range(i, min(i + AT_ONCE, start + count))))
        return kinds

    async def main():
        async with http() as c:
            await cycles(0, WARMUP, c)
            await wait_for(lambda: not len(server.state.sessions), 10, "the warm-up sessions closed")
            base = await asyncio.to_thread(_figures, server)
            kinds = await cycles(WARMUP, SESSIONS, c)
            await wait_for(
                lambda: not len(server.state.sessions) and not tiny_engine.sessions(), 15, "every session closed"
            )
            await asyncio.sleep(1.0)
            return base, await asyncio.to_thread(_figures, server), kinds

    base, end, kinds = run(main(), 200)
    served = {k: kinds.count(k) for k in set(kinds)}
    print(f"\n{SESSIONS} sessions {served}: after warm-up {base}, at the end {end}")
    assert len(server.state.sessions) == 0 and not tiny_engine.sessions()
    assert not server.app[OPEN_SOCKETS] and not lifetime.closes_pending()
    assert len(tiny_engine._denoisers) <= engine_module.MAX_DENOISERS
    assert end["tasks"] <= base["tasks"] + 5, (base, end)
    assert end["fds"] <= base["fds"] + 5, (base, end)
    assert end["threads"] <= base["threads"] + 3, (base, end)
    assert end["rss_mb"] <= base["rss_mb"] + 50, (base, end)


def _unseen_portrait(folder: Path) -> Path:
    """The packaged portrait with one pixel changed, and its key points: a portrait the engine has not encoded, so
    the server starts unready (/readyz: starting) while it registers."""
    image = np.array(Image.open(DEFAULT_AVATAR).convert("RGB"))
    image[0, 0] = 255 - image[0, 0]
    path = folder / "portrait.png"
    Image.fromarray(image).save(path)
    shutil.copy(Path(DEFAULT_AVATAR).with_suffix(".json"), path.with_suffix(".json"))
    return path


def test_soak_command_reports_its_figures(tiny_engine, tmp_path):
    """`vexpress-rt soak` in short: 2 clients (a WebRTC publisher and a bot), 24 s, sessions of 10 s."""
    avatar = str(_unseen_portrait(tmp_path))
    config = make_config(port=0, fps=10, steps=2, max_sessions=4, admission=False, avatar=avatar).validate()
    report = run_soak(
        tiny_engine,
        config,
        sessions=2,
        seconds=24,
        session_s=10,
        client="mixed",
        speech=load_speech(None),
        timeline_every_s=5,
    )
    timeline = report.pop("timeline")
    print(f"\nsoak: {report}")
    start, end = report["process"]["start"], report["process"]["end"]
    # No 503 at the start: the server started unready (its default portrait registers in the background), the soak
    # waited for /readyz (at least one poll said "starting"), and only then did the clients start
    assert report["ready_s"] >= soak_module.READY_POLL_S and not report["client_events"], report
    assert report["sessions_served"] >= 4, report
    assert report["frames_received"] > 100 and report["engine"]["worker_errors"] == 0  # during the run
    latency = report["latency_ms"]
    assert latency["first_p95"] and latency["last_p95"] and latency["p95_by_window"]
    assert end["sessions_open"] == 0 and end["engine_sessions"] == 0
    assert end["tasks"] <= start["tasks"] + 2 and end["open_fds"] <= start["open_fds"] + 5, (start, end)
    assert len(timeline) >= 4 and max(p["sessions_open"] for p in timeline) >= 1


def test_soak_stops_when_the_server_cannot_become_ready(tiny_engine, tmp_path):
    """/readyz says `failed` (a default portrait that is no picture): the soak says why instead of counting 503s."""
    bad = tmp_path / "portrait.png"
    bad.write_bytes(b"not a picture")
    config = make_config(avatar=str(bad), admission=False).validate()
    with pytest.raises(RuntimeError, match="could not start: the default portrait portrait.png"):
        run_soak(
            tiny_engine,
            config,
            sessions=1,
            seconds=5,
            session_s=0,
            client="ws",
            speech=load_speech(None),
            ready_timeout_s=60,
        )


def test_client_chosen_settings_do_not_grow_the_engine(server, tiny_engine):
    """Every distinct window shape (steps, strategy, new/context frames) a client asks for makes a denoiser (the
    attention weights and guidance scale do not: they are per row); the engine keeps at most MAX_DENOISERS of
    them (those of open sessions first), however many clients ask."""

    async def main() -> set:
        built = set()  # the window shapes whose denoiser was made while their session ran
        async with http() as c:
            for i in range(2 * engine_module.MAX_DENOISERS + 4):
                shape = {"strategy": "chunked", "context_frames": i % 16, "new_frames": 1 + i // 16}
                s = await create_session(c, server.url, {**shape, "audio_attention_weight": 1.0 + i / 100})
                session = tiny_engine.get_session(s["id"])
                await wait_for(lambda es=session: es.stream is not None, 5, f"session {i} ({shape}) running")
                if session.denoiser_settings in tiny_engine._denoisers:
                    built.add(session.denoiser_settings)
                await delete_session(c, s)
        return built

    built = run(main(), 60)
    assert len(built) == 2 * engine_module.MAX_DENOISERS + 4  # every shape got its denoiser...
    assert len(tiny_engine._denoisers) <= engine_module.MAX_DENOISERS  # ... and the engine kept at most this many
