"""Faults, injected against a served engine (tiny model, loopback): a WebRTC peer or a websocket vanishing
mid-stream, a peer whose ICE never completes, a consumer that stops reading, the model worker raising for one
session, the device running out of memory. The affected session ends with a clear event (or loses only its peer)
and its resources are released; the other sessions keep streaming; the worker keeps serving."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import aioice.ice
import aioice.stun
import pytest
import torch
from aiortc import RTCSessionDescription
from kit.aiortc_viewer import FrameCounter, connect_viewer, loopback_pc, vanish, viewer_offer
from kit.http_calls import bearer, create_session, delete_session, http, ws_messages, ws_url
from kit.media_synth import voiced_pcm16
from kit.served import server_fixture
from kit.waits import run, wait_for

from server.websockets.sockets import OPEN_SOCKETS
from streaming.denoiser import StreamDenoiser

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(120)]


server = server_fixture({"max_sessions": 6})


@pytest.fixture
def fast_consent(monkeypatch):
    """ICE consent checks every 0.2 s instead of 5 s (RFC 7675: a peer is gone after 6 missed checks, 30 s in
    production); the code path that notices a vanished peer is the same."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)


def _released(server, session_id: str) -> bool:
    return server.state.sessions.get(session_id) is None and server.engine.get_session(session_id) is None


async def _bot(c: aiohttp.ClientSession, session: dict):
    ws = await c.ws_connect(ws_url(session))
    ready = await ws.receive_json(timeout=10)
    assert ready["type"] == "session.ready"
    return ws


async def _speak(ws, seconds: float, chunk_s: float = 0.04) -> None:
    """Real-time PCM16 pushes (what a TTS bot sends)."""
    start = time.monotonic()
    sent = 0.0
    while sent < seconds and not ws.closed:
        try:
            await ws.send_bytes(voiced_pcm16(chunk_s))
        except ConnectionError:  # the server closed it meanwhile (the session ended)
            return
        sent += chunk_s
        await asyncio.sleep(max(0.0, start + sent - time.monotonic()))


# -- clients vanishing ---------------------------------------------------------------------------------------------
def test_publisher_vanishing_ends_its_session_and_others_continue(server, fast_consent):
    """A publisher's network drops (no DTLS close, no BYE): ICE consent fails, its session ends and releases its
    peers, pump and engine session (internals: the released tasks are read from the server session). A viewer of
    another session keeps receiving frames throughout."""

    async def main():
        async with http() as c:
            other = await create_session(c, server.url)
            viewer, seen, _ = await connect_viewer(c, other)
            doomed = await create_session(c, server.url)
            pc = loopback_pc()
            counter = FrameCounter(pc)
            pc.addTransceiver("audio", direction="recvonly")
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with c.post(
                doomed["offer_url"],
                json={"sdp": pc.localDescription.sdp, "type": "offer"},
                headers=bearer(doomed["token"]),
            ) as r:
                answer = await r.json()
            await pc.setRemoteDescription(RTCSessionDescription(**answer))
            await wait_for(lambda: counter.video >= 10 and seen.video >= 10, 20, "the publisher and the viewer playing")
            served = server.state.sessions.get(doomed["id"])
            before = seen.video
            t0 = time.monotonic()
            vanish(pc)
            await wait_for(lambda: _released(server, doomed["id"]), 30, "the vanished publisher's session released")
            detected_s = time.monotonic() - t0
            await asyncio.sleep(1.0)
            after = seen.video
            await counter.stop()
            await pc.close()
            other_alive = server.state.sessions.get(other["id"]) is not None
            await seen.stop()
            await viewer.close()
            await delete_session(c, other)
            return detected_s, served, before, after, other_alive

    detected_s, served, before, after, other_alive = run(main())
    print(f"\nvanished publisher noticed after {detected_s:.1f} s")
    assert served.closed and not served.peers and not served._tasks
    assert served.pump._task is None or served.pump._task.done()
    assert other_alive and after > before + 10, (before, after)


def test_viewer_vanishing_loses_only_its_peer(server, fast_consent):
    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            stay, stay_seen, _ = await connect_viewer(c, s)
            gone, gone_seen, _ = await connect_viewer(c, s)
            await wait_for(lambda: stay_seen.video >= 10 and gone_seen.video >= 10, 20, "both viewers playing")
            served = server.state.sessions.get(s["id"])
            assert len(served.peers) == 2
            vanish(gone)
            await wait_for(lambda: len(served.peers) == 1, 30, "the vanished viewer's peer removed")
            before = stay_seen.video
            await asyncio.sleep(1.0)
            after = stay_seen.video
            subscribers = len(served.pump._subscribers)
            for pc, counter in ((gone, gone_seen), (stay, stay_seen)):
                await counter.stop()
                await pc.close()
            alive = not served.closed
            await delete_session(c, s)
            return alive, before, after, subscribers

    alive, before, after, subscribers = run(main())
    assert alive and after > before + 10
    assert subscribers == 2  # the remaining viewer's audio and video tracks only


