"""A newcomer's first run (issue 27): the errors they meet are one line with what to do, the settings they set are
honoured or named, and the URLs a reverse proxy's clients get are the ones they can use."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from kit.paths import REPO_ROOT
from kit.served import ServerThread, call
from kit.waits import free_port

from server.settings.config import ServerConfig, unknown_variables

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _cli(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *argv], env=env or ENV, capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command failed the way the project fails on user errors: exit code 2, one `error:` line, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


# --- session URLs behind a reverse proxy (--trusted-proxy) ---------------------------------------------------------


def _urls(server: ServerThread, headers: dict) -> dict:
    reply = call("POST", f"{server.url}/v1/sessions", json={}, headers=headers)
    assert reply.status == 201, reply.text
    body = reply.json
    call("DELETE", body["url"].replace("https://", "http://"), headers={"Authorization": f"Bearer {body['token']}"})
    return {k: body[k] for k in ("url", "view_url", "ws_url", "frames_url", "whep_url")}


@pytest.mark.parametrize(
    "header",
    [{"X-Forwarded-Proto": "https"}, {"Forwarded": "for=203.0.113.7;proto=https"}],
    ids=["x-forwarded", "rfc7239"],
)
def test_session_urls_are_https_behind_a_trusted_proxy_only(header, serve):
    trusted = serve(trusted_proxy=["127.0.0.0/8"])
    behind = _urls(trusted, header)
    direct = _urls(trusted, {})
    untrusted = serve(trusted_proxy=["10.0.0.0/8"])
    spoofed = _urls(untrusted, header)
    for name in ("url", "view_url", "whep_url"):
        assert behind[name].startswith("https://"), behind
        assert direct[name].startswith("http://") and spoofed[name].startswith("http://"), (direct, spoofed)
    for name in ("ws_url", "frames_url"):
        assert behind[name].startswith("wss://"), behind
        assert direct[name].startswith("ws://") and spoofed[name].startswith("ws://"), (direct, spoofed)


def test_a_bad_trusted_proxy_is_refused():
    done = _cli("serve", "--model_dir", "/nonexistent", "--trusted-proxy", "not-a-network")
    assert "--trusted-proxy" in _one_line_error(done)


# --- VEXPRESS_* variables ----------------------------------------------------------------------------------------


def test_vexpress_no_admission_works_like_the_flag():
    assert ServerConfig.from_env({"VEXPRESS_NO_ADMISSION": "1"}).admission is False
    assert ServerConfig.from_env({"VEXPRESS_NO_ADMISSION": "0"}).admission is True
    assert ServerConfig.from_env({"VEXPRESS_ADMISSION": "0"}).admission is False
    assert ServerConfig.from_env({}).admission is True


def test_unknown_variables_are_named_with_the_closest_setting():
    named = unknown_variables({"VEXPRESS_MAX_SESSION": "2", "VEXPRESS_PORT": "1", "VEXPRESS_BOGUS": "1", "PATH": ""})
    assert named == ["VEXPRESS_BOGUS", "VEXPRESS_MAX_SESSION (did you mean VEXPRESS_MAX_SESSIONS?)"]


def test_serve_warns_about_an_unknown_variable_at_start_up(tmp_path):
    """Named at start-up (here the command then stops at the missing model, before opening a port)."""
    env = dict(ENV, VEXPRESS_MAX_SESSION="2")
    done = _cli("serve", "--model_dir", str(tmp_path / "none"), "--device", "cpu", "--port", "0", env=env)
    assert "VEXPRESS_MAX_SESSION (did you mean VEXPRESS_MAX_SESSIONS?) is not a setting" in done.stderr, done.stderr
    _one_line_error(done)


# --- one-line errors, before anything slow -----------------------------------------------------------------------


def test_serve_on_a_busy_port_says_so_before_loading_the_model(model_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        done = _cli("serve", "--model_dir", str(model_dir), "--device", "cpu", "--port", str(port))
        elapsed = time.monotonic() - started
    line = _one_line_error(done)
    assert f"127.0.0.1:{port}" in line and "another --port" in line, line
    assert "Loading" not in done.stderr and "check-weights" not in done.stderr, done.stderr  # the model was not read
    print(f"busy port reported in {elapsed:.1f} s")


def test_download_weights_without_the_hub_is_one_line(tmp_path):
    done = _cli("download-weights", "--model_dir", str(tmp_path / "m"))  # ENV has HF_HUB_OFFLINE=1
    line = _one_line_error(done)
    assert "HuggingFace hub" in line and "HF_HUB_OFFLINE" in line and "make-demo-model" in line, line


def test_present_with_no_server_there_is_one_line(tmp_path):
    script = tmp_path / "show.yaml"
    script.write_text("items:\n  - pause_s: 0.5\n")
    port = free_port()  # nothing listens there
    done = _cli("present", str(script), "--to", "rtmp://127.0.0.1/live/x", "--server", f"http://127.0.0.1:{port}")
    line = _one_line_error(done)
    assert f"http://127.0.0.1:{port}" in line and "--server" in line, line


def test_present_refuses_a_bad_output_before_opening_a_session(tmp_path):
    script = tmp_path / "show.yaml"
    script.write_text("items:\n  - pause_s: 0.5\n")
    done = _cli("present", str(script), "--to", "http://example.com/live", "--server", "http://127.0.0.1:9")
    line = _one_line_error(done)
    assert "--to http://example.com/live" in line and "rtmp://" in line, line  # not "cannot reach"


def test_present_help_lists_only_the_flags_it_uses():
    shown = _cli("present", "--help").stdout
    for ignored in ("--host", "--port", "--tls-cert", "--allowed-origin", "--insecure-no-auth"):
        assert ignored not in shown, ignored
    for used in ("--model_dir", "--tts-command", "--server", "--to"):
        assert used in shown, used


# --- the demo model ----------------------------------------------------------------------------------------------


def test_make_demo_model_writes_a_folder_that_checks_and_loads(tmp_path):
    folder = tmp_path / "demo_model"
    made = _cli("make-demo-model", "--model_dir", str(folder))
    assert made.returncode == 0, made.stderr
    assert f"serve --model_dir {folder}" in made.stdout, made.stdout
    checked = _cli("check-weights", "--model_dir", str(folder))
    assert checked.returncode == 0 and "All required model files are present" in checked.stdout, checked.stdout
    assert "accelerate" not in checked.stderr, checked.stderr  # no "pip install accelerate" on every load
    for sample in ("portrait.png", "portrait_kps.json", "speech.wav"):
        assert (folder / "samples" / sample).is_file(), sample
    from vexpress_rt.loader import load_models
    from vexpress_rt.weights import ModelPaths

    models = load_models(ModelPaths.from_model_dir(folder))  # strict: every key and shape
    assert models.unet_config.block_out_channels == (32, 32, 32, 64)
    again = _cli("make-demo-model", "--model_dir", str(folder))
    assert "exists already" in _one_line_error(again)


def test_push_connection_error_does_not_print_the_token(tmp_path):
    from kit.tiny_model import synthetic_voice, write_wav

    wav = write_wav(tmp_path / "a.wav", synthetic_voice(0.5))
    done = _cli("push", "ws://127.0.0.1:9/v1/sessions/s1/ws?token=SECRET-TOKEN-123", "--audio", str(wav))
    line = _one_line_error(done)
    assert "SECRET-TOKEN-123" not in done.stderr and "token=<redacted>" in line, done.stderr


def test_top_level_help_names_every_command_and_the_demo_model():
    shown = _cli("--help").stdout
    assert "real-time talking-head server" in shown and "make-demo-model" in shown, shown
