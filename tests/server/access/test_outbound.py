"""Where live outputs may connect (server/access/outbound.py, server/outputs/): the real server on loopback, pushed at
stand-in "internal" services on 127.0.0.1 (a metadata-like HTTP service, a TCP service with a banner, a WHIP endpoint
that redirects, one that answers 600 MiB, a TLS ingest with a self-signed certificate, an ingest that drops each
publisher after accepting it).

Servers that must reach the tests' own ingests run with `--output-allow 127.0.0.1`, as an operator with a local
ingest would; the others with the default policy. Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from kit.http_calls import bearer, create_session, delete_session
from kit.http_calls import http as open_http
from kit.paths import KIT
from kit.rtmp_receiver import RtmpIngest
from kit.served import server_fixture
from kit.waits import free_port, run

from server.outputs.target import protocol_available
from server.serving.tls import make_self_signed
from server.settings.config import ConfigError, ServerConfig

pytestmark = [pytest.mark.fixtures, pytest.mark.timeout(300)]

SECRET = "internal-secret-7f3a"  # what the stand-in services answer: it must never come back
ALLOW_LOOPBACK = ["127.0.0.1"]


server = server_fixture()  # the default policy: public addresses only


# an operator who allows loopback (the tests' stand-ins and ingests live there)
allowing = server_fixture({"output_allow": ALLOW_LOOPBACK}, name="allowing")


async def post_output(http, session: dict, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    async with http.post(f"{session['url']}/outputs", json=body, headers=headers or bearer(session["token"])) as r:
        return r.status, await r.json()


async def reports(http, session: dict) -> tuple[str, list[dict]]:
    """The session's GET (raw text, everything a caller can read) and its outputs."""
    async with http.get(session["url"], headers=bearer(session["token"])) as r:
        text = await r.text()
    async with http.get(f"{session['url']}/outputs", headers=bearer(session["token"])) as r:
        text += await r.text()
        return text, (await r.json())["outputs"]


async def wait_report(http, session: dict, output_id: str, predicate, timeout: float) -> dict:
    """The output's report once `predicate(report)` holds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        _, outputs = await reports(http, session)
        report = next(o for o in outputs if o["id"] == output_id)
        if predicate(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"output report never matched within {timeout} s: {report}")
        await asyncio.sleep(0.1)


async def stand_in(routes: list[web.RouteDef]) -> tuple[web.AppRunner, str]:
    """An HTTP service on 127.0.0.1 (an "internal" one); its base URL."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


# -- item 1: the policy, at add time -------------------------------------------------------------------------------
def test_internal_targets_are_refused_when_added(server):
    port = free_port()
    targets = {
        "metadata": "whip+http://169.254.169.254/latest/meta-data/",
        "docker": "whip+http://127.0.0.1:2375/containers/json",
        "private": "rtmp://10.0.0.1:2375/x/key",
        "loopback name": "rtmp://localhost:22/x/key",
        "loopback": f"rtmp://127.0.0.1:{port}/live/key",
        "cgnat": "rtmp://100.64.0.1/live/key",
        "ula": "rtmp://[fd00::1]/live/key",
        "mapped": "rtmp://[::ffff:127.0.0.1]/live/key",
        "nat64": "rtmp://[64:ff9b::a9fe:a9fe]/live/key",
        "multicast": "rtmp://239.1.1.1/live/key",
        "unspecified": "rtmp://0.0.0.0/live/key",
        "no such name": "rtmp://no-such-host.invalid/live/key",
    }

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, server.url)
            answers = {name: await post_output(http, session, {"url": url}) for name, url in targets.items()}
            _, outputs = await reports(http, session)
            async with http.post(f"{server.url}/v1/sessions", json={"outputs": [{"url": targets["metadata"]}]}) as r:
                at_creation = r.status, await r.json()
            open_sessions = len(server.state.sessions)
            await delete_session(http, session)
            return answers, outputs, at_creation, open_sessions

    answers, outputs, at_creation, open_sessions = run(main())
    print("\n" + "\n".join(f"{name}: {status} {body['error']['code']}" for name, (status, body) in answers.items()))
    for name, (status, body) in answers.items():
        assert status == 400 and body["error"]["code"] == "target_not_allowed", (name, status, body)
        assert "--output-allow" in body["error"]["message"]
    assert outputs == []  # nothing was started
    assert at_creation[0] == 400 and at_creation[1]["error"]["code"] == "target_not_allowed"
    assert open_sessions == 1  # the refused creation opened no session (the one open is the test's)


