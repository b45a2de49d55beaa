"""Requests through a reverse proxy that terminates HTTPS (docs/deploy.md): the scheme and client address it reports.

Behind Caddy or nginx the server sees plain `http` from the proxy's address. The proxy tells the original scheme in
`X-Forwarded-Proto` or `Forwarded: proto=` (RFC 7239) and the client in `X-Forwarded-For` or `Forwarded: for=`.
Anyone can send those headers, so they are believed only from the `--trusted-proxy` networks; then the request is
seen with that scheme (session URLs read `https://`/`wss://`, same-origin checks compare `https` origins) and that
client address (per-address quotas). The value the nearest proxy added (the last one) is the one taken.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SCHEMES = ("http", "https")


def parse_networks(texts: Sequence[str]) -> list[Network]:
    """`10.0.0.0/8`, `127.0.0.1` (one address) ...; ValueError naming a bad one."""
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an IP address or network (CIDR, e.g. 10.0.0.0/8)") from exc
    return out


def _last(header: str | None) -> str | None:
    if not header:
        return None
    value = header.split(",")[-1].strip()
    return value or None


def _forwarded(request: web.Request, name: str) -> str | None:
    """`name` (proto, for) from the `Forwarded` element the nearest proxy added, else from `X-Forwarded-*`."""
    elements = [e for e in request.forwarded if name in e]
    if elements:
        return elements[-1][name].strip().strip('"')
    legacy = {"proto": "X-Forwarded-Proto", "for": "X-Forwarded-For"}[name]
    return _last(request.headers.get(legacy))


def _address(text: str) -> str | None:
    """An address from `for=` / `X-Forwarded-For` (`192.0.2.1`, `"[2001:db8::1]:4711"`), or None (obfuscated)."""
    host = text.strip('"')
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _from_trusted(request: web.Request, networks: Sequence[Network]) -> bool:
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    return any(peer in network for network in networks)


def middleware(networks: Sequence[Network]):
    """The request as the client made it, when a trusted proxy forwarded it; else unchanged."""

    @web.middleware
    async def forwarded_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if networks and _from_trusted(request, networks):
            proto = (_forwarded(request, "proto") or "").lower()
            scheme = proto if proto in SCHEMES else request.scheme
            client = _forwarded(request, "for")
            address = _address(client) if client else None
            if address is not None and address != request.remote:
                request = request.clone(scheme=scheme, remote=address)
            elif scheme != request.scheme:
                request = request.clone(scheme=scheme)
        return await handler(request)

    return forwarded_middleware
