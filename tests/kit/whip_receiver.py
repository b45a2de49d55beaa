"""A WHIP endpoint (RFC 9725) on 127.0.0.1 made with aiohttp and aiortc, recording what a publisher sends."""

from __future__ import annotations

import asyncio

import numpy as np
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from kit.aiortc_viewer import loopback_pc
from kit.media_synth import OUT_RATE


class WhipReceiver:
    """A WHIP endpoint (RFC 9725) on 127.0.0.1 made with aiohttp and aiortc, as a media server's ingest would be:
    `POST /whip` (application/sdp offer -> 201, answer, Location), `DELETE /whip/<resource>`. It records what the
    publisher's tracks deliver: video frame times and audio samples (mono float)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.posts = 0
        self.deletes = 0
        self.video_times: list[float] = []  # pts seconds of each frame received
        self.audio_chunks: list[np.ndarray] = []
        self.audio_rate = OUT_RATE
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> WhipReceiver:
        app = web.Application()
        app.router.add_post("/whip", self._offer)
        app.router.add_delete("/whip/{resource}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/whip"
        return self

    async def _offer(self, request):
        self.posts += 1
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        assert request.content_type == "application/sdp"
        pc = loopback_pc()
        resource = f"r{self.posts}"
        self.pcs[resource] = pc

        @pc.on("track")
        def on_track(track):
            self._tasks.append(asyncio.ensure_future(self._record(track)))

        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whip/{resource}"},
        )

    async def _delete(self, request):
        self.deletes += 1
        pc = self.pcs.pop(request.match_info["resource"], None)
        if pc is None:
            return web.Response(status=404)
        await pc.close()
        return web.Response(status=200)

    async def _record(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_times.append(float(frame.pts * frame.time_base))
            else:
                self.audio_rate = frame.sample_rate
                pcm = frame.to_ndarray().reshape(-1, frame.layout.nb_channels if frame.format.is_packed else 1)
                self.audio_chunks.append(pcm.mean(axis=1) / 32768.0)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.audio_chunks) if self.audio_chunks else np.zeros(0)

    async def close(self) -> None:
        for pc in list(self.pcs.values()):
            await pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
