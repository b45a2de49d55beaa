"""The host bench's measurement (server/commands/host_bench.py): when the microphone captured the audio a received
frame carries, found in the microphone's own signal; and the command end to end with one real aiortc peer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.commands import host_bench
from server.commands.soak import MIC_RATE

pytestmark = pytest.mark.timeout(180)


def test_a_received_piece_of_speech_is_dated_by_the_microphone_signal():
    """A 200 ms piece of the microphone's speech, received 0.8 s after it was captured with codec-like damage
    (a 16 kHz round trip's low-pass, noise, gain), is dated to its capture time within 1 ms; silence is not."""
    speech = host_bench.speech_like(20.0)
    mic_start = 1000.0
    for start_s in (3.1, 7.45, 12.0):
        start, n = int(start_s * MIC_RATE), int(0.2 * MIC_RATE)
        piece = np.convolve(speech[start : start + n], np.ones(3) / 3, mode="same") * 0.7 * 32767
        piece += np.random.default_rng(0).normal(0, 30, n)
        captured_end = mic_start + (start + n) / MIC_RATE
        found = host_bench._captured_at(piece, speech.astype(np.float64), mic_start, captured_end + 0.8)
        assert found is not None and abs(found - captured_end) < 0.001, (start_s, found, captured_end)
    silence = np.zeros(9600)
    assert host_bench._captured_at(silence, speech.astype(np.float64), mic_start, mic_start + 10) is None


def test_the_host_bench_measures_one_real_peer_on_the_simulated_device(tmp_path, capsys):
    """`python -m server.commands.host_bench` for one session (3 s): the peer received 512x512 frames at a frame
    rate, their audio, and the server's CPU is split by thread; the table is printed."""
    out = tmp_path / "figures.json"
    args = ["--sessions", "1", "--seconds", "3", "--warmup_s", "1", "--no_netns", "--port", "0", "--json", str(out)]
    assert host_bench.main(args) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["sessions"] == 1 and case["fps_per_session"][0] > 5
    assert case["audio_s_per_s"][0] > 0.3
    stages = case["server_cpu"]["by_stage_ms_per_frame"]
    assert any("event loop" in name for name in stages) and case["server_cpu"]["ms_per_frame"] > 0
    assert "| sessions | fps per session |" in capsys.readouterr().out