def test_an_allow_rule_with_a_port_allows_that_port_only(serve):
    allowed, other = free_port(), free_port()
    srv = serve(output_allow=[f"127.0.0.1:{allowed}"])

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, srv.url)
            ok = await post_output(http, session, {"url": f"rtmp://127.0.0.1:{allowed}/live/key"})
            refused = await post_output(http, session, {"url": f"rtmp://127.0.0.1:{other}/live/key"})
            await delete_session(http, session)
            return ok, refused

    ok, refused = run(main())
    assert ok[0] == 201
    assert refused[0] == 400 and refused[1]["error"]["code"] == "target_not_allowed"
    env = ServerConfig.from_env({"VEXPRESS_OUTPUT_ALLOW": "127.0.0.1:1935, 10.0.0.0/8", "VEXPRESS_OUTPUTS": "off"})
    assert env.output_allow == ["127.0.0.1:1935", "10.0.0.0/8"] and env.outputs == "off"
    with pytest.raises(ConfigError):
        ServerConfig(output_allow=["10.0.0.0/8:99999"]).validate()
    with pytest.raises(ConfigError):
        ServerConfig(output_allow=["bad host!"]).validate()


# -- item 1: the operator's switch -----------------------------------------------------------------------------------
def test_the_outputs_switch_turns_them_off_or_restricts_them_to_api_keys(serve):
    url = "rtmp://a.rtmp.example.com/live/key"
    off = serve(outputs="off")
    keyed = serve(outputs="api-key", api_key="operator-key")

    async def main():
        async with open_http(60) as http:
            s1 = await create_session(http, off.url)
            switched_off = await post_output(http, s1, {"url": url})
            async with http.post(f"{off.url}/v1/sessions", json={"outputs": [{"url": url}]}) as r:
                off_at_creation = r.status, await r.json()
            await delete_session(http, s1)
            key = {"Authorization": "Bearer operator-key"}
            s2 = await create_session(http, keyed.url, headers=key)
            with_token = await post_output(http, s2, {"url": "rtmp://127.0.0.1/live/key"})
            with_key = await post_output(http, s2, {"url": "rtmp://127.0.0.1/live/key"}, headers=key)
            async with http.delete(s2["url"], headers=key) as r:
                assert r.status == 204
            return switched_off, off_at_creation, with_token, with_key

    switched_off, off_at_creation, with_token, with_key = run(main())
    assert switched_off[0] == 403 and switched_off[1]["error"]["code"] == "outputs_disabled"
    assert off_at_creation[0] == 403 and off_at_creation[1]["error"]["code"] == "outputs_disabled"
    assert with_token[0] == 403 and with_token[1]["error"]["code"] == "outputs_need_api_key"
    # the key passes the switch; the policy still refuses loopback
    assert with_key[0] == 400 and with_key[1]["error"]["code"] == "target_not_allowed"
    with pytest.raises(ConfigError):  # nobody could hold a key
        ServerConfig(outputs="api-key").validate()


