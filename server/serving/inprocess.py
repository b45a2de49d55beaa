"""Serve the app in this process: `serve`, `present`, `soak` and the tests all run the server through here.

`InProcessServer` runs it on the current event loop (`async with InProcessServer(config) as server: server.url`);
`ServerThread` runs one on a thread of its own, with its own (uvloop) event loop, for callers that block (`soak`,
tests that drive the server over HTTP from their own loop). Without an engine, one per device is built from the
settings (`--devices`; loads the weights), started, and closed after the app's cleanup; a given engine (or pool)
must be started by the caller and stays the caller's to close.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

try:
    import uvloop
except ImportError:  # Windows: the default loop
    uvloop = None  # type: ignore[assignment]

from streaming.device_pool import DevicePool
from streaming.engine import Engine

from ..api.state import STATE, ServerState
from ..app import create_app
from ..settings.config import ServerConfig
from .engine_factory import build_pool

T = TypeVar("T")
START_TIMEOUT_S = 120.0  # building the app, binding the port (not loading the weights: see ServerThread.start)
STOP_TIMEOUT_S = 60.0


class InProcessServer:
    """The app on `host:port` of the settings (port 0: a free one, read back into `port`), on the current loop."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | DevicePool | None = None,
        tls: ssl.SSLContext | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        add_routes: Callable[[web.Application], None] | None = None,
    ) -> None:
        """`add_routes`: a caller's own routes on the app (e.g. a bench's probe), added before it is frozen."""
        self.config = config
        self.add_routes = add_routes
        self.engine = engine
        self.tls = tls
        self.host = config.host if host is None else host
        self.port = config.port if port is None else port
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._owned: DevicePool | None = None  # the engine built here, closed by stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        shown = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        return f"{scheme}://{shown}:{self.port}"

    @property
    def state(self) -> ServerState:
        if self.app is None:
            raise RuntimeError("the server is not started")
        return self.app[STATE]

    async def start(self) -> str:
        """Build the app (and the engine when none was given), listen; the URL. The default portrait registers and
        the engine warms up in the background afterwards (`/readyz`, `ready()`)."""
        self.config.validate()  # ConfigError before any weights are loaded
        engine = self.engine
        if engine is None:
            engine = self._owned = build_pool(self.config)  # WeightsError when the model folder is incomplete
            engine.start()
        try:
            self.app = create_app(self.config, engine=engine)
            if self.add_routes is not None:
                self.add_routes(self.app)
            self._runner = web.AppRunner(self.app, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    async def ready(self) -> None:
        """Wait until the server is what `/readyz` calls ready (default portrait registered, engine warm) or has
        failed to start (`state.startup_error`)."""
        state = self.state
        while (state.default_avatar_id is None or not state.engine.warm) and state.startup_error is None:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Close the sessions and sockets (the app's shutdown), then the engine built here, if any."""
        try:
            if self._runner is not None:
                await self._runner.cleanup()
                self._runner = None
        finally:
            if self._owned is not None:
                self._owned.close()
                self._owned = None

    async def __aenter__(self) -> InProcessServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ServerThread:
    """An `InProcessServer` on a thread with its own event loop (uvloop's, as `serve` runs it), for blocking callers:
    `start()` returns once it listens (and, by default, is ready), `call(coro)` runs a coroutine on its loop."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | DevicePool | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "vexpress-server",
    ) -> None:
        self.server = InProcessServer(config, engine, host=host, port=port)
        self.config, self.engine = config, engine
        self.loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.url = ""

    @property
    def app(self) -> web.Application | None:
        return self.server.app

    @property
    def state(self) -> ServerState:
        return self.server.state

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run `coro` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready: bool = True, ready_timeout_s: float = START_TIMEOUT_S) -> ServerThread:
        self._thread.start()
        try:
            self.url = self.call(self.server.start(), timeout=START_TIMEOUT_S)
            if wait_ready:
                self.call(self.server.ready(), timeout=ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.call(self.server.stop(), timeout=STOP_TIMEOUT_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()
