"""WebRTC: the session's publisher (`POST /v1/sessions/{id}/offer`), the peer connection WHEP viewers share with it
(`connect_peer`; the WHEP protocol is `whep.py`) and aiortc's example protocol (`POST /offer`: a session and its
answer at once)."""

from __future__ import annotations

from aiohttp import web
from aiortc import RTCPeerConnection

from ..access import limits
from ..access.auth import client_identity, require_api_key
from ..api.session_features import SessionFeature
from ..api.sessions import open_session
from ..api.state import ServerState, capacity_error, json_body, server_state, session_for
from ..errors import ApiError
from ..media.opus_track import OPUS, OpusAudioTrack, answered_codec
from ..media.pump import AvatarVideoTrack
from ..session.served import PUBLISHER, ServerSession
from . import peer as rtc
from .turn import session_ice_servers


# -- WebRTC -------------------------------------------------------------------------------------------------------
async def connect_peer(state: ServerState, session: ServerSession, name: str, offer) -> RTCPeerConnection:
    """A peer connection that sends the session's video and audio (and reads the mic, for the publisher)."""
    pc = RTCPeerConnection(rtc.rtc_configuration(state.config.ice_server))
    publisher = name == PUBLISHER

    @pc.on("track")
    def on_track(track):
        if track.kind == "audio" and publisher:
            session.start_task(rtc.read_microphone(track, session.engine_session, session.log), "mic")
        else:
            session.start_task(rtc.drain(track), "drain")

    @pc.on("connectionstatechange")
    async def on_state():
        session.log.info("%s connection %s", name, pc.connectionState)
        if pc.connectionState == "connected":
            session.connected_once.set()
        elif pc.connectionState in ("failed", "closed") and session.peers.get(name) is pc:
            if publisher:  # the session ends with its publisher
                await state.sessions.close(session.id, f"publisher connection {pc.connectionState}")
            else:
                await session.close_peer(name)

    session.peers[name] = pc
    try:
        audio = OpusAudioTrack(session.pump)
        await rtc.answer_offer(pc, offer, [audio, AvatarVideoTrack(session.pump)])
        if answered_codec(pc.localDescription.sdp, "audio") == OPUS:
            audio.use_opus()  # encoded on the loop, not queued behind the VP8 encodes (opus_track.py)
    except BaseException:
        session.peers.pop(name, None)
        await rtc.close_quietly(pc)  # the offer's error is the answer, not a failure to clean up
        raise
    session.pump.start()  # the clock runs from the answer on; the tracks subscribe when their senders start
    return pc


async def session_offer(request: web.Request) -> web.Response:
    state = server_state(request)
    session = session_for(request)
    data = await json_body(request)
    if data.get("type", "offer") != "offer":
        raise ApiError(400, "type must be 'offer'", code="invalid_sdp")
    limits.check_sdp(data.get("sdp"), state.config.max_sdp_bytes)
    offer = rtc.parse_description(data.get("sdp"))
    if PUBLISHER in session.peers:
        raise ApiError(409, "this session already has a publisher; add viewers with WHEP")
    pc = await connect_peer(state, session, PUBLISHER, offer)
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


async def legacy_offer(request: web.Request) -> web.Response:
    """aiortc's example protocol: POST {sdp, type} -> {sdp, type}; a new session on the default avatar."""
    state = server_state(request)
    require_api_key(request, state.config.api_key)
    data = await json_body(request)
    if data.get("type", "offer") != "offer":
        raise ApiError(400, "type must be 'offer'", code="invalid_sdp")
    limits.check_sdp(data.get("sdp"), state.config.max_sdp_bytes)
    offer = rtc.parse_description(data.get("sdp"))
    if state.default_avatar_id is None:
        raise capacity_error("the server is starting")
    owner = client_identity(request, state.config.api_key)
    session = await open_session(state, state.default_avatar_id, state.session_config(), owner)
    try:
        pc = await connect_peer(state, session, PUBLISHER, offer)
    except BaseException:
        await state.sessions.close(session.id, "the offer failed")
        raise
    return web.json_response(
        {
            "sdp": pc.localDescription.sdp,
            "type": pc.localDescription.type,
            "session_id": session.id,
            "token": session.token,
        }
    )


async def _ice_servers(request: web.Request, session: ServerSession, _: object) -> dict:
    """The session's ICE servers in the 201 answer: `--ice-server`s and its own TURN credentials (turn.py)."""
    return {"ice_servers": session_ice_servers(server_state(request).config, session.id)}


SESSION_FEATURE = SessionFeature("ice", opened=_ice_servers)
