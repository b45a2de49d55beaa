"""WHEP viewers by the book (draft-ietf-wish-whep, which follows WHIP, RFC 9725): the endpoint
`/v1/sessions/{id}/whep` and each viewer's resource `/v1/sessions/{id}/whep/{viewer}`.

* `POST` endpoint, an `application/sdp` offer, with or without candidates: 201, the answer SDP (every server
  candidate in it), `Location`, `ETag`, `Accept-Patch`, one `Link: <url>; rel="ice-server"` per STUN/TURN server.
* `PATCH` resource, `application/trickle-ice-sdpfrag` (RFC 8840) with the viewer's candidates: 204; they join the
  running ICE checks (aioice trickles). With a new `ice-ufrag`/`ice-pwd` (an ICE restart): 422, as RFC 9725 has a
  server that trickles but cannot restart answer (aiortc cannot restart ICE on a live connection): the viewer
  DELETEs and POSTs a new offer. With an `If-Match` that is neither `*` nor the resource's `ETag`: 412.
* `DELETE` resource: 200, also for a viewer whose connection already ended (the resource's end, not a 404).
* `OPTIONS` endpoint or resource: 204 with `Allow` and `Accept-Post`/`Accept-Patch`; with `Origin` and
  `Access-Control-Request-Method`, the CORS preflight (`access/origins.py`).

Credentials: the session's token, its view-only token (`view_url`: a viewer page can watch, nothing more) or the API
key. The `Link` TURN credentials expire with the session (`turn.py`).

The server does not trickle its own candidates: aiortc gathers them before answering. Viewers that ended (their
peer connection failed or closed) are remembered per session, the most recent `MAX_REMEMBERED` of them, until the
session closes, so that their `DELETE` answers as the resource's end.
"""

from __future__ import annotations

import collections
import ipaddress
import secrets
from dataclasses import dataclass, field

from aiohttp import web
from aiortc.sdp import candidate_from_sdp

from ..access import limits
from ..api.state import STATE, server_state, session_for
from ..errors import ApiError
from ..session.served import PUBLISHER, ServerSession
from . import peer as rtc
from .publisher import connect_peer
from .turn import session_ice_servers

TRICKLE_TYPE = "application/trickle-ice-sdpfrag"
MAX_REMEMBERED = 64  # viewer resources per session kept after they ended (DELETE answers 200 for them)
ENDPOINT_ALLOW = "POST, OPTIONS"
RESOURCE_ALLOW = "PATCH, DELETE, OPTIONS"


@dataclass
class SdpFrag:
    """What a trickle-ice-sdpfrag body says: the ICE credentials it names and its candidates per m-line."""

    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[tuple[str | None, int, str]] = field(default_factory=list)  # (mid, m-line index, candidate)
    end_of_candidates: bool = False


def parse_sdpfrag(text: str) -> SdpFrag:
    """RFC 8840 section 9.2: session-level `a=` lines, then `m=` lines each with its `a=mid`, ICE credentials,
    `a=candidate` and `a=end-of-candidates`. Unknown lines are ignored; a malformed candidate is a 400."""
    frag = SdpFrag()
    mline, mid = -1, None
    pending: list[str] = []  # candidates of the current m-line, before its a=mid is known

    def flush() -> None:
        frag.candidates.extend((mid, max(mline, 0), c) for c in pending)
        pending.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("m="):
            flush()
            mline, mid = mline + 1, None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :].strip()
        elif line.startswith("a=ice-ufrag:"):
            frag.ufrag = line[len("a=ice-ufrag:") :].strip()
        elif line.startswith("a=ice-pwd:"):
            frag.pwd = line[len("a=ice-pwd:") :].strip()
        elif line.startswith("a=candidate:"):
            value = line[len("a=candidate:") :]
            if len(value.split()) < 8:
                raise ApiError(400, f"malformed candidate: {line[:200]!r}", code="invalid_sdpfrag")
            pending.append(value)
        elif line == "a=end-of-candidates":
            frag.end_of_candidates = True
    flush()
    return frag


