"""The client side of vexpress-rt: what a bot's process imports to drive an avatar over the server's public API
(HTTP, the bot websocket, the frames websocket). It imports neither the server nor the engine nor the model (no
torch, no aiortc: import-linter checks it), so a bot project imports it under this name whatever its own modules
are called (a `server.py` of its own included).

| module | what |
|---|---|
| `session.py` | `AvatarSession`: open a session, push PCM16, interrupt, read events and paired frames, close |
| `frames.py` | the frames websocket's wire format, shared with the server (which imports it from here) |
| `pipecat.py` | `VExpressVideoService`: a Pipecat frame processor (needs `pip install 'vexpress-rt[pipecat]'`) |

`pipecat` is imported only by `vexpress_rt_client.pipecat`.
"""

from .session import AvatarSession, SessionLost, SessionOptions

__all__ = ["AvatarSession", "SessionLost", "SessionOptions"]
