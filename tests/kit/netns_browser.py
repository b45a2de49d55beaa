"""Run `vexpress-rt serve` over HTTPS (and a TURN server, in relay mode) plus headless Chromium, inside a network
namespace that has only loopback; print one JSON report. Used by tests/server/serving/test_deploy.py, which starts it as

    unshare -n bash -c 'ip link set lo up; exec python tests/kit/netns_browser.py --mode https ...'

so nothing it opens can reach or be reached from outside this machine (TESTING.md). Modes:
  https  `serve --tls-self-signed`; Chromium with --ignore-certificate-errors opens https://127.0.0.1:PORT/,
         gets the fake microphone, plays the avatar; a wss:// frames websocket on the same port delivers a frame.
  turn   the same plus coturn on 127.0.0.1 (`use-auth-secret`), `serve --turn-secret --turn-url`, and the page
         loaded with ?relay=1 (iceTransportPolicy "relay"): the selected candidate pair must be a relay one.
Every step has a deadline; the whole run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kit.paths import KIT, REPO_ROOT, pythonpath
from kit.waits import free_port

CHROMIUM = os.environ.get("VEXPRESS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--ignore-certificate-errors",  # the server's certificate is self-signed
]  # fmt: skip
WIDTH, HEIGHT, FPS = 128, 64, 25
TURN_SECRET = "test-turn-secret-not-for-production"
TURN_REALM = "vexpress.test"


WHEP_VIEWER_JS = """async (relay) => {
  const s = window.vexpress.session;
  const pc = new RTCPeerConnection({ iceServers: s.ice_servers || [], iceTransportPolicy: relay ? "relay" : "all" });
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    setTimeout(resolve, 5000);
  });
  const resp = await fetch(s.whep_url, { method: "POST", body: pc.localDescription.sdp,
    headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${s.token}` } });
  const out = { status: resp.status, url: s.whep_url, framesDecoded: 0, pairLocalType: null };
  if (resp.status !== 201) { out.body = await resp.text(); pc.close(); return out; }
  const location = resp.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
  const deadline = Date.now() + 10000;
  while (Date.now() < deadline && out.framesDecoded < 10) {
    await new Promise((r) => setTimeout(r, 200));
    const stats = await pc.getStats();
    stats.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") out.framesDecoded = r.framesDecoded || 0;
      if (r.type === "transport" && r.selectedCandidatePairId) {
        const pair = stats.get(r.selectedCandidatePairId);
        const local = pair && stats.get(pair.localCandidateId);
        out.pairLocalType = local ? local.candidateType : null;
      }
    });
  }
  const del = await fetch(new URL(location, s.whep_url), { method: "DELETE",
    headers: { Authorization: `Bearer ${s.token}` } });  // before closing: a closed peer is gone already
  out.deleteStatus = del.status;
  pc.close();
  return out;
}"""


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2, context=insecure) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready after {timeout_s} s:\n{tail(log)}")
        time.sleep(0.25)


def start_serve(model_dir: str | Path, port: int, log_path: Path, *extra: str) -> subprocess.Popen:
    """`vexpress-rt serve` (`python -m server`) offline on 127.0.0.1:`port` at the tests' frame size, logging to
    `log_path`. Admission is off: a small CI CPU cannot run even the tiny model in real time, so admission control
    would refuse the session; the stream runs at the session fps regardless (idle frames fill in)."""
    cmd = [
        sys.executable, "-m", "server", "serve", "--model_dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--ice-host", "127.0.0.1",
        "--width", str(WIDTH), "--height", str(HEIGHT), "--no_admission", *extra,
    ]  # fmt: skip
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=pythonpath(),
    )
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


@contextmanager
def served_for_driver(
    model_dir: str | Path, work: Path, report: dict, *extra: str, scheme: str = "http"
) -> Iterator[str]:
    """`serve` for a browser driver: yields its base URL once ready; stops it on the way out (the tail of its log
    goes into the report)."""
    port = free_port()
    log = work / "serve.log"
    proc = start_serve(model_dir, port, log, *extra)
    try:
        base = f"{scheme}://127.0.0.1:{port}"
        t0 = time.monotonic()
        wait_ready(base, proc, log, 45)
        report["server_ready_s"] = round(time.monotonic() - t0, 2)
        yield base
    finally:
        stop(proc)
        report["server_log_tail"] = tail(log, 2500)


@contextmanager
def chromium_pages(report: dict, wav: str | None = None) -> Iterator[Callable[..., Any]]:
    """Headless Chromium (its fake microphone playing `wav`): yields `new_page(name="", **options)`; every page's
    console is kept, and its last lines go into the report when the browser closes."""
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    flags = [*CHROMIUM_FLAGS, *([f"--use-file-for-fake-audio-capture={wav}"] if wav else [])]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags, timeout=30_000)

        def new_page(name: str = "", **options: Any) -> Any:
            page = browser.new_page(**options)
            prefix = f"{name} " if name else ""
            page.on("console", lambda m: console.append(f"{prefix}{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"{prefix}pageerror: {e}"))
            return page

        try:
            yield new_page
        finally:
            report["console"] = console[-30:]
            browser.close()


def start_turn(work: Path) -> tuple[subprocess.Popen, int, Path]:
    """coturn on 127.0.0.1 only, TURN REST API auth (shared secret), relaying to loopback peers (the server)."""
    port = free_port(socket.SOCK_DGRAM)
    log = work / "turnserver.log"
    lo, hi = 49160, 49200
    cmd = [
        shutil.which("turnserver") or "turnserver",
        "-n",  # no config file
        "--listening-ip=127.0.0.1", f"--listening-port={port}", "--relay-ip=127.0.0.1",
        f"--min-port={lo}", f"--max-port={hi}",
        "--use-auth-secret", f"--static-auth-secret={TURN_SECRET}", f"--realm={TURN_REALM}",
        "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--fingerprint",
        "--no-multicast-peers", "--simple-log", f"--log-file={log}", "--verbose",
        "--max-allocate-lifetime=600", "--pidfile", str(work / "turnserver.pid"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # listening: a UDP socket bound on the port answers nothing, so wait for the log
        if proc.poll() is not None:
            raise RuntimeError(f"turnserver exited with {proc.returncode}:\n{tail(log)}")
        if "listener opened on" in tail(log, 100_000) or "Total UDP servers" in tail(log, 100_000):
            break
        time.sleep(0.1)
    time.sleep(0.3)
    return proc, port, log


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run(args: argparse.Namespace, report: dict) -> None:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    report["interfaces"] = sorted(name for _, name in socket.if_nameindex())  # this namespace's, not sysfs's
    turn = None
    try:
        extra = ["--tls-self-signed"]
        if args.mode == "turn":
            turn, turn_port, turn_log = start_turn(work)
            report["turn_port"] = turn_port
            extra += ["--turn-secret", TURN_SECRET, "--turn-url", f"turn:127.0.0.1:{turn_port}?transport=udp"]
        with served_for_driver(args.model_dir, work, report, *extra, scheme="https") as base:
            banner = tail(work / "serve.log", 20_000).splitlines()
            report["server_banner"] = [ln for ln in banner if ln.startswith(("TLS:", "vexpress-rt serving"))]
            with chromium_pages(report, args.wav) as new_page:
                page = new_page()
                query = "?relay=1" if args.mode == "turn" else ""
                page.goto(f"{base}/{query}", wait_until="load", timeout=15_000)
                page.wait_for_function("window.vexpress !== undefined", timeout=5_000)
                report["secure_context"] = page.evaluate("window.isSecureContext")
                report["page_url"] = page.url
                page.click("#start")
                page.wait_for_function(
                    "window.vexpress.lastError || window.vexpress.pc?.connectionState === 'connected'", timeout=30_000
                )
                report["last_error"] = page.evaluate("window.vexpress.lastError")
                if report["last_error"]:
                    return
                session = page.evaluate("window.vexpress.session")
                report["session_id"] = session.get("id")
                report["session_ice_servers"] = session.get("ice_servers")
                report["ice_transport_policy"] = page.evaluate(
                    "window.vexpress.pc.getConfiguration().iceTransportPolicy"
                )
                deadline = time.monotonic() + 15
                while True:
                    s0 = page.evaluate("window.vexpress.stats()")
                    if (s0.get("video") or {}).get("framesDecoded") and (s0.get("audio") or {}).get(
                        "totalSamplesReceived"
                    ):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("no frame or audio decoded within 15 s")
                    time.sleep(0.1)
                page.wait_for_timeout(2000)
                s0 = page.evaluate("window.vexpress.stats()")
                peak, t_end = 0.0, time.monotonic() + args.measure_s
                while time.monotonic() < t_end:
                    peak = max(peak, page.evaluate("window.vexpress.remoteLevel()"))
                    time.sleep(0.05)
                s1 = page.evaluate("window.vexpress.stats()")
                seconds = (s1["time"] - s0["time"]) / 1000
                report["fps"] = round((s1["video"]["framesDecoded"] - s0["video"]["framesDecoded"]) / seconds, 2)
                report["frame_size"] = [s1["video"]["frameWidth"], s1["video"]["frameHeight"]]
                report["audio_samples_per_s"] = round(
                    (s1["audio"]["totalSamplesReceived"] - s0["audio"]["totalSamplesReceived"]) / seconds
                )
                report["remote_level_peak_rms"] = round(peak, 5)
                report["pair"] = s1.get("pair")
                report["offer_candidate_types"] = sorted(
                    {ln.split(" ")[7] for ln in page.evaluate("window.vexpress.offerSdp").split("\r\n")
                     if ln.startswith("a=candidate:") and len(ln.split(" ")) > 7}
                )  # fmt: skip
                # The frames websocket over wss:// on the same port: one binary frame arrives.
                report["wss_frame_bytes"] = page.evaluate(
                    """() => new Promise((resolve) => {
                        const s = window.vexpress.session;
                        const ws = new WebSocket(`${s.frames_url}?token=${encodeURIComponent(s.token)}`);
                        ws.binaryType = "arraybuffer";
                        const timer = setTimeout(() => { ws.close(); resolve(-1); }, 10000);
                        ws.onmessage = (e) => {
                          if (typeof e.data === "string") return;
                          clearTimeout(timer); ws.close(); resolve(e.data.byteLength);
                        };
                        ws.onerror = () => { clearTimeout(timer); resolve(-2); };
                    })"""
                )
                # A WHEP viewer of the same session, POSTed to the same https:// port (same ICE policy and servers).
                report["whep"] = page.evaluate(WHEP_VIEWER_JS, args.mode == "turn")
                page.click("#stop")
                page.wait_for_function("window.vexpress.state === 'idle'", timeout=10_000)
    finally:
        stop(turn)
        if turn is not None:
            text = tail(turn_log, 400_000)
            report["turn_allocations"] = text.count("ALLOCATE processed, success")
            report["turn_log_tail"] = text[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("https", "turn"), required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--wav", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--measure-s", type=float, default=3.0)
    ap.add_argument("--timeout", type=int, default=120, help="the whole run; then the servers are stopped")
    args = ap.parse_args()
    # bounded lifetime: the finally blocks stop serve and turnserver
    return report_bounded("netns_browser", args.timeout, lambda report: run(args, report), {"mode": args.mode})


# -- the test side: run a driver (this file or netns_viewer.py) in a loopback-only namespace ------------------------
def run_driver_in_netns(driver: str, args: list[str], timeout_s: float) -> dict:
    """`tests/kit/<driver>` with `args` inside `unshare -n` (only `lo`), bounded by `timeout_s`; its REPORT line.
    Skips (fails in CI, see conftest) where Chromium, Playwright, root or unshare is missing."""
    import pytest

    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a loopback-only network namespace needs root and unshare (util-linux)")
    command = [sys.executable, str(KIT / driver), *args, "--timeout", str(int(timeout_s) - 20)]
    script = "ip link set lo up && exec " + " ".join(f"'{a}'" for a in command)
    env = dict(os.environ, PYTHONPATH=pythonpath())  # the driver imports the kit
    proc = subprocess.Popen(
        ["unshare", "-n", "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, start_new_session=True, env=env,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # the driver's own alarm failed: stop everything it started
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


# -- the driver side: one bounded run that always prints its report ------------------------------------------------
def report_bounded(name: str, timeout_s: int, run: Callable[[dict], None], report: dict) -> int:
    """`run(report)` under an alarm of `timeout_s` (its finally blocks stop what it started); the report, with
    any exception and the runtime, printed as one REPORT line for the test to assert on."""

    def expired(signum, frame):
        raise TimeoutError(f"{name}: over {timeout_s} s")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(timeout_s)
    t0 = time.monotonic()
    try:
        run(report)
    except Exception as exc:  # the report says what failed; the test asserts on it
        report["exception"] = f"{type(exc).__name__}: {exc}"
    report["runtime_s"] = round(time.monotonic() - t0, 2)
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
