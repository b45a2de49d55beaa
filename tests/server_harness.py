"""Run the server in-process for tests: `ServerThread` (server/serving/inprocess.py, what `serve` runs) serves the app
on 127.0.0.1, port 0, in a thread with its own (uvloop) event loop.

Tests talk to it over real HTTP (and WebRTC) from their own loop, as a client would.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp

from server.serving.inprocess import ServerThread
from server.settings.config import ServerConfig

TEST_SIZE = {"width": 128, "height": 64}


def make_config(**overrides) -> ServerConfig:
    values = {**TEST_SIZE, "ice_host": ["127.0.0.1"], "connect_timeout_s": 30.0}
    values.update(overrides)
    return ServerConfig(**values)


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
