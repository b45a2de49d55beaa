"""Publish to a WHIP endpoint (RFC 9725: WebRTC-HTTP ingestion) with aiortc: the session's tracks (the ones WHEP
viewers get) in a send-only offer, `POST` as `application/sdp`, the answer in the 201 reply and the resource in its
`Location`; `DELETE` of that resource when the output stops. A connection that fails or closes is made again with
back-off (publisher.py). Encoding runs where aiortc runs it (its encoder threads), not on the model worker.

Outbound rules (server/access/outbound.py): the endpoint's host is resolved and checked at each connection and the HTTP
request goes to that address (a resolver that answers only it; Host and TLS SNI stay the URL's name; https is
verified unless the output opts out). No redirect is followed. The answer must be `201`, `application/sdp`, at most
`--max_sdp_bytes`, read no further; its ICE candidates on refused addresses are dropped before aiortc sees them.
The resource (`Location`) is deleted only on the endpoint's own origin, where the bearer token may go. Failures
read as fixed reasons ("http 403", "could not connect"...): the reply's body is never shown nor logged.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import urljoin, urlsplit

import aiohttp
import av
from aiohttp.abc import AbstractResolver, ResolveResult
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from ..access.outbound import Endpoint, OutboundPolicy, OutboundRefused
from ..media.pump import AvatarAudioTrack, AvatarVideoTrack
from ..session.served import ServerSession
from .publisher import OutputFailure, Publisher
from .target import DEFAULT_PORTS, OutputSettings, shown

HTTP_TIMEOUT_S = 10.0
STATS_PERIOD_S = 1.0
COULD_NOT_CONNECT = "could not connect"


class WhipError(OutputFailure):
    """The endpoint refused the offer, or its answer is not one."""


class PinnedResolver(AbstractResolver):
    """Resolves the checked endpoint's name to the checked address, and nothing else."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower() != self.endpoint.host.lower():
            raise OSError("not the checked host")
        address = self.endpoint.address
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


def pinned_http(endpoint: Endpoint, verify: bool, timeout_s: float) -> aiohttp.ClientSession:
    verified = True if verify else False  # aiohttp: True verifies, False accepts any certificate
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(endpoint), use_dns_cache=False, ssl=verified)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


def allowed_candidates(sdp: str, policy: OutboundPolicy) -> str:
    """The answer without the ICE candidates the policy refuses (by address; a media port is the peer's choice).
    WhipError when none is left."""
    lines = sdp.splitlines()
    kept = [line for line in lines if not line.startswith("a=candidate:") or _candidate_allowed(line, policy)]
    if not any(line.startswith("a=candidate:") for line in kept):
        raise WhipError("no allowed ICE candidate")
    return "\r\n".join(kept) + "\r\n"


def _candidate_allowed(line: str, policy: OutboundPolicy) -> bool:
    fields = line.split()
    return len(fields) >= 6 and policy.allows(fields[4])


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
        self,
        output_id: str,
        session: ServerSession,
        settings: OutputSettings,
        policy: OutboundPolicy,
        rtc_config: RTCConfiguration | None,
        max_answer_bytes: int,
    ):
        super().__init__(output_id, session, settings, policy)
        self.rtc_config = rtc_config or RTCConfiguration(iceServers=[])
        self.max_answer_bytes = max_answer_bytes
        self.resource: str | None = None  # the WHIP session's URL, from Location
        self._endpoint_used: Endpoint | None = None
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
        endpoint = await self._endpoint()
        pump = self.session.pump
        pc = RTCPeerConnection(self.rtc_config)
        video, audio = CountedVideoTrack(pump), AvatarAudioTrack(pump)
        self._video = video
        ended = asyncio.Event()
        closing = False  # our own close below: its "closed" must not overwrite the reason that made us close

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                self.went_live()
            elif pc.connectionState in ("failed", "closed") and not closing:
                self.last_error = f"the WebRTC connection {pc.connectionState}"
                ended.set()

        try:
            pc.addTransceiver(video, direction="sendonly")
            pc.addTransceiver(audio, direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers every candidate first
            answer = allowed_candidates(await self._post_offer(endpoint, pc.localDescription.sdp), self.policy)
            try:
                await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            except ValueError:  # aiortc's message quotes the answer
                raise WhipError("the answer is not a usable SDP") from None
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
            closing = True
            await pc.close()
            await self._delete_resource()

    async def _post_offer(self, endpoint: Endpoint, sdp: str) -> str:
        url = self.settings.url
        headers = self._headers("application/sdp")
        try:
            async with pinned_http(endpoint, self.settings.tls_verify, HTTP_TIMEOUT_S) as http:
                async with http.post(url, data=sdp, headers=headers, allow_redirects=False) as reply:
                    if reply.status != 201:
                        raise WhipError(f"http {reply.status}")
                    if reply.content_type != "application/sdp":
                        raise WhipError("the answer is not application/sdp")
                    if (reply.content_length or 0) > self.max_answer_bytes:
                        raise WhipError("the answer is too large")
                    location = reply.headers.get("Location")
                    if not location:
                        raise WhipError("no Location for the session")
                    body = await self._read_answer(reply)
        except aiohttp.ClientConnectorCertificateError:
            raise WhipError('certificate not verified (a self-signed test endpoint: "tls_verify": false)') from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            raise WhipError(COULD_NOT_CONNECT) from None
        self.resource = urljoin(url, location)
        self._endpoint_used = endpoint
        return body

    async def _read_answer(self, reply: aiohttp.ClientResponse) -> str:
        """The body, read no further than the SDP limit."""
        data = bytearray()
        while chunk := await reply.content.readany():
            data += chunk
            if len(data) > self.max_answer_bytes:
                raise WhipError("the answer is too large")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise WhipError("the answer is not a usable SDP") from None

    async def _delete_resource(self) -> None:
        resource, self.resource = self.resource, None
        endpoint, self._endpoint_used = self._endpoint_used, None
        if resource is None or endpoint is None:
            return
        if not self._same_origin(resource):  # the bearer token goes nowhere else
            self.session.log.info("WHIP resource %s is not on the endpoint's origin: not deleted", shown(resource))
            return
        try:
            endpoint = await self.policy.resolve(endpoint.host, endpoint.port)
            async with pinned_http(endpoint, self.settings.tls_verify, HTTP_TIMEOUT_S / 2) as http:
                async with http.delete(resource, headers=self._headers(), allow_redirects=False):
                    pass
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, OutboundRefused) as exc:
            self.session.log.info("WHIP DELETE of %s failed (%s)", shown(resource), type(exc).__name__)

    def _same_origin(self, resource: str) -> bool:
        a, b = urlsplit(self.settings.url), urlsplit(resource)
        try:
            ports = (a.port or DEFAULT_PORTS[a.scheme], b.port or DEFAULT_PORTS.get(b.scheme, 0))
        except ValueError:
            return False
        return (a.scheme, a.hostname, ports[0]) == (b.scheme, b.hostname, ports[1])

    async def _count(self, pc: RTCPeerConnection, video: CountedVideoTrack) -> None:
        total = 0
        for sender in pc.getSenders():
            stats = await sender.getStats()
            total += sum(getattr(s, "bytesSent", 0) for s in stats.values() if s.type == "outbound-rtp")
        self.figures.frames_sent = self._frames_before + video.sent
        self.count_bytes(self._bytes_base + total)