# -- item 1: what an allowed output can learn ------------------------------------------------------------------------
def test_whip_redirects_are_not_followed_and_replies_never_come_back(allowing, caplog):
    internal_hits: list[str] = []

    async def internal(request: web.Request) -> web.Response:
        internal_hits.append(request.method)
        return web.Response(text=f"{SECRET} credentials", content_type="text/plain")

    async def main():
        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"{base}/latest/meta-data/", text=SECRET)

        async def forbidden(request: web.Request) -> web.Response:
            return web.Response(status=403, text=f"denied: {SECRET}")

        async def candidates(request: web.Request) -> web.Response:
            sdp = "v=0\r\na=candidate:1 1 udp 2130706431 169.254.169.254 80 typ host\r\n"
            return web.Response(status=201, content_type="application/sdp", headers={"Location": "/c/1"}, text=sdp)

        runner, base = await stand_in(
            [
                web.get("/latest/meta-data/", internal),
                web.post("/latest/meta-data/", internal),
                web.post("/redirect", redirect),
                web.post("/forbidden", forbidden),
                web.post("/candidates", candidates),
            ]
        )
        try:
            async with open_http(60) as http:
                session = await create_session(http, allowing.url)
                ids = {}
                for name in ("redirect", "forbidden", "candidates"):
                    status, body = await post_output(http, session, {"url": f"whip+{base}/{name}"})
                    assert status == 201, body
                    ids[name] = body["id"]
                found = {
                    name: await wait_report(http, session, oid, lambda r: r["last_error"] is not None, 30)
                    for name, oid in ids.items()
                }
                await asyncio.sleep(1.5)  # a reconnect or two
                text, _ = await reports(http, session)
                await delete_session(http, session)
                return found, text
        finally:
            await runner.cleanup()

    caplog.set_level(logging.DEBUG)
    found, text = run(main(), 120)
    print(f"\nreports: { {n: r['last_error'] for n, r in found.items()} }, internal service hit {internal_hits}")
    assert internal_hits == []  # the 302 was not followed: no GET (nor POST) reached the internal service
    assert found["redirect"]["last_error"] == "http 302"
    assert found["forbidden"]["last_error"] == "http 403"
    assert found["candidates"]["last_error"] == "no allowed ICE candidate"
    assert SECRET not in text and "denied" not in text
    assert not [r for r in caplog.records if SECRET in r.getMessage()]  # nor in the server's log


def test_an_open_and_a_closed_port_read_the_same(allowing, caplog):
    closed = free_port()

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"SSH-2.0-OpenSSH {SECRET}\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    async def main():
        service = await asyncio.start_server(banner, "127.0.0.1", 0)
        open_port = service.sockets[0].getsockname()[1]
        try:
            async with open_http(60) as http:
                session = await create_session(http, allowing.url)
                ids = {}
                for name, port in (("open", open_port), ("closed", closed)):
                    status, body = await post_output(http, session, {"url": f"rtmp://127.0.0.1:{port}/live/key"})
                    assert status == 201, body
                    ids[name] = body["id"]
                found = {
                    name: await wait_report(http, session, oid, lambda r: r["reconnects"] >= 1, 60)
                    for name, oid in ids.items()
                }
                text, _ = await reports(http, session)
                await delete_session(http, session)
                return found, text
        finally:
            service.close()

    caplog.set_level(logging.DEBUG)
    found, text = run(main(), 120)
    print(f"\nopen port: {found['open']['last_error']!r}; closed port: {found['closed']['last_error']!r}")
    assert found["open"]["last_error"] == found["closed"]["last_error"] == "could not connect"
    assert found["open"]["state"] == found["closed"]["state"] == "reconnecting"
    assert found["open"]["connects"] == found["closed"]["connects"] == 0
    assert SECRET not in text and "SSH" not in text
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


def test_the_rtmp_relay_connects_to_the_checked_address_and_keeps_the_ingest_name(allowing):
    """`rtmp://localhost:PORT/...`: checked, connected at 127.0.0.1 by the server; the ingest still reads its own
    name in the connect command's tcUrl (not the relay's loopback port)."""
    seen: list[bytes] = []

    async def ingest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c0c1 = await reader.readexactly(1537)
        writer.write(b"\x03" + bytes(1536) + c0c1[1:])  # S0, S1, S2: enough for FFmpeg to go on
        await reader.readexactly(1536)
        try:
            seen.append(await asyncio.wait_for(reader.read(4096), 10))
        finally:
            writer.close()

    async def main():
        service = await asyncio.start_server(ingest, "127.0.0.1", 0)
        port = service.sockets[0].getsockname()[1]
        try:
            async with open_http(60) as http:
                session = await create_session(http, allowing.url)
                status, body = await post_output(http, session, {"url": f"rtmp://localhost:{port}/live/key"})
                assert status == 201, body
                deadline = time.monotonic() + 40
                while not seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await delete_session(http, session)
                return port
        finally:
            service.close()

    port = run(main(), 90)
    assert seen, "the ingest never got the connect command"
    print(f"\nconnect command: {seen[0][:200]!r}")
    assert f"rtmp://localhost:{port}/live".encode() in seen[0].replace(b"\xc3", b"")
    assert b"127.0.0.1" not in seen[0]