def ice_credentials(sdp: str) -> tuple[str | None, str | None]:
    """The first `a=ice-ufrag` and `a=ice-pwd` of an SDP (a BUNDLE offer has one pair)."""
    frag = parse_sdpfrag(sdp.replace("a=candidate:", "a=x-candidate:"))  # only the credentials are wanted here
    return frag.ufrag, frag.pwd


def _usable_address(host: str) -> bool:
    """An IP address, or an mDNS name (`<uuid>.local`, which aioice resolves); never a DNS name to look up."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.endswith(".local")
    return True


def link_header(server: dict) -> str:
    """One STUN/TURN server as a WHIP/WHEP `Link` value (RFC 9725 section 4.6); one value per URL."""
    parts = []
    urls = server["urls"] if isinstance(server["urls"], list) else [server["urls"]]
    for url in urls:
        value = f'<{url}>; rel="ice-server"'
        if server.get("username"):
            value += f'; username="{server["username"]}"; credential="{server["credential"]}"'
            value += '; credential-type="password"'
        parts.append(value)
    return ", ".join(parts)


@dataclass
class WhepResource:
    viewer_id: str
    etag: str
    ice_ufrag: str | None
    ice_pwd: str | None
    trickled: int = 0  # candidates accepted through PATCH


class WhepResources:
    """Every session's WHEP resources, live and recently ended; a session's are forgotten when it closes."""

    def __init__(self) -> None:
        self._by_session: dict[str, collections.OrderedDict[str, WhepResource]] = {}

    def add(self, session_id: str, resource: WhepResource) -> None:
        known = self._by_session.setdefault(session_id, collections.OrderedDict())
        known[resource.viewer_id] = resource
        while len(known) > MAX_REMEMBERED:
            known.popitem(last=False)

    def get(self, session_id: str, viewer_id: str) -> WhepResource | None:
        known = self._by_session.get(session_id)
        return known.get(viewer_id) if known is not None else None

    def forget(self, session_id: str, viewer_id: str) -> None:
        known = self._by_session.get(session_id)
        if known is not None:
            known.pop(viewer_id, None)

    def forget_session(self, session: ServerSession) -> None:
        self._by_session.pop(session.id, None)


RESOURCES = web.AppKey("whep_resources", WhepResources)


def setup(app: web.Application) -> None:
    """The registry, emptied of each session's resources when the session closes."""
    resources = app[RESOURCES] = WhepResources()
    app[STATE].sessions.add_close_listener(resources.forget_session)


def _resources(request: web.Request) -> WhepResources:
    return request.app[RESOURCES]


def _resource_url(session: ServerSession, viewer: str) -> str:
    return f"/v1/sessions/{session.id}/whep/{viewer}"


# -- handlers -----------------------------------------------------------------------------------------------------
async def whep_offer(request: web.Request) -> web.Response:
    state = server_state(request)
    session = session_for(request, watching=True)  # the view token too
    if request.content_type != "application/sdp":
        raise ApiError(415, "WHEP: send the offer as application/sdp")
    sdp = await limits.read_body(request, state.config.max_sdp_bytes, "the SDP", code="sdp_too_large")
    offer = rtc.parse_description(limits.utf8(sdp, "the SDP", code="invalid_sdp"))
    # Checked after the last await before connect_peer takes its place in session.peers (synchronously), so
    # concurrent offers cannot all pass the check first.
    limits.check_viewers(session, state.config.max_viewers, PUBLISHER)
    viewer = session.new_viewer_id()
    pc = await connect_peer(state, session, viewer, offer)
    ufrag, pwd = ice_credentials(offer.sdp)
    resource = WhepResource(viewer, f'"{secrets.token_hex(8)}"', ufrag, pwd)
    _resources(request).add(session.id, resource)
    headers = {
        "Location": _resource_url(session, viewer),
        "ETag": resource.etag,
        "Accept-Patch": TRICKLE_TYPE,
    }
    response = web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp", headers=headers)
    for server in session_ice_servers(state.config, session.id, session_age_s=session.age_s()):
        response.headers.add("Link", link_header(server))
    return response


