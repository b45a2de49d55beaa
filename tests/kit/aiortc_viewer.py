"""An aiortc viewer of a session on loopback: a receive-only peer, its frame counter, a WHEP viewer (at once, or one
that trickles its candidates later, RFC 9725 / RFC 8840), and a peer that vanishes without a word."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from multidict import CIMultiDict

from kit.http_calls import bearer
from kit.sdp_frag import TRICKLE_TYPE, ice_credentials, sdpfrag, split_candidates


def loopback_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def viewer_offer() -> tuple[RTCPeerConnection, str]:
    """A receive-only peer (video + audio) and its offer SDP (host candidates on 127.0.0.1 when restricted)."""
    pc = loopback_pc()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


class FrameCounter:
    """Counts the frames a peer receives on its tracks."""

    def __init__(self, pc: RTCPeerConnection):
        self.video = 0
        self.audio = 0
        self.tasks: list[asyncio.Task] = []
        pc.on("track", lambda track: self.tasks.append(asyncio.ensure_future(self._consume(track))))

    async def _consume(self, track) -> None:
        try:
            while True:
                await track.recv()
                if track.kind == "video":
                    self.video += 1
                else:
                    self.audio += 1
        except MediaStreamError:
            pass

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def connect_viewer(client: aiohttp.ClientSession, session: dict) -> tuple[RTCPeerConnection, FrameCounter, str]:
    """A WHEP viewer of the session: (its peer connection, its frame counter, its resource URL)."""
    pc, sdp = await viewer_offer()
    counter = FrameCounter(pc)
    headers = {**bearer(session["token"]), "Content-Type": "application/sdp"}
    async with client.post(session["whep_url"], data=sdp, headers=headers) as r:
        assert r.status == 201, (r.status, await r.text())
        answer = await r.text()
        location = r.headers["Location"]
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, counter, location


def vanish(pc: RTCPeerConnection) -> None:
    """The peer disappears without a word: its UDP sockets close, no DTLS close, no RTCP BYE, no ICE (as when a
    laptop lid closes or the network drops). The far end notices only through ICE consent checks failing."""
    for transceiver in pc.getTransceivers():
        ice = transceiver.receiver.transport.transport  # DTLS -> ICE transport
        for protocol in list(ice._connection._protocols):
            if protocol.transport is not None:
                protocol.transport.close()


@dataclass
class TrickleViewer:
    """A WHEP viewer that posted its offer without candidates; `patch()` sends them (or anything) to its resource."""

    client: aiohttp.ClientSession
    session: dict
    pc: RTCPeerConnection
    counter: FrameCounter
    resource_url: str
    etag: str | None
    headers: CIMultiDict  # of the 201
    answer: str
    held: list[tuple[str, str]]  # the candidates not sent yet
    ufrag: str
    pwd: str

    async def patch(self, body: str, if_match: str | None = "etag", content_type: str = TRICKLE_TYPE) -> int:
        headers = {**bearer(self.session["token"]), "Content-Type": content_type}
        if if_match is not None:
            headers["If-Match"] = self.etag if if_match == "etag" else if_match
        async with self.client.patch(self.resource_url, data=body, headers=headers) as r:
            await r.read()
            return r.status

    async def trickle(self) -> int:
        """Every held candidate and the end of candidates, in one PATCH (204 expected)."""
        status = await self.patch(sdpfrag(self.ufrag, self.pwd, self.held))
        self.held = []
        return status

    async def delete(self) -> int:
        async with self.client.delete(self.resource_url, headers=bearer(self.session["token"])) as r:
            await r.read()
            return r.status


async def trickle_viewer(client: aiohttp.ClientSession, session: dict, base_url: str) -> TrickleViewer:
    """POST a candidate-less offer; the answer is applied later (`apply_answer`) so that the server can only reach
    this peer through the candidates trickled to it."""
    pc, sdp = await viewer_offer()
    counter = FrameCounter(pc)
    offer, held = split_candidates(sdp)
    ufrag, pwd = ice_credentials(sdp)
    headers = {**bearer(session["token"]), "Content-Type": "application/sdp"}
    async with client.post(session["whep_url"], data=offer, headers=headers) as r:
        assert r.status == 201, (r.status, await r.text())
        answer = await r.text()
        out = CIMultiDict(r.headers)
    return TrickleViewer(
        client, session, pc, counter, base_url + out["Location"], out.get("ETag"), out, answer, held, ufrag, pwd
    )


async def apply_answer(viewer: TrickleViewer) -> None:
    await viewer.pc.setRemoteDescription(RTCSessionDescription(sdp=viewer.answer, type="answer"))
