"""WebRTC with aiortc: ICE settings, offers in and answers out, the microphone reader.

Host candidates: aioice offers every interface address it finds (and never 127.0.0.1). `restrict_host_addresses`
replaces aioice's discovery, for the whole process, with the configured `--ice-host` addresses; the tests use
127.0.0.1 so that peers meet on loopback only.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging

import aioice.ice
import ifaddr
import numpy as np
from aiortc import RTCConfiguration, RTCIceCandidate, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame

from vexpress_rt.errors import InputError

from ..errors import ApiError
from ..settings.config import ConfigError, IceServer

log = logging.getLogger("server.webrtc.peer")

CODECS = ("VP8", "H264", "opus")
_discover_host_addresses = aioice.ice.get_host_addresses


def local_addresses() -> set[str]:
    """Every address of every interface, loopback included."""
    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return found


def _configured_host_addresses(hosts: tuple[str, ...], use_ipv4: bool, use_ipv6: bool) -> list[str]:
    wanted = {4: use_ipv4, 6: use_ipv6}
    return [h for h in hosts if wanted[ipaddress.ip_address(h).version]]


def restrict_host_addresses(hosts: list[str] | None) -> None:
    """Offer host candidates on `hosts` only (all interfaces again when empty). Affects every peer in the process."""
    if not hosts:
        aioice.ice.get_host_addresses = _discover_host_addresses
        return
    missing = [h for h in hosts if h not in local_addresses()]
    if missing:
        raise ConfigError(f"--ice-host {', '.join(missing)}: not an address of this machine")
    aioice.ice.get_host_addresses = functools.partial(_configured_host_addresses, tuple(hosts))


def rtc_configuration(servers: list[IceServer]) -> RTCConfiguration:
    """No servers means none at all (aiortc would otherwise ask a public STUN server)."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential) for s in servers]
    )


def parse_description(sdp, kind: str = "offer") -> RTCSessionDescription:
    if not isinstance(sdp, str) or not sdp.lstrip().startswith("v=0"):
        raise ApiError(400, "the SDP must be a string starting with v=0", code="invalid_sdp")
    if "m=video" not in sdp:
        raise ApiError(400, "the offer must have a video m-line to receive the avatar", code="invalid_sdp")
    return RTCSessionDescription(sdp=sdp, type=kind)


async def answer_offer(pc: RTCPeerConnection, offer: RTCSessionDescription, tracks: list[MediaStreamTrack]) -> None:
    """Apply the offer, send `tracks` on the offered m-lines of their kind, and set the local answer.

    A malformed SDP is an ApiError(400). The answer carries every candidate (gathering completes first).
    """
    try:
        await pc.setRemoteDescription(offer)
    except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError... on a bad SDP
        raise ApiError(400, f"cannot use the offer: {exc}", code="invalid_sdp") from exc
    offered = {t.kind for t in pc.getTransceivers()}
    for track in tracks:
        if track.kind in offered:
            pc.addTrack(track)
        else:
            track.stop()
    try:
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # e.g. no codec in common
        raise ApiError(400, f"cannot answer the offer: {exc}", code="invalid_sdp") from exc


async def add_remote_candidate(pc: RTCPeerConnection, candidate: RTCIceCandidate | None) -> None:
    """A trickled remote candidate (None: the end of them) joins the running ICE checks. After the end of the
    candidates, or once the connection closed, aioice refuses more: they are ignored then, as a browser does."""
    try:
        await pc.addIceCandidate(candidate)
    except ValueError as exc:
        log.debug("remote candidate ignored: %s", exc)


async def read_microphone(track: MediaStreamTrack, session, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Push every received audio frame (aiortc: s16, 48 kHz, stereo, 20 ms) into the engine session."""
    frames = 0
    try:
        while True:
            frame = await track.recv()
            if not isinstance(frame, AudioFrame):  # an audio track yields audio frames; anything else is skipped
                continue
            pcm = frame.to_ndarray()
            channels = len(frame.layout.channels)
            if frame.format.is_planar:
                pcm = pcm.T  # (channels, n) -> (n, channels)
            samples = np.ascontiguousarray(pcm).reshape(-1, channels)
            session.push_audio(samples, frame.sample_rate, channels, live=True)  # a live source: bounded lag
            frames += 1
    except MediaStreamError:
        logger.info("microphone track ended after %d frames", frames)
        try:
            session.end_utterance()
        except InputError:
            pass  # the session closed meanwhile
    except InputError as exc:
        logger.warning("microphone audio refused by the engine: %s", exc)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("reading the microphone failed")


async def drain(track: MediaStreamTrack) -> None:
    """Receive and drop a track we do not use (e.g. a camera), so that aiortc does not queue it forever."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


async def close_quietly(pc: RTCPeerConnection) -> None:
    """`pc.close()`, also for a connection whose offer failed half-way: aiortc's close then meets transceivers
    without transports and raises, leaving the rest running. Whatever was started is stopped; nothing is raised."""
    try:
        await pc.close()
        return
    except Exception as exc:
        log.debug("closing a half-set-up peer connection: %s: %s", type(exc).__name__, exc)
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        for transport in (dtls, getattr(dtls, "transport", None)):
            if transport is not None:
                try:
                    await transport.stop()
                except Exception:
                    pass
    pc.remove_all_listeners()
