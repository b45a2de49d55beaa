"""The websockets' JSON messages, named once for the server and its clients (schema and fields: docs/websocket.md).
The frames websocket's binary messages are `frames.py`.

A message is a JSON object whose string `type` is one of the names below. The server's websocket handlers
(server/websockets/) dispatch on and send these names; the clients (`session.py`, `pipecat.py`) send and read them.
The engine's events (`state`, `playback.*`, `mark`, `control.applied`, `error`) are forwarded as they are.
"""

from __future__ import annotations

# -- bot -> server, on the bot websocket (binary messages are PCM16 audio) ------------------------------------------
AUDIO_END = "audio.end"  # the utterance pushed so far is complete
INTERRUPT = "interrupt"  # stop speaking now, drop what is pending
MARK = "mark"  # {"name"}: answered by a `mark` event when the audio pushed before it has played
CONTROL = "control"  # live controls (the fields of PATCH /v1/sessions/{id}), optional "id"
PING = "ping"  # optional "id", answered by `pong`
SESSION_CLOSE = "session.close"  # end the session

CLIENT_MESSAGES = (AUDIO_END, INTERRUPT, MARK, CONTROL, PING, SESSION_CLOSE)

# -- server -> client ------------------------------------------------------------------------------------------------
SESSION_READY = "session.ready"  # the first message on every bot websocket
STREAM_START = "stream.start"  # the first message on every frames websocket
STATE = "state"  # idle, speaking, closed
PLAYBACK_STARTED = "playback.started"
PLAYBACK_FINISHED = "playback.finished"
BUFFER = "buffer"  # buffered_ms: backpressure
CONTROL_ACCEPTED = "control.accepted"
CONTROL_APPLIED = "control.applied"
PONG = "pong"
SCRIPT_STATE = "script.state"
SCRIPT_ITEM = "script.item"
ERROR = "error"  # {"code", "message"}

SERVER_MESSAGES = (
    SESSION_READY,
    STREAM_START,
    STATE,
    PLAYBACK_STARTED,
    PLAYBACK_FINISHED,
    MARK,
    BUFFER,
    CONTROL_ACCEPTED,
    CONTROL_APPLIED,
    PONG,
    SCRIPT_STATE,
    SCRIPT_ITEM,
    ERROR,
)


def message(kind: str, **fields: object) -> dict:
    """`{"type": kind, **fields}`: what either side sends as one JSON text message."""
    return {"type": kind, **fields}
