"""Browser origins (CORS) and what the access log may show.

* Requests without an `Origin` header (curl, bots, other servers, page navigations) are not a browser calling
  across sites: they pass, and the API key / session token decide.
* A request naming a `Host` the server was not configured for (an IP address, a loopback name or a
  `--allowed-host`) gets 403 first: against DNS rebinding, where a page on the attacker's name is "same origin".
* A request with an `Origin` is let through when that origin is the server's own (its host and port are the `Host`
  of the request; a server listening on loopback only trusts loopback names, against DNS rebinding) or is listed
  with `--allowed-origin` (`*`: any). Any other origin gets 403 before a handler runs: websocket upgrades
  included, since browsers send their page's origin there too and no CORS protects a websocket.
* Cross-origin answers carry `Access-Control-Allow-Origin` (the caller's origin) and `Vary: Origin`; preflight
  `OPTIONS` requests are answered here (204). No cookies are used, so no credentials mode is offered.
* Session tokens may travel as `?token=` (browsers cannot set headers on a websocket): the access log shows them
  as `token=<redacted>`.
"""

from __future__ import annotations

import ipaddress
import logging
import re

from aiohttp import hdrs, web

from ..errors import error_response

log = logging.getLogger("server.access.origins")

ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, X-API-Key, If-Match"
EXPOSE_HEADERS = "Location, Retry-After, WWW-Authenticate, ETag, Link, Accept-Patch, Accept-Post"
PREFLIGHT_MAX_AGE_S = 600
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_TOKEN = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)


def is_loopback_host(host: str) -> bool:
    """`localhost`, `127.x.y.z`, `::1` (a name or an address, without port)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(hostport: str, scheme: str) -> tuple[str, str]:
    """`host[:port]` -> (host, port) with the scheme's default port filled in; IPv6 literals keep their brackets."""
    hostport = hostport.lower()
    if hostport.startswith("["):
        host, _, rest = hostport.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = hostport.partition(":")
    return host, port or _DEFAULT_PORTS.get(scheme, "")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class OriginPolicy:
    def __init__(self, allowed: list[str], listen_host: str, allowed_hosts: list[str] | None = None):
        self.allowed = {o.lower().rstrip("/") for o in allowed}
        self.allowed_hosts = {h.lower() for h in allowed_hosts or []}
        self.any = "*" in self.allowed
        # A server bound to loopback serves this machine only: a page whose origin is not a loopback name can only
        # be "same origin" through DNS rebinding, so it must be listed explicitly.
        self.loopback_only = is_loopback_host(listen_host)

    def trusted_host(self, request: web.Request) -> bool:
        """The `Host` names this server: an IP address, a loopback name or a `--allowed-host`. A DNS name pointed
        at the server by someone else (DNS rebinding: the attacker's page then counts as same-origin and reads the
        API) is none of these."""
        if not request.host:
            return True  # HTTP/1.0 without Host: not a browser
        host, port = _split_host(request.host, request.scheme)
        return is_loopback_host(host) or _is_ip(host) or self._listed_host(host, port)

    def _listed_host(self, host: str, port: str) -> bool:
        return host in self.allowed_hosts or f"{host}:{port}" in self.allowed_hosts

    def same_origin(self, origin: str, request: web.Request) -> bool:
        scheme, sep, hostport = origin.partition("://")
        if not sep or not request.host:
            return False
        host, port = _split_host(hostport, scheme)
        if (host, port) != _split_host(request.host, scheme):
            return False
        return not self.loopback_only or is_loopback_host(host) or self._listed_host(host, port)

    def allows(self, origin: str, request: web.Request) -> bool:
        origin = origin.strip().lower().rstrip("/")
        return self.any or origin in self.allowed or self.same_origin(origin, request)

    def middleware(self):
        policy = self

        @web.middleware
        async def origin_middleware(request: web.Request, handler):
            if not policy.trusted_host(request):
                log.warning(
                    "refused %s %s for Host %r (not an --allowed-host)",
                    request.method,
                    request.path,
                    request.host[:200],
                )
                return error_response(
                    403, "host_not_allowed", f"this server does not answer as {request.host[:200]!r} (--allowed-host)"
                )
            origin = request.headers.get(hdrs.ORIGIN)
            if origin is None:
                return await handler(request)
            if not policy.allows(origin, request):
                log.warning(
                    "refused %s %s from origin %r (not allowed: see --allowed-origin)",
                    request.method,
                    request.path,
                    origin[:200],
                )
                return error_response(
                    403, "origin_not_allowed", f"origin {origin[:200]!r} may not call this server (--allowed-origin)"
                )
            cors = {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Expose-Headers": EXPOSE_HEADERS,
                "Vary": "Origin",
            }
            if request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
                preflight = {
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                }
                return web.Response(status=204, headers={**cors, **preflight})
            response = await handler(request)
            if not response.prepared:  # a websocket has sent its headers already
                response.headers.update(cors)
            return response

        return origin_middleware


def redact(text: str) -> str:
    """`token=<secret>` in a URL or log line -> `token=<redacted>`."""
    return _TOKEN.sub(r"\1<redacted>", text)


class RedactTokens(logging.Filter):
    """On the access log: session tokens passed in the query string never reach a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "token=" in record.msg.lower():
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        for key in ("first_request_line", "request_line", "path"):
            value = record.__dict__.get(key)
            if isinstance(value, str):
                record.__dict__[key] = redact(value)
        return True


def install_log_redaction() -> None:
    """Redact tokens from aiohttp's access log (idempotent)."""
    logger = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactTokens) for f in logger.filters):
        logger.addFilter(RedactTokens())
