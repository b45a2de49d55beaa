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
from kit.netns_browser import run_driver_in_netns
from kit.served import call

CHROMIUM = os.environ.get("VEXPRESS_CHROMIUM", "/usr/bin/chromium")
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
