"""Run the server in-process for tests: `ServerThread` (server/serving/inprocess.py, what `serve` runs) serves the app
on 127.0.0.1, port 0, in a thread with its own (uvloop) event loop.

Tests talk to it over real HTTP (and WebRTC) from their own loop, as a client would. A module's server:
`server = server_fixture(max_sessions=8)`; servers of one test: the `serve` fixture (tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from server.serving.inprocess import ServerThread
from server.settings.config import ServerConfig

TEST_SIZE = {"width": 128, "height": 64}


def make_config(**overrides) -> ServerConfig:
    values = {**TEST_SIZE, "ice_host": ["127.0.0.1"], "connect_timeout_s": 30.0}
    values.update(overrides)
    return ServerConfig(**values)


_TINY = object()  # the session's tiny_engine fixture


class Servers:
    """Servers one test starts (`start(**settings)`), all stopped by `stop_all()`."""

    def __init__(self, tiny_engine: Callable[[], Any]):
        self._tiny_engine = tiny_engine
        self._started: list[ServerThread] = []

    def start(
        self, engine: Any = _TINY, wait_ready: bool = True, config: ServerConfig | None = None, **settings
    ) -> ServerThread:
        """A started server with `make_config(**settings)` (or `config`) over `engine` (default: tiny_engine; None:
        one built from the settings, as `serve` does)."""
        chosen = self._tiny_engine() if engine is _TINY else engine
        server = ServerThread(config if config is not None else make_config(**settings), chosen)
        self._started.append(server)
        return server.start(wait_ready=wait_ready)

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


def server_fixture(
    settings: dict | Callable[[pytest.FixtureRequest], dict] | None = None, scope: str = "module", name: str = "server"
):
    """A fixture that serves the app once per `scope` (a module by default) over the session's tiny_engine, with
    `make_config(**settings)`; `settings` may be a function of the fixture request (settings made from other
    fixtures: a temporary folder, a TTS command). In a test module: `server = server_fixture({"max_sessions": 8})`;
    another name: `allowing = server_fixture({...}, name="allowing")`."""

    @pytest.fixture(scope=scope, name=name)
    def server(request: pytest.FixtureRequest):
        overrides = settings(request) if callable(settings) else dict(settings or {})
        servers = Servers(lambda: request.getfixturevalue("tiny_engine"))
        yield servers.start(**overrides)
        servers.stop_all()

    return server


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
