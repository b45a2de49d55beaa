"""The chromeless viewer page for OBS (issue 15 item 3), in headless Chromium inside a loopback-only network
namespace (tests/kit/netns_viewer.py): /view/{id}?token=... plays the session over WHEP with trickle ICE, without
controls, with sound (the avatar's speech after `POST .../speak` reaches the page), transparent or key-coloured
outside the portrait, comes back by itself when the server ends its viewer, and leaves (DELETE) when the page
goes away.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from kit.media_synth import spoken_wav
from kit.netns_browser import CHROMIUM, CHROMIUM_FLAGS, run_driver_in_netns
from kit.served import call

SPEECH = "Good evening. Here is the news, read by the avatar, with its lips in time with its voice."


def test_viewer_page_is_served_without_a_referrer(serve):
    """The page itself: static, no-cache, no Referer (its URL holds the token); its script next to it."""
    server = serve()
    page = call("GET", f"{server.url}/view/s0123?token=abc")
    script = call("GET", f"{server.url}/view.js")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert page.headers["Referrer-Policy"] == "no-referrer" and "../view.js" in page.text
    assert "<video" in page.text and "controls" not in page.text.split("<video", 1)[1].split(">", 1)[0]
    assert script.status == 200 and "trickle-ice-sdpfrag" in script.text


@pytest.mark.browser
def test_viewer_key_option_cuts_the_key_colour_out(serve):
    """?key=00ff00 (WebRTC carries no alpha: a cut-out travels over a key colour): the page shows a canvas instead
    of the video, and its keying makes the key colour and colours near it (as H.264 leaves it) transparent,
    partly so on the rim, and leaves the person's colours opaque. The page runs in headless Chromium; its WHEP
    call to a session that does not exist fails (404) and changes nothing here."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    assert os.path.isfile(CHROMIUM), f"Chromium not found at {CHROMIUM}"
    server = serve()
    pixels = [[0, 255, 0], [12, 240, 20], [60, 200, 60], [224, 172, 150], [30, 30, 30], [255, 255, 255]]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=30_000)
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/view/s0123?token=abc&bg=transparent&key=00ff00", wait_until="load")
            page.wait_for_function("window.vexview !== undefined", timeout=5_000)
            alphas = page.evaluate(
                "(px) => Array.from(window.vexview.keyOut(new Uint8ClampedArray(px.flatMap((c) => [...c, 255])),"
                " [0, 255, 0])).filter((_, i) => i % 4 === 3)",
                pixels,
            )
            keyed = page.evaluate(
                "[!!document.querySelector('canvas#keyed'), getComputedStyle(document.querySelector('video')).opacity]"
            )
            plain = browser.new_page()
            plain.goto(f"{server.url}/view/s0123?token=abc", wait_until="load")
            plain.wait_for_function("window.vexview !== undefined", timeout=5_000)
            unkeyed = plain.evaluate("!!document.querySelector('canvas#keyed')")
        finally:
            browser.close()
    assert alphas[:2] == [0, 0]  # the key colour, and a compressed shade of it
    assert 0 < alphas[2] < 255  # the rim: partly
    assert alphas[3:] == [255, 255, 255]  # skin, dark hair, white: opaque
    assert keyed == [True, "0"] and unkeyed is False


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    return spoken_wav(tmp_path_factory.mktemp("speech") / "speech.wav", SPEECH)


def _netns_run(model_dir: Path, wav: Path, workdir: Path, timeout_s: float = 150) -> dict:
    args = ["--model-dir", str(model_dir), "--wav", str(wav), "--workdir", str(workdir)]
    report = run_driver_in_netns("netns_viewer.py", args, timeout_s)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    dest = os.environ.get("VEXPRESS_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "view_transparent.png", "view_key.png"):
            if (workdir / name).exists():
                shutil.copy(workdir / name, Path(dest) / f"viewer_{name}")
    return report


@pytest.mark.browser
@pytest.mark.fixtures
@pytest.mark.timeout(180)
def test_obs_viewer_page_plays_with_sound_in_chromium(model_dir, speech_wav, tmp_path):
    report = _netns_run(model_dir, speech_wav, tmp_path)
    where = json.dumps({k: v for k, v in report.items() if k != "server_log_tail"}, indent=1)[:5000]
    where += "\n" + report.get("server_log_tail", "")[-1500:]
    assert "exception" not in report and not report.get("last_error"), where
    assert report["interfaces"] == ["lo"], where
    assert report["state"] == "playing" and report["controls"] is False and report["paused"] is False, where
    # WHEP with trickle ICE: the page PATCHed its candidates, and the pair is loopback on both sides
    assert report["patches"] >= 1 and report["trickled_candidates"] >= 1, where
    assert report["pair"]["local"] == report["pair"]["remote"] == "127.0.0.1", where
    assert 0.8 * 25 <= report["fps"] <= 1.2 * 25 and report["frame_size"] == [128, 64], where
    assert 0.7 * 48000 <= report["audio_samples_per_s"] <= 1.3 * 96000, where
    # Sound: the speech said through the API is heard by the page (unmuted), well above the idle level
    assert report["speak"][0] == 202 and report["muted"] is False, where
    assert report["speech_level_peak_rms"] > max(1e-3, 3 * report["idle_level_peak_rms"]), where
    # Outside the portrait: transparent (alpha 0) or the key colour; the portrait itself is opaque
    assert all(px[3] == 0 for px in report["transparent_outside_rgba"]), where
    assert report["transparent_portrait_rgba"][3] == 255, where
    assert all(px[:3] == [0, 255, 0] for px in report["key_outside_rgba"]), where
    assert report["key_portrait_rgba"][:3] != [0, 255, 0], where
    # A viewer the server ended comes back by itself (a new WHEP resource)
    assert report["reconnected_s"] < 25, where
    # Leaving the page ends the viewer's resource
    assert len(report["peers_while_playing"]) >= 1 and report["peers_after_leaving"] == [], where
    print(
        f"viewer: {report['fps']} fps, speech peak RMS {report['speech_level_peak_rms']} "
        f"(idle {report['idle_level_peak_rms']}), {report['patches']} PATCH, "
        f"reconnected in {report['reconnected_s']} s, {report['runtime_s']} s"
    )
