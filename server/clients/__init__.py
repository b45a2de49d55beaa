"""Client-side integrations: code that runs in a bot's process and talks to a vexpress-rt server over its public
API (HTTP + the bot and frames websockets), never in the server's process.

| module | what |
|---|---|
| `session_client.py` | `AvatarSession`: open a session, push PCM16, interrupt, read events and paired frames, close |
| `pipecat.py` | `VExpressVideoService`: a Pipecat frame processor (needs `pip install 'vexpress-rt[pipecat]'`) |

Nothing here is imported by the server; `pipecat` is imported only by `server.clients.pipecat`.
"""
