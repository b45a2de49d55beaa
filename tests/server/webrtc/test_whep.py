"""WHEP by the book (issue 15 item 5): a viewer that trickles its candidates with PATCH (RFC 8840 fragments),
ICE restarts refused with 422, If-Match/ETag, DELETE of a viewer that already left, OPTIONS and CORS.

The client is aiortc on 127.0.0.1 (`kit.aiortc_viewer.trickle_viewer`): its offer goes out without candidates, and the
candidates follow in a PATCH before the client even applies the answer, so the server's side of the connection has
no way to the viewer but the trickled candidates (checked on the server's ICE transport).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.aiortc_viewer import apply_answer, trickle_viewer, viewer_offer
from kit.http_calls import bearer, create_session, delete_session, http
from kit.sdp_frag import TRICKLE_TYPE, sdpfrag
from kit.served import ServerThread, server_fixture
from kit.waits import run, wait_for

from server.errors import ApiError
from server.webrtc.whep import parse_sdpfrag

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(120)]

LINE = st.text(alphabet=st.sampled_from("am=:-.0123456789 abcdefxyzudptypho\r\n"), max_size=80)
SDPFRAG_LINES = st.sampled_from(
    [
        "a=ice-ufrag:u",
        "a=ice-pwd:p",
        "m=audio 9 UDP/TLS/RTP/SAVPF 0",
        "a=mid:0",
        "a=candidate:1 1 udp 2 127.0.0.1 9 typ host",
        "a=end-of-candidates",
        "a=candidate:",
    ]
)

ORIGIN = "https://studio.example"
TURN_URL = "turn:127.0.0.1:3478?transport=udp"


# A TURN secret and URL only to see them in the Link headers: the server's own peers use --ice-server (none).
server = server_fixture({"allowed_origin": [ORIGIN], "turn_secret": "test-secret", "turn_url": [TURN_URL]})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(SDPFRAG_LINES, LINE), max_size=12))
def test_sdpfrag_parser_takes_anything(lines):
    """Any body: parsed, or a 400 (ApiError); never another exception (a 500)."""
    try:
        frag = parse_sdpfrag("\r\n".join(lines))
    except ApiError as exc:
        assert exc.status == 400
    else:
        assert all(len(c.split()) >= 8 for _, _, c in frag.candidates)


def _server_remote_candidates(server: ServerThread, session_id: str, viewer: str) -> list:
    """The remote candidates the server's ICE transport holds for one viewer (asked on the server's loop)."""

    async def read():
        pc = server.state.sessions.get(session_id).peers[viewer]
        return pc.getTransceivers()[0].receiver.transport.transport.getRemoteCandidates()

    return server.call(read())


def test_trickling_viewer_connects_through_its_patched_candidates(server):
    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            v = await trickle_viewer(c, s, server.url)
            viewer = v.resource_url.rsplit("/", 1)[1]
            assert v.held and all(" 127.0.0.1 " in line for _, line in v.held)
            assert v.etag and v.headers["Accept-Patch"] == TRICKLE_TYPE
            before = _server_remote_candidates(server, s["id"], viewer)
            assert await v.trickle() == 204
            after = _server_remote_candidates(server, s["id"], viewer)
            await apply_answer(v)
            await wait_for(
                lambda: v.counter.video >= 10 and v.counter.audio >= 10,
                30,
                lambda: (
                    f"media through the trickled candidates ({v.counter.video} video, {v.counter.audio} audio, "
                    f"{v.pc.connectionState})"
                ),
            )
            assert await v.delete() == 200
            await v.pc.close()
            await v.counter.stop()
            await delete_session(c, s)
            return before, after

    before, after = run(main(), 90)
    assert before == [], f"the offer had no candidates, yet the server knew {before}"
    assert after and {(c.ip, c.type) for c in after} == {("127.0.0.1", "host")}


async def playing_viewer(c, url: str):
    """A new session and a WHEP viewer that trickled its candidates and plays: (session, viewer)."""
    s = await create_session(c, url)
    v = await trickle_viewer(c, s, url)
    assert await v.trickle() == 204
    await apply_answer(v)
    await wait_for(lambda: v.counter.video >= 5, 30, "the viewer playing")
    return s, v


def test_ice_restart_is_refused_and_the_viewer_plays_on(server):
    async def main():
        async with http() as c:
            s, v = await playing_viewer(c, server.url)
            restart = sdpfrag("newufrag", "newpasswordnewpasswordxx", [])
            headers = {**bearer(s["token"]), "Content-Type": TRICKLE_TYPE, "If-Match": "*"}
            async with c.patch(v.resource_url, data=restart, headers=headers) as r:
                status, body = r.status, await r.json()
            frames = v.counter.video
            await wait_for(
                lambda: v.counter.video >= frames + 10,
                10,
                "the running connection playing on after the refused restart",
            )
            await v.delete()
            await v.pc.close()
            await v.counter.stop()
            await delete_session(c, s)
            return status, body

    status, body = run(main(), 90)
    assert status == 422 and body["error"]["code"] == "ice_restart_unsupported", body
    assert "POST a new offer" in body["error"]["message"]


def test_patch_checks_etag_type_token_and_candidates(server):
    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            v = await trickle_viewer(c, s, server.url)
            frag = sdpfrag(v.ufrag, v.pwd, v.held)
            out = {
                "stale etag": await v.patch(frag, if_match='"not-the-etag"'),
                "wrong type": await v.patch(frag, content_type="application/sdp"),
                "bad candidate": await v.patch(sdpfrag(v.ufrag, v.pwd, [("0", "a=candidate:1 1 udp")])),
                "bad numbers": await v.patch(
                    sdpfrag(v.ufrag, v.pwd, [("0", "a=candidate:1 x udp y 1.2.3.4 z typ host")])
                ),
                "a host name": await v.patch(
                    sdpfrag(v.ufrag, v.pwd, [("0", "a=candidate:1 1 udp 1 example.com 9 typ host")])
                ),
                "no if-match": await v.patch(sdpfrag(v.ufrag, v.pwd, v.held[:1], end=False), if_match=None),
                "etag": await v.patch(frag),
            }
            async with c.patch(v.resource_url, data=frag, headers={"Content-Type": TRICKLE_TYPE}) as r:
                out["no token"] = r.status
            async with c.patch(v.resource_url + "x", data=frag, headers={**bearer(s["token"])}) as r:
                out["unknown viewer"] = r.status
            await v.delete()
            await v.pc.close()
            await v.counter.stop()
            await delete_session(c, s)
            return out

    out = run(main(), 60)
    assert out == {
        "stale etag": 412,
        "wrong type": 415,
        "bad candidate": 400,
        "bad numbers": 400,
        "a host name": 400,
        "no if-match": 204,
        "etag": 204,
        "no token": 401,
        "unknown viewer": 404,
    }


def test_delete_of_a_viewer_that_already_left_ends_the_resource(server):
    async def main():
        async with http() as c:
            s, v = await playing_viewer(c, server.url)
            viewer = v.resource_url.rsplit("/", 1)[1]
            await v.pc.close()  # the viewer leaves without a DELETE (a closed tab)
            await v.counter.stop()

            async def peers() -> list[str]:
                async with c.get(s["url"], headers=bearer(s["token"])) as r:
                    return (await r.json())["peers"]

            left = False
            for _ in range(100):  # at most ~10 s for the server to see the connection close
                if viewer not in await peers():
                    left = True
                    break
                await asyncio.sleep(0.1)
            statuses = [await v.delete(), await v.delete()]
            await delete_session(c, s)
            return left, statuses

    left, statuses = run(main(), 60)
    assert left, "the server did not notice the viewer leave"
    assert statuses == [200, 404], "DELETE of a viewer that left answers its end; after that it is gone"


def test_options_cors_and_link_headers(server):
    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            out = {}
            async with c.options(s["whep_url"]) as r:
                out["endpoint"] = (r.status, r.headers.get("Allow"), r.headers.get("Accept-Post"))
            preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "PATCH"}
            async with c.options(s["whep_url"] + "/anything", headers=preflight) as r:
                out["preflight"] = (
                    r.status,
                    r.headers.get("Access-Control-Allow-Origin"),
                    r.headers.get("Access-Control-Allow-Methods"),
                    r.headers.get("Access-Control-Allow-Headers"),
                )
            async with c.options(s["whep_url"], headers={"Origin": "https://evil.example"}) as r:
                out["other origin"] = r.status
            v = await trickle_viewer(c, s, server.url)
            async with c.options(v.resource_url) as r:
                out["resource"] = (r.status, r.headers.get("Allow"), r.headers.get("Accept-Patch"))
            await v.delete()
            await v.pc.close()
            await v.counter.stop()
            # A cross-origin POST (an OBS page or a web app elsewhere) can read the headers a WHEP client needs.
            pc, sdp = await viewer_offer()
            headers = {**bearer(s["token"]), "Content-Type": "application/sdp", "Origin": ORIGIN}
            async with c.post(s["whep_url"], data=sdp, headers=headers) as r:
                out["post"] = (r.status, r.headers.get("Access-Control-Expose-Headers", ""), r.headers.getall("Link"))
                location = r.headers["Location"]
            async with c.delete(server.url + location, headers=bearer(s["token"])) as r:
                out["delete"] = r.status
            await pc.close()
            await delete_session(c, s)
            return s, out

    s, out = run(main(), 60)
    status, allow, accept_post = out["endpoint"]
    assert status == 204 and "POST" in allow and accept_post == "application/sdp"
    status, allow, accept_patch = out["resource"]
    assert status == 204 and {"PATCH", "DELETE"} <= set(allow.replace(" ", "").split(","))
    assert accept_patch == TRICKLE_TYPE
    status, origin, methods, headers = out["preflight"]
    assert status == 204 and origin == ORIGIN and "PATCH" in methods and "If-Match" in headers
    assert out["other origin"] == 403
    status, exposed, links = out["post"]
    assert status == 201 and {"Location", "ETag", "Link"} <= set(exposed.replace(" ", "").split(","))
    assert len(links) == 1 and links[0].startswith(f'<{TURN_URL}>; rel="ice-server"; username="'), links
    assert f':{s["id"]}"' in links[0] and 'credential-type="password"' in links[0]
    assert out["delete"] == 200