# -- item 6: the WHIP answer is bounded -----------------------------------------------------------------------------
def test_a_huge_whip_answer_is_not_read(allowing):
    total = 600 << 20
    sent = {"sdp": 0, "text": 0}

    def huge(kind: str, content_type: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            reply = web.StreamResponse(status=201, headers={"Location": f"/{kind}/1", "Content-Type": content_type})
            await reply.prepare(request)
            block = b"a=x-padding:" + b"x" * ((1 << 20) - 13) + b"\n"
            try:
                while sent[kind] < total:
                    await reply.write(block)
                    sent[kind] += len(block)
            except (ConnectionError, RuntimeError):
                pass
            return reply

        return handler

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    async def main():
        runner, base = await stand_in(
            [web.post("/sdp", huge("sdp", "application/sdp")), web.post("/text", huge("text", "text/plain"))]
        )
        try:
            async with open_http(120) as http:
                session = await create_session(http, allowing.url)
                before, peak = rss_mb(), 0.0
                ids = {}
                for kind in ("sdp", "text"):
                    status, body = await post_output(http, session, {"url": f"whip+{base}/{kind}"})
                    assert status == 201, body
                    ids[kind] = body["id"]
                found = {}
                deadline = time.monotonic() + 90
                while len(found) < 2 and time.monotonic() < deadline:
                    peak = max(peak, rss_mb())
                    _, outputs = await reports(http, session)
                    found = {
                        k: o
                        for k, o in ((k, next(o for o in outputs if o["id"] == v)) for k, v in ids.items())
                        if o["last_error"] is not None
                    }
                    await asyncio.sleep(0.1)
                await delete_session(http, session)
                return found, peak - before
        finally:
            await runner.cleanup()

    found, grew = run(main(), 150)
    print(
        f"\n600 MiB WHIP answers: server RSS grew {grew:.0f} MiB at most; the stand-in got {sent['sdp'] >> 20} MiB "
        f"(application/sdp) and {sent['text'] >> 20} MiB (text/plain) out; {found}"
    )
    assert found["sdp"]["last_error"] == "the answer is too large"
    assert found["text"]["last_error"] == "the answer is not application/sdp"
    assert sent["sdp"] < 64 << 20 and sent["text"] < 64 << 20  # read no further than the limit (plus buffers)
    assert grew < 200


# -- item 7: rtmps verifies the ingest ------------------------------------------------------------------------------
async def tls_front(ingest_port: int, names: list[str], tmp: Path) -> tuple[asyncio.Server, bytes]:
    """A TLS listener with a self-signed certificate for `names`, passing what it gets to a plain RTMP ingest (as a
    relay that wants the stream key would); its certificate (PEM)."""
    made = make_self_signed(names)
    (tmp / "cert.pem").write_bytes(made.cert_pem)
    (tmp / "key.pem").write_bytes(made.key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", ingest_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context), made.cert_pem


@pytest.mark.parametrize("case", ["self-signed", "opt-out", "trusted"])
def test_rtmps_verifies_the_ingest_certificate(allowing, tmp_path, monkeypatch, case):
    ingest = RtmpIngest(free_port(), tmp_path / "received.flv", key="secret-stream-key")
    ingest_port = int(ingest.url.split(":")[2].split("/")[0])

    async def main():
        name = "localhost" if case == "trusted" else "attacker.invalid"
        front, cert_pem = await tls_front(ingest_port, [name], tmp_path)
        if case == "trusted":  # the operator's trust store holds the ingest's certificate
            (tmp_path / "trust.pem").write_bytes(cert_pem)
            monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "trust.pem"))
        port = front.sockets[0].getsockname()[1]
        body = {"url": f"rtmps://localhost:{port}/live/secret-stream-key"}
        if case == "opt-out":
            body["tls_verify"] = False
        try:
            async with open_http(60) as http:
                session = await create_session(http, allowing.url)
                status, created = await post_output(http, session, body)
                assert status == 201, created
                report = await wait_report(
                    http, session, created["id"], lambda r: r["state"] == "live" or r["reconnects"] >= 1, 60
                )
                await delete_session(http, session)
                return report
        finally:
            front.close()

    try:
        report = run(main(), 120)
    finally:
        ingest.kill()
    print(f"\nrtmps ({case}): {report['state']}, last_error {report['last_error']!r}; ingest said {ingest.lines}")
    if case == "self-signed":
        assert report["state"] == "reconnecting" and report["connects"] == 0
        assert report["last_error"].startswith("certificate not verified")
        assert not any(line.startswith("receiving") for line in ingest.lines)  # the key never reached it
    else:
        assert report["state"] == "live", report


