"""End to end in a real browser: `vexpress-rt serve` with the tiny fixture model, headless Chromium opening its page.

The server runs as a user runs it (a subprocess: `python -m server serve`, which is `vexpress-rt serve`; ICE on
127.0.0.1 only, no STUN). Debian's Chromium, driven by Playwright, gets a fake microphone that plays espeak-ng speech,
loads `/?loopback=1` (the page then offers only its 127.0.0.1 candidates), clicks Start and reads the peer
connection's `getStats()` through the page's `window.vexpress` hook. Checked: video frames are decoded at the session
fps with the session's size; the traffic stays on this machine (the server's side of the selected candidate pair is
127.0.0.1, the browser's side is 127.0.0.1 or this machine's own host address, see below); the avatar's audio arrives
with energy (measured by a WebAudio analyser in the page: headless Chromium reports totalAudioEnergy = 0); the live
controls reach the server (a slider and a head motion set before Start are in the session it made; a slider moved
while live and a style picked are changes it numbers and reports in GET /v1/sessions/{id}; picking a style moves the
sliders to the style's values); Interrupt keeps the stream going; Stop closes it. A screenshot and a JSON report are
saved (also to $VEXPRESS_ARTIFACTS when set). The whole test takes well under 90 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kit.media_synth import spoken_wav
from kit.netns_browser import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    FPS,
    HEIGHT,
    WIDTH,
    free_port,
    start_serve,
    stop,
    tail,
    wait_ready,
)

from streaming.styles import BUILT_IN

pytestmark = [pytest.mark.browser, pytest.mark.fixtures, pytest.mark.timeout(180)]

SERVER_START_TIMEOUT_S = 45
CONNECT_TIMEOUT_S = 20
WARMUP_S = 3.0  # after the first frame: the start (first model runs, buffers settling) is not what is measured
MEASURE_S = 4.0
SPEECH = (
    "Hello there. This is a test of the streaming avatar. "
    "It should move its lips while it says these words, and keep going until the end of the sentence."
)


@pytest.fixture(scope="module")
def sync_playwright():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set VEXPRESS_CHROMIUM)")
    api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    return api.sync_playwright


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    return spoken_wav(tmp_path_factory.mktemp("speech") / "speech.wav", SPEECH)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`vexpress-rt serve` on a free 127.0.0.1 port with the tiny fixture model; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_serve(model_dir, port, log_path)
    try:
        try:
            wait_ready(base, proc, log_path, SERVER_START_TIMEOUT_S)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        yield {"url": base, "log": log_path}
    finally:
        stop(proc)


def _is_own_address(address: str | None) -> bool:
    """True for 127.0.0.1 and for any address of this machine (one a socket can bind to)."""
    if address == "127.0.0.1":
        return True
    if not address:
        return False
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def _stats(page) -> dict:
    return page.evaluate("window.vexpress.stats()")


def _server_session(session: dict) -> dict:
    """The session as the server reports it (GET /v1/sessions/{id} with its token): its controls among the rest."""
    request = urllib.request.Request(session["url"], headers={"Authorization": f"Bearer {session['token']}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)


def _controls_on_page(page) -> dict:
    """The live controls' values as the page shows them (field -> value; the sliders' as numbers)."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#controls [data-field]')].map((el) =>
            [el.dataset.field, el.tagName === 'SELECT' ? el.value : Number(el.value)]))"""
    )


def _save_artifacts(files: list[Path]) -> None:
    dest = os.environ.get("VEXPRESS_ARTIFACTS")
    if not dest:
        return
    Path(dest).mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.exists():
            shutil.copy(f, Path(dest) / f.name)


def _fixture_portrait(inputs_dir: Path) -> tuple[Path, list[list[float]]]:
    """The fixtures' portrait and its eye, eye, nose points in the photo's pixels (the .npy has them in the 128x64
    frame the photo is resized to)."""
    import numpy as np
    from PIL import Image

    path = inputs_dir / "reference.png"
    w, h = Image.open(path).size
    kps = np.load(inputs_dir / "reference_kps.npy")[:3] * [w / 128, h / 64]
    return path, np.round(kps, 3).tolist()


def test_browser_session_end_to_end(server, sync_playwright, speech_wav, inputs_dir, tmp_path):
    t_start = time.monotonic()
    console: list[str] = []
    page_errors: list[str] = []
    shot = tmp_path / "browser_session.png"
    report_path = tmp_path / "browser_session.json"
    report: dict = {}

    def where() -> str:
        return (
            f"\nconsole: {console[-20:]}\npage errors: {page_errors}\nreport: {json.dumps(report)[:2000]}"
            f"\nserver log:\n{tail(server['log'], 2500)}"
        )

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={speech_wav}"],
            timeout=30_000,
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(f"{server['url']}/?loopback=1", wait_until="load", timeout=15_000)
            page.wait_for_function("window.vexpress !== undefined", timeout=5_000)

            # Upload a portrait through the page (with its key points: the fixtures have no face detector models).
            portrait, kps = _fixture_portrait(inputs_dir)
            page.fill("#avatar-kps", json.dumps(kps))
            page.set_input_files("#avatar-file", str(portrait))
            page.wait_for_function(
                "window.vexpress.lastError || document.getElementById('avatar-select').value !== ''", timeout=30_000
            )
            assert page.evaluate("window.vexpress.lastError") is None, where()
            avatar_id = page.evaluate("document.getElementById('avatar-select').value")

            # Live controls set before the session go into its creation request (the sliders and pickers are filled
            # from /v1/info and /v1/styles at load).
            page.wait_for_function(
                "document.getElementById('c-motion').options.length > 0"
                " && document.getElementById('style').options.length > 1",
                timeout=5_000,
            )
            page.fill("#c-blinks", "40")  # a range input: Playwright sets it and fires input + change, as a drag does
            page.select_option("#c-motion", "nod")
            # Presenter framing: a key colour behind the person (the crop framing keeps the frame size checked below)
            page.click("summary:has-text('Options')")  # the options are folded away
            page.select_option("#background", "colour")
            page.fill("#background-colour", "#00b140")

            page.click("#start")
            page.wait_for_function(
                "window.vexpress.lastError || window.vexpress.pc?.connectionState === 'connected'",
                timeout=CONNECT_TIMEOUT_S * 1000,
            )
            assert page.evaluate("window.vexpress.lastError") is None, where()
            session = page.evaluate("window.vexpress.session")
            report["session"] = {k: session.get(k) for k in ("id", "avatar_id", "fps", "width", "height", "offer_url")}
            assert session["avatar_id"] == avatar_id, where()
            assert (session["width"], session["height"], session["fps"]) == (WIDTH, HEIGHT, FPS), where()
            created = _server_session(session)
            report["controls_created"] = {"version": created.get("control_version"), "params": created.get("params")}
            assert created["params"]["blinks_per_minute"] == 40 and created["params"]["motion"] == "nod", where()
            assert created["control_version"] == 0, where()
            assert (created["framing"], created["background"]) == ("crop", "#00b140"), where()

            # First decoded frame and first audio samples, a warm-up, then measure over MEASURE_S seconds.
            deadline = time.monotonic() + 10
            while True:
                s0 = _stats(page)
                v, a = s0.get("video") or {}, s0.get("audio") or {}
                if v.get("framesDecoded") and a.get("totalSamplesReceived"):
                    break
                assert time.monotonic() < deadline, "no video frame or audio sample decoded within 10 s" + where()
                time.sleep(0.1)
            page.wait_for_timeout(WARMUP_S * 1000)
            s0 = _stats(page)
            peak_level = 0.0
            t_end = time.monotonic() + MEASURE_S
            while time.monotonic() < t_end:
                peak_level = max(peak_level, page.evaluate("window.vexpress.remoteLevel()"))
                time.sleep(0.05)
            s1 = _stats(page)
            page.wait_for_timeout(1100)  # let the page's own 1 s stats update run once more
            s2 = _stats(page)

            v0, v1, a0, a1 = s0["video"], s1["video"], s0["audio"], s1["audio"]
            seconds = (s1["time"] - s0["time"]) / 1000
            fps = (v1["framesDecoded"] - v0["framesDecoded"]) / seconds
            audio_rate = (a1["totalSamplesReceived"] - a0["totalSamplesReceived"]) / seconds
            received = a1["totalSamplesReceived"] - a0["totalSamplesReceived"]
            concealed = (a1.get("concealedSamples") or 0) - (a0.get("concealedSamples") or 0)
            pair = s1["pair"] or {}
            report.update(
                measured_s=round(seconds, 3),
                fps=round(fps, 2),
                audio_samples_per_s=round(audio_rate),
                audio_concealed_fraction=round(concealed / max(received, 1), 4),
                remote_level_peak_rms=round(peak_level, 5),
                video=v1,
                audio=a1,
                pair=pair,
                page_derived=s2.get("derived"),
            )

            assert 0.8 * FPS <= fps <= 1.2 * FPS, f"decoded {fps:.1f} fps, session fps {FPS}" + where()
            assert (v1["frameWidth"], v1["frameHeight"]) == (WIDTH, HEIGHT), where()
            assert v1["codec"] and v1["codec"].lower() in ("video/vp8", "video/h264"), where()
            # Loopback only. The offer carried only 127.0.0.1 candidates and the server offers only 127.0.0.1, so
            # every packet is addressed to 127.0.0.1. Chromium still pairs its other host addresses (e.g. eth0's) with
            # the server's 127.0.0.1 and, ranking an ethernet network cheaper than an "unknown"-type loopback, may
            # nominate that pair: its local side is then this machine's own address, and the kernel delivers the
            # packets over lo all the same. No STUN, no relay.
            offer = page.evaluate("window.vexpress.offerSdp")
            offer_candidates = [ln for ln in offer.split("\r\n") if ln.startswith("a=candidate:")]
            assert offer_candidates and all(ln.split(" ")[4] == "127.0.0.1" for ln in offer_candidates), where()
            local, remote = pair.get("local") or {}, pair.get("remote") or {}
            assert remote.get("address") == "127.0.0.1" and remote.get("type") == "host", where()
            assert local.get("type") == "host" and _is_own_address(local.get("address")), where()
            # Opus at 48 kHz: about 48000 samples/s arrive (the receiver may count per channel; allow slack).
            assert 0.7 * 48000 <= audio_rate <= 1.3 * 96000, where()
            assert peak_level > 1e-3, f"the avatar's audio is silent (peak RMS {peak_level:.2e})" + where()

            page.screenshot(path=str(shot))

            # Live control changes: a slider, then a style (which moves the sliders); each is a PATCH the server
            # numbers, and GET /v1/sessions/{id} reports the controls as last changed.
            def wait_status(text: str) -> None:
                try:
                    page.wait_for_function(
                        "(text) => window.vexpress.lastError || document.getElementById('status').textContent === text",
                        arg=text,
                        timeout=5_000,
                    )
                except Exception as exc:  # Playwright's TimeoutError: say what the page shows instead
                    pytest.fail(f"status {page.text_content('#status')!r}, not {text!r}: {exc}" + where())

            page.fill("#c-strength", "4.5")
            wait_status("Controls changed (version 1).")
            assert page.evaluate("window.vexpress.lastError") is None, where()
            changed = _server_session(session)
            report["controls_changed"] = {"version": changed.get("control_version"), "params": changed.get("params")}
            assert changed["control_version"] == 1 and changed["params"]["audio_attention_weight"] == 4.5, where()
            assert changed["params"]["blinks_per_minute"] == 40, where()  # the other controls stay

            calm = BUILT_IN["calm"]
            page.select_option("#style", "calm")
            wait_status("Controls changed (version 2).")
            assert page.evaluate("window.vexpress.lastError") is None, where()
            shown = _controls_on_page(page)
            sliders = {k: v for k, v in calm.items() if k != "reference_attention_weight"}  # no slider for it
            assert shown == sliders, f"the sliders show {shown}, style calm is {calm}" + where()
            assert page.text_content("#c-strength-v") == page.input_value("#c-strength"), where()
            styled = _server_session(session)
            report["controls_styled"] = {"version": styled.get("control_version"), "params": styled.get("params")}
            assert styled["control_version"] == 2, where()
            assert {k: styled["params"][k] for k in calm} == calm, where()

            page.click("#interrupt")
            page.wait_for_function(
                "window.vexpress.lastError || document.getElementById('status').textContent.startsWith('Interrupted')",
                timeout=5_000,
            )
            assert page.evaluate("window.vexpress.lastError") is None, where()
            frames_before = _stats(page)["video"]["framesDecoded"]
            page.wait_for_timeout(500)
            frames_after = _stats(page)["video"]["framesDecoded"]
            assert frames_after > frames_before, "the stream stalled after interrupt" + where()

            page.click("#stop")
            page.wait_for_function("window.vexpress.state === 'idle'", timeout=10_000)
            assert page.evaluate("window.vexpress.pc") is None
            assert page.evaluate("window.vexpress.lastError") is None, where()
            assert not page_errors, where()
            assert not [c for c in console if c.startswith("error")], where()
        finally:
            report["console"] = console
            report["runtime_s"] = round(time.monotonic() - t_start, 2)
            report_path.write_text(json.dumps(report, indent=2))
            _save_artifacts([shot, report_path])
            browser.close()
    print(
        f"browser: {report['fps']} fps decoded, {WIDTH}x{HEIGHT}, remote peak RMS {report['remote_level_peak_rms']}, "
        f"A/V offset (page) {report['page_derived']}, screenshot {shot}"
    )
