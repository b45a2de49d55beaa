"""Deploying (issue 17): HTTPS on `serve` (--tls-cert/--tls-key, --tls-self-signed) and TURN REST API credentials.

Fast unit tests of the flags, the certificate and the credentials; then end to end in headless Chromium, run by
tests/kit/netns_browser.py inside a loopback-only network namespace (`unshare -n`, as root): the page over
https://127.0.0.1, the fake microphone, the avatar's video and audio, a wss:// websocket on the same port.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import ssl
import time
from pathlib import Path

import pytest
from kit.aiortc_viewer import viewer_offer
from kit.http_calls import bearer, create_session, delete_session, http
from kit.media_synth import spoken_wav
from kit.netns_browser import run_driver_in_netns
from kit.served import make_config
from kit.waits import run

from server import cli
from server.serving.tls import make_self_signed, served_names, ssl_context
from server.settings.config import ConfigError, ServerConfig
from server.webrtc.turn import session_ice_servers, turn_credentials


# -- flags ------------------------------------------------------------------------------------------------------------
def _write_pair(folder: Path, name: str, names: list[str]) -> tuple[Path, Path]:
    made = make_self_signed(names)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    cert.write_bytes(made.cert_pem)
    key.write_bytes(made.key_pem)
    return cert, key


def test_tls_flags_and_env():
    cfg = ServerConfig.from_env({"VEXPRESS_TLS_SELF_SIGNED": "1"})
    assert cfg.tls_self_signed and cfg.tls_cert is None
    cfg = ServerConfig.from_env({"VEXPRESS_TLS_CERT": "/a.crt", "VEXPRESS_TLS_KEY": "/a.key"})
    assert (cfg.tls_cert, cfg.tls_key) == ("/a.crt", "/a.key")
    with pytest.raises(ConfigError, match="go together"):
        ServerConfig.from_env({"VEXPRESS_TLS_CERT": "/a.crt"})
    with pytest.raises(ConfigError, match="not both"):
        ServerConfig.from_env({}, tls_self_signed=True, tls_cert="/a.crt", tls_key="/a.key")
    args = cli.model_cli.build_parser(cli.EXTRA_COMMANDS).parse_args(["serve", "--tls-cert", "c", "--tls_key", "k"])
    assert (args.tls_cert, args.tls_key, args.tls_self_signed) == ("c", "k", None)


@pytest.mark.parametrize("case", ["missing", "mismatched", "not_pem", "only_cert"])
def test_serve_refuses_bad_certificates_before_loading(case, tmp_path, capsys, monkeypatch):
    """Exit 2 with one clear line, before the model loads or the port opens."""
    monkeypatch.setattr("server.serving.engine_factory.build_pool", lambda cfg: pytest.fail("the engine was built"))
    cert, key = _write_pair(tmp_path, "a", ["127.0.0.1"])
    _, other_key = _write_pair(tmp_path, "b", ["127.0.0.1"])
    argv = {
        "missing": ["--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(key)],
        "mismatched": ["--tls-cert", str(cert), "--tls-key", str(other_key)],
        "not_pem": ["--tls-cert", str(cert), "--tls-key", str(tmp_path / "b.crt")],
        "only_cert": ["--tls-cert", str(cert)],
    }[case]
    for var in [v for v in os.environ if v.startswith("VEXPRESS_")]:
        monkeypatch.delenv(var)
    assert cli.main(["serve", "--model_dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "file not found",
        "mismatched": "is not the private key of",
        "not_pem": "not a PEM private key",
        "only_cert": "go together",
    }[case]
    assert expected in err, err


# -- the certificate --------------------------------------------------------------------------------------------------
def test_self_signed_certificate_names_and_key(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    names = served_names("0.0.0.0", {"127.0.0.1", "192.0.2.7", "fe80::1%eth0"}, ["avatar.lan:8443"])
    assert names[:2] == ["localhost", "127.0.0.1"]
    assert "192.0.2.7" in names and "fe80::1" in names and "avatar.lan" in names
    assert served_names("192.0.2.9")[-1] == "192.0.2.9"

    made = make_self_signed(names)
    cert = x509.load_pem_x509_certificate(made.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(i) for i in san.get_values_for_type(x509.IPAddress)}
    dns = set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "192.0.2.7", "::1", "fe80::1"} <= ips
    assert {"localhost", "avatar.lan"} <= dns
    der = cert.public_bytes(serialization.Encoding.DER)
    assert made.fingerprint == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    key = serialization.load_pem_private_key(made.key_pem, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    # It loads as a server context, and a client that trusts it verifies it for 127.0.0.1 (IP SAN).
    crt, k = tmp_path / "c.pem", tmp_path / "k.pem"
    crt.write_bytes(made.cert_pem)
    k.write_bytes(made.key_pem)
    assert isinstance(ssl_context(str(crt), str(k)), ssl.SSLContext)
    assert ipaddress.ip_address("192.0.2.7") in {ipaddress.ip_address(i) for i in ips}


def test_aiohttp_serves_with_the_context_and_clients_verify_it(tmp_path):
    """The context `serve` gives aiohttp's TCPSite answers HTTPS; a client that trusts the certificate verifies it for
    https://127.0.0.1 (an IP subjectAltName) and refuses it for a name it was not made for."""
    import socket
    import urllib.request

    from aiohttp import web

    made = make_self_signed(served_names("127.0.0.1"))
    crt, key = tmp_path / "c.pem", tmp_path / "k.pem"
    crt.write_bytes(made.cert_pem)
    key.write_bytes(made.key_pem)

    async def main() -> tuple[str, str]:
        app = web.Application()

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context(str(crt), str(key)))
        await site.start()
        port = runner.addresses[0][1]
        trusting = ssl.create_default_context(cadata=made.cert_pem.decode())

        def get(url: str) -> str:
            with urllib.request.urlopen(url, timeout=5, context=trusting) as resp:
                return resp.read().decode()

        def wrong_name() -> str:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                    trusting.wrap_socket(raw, server_hostname="other.example").close()
            except ssl.SSLCertVerificationError as exc:
                return f"refused: {exc.verify_message}"
            return "accepted"

        try:
            ok = await asyncio.to_thread(get, f"https://127.0.0.1:{port}/")
            wrong = await asyncio.to_thread(wrong_name)
        finally:
            await runner.cleanup()
        return ok, wrong

    ok, wrong = asyncio.run(main())
    assert ok == "ok"
    assert wrong.startswith("refused") and "other.example" in wrong, wrong


