"""Issue 12 item 5: offers that fail, and peers that never connect, leave nothing behind on the server: no frame
pump subscriber, no task, no peer connection. Counted on one long-lived session after 50 of each."""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiortc import RTCPeerConnection
from kit.aiortc_viewer import viewer_offer
from kit.http_calls import bearer, create_session, delete_session, http
from kit.waits import run

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(240)]

BAD_OFFER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\n"


def _peer_connections() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is RTCPeerConnection)


def test_failed_and_abandoned_offers_leak_nothing(serve):
    server = serve(max_sessions=2, max_viewers=4)

    async def server_counts(session_id: str) -> tuple[int, int, int]:
        session = server.state.sessions.get(session_id)
        tasks = len([t for t in asyncio.all_tasks() if not t.done()])
        return len(session.pump.queue_depths()), len(session.peers), tasks

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            headers = {**bearer(s["token"]), "Content-Type": "application/sdp"}
            async with c.post(s["whep_url"], data=BAD_OFFER, headers=headers) as r:  # warm-up: lazy imports
                assert r.status == 400
            before = server.call(server_counts(s["id"]))
            pcs_before = _peer_connections()
            for _ in range(50):  # offers the server cannot use
                async with c.post(s["whep_url"], data=BAD_OFFER, headers=headers) as r:
                    assert r.status == 400, await r.text()
            for _ in range(50):  # answered, then the client gives up without ever connecting
                pc, sdp = await viewer_offer()
                async with c.post(s["whep_url"], data=sdp, headers=headers) as r:
                    assert r.status == 201, await r.text()
                    location = r.headers["Location"]
                await pc.close()
                async with c.delete(f"{server.url}{location}", headers=bearer(s["token"])) as r:
                    assert r.status == 200
            await asyncio.sleep(0.5)  # closing transports finish their tasks
            after = server.call(server_counts(s["id"]))
            pcs_after = _peer_connections()
            await delete_session(c, s)
            return before, after, pcs_before, pcs_after

    before, after, pcs_before, pcs_after = run(main(), 180)
    assert after[0] == before[0] == 0, f"frame pump subscribers: {before[0]} before, {after[0]} after"
    assert after[1] == before[1] == 0, f"peer connections held by the session: {after[1]}"
    assert after[2] <= before[2] + 2, f"tasks on the server loop: {before[2]} before, {after[2]} after"
    assert pcs_after <= pcs_before + 2, f"RTCPeerConnection objects alive: {pcs_before} before, {pcs_after} after"
