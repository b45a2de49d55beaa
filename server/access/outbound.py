"""Where the server may connect out: the one policy for every outbound connection (live outputs: RTMP/RTMPS/SRT
ingests, WHIP endpoints and the ICE candidates of their answers).

A host is resolved here, every address it resolves to is checked, and the caller connects to the address that was
checked (never resolving again: no DNS rebinding between the check and the connection). By default only public
(globally routed) unicast addresses are allowed: loopback, private (RFC 1918), link-local (cloud metadata
169.254.169.254), ULA (fc00::/7), CGNAT (100.64.0.0/10), multicast, unspecified, reserved and documentation
ranges are refused, IPv4 addresses inside IPv6 (mapped, 6to4, Teredo, NAT64) as the IPv4 address they carry. The
operator allows more with `--output-allow host|CIDR[:port]` (repeatable).

Refusals carry a fixed reason, never the resolver's or a socket's text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
RESOLVE_TIMEOUT_S = 5.0
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundRefused(Exception):
    """The policy refuses this target (or it does not resolve: the same answer, so that a caller cannot tell
    internal names that exist from names that do not)."""

    def __init__(self, reason: str = "not allowed"):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AllowRule:
    """One `--output-allow`: a network or a host name, on any port or on one."""

    network: IPNetwork | None = None
    host: str | None = None  # lower case, no trailing dot
    port: int | None = None

    def matches(self, address: IPAddress, port: int | None, host: str | None) -> bool:
        if self.port is not None and port is not None and port != self.port:
            return False
        if self.network is not None:
            return address.version == self.network.version and address in self.network
        return host is not None and host == self.host


def parse_allow(text: str) -> AllowRule:
    """`10.0.0.0/8`, `192.168.1.20:1935`, `[fd00::/8]:443`, `::1`, `ingest.lan`, `ingest.lan:1935`."""
    spec = text.strip()
    port: int | None = None
    if spec.startswith("["):
        inside, _, rest = spec[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"--output-allow {text!r}: expected [IPv6 or CIDR]:port")
            port = _port(rest[1:], text)
        spec = inside
    elif spec.count(":") == 1:
        spec, _, port_text = spec.partition(":")
        port = _port(port_text, text)
    try:
        return AllowRule(network=ipaddress.ip_network(spec, strict=False), port=port)
    except ValueError:
        pass
    host = spec.lower().rstrip(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_label_ok(label) for label in labels) or "/" in host:
        raise ValueError(f"--output-allow {text!r}: expected a host name, an IP address or a CIDR, and :port")
    return AllowRule(host=host, port=port)


def _port(text: str, rule: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"--output-allow {rule!r}: the port must be a number from 1 to 65535")
    return int(text)


def _label_ok(label: str) -> bool:
    return 0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label) and label.isascii()


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo's server and client, NAT64), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """A globally routed unicast address (what the policy allows without a rule)."""
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_private
        and not address.is_reserved
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_unspecified
    )


@dataclass(frozen=True)
class Endpoint:
    """A checked target: the name the URL gave (for TLS SNI, the Host header) and the address to connect to."""

    host: str
    port: int
    address: str


class OutboundPolicy:
    def __init__(self, rules: Sequence[AllowRule] = ()):
        self.rules = tuple(rules)

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> OutboundPolicy:
        return cls([parse_allow(t) for t in texts])

    def allows(self, address: IPAddress | str, port: int | None = None, host: str | None = None) -> bool:
        """Whether the server may connect to `address` (`port`: None matches a rule on any port)."""
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
        name = host.lower().rstrip(".") if host else None
        return is_public(address) or any(rule.matches(address, port, name) for rule in self.rules)

    async def resolve(self, host: str, port: int) -> Endpoint:
        """The address to connect to for `host:port`: the first one the policy allows. OutboundRefused when none
        is (or the name does not resolve)."""
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            candidates: list[str] = [str(literal)]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
            except (OSError, UnicodeError, asyncio.TimeoutError):
                raise OutboundRefused() from None
            candidates = [str(info[4][0]) for info in infos]
        for address in candidates:
            if self.allows(address, port, host):
                return Endpoint(host=host, port=port, address=address)
        raise OutboundRefused()