# -- TURN credentials ------------------------------------------------------------------------------------------------
def test_turn_rest_credentials():
    user, password = turn_credentials("s3cret", "sess1", ttl_s=600, now=1_700_000_000)
    assert user == "1700000600:sess1"
    expected = base64.b64encode(hmac.new(b"s3cret", user.encode(), hashlib.sha1).digest()).decode()
    assert password == expected


def test_turn_flags_and_session_servers():
    cfg = ServerConfig.from_env(
        {
            "VEXPRESS_TURN_SECRET": "s3cret",
            "VEXPRESS_TURN_URL": "turn:turn.example.org:3478?transport=udp,turns:turn.example.org:5349",
            "VEXPRESS_ICE_SERVER": "stun:stun.example.org:3478",
        }
    )
    assert cfg.turn_url == ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]
    servers = session_ice_servers(cfg, "se123", now=1000)
    assert servers[0] == {"urls": ["stun:stun.example.org:3478"]}
    assert servers[1]["urls"] == cfg.turn_url and servers[1]["username"] == "4600:se123"
    assert servers[1]["credential"] == turn_credentials("s3cret", "se123", 3600, now=1000)[1]
    assert session_ice_servers(ServerConfig.from_env({}), "se1") == []
    with pytest.raises(ConfigError, match="go together"):
        ServerConfig.from_env({"VEXPRESS_TURN_SECRET": "s3cret"})
    with pytest.raises(ConfigError, match="go together"):
        ServerConfig.from_env({}, turn_url=["turn:h:3478"])
    with pytest.raises(ConfigError, match="no credentials"):
        ServerConfig.from_env({}, turn_secret="x", turn_url=["turn:u:p@h:3478"])


