"""Publish to a WHIP endpoint (RFC 9725: WebRTC-HTTP ingestion) with aiortc: the session's tracks (the ones WHEP
viewers get) in a send-only offer, `POST` as `application/sdp`, the answer in the 201 reply and the resource in its
`Location`; `DELETE` of that resource when the output stops. A connection that fails or closes is made again with
back-off (publisher.py). Encoding runs where aiortc runs it (its encoder threads), not on the model worker.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from ..media import AvatarAudioTrack, AvatarVideoTrack
from ..sessions import ServerSession
from .publisher import Publisher
from .target import OutputSettings, shown

HTTP_TIMEOUT_S = 10.0
STATS_PERIOD_S = 1.0


class WhipError(Exception):
    """The endpoint refused the offer."""


class CountedVideoTrack(AvatarVideoTrack):
    """The session's video, counting the frames handed to the encoder."""

    def __init__(self, pump):
        super().__init__(pump)
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        frame = await super().recv()
        self.sent += 1
        return frame

    @property
    def dropped(self) -> int:
        return self._queue.dropped if self._queue is not None else 0


class WhipPublisher(Publisher):
    kind = "whip"

    def __init__(
        self, output_id: str, session: ServerSession, settings: OutputSettings, rtc_config: RTCConfiguration | None
    ):
        super().__init__(output_id, session, settings)
        self.rtc_config = rtc_config or RTCConfiguration(iceServers=[])
        self.resource: str | None = None  # the WHIP session's URL, from Location
        self._dropped_before = 0
        self._frames_before = 0
        self._bytes_base = 0  # sent by earlier connections
        self._video: CountedVideoTrack | None = None

    @property
    def dropped_frames(self) -> int:
        return self._dropped_before + (self._video.dropped if self._video is not None else 0)

    def _headers(self, content_type: str | None = None) -> dict:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.settings.bearer_token:
            headers["Authorization"] = f"Bearer {self.settings.bearer_token}"
        return headers

    async def _connect_and_run(self) -> bool:
        pump = self.session.pump
        pc = RTCPeerConnection(self.rtc_config)
        video, audio = CountedVideoTrack(pump), AvatarAudioTrack(pump)
        self._video = video
        ended = asyncio.Event()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                self.went_live()
            elif pc.connectionState in ("failed", "closed"):
                self.last_error = f"the WebRTC connection {pc.connectionState}"
                ended.set()

        try:
            pc.addTransceiver(video, direction="sendonly")
            pc.addTransceiver(audio, direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate first
            answer = await self._post_offer(pc.localDescription.sdp)
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            while not ended.is_set() and not self.session.closed:
                try:
                    await asyncio.wait_for(ended.wait(), STATS_PERIOD_S)
                except asyncio.TimeoutError:
                    pass
                await self._count(pc, video)
            return self.session.closed
        finally:
            self._frames_before += video.sent
            self._dropped_before += video.dropped
            self._bytes_base = self.figures.bytes_sent
            self._video = None
            await pc.close()
            await self._delete_resource()

    async def _post_offer(self, sdp: str) -> str:
        url = self.settings.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as http:
            async with http.post(url, data=sdp, headers=self._headers("application/sdp")) as reply:
                body = await reply.text()
                if reply.status != 201:
                    raise WhipError(f"the WHIP endpoint {shown(url)} answered {reply.status}: {body[:200]}")
                if "Location" not in reply.headers:
                    raise WhipError(f"the WHIP endpoint {shown(url)} gave no Location for the session")
                self.resource = urljoin(url, reply.headers["Location"])
                return body

    async def _delete_resource(self) -> None:
        resource, self.resource = self.resource, None
        if resource is None:
            return
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S / 2)) as http:
                async with http.delete(resource, headers=self._headers()):
                    pass
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.session.log.info("WHIP DELETE of %s failed: %s", shown(resource), exc)

    async def _count(self, pc: RTCPeerConnection, video: CountedVideoTrack) -> None:
        total = 0
        for sender in pc.getSenders():
            stats = await sender.getStats()
            total += sum(getattr(s, "bytesSent", 0) for s in stats.values() if s.type == "outbound-rtp")
        self.figures.frames_sent = self._frames_before + video.sent
        self.count_bytes(self._bytes_base + total)
