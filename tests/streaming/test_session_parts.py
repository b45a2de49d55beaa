"""The parts a live session is made of, on their own: its state machine and its input side (no model runs: the
input only plans audio for wav2vec2, the worker runs it). The whole session is tested in test_engine.py."""

import numpy as np
import pytest

from streaming.frames import Event
from streaming.session_config import SessionConfig
from streaming.session_input import MAX_MARKS_PER_UTTERANCE, SessionInput
from streaming.session_state import SessionLifecycle, SessionState
from vexpress_rt.errors import InputError

RATE = 16000


def _input(**config) -> SessionInput:
    clock = iter(np.arange(0.0, 1e6, 0.01))
    return SessionInput(SessionConfig(**config), models=None, now=lambda: float(next(clock)), session_id="s1")


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[:, None]


def test_the_state_machine_speaks_idles_and_stays_closed():
    life = SessionLifecycle("s1")
    heard: list[Event] = []
    life.add_listener(lambda e: (_ for _ in ()).throw(RuntimeError("a broken listener")))
    life.add_listener(heard.append)
    life.emit(life.to(SessionState.SPEAKING, 3))
    life.emit(life.to(SessionState.SPEAKING, 4))  # no change: no event
    life.emit(life.to(SessionState.IDLE, 9))
    life.emit(life.to(SessionState.CLOSED, 10))
    # a frame still in flight after the close cannot bring the session back
    assert life.to(SessionState.SPEAKING, 11) == [] and life.state == SessionState.CLOSED
    assert [(e.data["state"], e.frame_index) for e in heard] == [("speaking", 3), ("idle", 9), ("closed", 10)]
    with pytest.raises(InputError, match="session s1 is closed"):
        life.check_open()


def test_an_interrupt_starts_a_new_epoch():
    life = SessionLifecycle("s1")
    before = life.epoch
    life.interrupt()
    assert life.epoch == before + 1


def test_audio_is_grouped_into_utterances_padded_to_whole_frames():
    inp = _input()
    inp.push(_speech(0.5), RATE, 1, live=False)
    inp.push(_speech(0.21), RATE, 1, live=False)  # the same utterance until it is ended
    assert len(inp.utterances) == 1 and inp.end()
    utt = inp.utterances[0]
    spf = inp.samples_per_frame
    assert utt.frames_total == 18  # 0.71 s at 25 fps, rounded up to whole frames
    assert utt.out_total == 18 * spf and utt.real_samples <= 0.71 * 48000 + 1
    assert not inp.end()  # nothing open any more
    inp.push(_speech(0.1), 24000, 1, live=False)  # the next push opens the next utterance
    assert [u.id for u in inp.utterances] == [1, 2]


def test_a_refused_push_changes_nothing():
    inp = _input(max_buffer_s=1.0)
    inp.push(_speech(0.8), RATE, 1, live=False)
    before = (inp.buffered_ms(), inp.utterances[0].in_samples)
    with pytest.raises(InputError, match="audio buffer full"):
        inp.push(_speech(0.5), RATE, 1, live=False)
    assert (inp.buffered_ms(), inp.utterances[0].in_samples) == before


def test_live_input_behind_drops_the_oldest_audio_not_yet_generated():
    inp = _input(max_live_lag_s=1.0)
    inp.push(_speech(0.9), RATE, 1, live=True)
    inp.mark("after the first words")
    inp.push(_speech(0.5), RATE, 1, live=True)  # 1.4 s behind: the 0.9 s nothing was generated from goes
    assert inp.live_dropped_ms == pytest.approx(900, abs=30)
    assert inp.pending_marks == ["after the first words"]  # its audio is gone: the mark fires with the next frame
    assert 400 < inp.buffered_ms() < 600


def test_marks_wait_for_their_audio_and_are_bounded():
    inp = _input()
    inp.mark("before any audio")
    assert inp.pending_marks == ["before any audio"]
    inp.push(_speech(0.2), RATE, 1, live=False)
    inp.mark("after 0.2 s")
    assert list(inp.utterances[0].marks) == [(9600, "after 0.2 s")]  # at 48 kHz, where the pushed audio ends
    for i in range(MAX_MARKS_PER_UTTERANCE - 1):
        inp.mark(f"m{i}")
    with pytest.raises(InputError, match="too many marks"):
        inp.mark("one too many")


def test_clear_reports_where_each_utterance_stopped():
    inp = _input()
    inp.push(_speech(0.4), RATE, 1, live=False)
    inp.mark("never played")
    events = inp.clear(index=7)
    assert [(e.type, e.frame_index) for e in events] == [("playback.finished", 7), ("mark", 7)]
    assert events[0].data == {"utterance": 1, "position_ms": 0.0, "interrupted": True}
    assert not inp.utterances and inp.buffered_ms() == 0
