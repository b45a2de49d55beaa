"""The network side of an RTMP/RTMPS output, made by the server, not by FFmpeg.

The encoder child (encoder_process.py) speaks RTMP to a listener on 127.0.0.1 that accepts that one connection;
this relay has already connected to the address the outbound policy checked (server/access/outbound.py), over TLS for
rtmps:// (certificate and host name verified unless the output opts out; SNI is the URL's host name), and copies
the bytes both ways. Why: PyAV opens an output with no protocol options, so FFmpeg could neither be told which
address to use (it would resolve the name again), nor to verify a certificate, nor be limited to a protocol list.
Here FFmpeg only ever opens `rtmp://127.0.0.1:<relay>/...`, a URL the server built.

The one thing changed in the stream: RTMP's `connect` command carries `tcUrl`, the URL FFmpeg was given; the relay
writes back the ingest's own (`rtmps://host:port/app`), which servers may route by.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from ..access.outbound import Endpoint
from .target import OutputSettings

CONNECT_TIMEOUT_S = 10.0
ACCEPT_TIMEOUT_S = 30.0  # the encoder child starts (Python, PyAV) before it connects
HANDSHAKE_BYTES = (1 + 1536, 1536)  # C0+C1, then (after the ingest's S0+S1) C2: the client's half of the handshake
CHUNK_SIZE = 128  # RTMP's chunk size until a Set Chunk Size message (FFmpeg sends it after connect)
CONTINUATION = 0xC3  # basic header of a type-3 chunk on chunk stream 3 (where FFmpeg sends connect)
COPY_BYTES = 1 << 16


class RelayError(Exception):
    """The relay could not connect; `reason` is fixed text (never a socket's or a peer's)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def tls_context(verify: bool) -> ssl.SSLContext:
    """Verified: against the system's trust store (SSL_CERT_FILE/SSL_CERT_DIR when set), host name included;
    unverified: any certificate, any name (an output's explicit `"tls_verify": false`, a self-signed test ingest).
    Made per connection, so that a trust store updated on disk applies to the next reconnect."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def rewrite_tc_url(message: bytes, tc_url: str) -> bytes:
    """The `connect` command (AMF0, in 128-byte chunks on chunk stream 3) with its tcUrl's scheme://host:port
    replaced by `tc_url`'s; anything else unchanged."""
    if len(message) < 12 or message[0] != 0x03 or message[7] != 0x14:  # fmt 0, stream 3, AMF0 command
        return message
    length = int.from_bytes(message[4:7], "big")
    payload = bytearray()
    body = message[12:]
    while body and len(payload) < length:
        take = min(CHUNK_SIZE, length - len(payload))
        payload += body[:take]
        body = body[take:]
        if len(payload) < length:
            if not body or body[0] != CONTINUATION:
                return message
            body = body[1:]
    key = b"\x00\x05tcUrl\x02"
    at = payload.find(key)
    if at < 0 or len(payload) != length:
        return message
    start = at + len(key) + 2
    size = struct.unpack(">H", payload[at + len(key) : start])[0]
    old = bytes(payload[start : start + size]).decode("latin-1")
    scheme_end = old.find("://")
    path_at = old.find("/", scheme_end + 3) if scheme_end >= 0 else -1
    new = (tc_url + (old[path_at:] if path_at >= 0 else "")).encode()
    payload[at + len(key) : start + size] = struct.pack(">H", len(new)) + new
    chunks = [payload[i : i + CHUNK_SIZE] for i in range(0, len(payload), CHUNK_SIZE)]
    header = message[:4] + len(payload).to_bytes(3, "big") + message[7:12]
    return header + bytes([CONTINUATION]).join(chunks) + body


async def read_connect(reader: asyncio.StreamReader) -> bytes:
    """The client's first message after the handshake (connect), whole, with its chunk headers."""
    header = await reader.readexactly(12)
    if header[0] != 0x03:
        return header
    length = int.from_bytes(header[4:7], "big")
    continuations = max(0, (length - 1) // CHUNK_SIZE)
    return header + await reader.readexactly(length + continuations)


class IngestRelay:
    """`await connect()` (to the ingest, TLS done), `port` for the encoder child, `await run()` until a side
    closes, `close()`."""

    def __init__(self, settings: OutputSettings, endpoint: Endpoint):
        self.settings = settings
        self.endpoint = endpoint
        self.port = 0
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._server: asyncio.Server | None = None
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> None:
        tls = self.settings.scheme == "rtmps"
        try:
            self._upstream = await asyncio.wait_for(
                asyncio.open_connection(
                    self.endpoint.address,
                    self.endpoint.port,
                    ssl=tls_context(self.settings.tls_verify) if tls else None,
                    server_hostname=self.endpoint.host if tls else None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except ssl.SSLCertVerificationError:
            raise RelayError('certificate not verified (a self-signed test ingest: "tls_verify": false)') from None
        except (OSError, asyncio.TimeoutError):
            raise RelayError("could not connect") from None
        self._writers.append(self._upstream[1])
        self._accepted = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._accepted is not None and self._server is not None
        if self._accepted.done():  # one connection: the encoder child's
            writer.close()
            return
        self._server.close()
        self._accepted.set_result((reader, writer))

    async def run(self) -> None:
        """Copy both ways until one side closes (then close the other)."""
        assert self._accepted is not None and self._upstream is not None
        try:
            child_reader, child_writer = await asyncio.wait_for(self._accepted, ACCEPT_TIMEOUT_S)
        except asyncio.TimeoutError:
            return
        self._writers.append(child_writer)
        up_reader, up_writer = self._upstream
        to_ingest = asyncio.ensure_future(self._to_ingest(child_reader, up_writer))
        to_child = asyncio.ensure_future(self._copy(up_reader, child_writer))
        try:
            await asyncio.wait((to_ingest, to_child), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_ingest, to_child):
                task.cancel()
            await asyncio.gather(to_ingest, to_child, return_exceptions=True)
            self.close()

    async def _to_ingest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            for size in HANDSHAKE_BYTES:
                writer.write(await reader.readexactly(size))
                await writer.drain()
            writer.write(rewrite_tc_url(await read_connect(reader), self.settings.tc_url()))
            await writer.drain()
            await self._copy(reader, writer)

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(COPY_BYTES):
                writer.write(data)
                await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