def _live_peer(request: web.Request, session: ServerSession):
    """(the resource, its peer connection or None when the viewer ended); 404 for a resource never made here."""
    viewer = request.match_info["viewer_id"]
    resource = None if viewer == PUBLISHER else _resources(request).get(session.id, viewer)
    pc = session.peers.get(viewer) if viewer != PUBLISHER else None
    if resource is None and pc is None:
        raise ApiError(404, f"no WHEP viewer {viewer!r} in this session")
    return resource, pc


async def whep_patch(request: web.Request) -> web.Response:
    """Trickle ICE (RFC 8840 fragments): the viewer's candidates join the checks; an ICE restart is refused."""
    state = server_state(request)
    session = session_for(request, watching=True)  # the view token too
    resource, pc = _live_peer(request, session)
    if pc is None or resource is None:
        raise ApiError(404, "this WHEP viewer has ended; POST a new offer to the endpoint", code="viewer_ended")
    if request.content_type != TRICKLE_TYPE:
        raise ApiError(415, f"WHEP PATCH: send {TRICKLE_TYPE} (RFC 8840)", headers={"Accept-Patch": TRICKLE_TYPE})
    if_match = request.headers.get("If-Match")
    if if_match is not None and if_match.strip() not in ("*", resource.etag):
        raise ApiError(412, f"If-Match {if_match[:60]!r} is not this resource's ETag", code="precondition_failed")
    body = await limits.read_body(request, state.config.max_sdp_bytes, "the SDP fragment", code="sdp_too_large")
    frag = parse_sdpfrag(limits.utf8(body, "the SDP fragment", code="invalid_sdpfrag"))
    restart = (frag.ufrag is not None and frag.ufrag != resource.ice_ufrag) or (
        frag.pwd is not None and frag.pwd != resource.ice_pwd
    )
    if restart:
        raise ApiError(
            422,
            "ICE restarts are not supported by this server (aiortc cannot restart ICE on a live connection); "
            "DELETE this resource and POST a new offer",
            code="ice_restart_unsupported",
        )
    for mid, index, line in frag.candidates:
        try:
            candidate = candidate_from_sdp(line)
        except (ValueError, AssertionError) as exc:
            raise ApiError(400, f"malformed candidate: {line[:200]!r}", code="invalid_sdpfrag") from exc
        if not _usable_address(candidate.ip):
            raise ApiError(
                400, f"candidate address {candidate.ip[:100]!r} is not an IP address", code="invalid_sdpfrag"
            )
        candidate.sdpMid, candidate.sdpMLineIndex = mid, index
        await rtc.add_remote_candidate(pc, candidate)
        resource.trickled += 1
    if frag.end_of_candidates:
        await rtc.add_remote_candidate(pc, None)
    return web.Response(status=204, headers={"ETag": resource.etag})


async def whep_delete(request: web.Request) -> web.Response:
    """The viewer leaves: 200, also when its connection had already ended (the resource ends either way)."""
    session = session_for(request, watching=True)  # the view token too
    resource, pc = _live_peer(request, session)
    if pc is not None:
        await session.close_peer(request.match_info["viewer_id"])
    _resources(request).forget(session.id, request.match_info["viewer_id"])
    return web.Response(status=200)


async def endpoint_options(request: web.Request) -> web.Response:
    """What the endpoint takes (a CORS preflight with `Origin` is answered by the origin middleware first)."""
    return web.Response(status=204, headers={"Allow": ENDPOINT_ALLOW, "Accept-Post": "application/sdp"})


async def resource_options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Allow": RESOURCE_ALLOW, "Accept-Patch": TRICKLE_TYPE})