def test_publisher_whose_ice_never_completes(server, monkeypatch):
    """The client sends its offer and is gone before connecting: the session is closed when ICE fails (STUN
    checks retransmitted 2 times instead of 6 here: about 4 s instead of 30)."""
    monkeypatch.setattr(aioice.stun, "RETRY_MAX", 2)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            pc, sdp = await viewer_offer()
            async with c.post(s["offer_url"], json={"sdp": sdp, "type": "offer"}, headers=bearer(s["token"])) as r:
                assert r.status == 200
            await pc.close()  # never applies the answer: no ICE checks from this side
            await wait_for(
                lambda: _released(server, s["id"]), 60, "the session whose answer was never applied released"
            )

    run(main())


def test_websockets_dropped_without_close(server):
    """A bot's and a frames consumer's TCP connections are cut (no close frame): the server's handlers end, the
    listener, subscriber and socket are released; the session stays for a reconnect, which works."""

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            served = server.state.sessions.get(s["id"])
            es = served.engine_session
            listeners = es.lifecycle.listener_count
            bot = await _bot(c, s)
            frames = await c.ws_connect(ws_url(s, "frames"))
            await ws_messages(frames, 1.0, until=lambda m: isinstance(m, bytes))
            await bot.send_bytes(voiced_pcm16(0.3))
            assert es.lifecycle.listener_count > listeners and len(served.pump._subscribers) == 1
            for ws in (bot, frames):
                ws._response.connection.transport.abort()  # the TCP connection is gone
            await wait_for(
                lambda: (
                    es.lifecycle.listener_count == listeners
                    and not served.pump._subscribers
                    and not server.app[OPEN_SOCKETS]
                ),
                10,
                "a dropped websocket's listener, subscriber and socket released",
            )
            again = await _bot(c, s)
            await again.send_str('{"type": "ping", "id": 1}')
            pong = await ws_messages(again, 5.0, until=lambda m: m.get("type") == "pong")
            await again.close()
            await delete_session(c, s)
            return pong

    pong = run(main())
    assert pong[-1] == {"type": "pong", "id": 1}


def test_slow_consumer_loses_frames_not_the_session(server):
    """A frames consumer that never reads (its TCP window closes): its queue drops the oldest frames (counted),
    while another session's consumer keeps receiving at the full rate."""

    async def main():
        async with http() as c:
            slow_s = await create_session(c, server.url)
            fast_s = await create_session(c, server.url)
            fast = await c.ws_connect(ws_url(fast_s, "frames"))
            await ws_messages(fast, 1.0)  # drains what its queue held
            slow = await _stalled_websocket(server.url, f"/v1/sessions/{slow_s['id']}/frames?token={slow_s['token']}")
            served = server.state.sessions.get(slow_s["id"])
            await wait_for(lambda: served.pump.dropped > 25, 30, "frames dropped for the stalled consumer")
            await ws_messages(fast, 0.5)
            t0 = time.monotonic()
            got = await ws_messages(fast, 2.0)
            fps = sum(isinstance(m, bytes) for m in got) / (time.monotonic() - t0)
            async with c.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
            slow.close()
            await fast.close()
            for s in (slow_s, fast_s):
                await delete_session(c, s)
            return served.pump.dropped, fps, metrics

    count, fps, metrics = run(main())
    print(f"\nslow consumer: {count} frames dropped; the other consumer at {fps:.1f} fps")
    assert fps > 20
    line = next(x for x in metrics.splitlines() if x.startswith('vexpress_dropped_frames_total{stage="track_queue"}'))
    assert float(line.split()[-1]) > 25


async def _stalled_websocket(url: str, path: str) -> socket.socket:
    """A websocket client with a 4 KiB receive buffer that completes the handshake and then never reads."""
    host, port = url.split("//")[1].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


# -- the model worker ----------------------------------------------------------------------------------------------
def _inject(monkeypatch, fail_for, exc_factory):
    """StreamDenoiser.run raises when `fail_for(jobs)` says so."""
    real = StreamDenoiser.run

    def run(self, jobs):
        if fail_for(jobs):
            raise exc_factory()
        return real(self, jobs)

    monkeypatch.setattr(StreamDenoiser, "run", run)