@pytest.mark.parametrize("ttl", ["86401", "1e9", "0"])
def test_serve_refuses_a_turn_ttl_out_of_bounds(ttl, tmp_path, capsys, monkeypatch):
    """--turn_ttl_s above a day (or not positive): exit 2 with one clear line, before the model loads."""
    monkeypatch.setattr("server.serving.engine_factory.build_pool", lambda cfg: pytest.fail("the engine was built"))
    for var in [v for v in os.environ if v.startswith("VEXPRESS_")]:
        monkeypatch.delenv(var)
    argv = ["--turn-secret", "s3cret", "--turn-url", "turn:127.0.0.1:3478", "--turn_ttl_s", ttl]
    assert cli.main(["serve", "--model_dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "--turn_ttl_s" in err and "86400 s (24 h)" in err and "Traceback" not in err, err
    assert ServerConfig.from_env({}, turn_secret="s", turn_url=["turn:h:3478"], turn_ttl_s=86400).turn_ttl_s == 86400


def test_turn_credentials_end_with_their_session(serve):
    """A session's TURN credentials expire at --turn_ttl_s or at the end of the session's --max_session_s,
    whichever comes first: in the creation reply and in the WHEP answer's Link header."""
    config = make_config(turn_secret="s3cret", turn_url=["turn:127.0.0.1:3478"], turn_ttl_s=3600, max_session_s=600)
    server = serve(config=config)

    async def main():
        async with http() as c:
            s = await create_session(c, server.url)
            opened = time.time()
            pc, sdp = await viewer_offer()
            headers = {**bearer(s["token"]), "Content-Type": "application/sdp"}
            async with c.post(s["whep_url"], data=sdp, headers=headers) as r:
                assert r.status == 201, await r.text()
                link = r.headers["Link"]
            await pc.close()
            await delete_session(c, s)
            return s, opened, link

    s, opened, link = run(main(), 60)
    unlimited = session_ice_servers(dataclasses.replace(config, max_session_s=0), "s1")
    turn = next(i for i in s["ice_servers"] if i.get("username"))
    expiry = int(turn["username"].split(":")[0])
    assert opened + 590 <= expiry <= opened + 600, (expiry - opened, turn)
    whep_expiry = int(re.search(r'username="(\d+):', link)[1])
    assert whep_expiry <= expiry, (whep_expiry, expiry)
    assert 3590 <= int(unlimited[0]["username"].split(":")[0]) - time.time() <= 3600  # no --max_session_s: the TTL


# -- end to end, in a loopback-only namespace -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    text = "Hello there. This is a test of the avatar over a secure connection, and it keeps on talking for a while."
    return spoken_wav(tmp_path_factory.mktemp("speech") / "speech.wav", text)


def _netns_run(mode: str, model_dir: Path, wav: Path, workdir: Path, timeout_s: float = 150) -> dict:
    args = ["--mode", mode, "--model-dir", str(model_dir), "--wav", str(wav), "--workdir", str(workdir)]
    report = run_driver_in_netns("netns_browser.py", args, timeout_s)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    dest = os.environ.get("VEXPRESS_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / "report.json", Path(dest) / f"deploy_{mode}.json")
    return report


def _check_media(report: dict) -> None:
    where = json.dumps(report, indent=1)[:6000]
    assert "exception" not in report and not report.get("last_error"), where
    assert report["interfaces"] == ["lo"], where  # the namespace has loopback only
    assert report["page_url"].startswith("https://127.0.0.1:") and report["secure_context"] is True, where
    assert 0.8 * 25 <= report["fps"] <= 1.2 * 25, where
    assert report["frame_size"] == [128, 64], where
    assert report["audio_samples_per_s"] > 0.7 * 48000, where
    assert report["remote_level_peak_rms"] > 1e-3, where
    assert report["wss_frame_bytes"] > 0, where
    whep = report["whep"]  # a WHEP viewer over the same https:// port
    assert whep["url"].startswith("https://127.0.0.1:") and whep["status"] == 201, where
    assert whep["framesDecoded"] >= 10 and whep["deleteStatus"] == 200, where
    assert not [c for c in report["console"] if c.startswith(("error", "pageerror"))], where


@pytest.mark.browser
@pytest.mark.fixtures
@pytest.mark.timeout(180)
def test_https_self_signed_browser(model_dir, speech_wav, tmp_path):
    report = _netns_run("https", model_dir, speech_wav, tmp_path)
    _check_media(report)
    assert any("SHA-256 fingerprint" in ln for ln in report["server_banner"]), report["server_banner"]
    assert any(ln.startswith("vexpress-rt serving on https://") for ln in report["server_banner"])
    pair = report["pair"]
    assert pair["local"]["address"] == pair["remote"]["address"] == "127.0.0.1", pair
    print(
        f"https: {report['fps']} fps, peak RMS {report['remote_level_peak_rms']}, ready {report['server_ready_s']} s,"
        f" run {report['runtime_s']} s"
    )


@pytest.mark.browser
@pytest.mark.fixtures
@pytest.mark.timeout(180)
def test_turn_relay_browser(model_dir, speech_wav, tmp_path):
    """coturn on 127.0.0.1 with a shared secret; the page forced to relay; the media still flows, relayed."""
    if shutil.which("turnserver") is None:
        pytest.skip("coturn not found (apt-get install coturn)")
    report = _netns_run("turn", model_dir, speech_wav, tmp_path)
    _check_media(report)
    where = json.dumps({k: v for k, v in report.items() if k != "server_log_tail"}, indent=1)[:6000]
    assert report["ice_transport_policy"] == "relay", where
    assert report["offer_candidate_types"] == ["relay"], where  # the browser offered relayed candidates only
    turn = [s for s in report["session_ice_servers"] if any(u.startswith("turn:") for u in s["urls"])]
    assert len(turn) == 1 and turn[0]["urls"] == [f"turn:127.0.0.1:{report['turn_port']}?transport=udp"], where
    expiry, _, session_id = turn[0]["username"].partition(":")
    assert session_id == report["session_id"] and turn[0]["credential"], where
    assert 3000 < int(expiry) - time.time() <= 3600, where  # --turn_ttl_s default: an hour from the session's start
    pair = report["pair"]
    assert pair["local"]["type"] == "relay" and pair["local"]["address"] == "127.0.0.1", where
    assert pair["remote"]["address"] == "127.0.0.1", where
    assert report["whep"]["pairLocalType"] == "relay", where  # the WHEP viewer got relayed too
    assert report["turn_allocations"] >= 2, where  # the publisher's and the viewer's
    print(
        f"turn: {report['fps']} fps relayed, peak RMS {report['remote_level_peak_rms']}, pair {pair},"
        f" run {report['runtime_s']} s"
    )
