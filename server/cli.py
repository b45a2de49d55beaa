"""`vexpress-rt`: the model's commands (vexpress_rt.cli) plus those of the layers above: `serve`, `push` (and `bench`).

`EXTRA_COMMANDS` lists functions that each add one subcommand to the parser's subparsers; the console script
`vexpress-rt` is `server.cli:main`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable

from streaming.bench.demo_model import add_make_demo_model_command
from streaming.generate_additions import FRAMING_ADDITION, PRODUCT_ADDITIONS
from vexpress_rt import cli as model_cli
from vexpress_rt.errors import WeightsError

from .commands.camera import add_camera_command
from .commands.present import add_present_command
from .commands.push import add_push_command
from .commands.soak import add_soak_command
from .settings.config import ServerConfig, add_serve_arguments, unknown_variables

log = logging.getLogger("server")


def add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the WebRTC avatar server (browser page at /, HTTP API under /v1)",
        description="Serve live avatar sessions over WebRTC. Every flag also reads VEXPRESS_<FLAG>.",
    )
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)


EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_serve_command, add_push_command]
try:  # the engine's benchmark, when the streaming package provides one
    from streaming.bench.command import add_bench_command
except ImportError:
    pass
else:
    EXTRA_COMMANDS.append(add_bench_command)
EXTRA_COMMANDS.append(add_soak_command)  # N sessions for M minutes against a served app: latency, memory, fds, tasks
EXTRA_COMMANDS.append(add_present_command)  # a script on a session pushed to RTMP/SRT/WHIP, from the command line
EXTRA_COMMANDS.append(add_camera_command)  # a session as a virtual camera + microphone for video calls
EXTRA_COMMANDS.append(add_make_demo_model_command)  # a tiny random model folder: every command on a CPU, no download


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving.engine_factory import build_pool, weights_report
    from .webrtc.peer import restrict_host_addresses

    config = ServerConfig.from_args(args, os.environ)  # ConfigError: one line, exit code 2
    for variable in unknown_variables(os.environ):
        log.warning("%s is not a setting of vexpress-rt serve: ignored", variable)
    restrict_host_addresses(config.ice_host)  # unknown addresses: exit before loading anything
    tls = _tls_context(config)  # missing/mismatched certificate files: exit 2 before loading anything
    busy = _port_problem(config.host, config.port)  # a busy port: exit 2 now, not after loading the model
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 2
    try:
        engine = build_pool(config)  # one engine per device (--devices)
    except WeightsError as exc:
        print(f"error: cannot load the model from {config.model_dir}: {str(exc).splitlines()[0]}", file=sys.stderr)
        print("Model folder check:", file=sys.stderr)
        for line in weights_report(config):
            print(f"  {line}", file=sys.stderr)
        return 2
    engine.start()
    try:
        return _run(config, engine, tls)
    finally:
        engine.close()


def _port_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (bound and released at once, as aiohttp will bind it), or None."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: cannot resolve it ({exc.strerror})"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                hint = (
                    "another server is running there: stop it or give another --port"
                    if (exc.errno == errno.EADDRINUSE)
                    else "check --host and --port"
                )
                return f"cannot listen on {host}:{port}: {exc.strerror} ({hint})"
    return None


def _tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """`--tls-cert/--tls-key`, or a fresh self-signed certificate (its fingerprint printed), or None (HTTP)."""
    from .serving.tls import self_signed_context, served_names, ssl_context
    from .webrtc.peer import local_addresses

    if config.tls_cert and config.tls_key:
        return ssl_context(config.tls_cert, config.tls_key)
    if not config.tls_self_signed:
        return None
    ctx, made = self_signed_context(served_names(config.host, local_addresses(), config.allowed_host))
    print(f"TLS: self-signed certificate for {', '.join(made.names)}", flush=True)
    print(f"TLS: SHA-256 fingerprint {made.fingerprint}", flush=True)
    return ctx


def _run(config: ServerConfig, engine, tls: ssl.SSLContext | None = None) -> int:
    coro = _serve(config, engine, tls)
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _serve(config: ServerConfig, engine, tls: ssl.SSLContext | None = None) -> int:
    from .serving.inprocess import InProcessServer

    server = InProcessServer(config, engine, tls)  # starts registering the default avatar in the background
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    async with server:
        print(f"vexpress-rt serving on {server.url}/ (Ctrl+C to stop)", flush=True)
        await stop.wait()
        log.info("stopping")
    return 0


def main(argv: list[str] | None = None) -> int:
    return model_cli.main(argv, extra_commands=EXTRA_COMMANDS, generate_additions=[PRODUCT_ADDITIONS, FRAMING_ADDITION])


if __name__ == "__main__":
    sys.exit(main())