# -- item 10: back-off whatever happened before ---------------------------------------------------------------------
def test_an_ingest_that_drops_after_accepting_gets_ever_longer_waits(allowing):
    window_s = 30.0
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(KIT / "rtmp_ingest.py"),
            f"rtmp://127.0.0.1:{port}/live/k",
            "-",
            "--drop-after",
            "0.3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    accepted: list[float] = []

    def read_accepts() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("accepted"):
                accepted.append(float(line.split()[1]))

    threading.Thread(target=read_accepts, daemon=True).start()

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, allowing.url)
            status, body = await post_output(http, session, {"url": f"rtmp://127.0.0.1:{port}/live/k"})
            assert status == 201, body
            await asyncio.sleep(window_s)
            _, outputs = await reports(http, session)
            await delete_session(http, session)
        return outputs[0]

    try:
        report = run(main(), 120)
    finally:
        proc.kill()
        proc.wait(10)
    gaps = [round(b - a, 1) for a, b in zip(accepted, accepted[1:])]
    print(f"\ndrop-after-accept ingest: {len(accepted)} connections in {window_s:.0f} s, gaps {gaps} s; {report}")
    assert len(accepted) >= 3, accepted  # it did connect, and again
    assert len(accepted) <= 6  # 1, 2, 4, 8, 16 s waits: at most 6 connections in 30 s (was one every ~2 s)
    assert gaps[-1] - gaps[0] >= 2.5  # the waits grow although each connection went live (was: 1 s each time)


# -- item 11: URLs ---------------------------------------------------------------------------------------------------
def test_urls_with_spaces_controls_or_listener_options_are_refused(allowing):
    port = free_port()
    bad = {
        "leading space": f" rtmp://127.0.0.1:{port}/live/key",
        "tab in scheme": f"rt\tmp://127.0.0.1:{port}/live/key",
        "newline": f"rtmp://127.0.0.1:{port}/live/key\n",
        "nul": f"rtmp://127.0.0.1:{port}/live/\x00key",
        "non-ascii": f"rtmp://127.0.0.1:{port}/live/kéy",
        "fragment": f"rtmp://127.0.0.1:{port}/live/key#x",
        "srt listener": f"srt://127.0.0.1:{port}?mode=listener",
        "srt local port": f"srt://127.0.0.1:{port}?localport=5000",
    }

    async def main():
        async with open_http(60) as http:
            session = await create_session(http, allowing.url)
            answers = {name: await post_output(http, session, {"url": url}) for name, url in bad.items()}
            _, outputs = await reports(http, session)
            await delete_session(http, session)
            return answers, outputs

    answers, outputs = run(main())
    print("\n" + "\n".join(f"{n}: {s} {b['error']['code']}" for n, (s, b) in answers.items()))
    for name, (status, body) in answers.items():
        assert status == 400, (name, body)
        if not name.startswith("srt") or protocol_available("srt"):
            assert body["error"]["code"] == "invalid_url", (name, body)
    assert outputs == []
