"""Run the server in-process for tests: the aiohttp app on 127.0.0.1, port 0, in a thread with its own event loop.

Tests talk to it over real HTTP (and WebRTC) from their own loop, as a client would. The server's loop is uvloop's,
as `vexpress-rt serve` runs it in production (`server/cli.py`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass

import aiohttp
import uvloop
from aiohttp import web

from server.api.state import STATE
from server.app import create_app
from server.settings.config import ServerConfig

TEST_SIZE = {"width": 128, "height": 64}


def make_config(**overrides) -> ServerConfig:
    values = {**TEST_SIZE, "ice_host": ["127.0.0.1"], "connect_timeout_s": 30.0}
    values.update(overrides)
    return ServerConfig(**values)


class ServerThread:
    def __init__(self, config: ServerConfig, engine):
        self.config = config
        self.engine = engine
        self.loop = uvloop.new_event_loop()  # the production loop, not asyncio's default
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.url = ""
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None

    def call(self, coro, timeout: float = 60.0):
        """Run `coro` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def state(self):
        return self.app[STATE]

    def start(self, wait_ready: bool = True) -> ServerThread:
        self._thread.start()

        async def up():
            self.app = create_app(self.config, engine=self.engine)
            self._runner = web.AppRunner(self.app, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.url = f"http://127.0.0.1:{self.call(up(), timeout=120)}"
        if wait_ready:
            self.call(self._ready(), timeout=120)
        return self

    async def _ready(self) -> None:
        """The default portrait registers and the engine warms up in the background: wait for what `/readyz` calls
        ready (or a failure), as a client should before it opens sessions."""
        state = self.state
        while (state.default_avatar_id is None or not state.engine.warm) and state.startup_error is None:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@dataclass
class Reply:
    status: int
    headers: dict
    text: str

    @property
    def json(self):
        return json.loads(self.text)


async def request(method: str, url: str, **kwargs) -> Reply:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.request(method, url, **kwargs) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.text())


def call(method: str, url: str, **kwargs) -> Reply:
    """A blocking HTTP request, for tests that do not run their own loop."""
    return asyncio.run(request(method, url, **kwargs))