def _worker_fault(server, monkeypatch, exc_factory, code: str):
    """Two bots speak at once (their windows share batches); every window of the first one fails: it gets an
    `error` event with `code` and closes; the second speaks on; the worker serves a new session afterwards."""
    engine = server.engine
    errors0, retries0 = engine.worker.errors, engine.worker.batch_retries

    async def main():
        async with http() as c:
            bad, good = await create_session(c, server.url), await create_session(c, server.url)
            bad_es, good_es = engine.get_session(bad["id"]), engine.get_session(good["id"])
            _inject(monkeypatch, lambda jobs: any(j.state is bad_es.stream for j in jobs), exc_factory)
            bad_ws, good_ws = await _bot(c, bad), await _bot(c, good)
            good_before = good_es.speech_frames_out
            speaking = asyncio.gather(_speak(bad_ws, 3.0), _speak(good_ws, 3.0), return_exceptions=True)
            bad_events = await ws_messages(bad_ws, 15.0)
            await speaking
            await good_ws.send_str('{"type": "audio.end"}')
            good_events = await ws_messages(good_ws, 10.0, until=lambda m: m.get("type") == "playback.finished")
            good_after = good_es.speech_frames_out
            await good_ws.close()
            await delete_session(c, good)
            monkeypatch.undo()
            fresh = await create_session(c, server.url)
            fresh_ws = await _bot(c, fresh)
            await _speak(fresh_ws, 1.0)
            await fresh_ws.send_str('{"type": "audio.end"}')
            fresh_events = await ws_messages(fresh_ws, 15.0, until=lambda m: m.get("type") == "playback.finished")
            await fresh_ws.close()
            await delete_session(c, fresh)
            return bad, bad_events, good_events, good_after - good_before, fresh_events

    bad, bad_events, good_events, good_frames, fresh_events = run(main())
    errors = [m for m in bad_events if isinstance(m, dict) and m.get("type") == "error"]
    assert errors and errors[0]["code"] == code, bad_events
    assert bad_events[-1] in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), bad_events[-3:]
    assert _released(server, bad["id"])
    assert good_frames > 25 and good_events[-1]["type"] == "playback.finished", good_events[-3:]
    assert not good_events[-1]["interrupted"] and not any(m.get("type") == "error" for m in good_events)
    assert fresh_events[-1]["type"] == "playback.finished", "the worker serves new sessions after the fault"
    assert engine.worker.errors > errors0 and engine.worker._thread.is_alive()
    return engine.worker.batch_retries - retries0, errors[0]


def test_model_error_in_one_session(server, monkeypatch):
    retries, error = _worker_fault(server, monkeypatch, lambda: RuntimeError("injected fault"), "model_error")
    print(f"\nworker fault: {error}; batches retried one by one: {retries}")
    assert "injected fault" in error["message"]


def test_device_out_of_memory_in_one_session(server, monkeypatch):
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    retries, error = _worker_fault(
        server, monkeypatch, lambda: oom("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"), "out_of_memory"
    )
    print(f"\nout of memory: {error}; batches retried one by one: {retries}")


def test_batch_out_of_memory_is_retried_one_by_one(server, monkeypatch):
    """The device runs out of memory for a batch of windows but not for one window: nobody fails."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    engine = server.engine
    errors0, retries0 = engine.worker.errors, engine.worker.batch_retries
    _inject(monkeypatch, lambda jobs: len(jobs) > 1, lambda: oom("CUDA out of memory (simulated, batch)"))

    async def main():
        async with http() as c:
            sessions = [await create_session(c, server.url) for _ in range(2)]
            bots = [await _bot(c, s) for s in sessions]
            await asyncio.gather(*(_speak(ws, 2.0) for ws in bots))
            events = []
            for ws in bots:
                await ws.send_str('{"type": "audio.end"}')
                events.append(await ws_messages(ws, 15.0, until=lambda m: m.get("type") == "playback.finished"))
                await ws.close()
            for s in sessions:
                await delete_session(c, s)
            return events

    events = run(main())
    retries = engine.worker.batch_retries - retries0
    print(f"\nbatch out of memory: {retries} batches retried one window at a time, no session failed")
    assert retries >= 1 and engine.worker.errors == errors0
    for per in events:
        assert per[-1]["type"] == "playback.finished" and not any(m.get("type") == "error" for m in per)
