"""What one setting's value must be: the parsers and checks that `ServerConfig`'s declarations name, one per
setting that needs more than a range (ICE servers, origins, networks, devices, the TTS command...).

ICE servers are written as URLs, with TURN credentials in the user-info part, or as a JSON object:

    stun:stun.example.org:3478
    turn:alice:s3cret@turn.example.org:3478?transport=udp
    {"urls": ["turn:turn.example.org:3478"], "username": "alice", "credential": "s3cret"}
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from streaming.device_pool import parse_devices
from streaming.params import field_error
from streaming.presets import preset_named
from streaming.sim.profile import ProfileError, is_simulated, profile_of
from streaming.styles import load_styles
from vexpress_rt.errors import InputError

from ..access.outbound import parse_allow
from ..access.proxy import parse_networks
from .setting import ConfigError
from .tts_template import parse_template

MAX_TURN_TTL_S = 86400.0  # TURN credentials live a day at most (they cannot be revoked before their expiry)


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server, as RTCIceServer takes it (and as a browser's RTCPeerConnection takes it)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def to_json(self, with_credentials: bool = True) -> dict:
        out: dict = {"urls": list(self.urls)}
        if with_credentials and self.username is not None:
            out["username"] = self.username
        if with_credentials and self.credential is not None:
            out["credential"] = self.credential
        return out


_ICE_URL = re.compile(r"^(?P<scheme>stuns?|turns?):(?:(?P<user>[^:@/]+):(?P<password>[^@/]*)@)?(?P<rest>[^@\s]+)$")


def parse_ice_server(text: str) -> IceServer:
    """`stun:host[:port]`, `turn[s]:user:pass@host[:port][?transport=udp|tcp]` or a JSON object."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
            urls = data["urls"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"ICE server {text!r}: a JSON object needs 'urls' ({exc})") from exc
        urls = (urls,) if isinstance(urls, str) else tuple(urls)
        for url in urls:
            if not _ICE_URL.match(url):
                raise ConfigError(f"ICE server URL {url!r} is not stun:, stuns:, turn: or turns:")
        return IceServer(urls, data.get("username"), data.get("credential"))
    m = _ICE_URL.match(text)
    if not m:
        raise ConfigError(f"ICE server {text!r}: expected stun:host:port or turn:user:pass@host:port")
    url = f"{m['scheme']}:{m['rest']}"
    if m["user"] is None:
        if m["scheme"].startswith("turn"):
            raise ConfigError(f"TURN server {text!r} needs credentials: turn:user:pass@host:port")
        return IceServer((url,))
    return IceServer((url,), unquote(m["user"]), unquote(m["password"]))


def ice_server_item(value: str | IceServer) -> IceServer:
    return value if isinstance(value, IceServer) else parse_ice_server(value)


def parse_origin(text: str) -> str:
    """A browser origin as the `Origin` header carries it: `scheme://host[:port]`, or `*` (any) or `null`."""
    text = text.strip().rstrip("/").lower()
    if text in ("*", "null") or re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+", text):
        return text
    raise ConfigError(f"--allowed-origin {text!r}: expected scheme://host[:port] (e.g. https://app.example.com) or *")


def parse_ice_host(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        raise ConfigError(f"--ice-host {text!r} is not an IP address") from exc


# --- checks of one setting each: (the flag as messages spell it, the value) -> the value to keep ------------------


def tcp_port(flag: str, port: int) -> int:
    if not 1 <= port <= 65535 and port != 0:
        raise ConfigError(f"{flag} {port} is not a TCP port")
    return port


def frame_rate(flag: str, fps: int) -> int:
    if not 5 <= fps <= 60 or 48000 % fps:
        raise ConfigError(f"{flag} {fps} must be an integer from 5 to 60 that divides 48000")
    return fps


def steps(flag: str, value: int | None) -> int | None:
    """None: the preset's steps."""
    message = None if value is None else field_error("steps", value)  # GenerationParams' own message
    if message:
        raise ConfigError(message)
    return value


def preset(flag: str, name: str | None) -> str | None:
    """None: the `default` schedule (streaming/presets.py)."""
    if name is not None:
        try:
            preset_named(name)
        except InputError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    return name


def frame_side(flag: str, value: int) -> int:
    if value % 8 or value < 8:
        raise ConfigError("--width and --height must be positive multiples of 8")
    return value


def styles_file(flag: str, path: str | None) -> str | None:
    try:
        load_styles(path)
    except InputError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    return path


def api_keys(flag: str, value: str | list[str] | None) -> str | list[str] | None:
    """One key, several keys, or None (an empty key or none at all: no key required)."""
    keys = [value] if isinstance(value, str) else list(value or [])
    if keys in ([], [""]):
        return None
    if not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{flag}: every key must be a non-empty string")
    return keys[0] if len(keys) == 1 else keys


def origins(flag: str, values: list[str]) -> list[str]:
    return [parse_origin(o) for o in values]


def host_names(flag: str, values: list[str]) -> list[str]:
    return [h.strip().lower() for h in values if h.strip()]


def networks(flag: str, values: list[str]) -> list[str]:
    try:
        parse_networks(values)
    except ValueError as exc:
        raise ConfigError(f"{flag} {exc}") from None
    return values


def turn_urls(flag: str, values: list[str]) -> list[str]:
    urls = [u.strip() for u in values if u.strip()]
    for url in urls:
        if not re.fullmatch(r"turns?:[^\s@/?]+(\?transport=(udp|tcp))?", url):
            raise ConfigError(
                f"{flag} {url!r}: expected turn:host:port[?transport=udp|tcp] or turns:host:port "
                "(no credentials: they come from --turn-secret)"
            )
    return urls


def turn_ttl(flag: str, seconds: float) -> float:
    if not 0 < seconds <= MAX_TURN_TTL_S:
        raise ConfigError(
            f"{flag} {seconds:g} is out of range: TURN credentials live from 1 s to "
            f"{MAX_TURN_TTL_S:g} s (24 h); a session's credentials end with it anyway (--max_session_s)"
        )
    return seconds


def tts_command(flag: str, command: str | None) -> str | None:
    if command:
        try:
            parse_template(command)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return command


def output_rules(flag: str, values: list[str]) -> list[str]:
    rules = [a.strip() for a in values if a.strip()]
    for rule in rules:
        try:
            parse_allow(rule)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return rules


def device(flag: str, name: str) -> str:
    """A simulated device names a profile that exists (a real one is found, or not, when the model loads)."""
    if is_simulated(name):
        try:
            profile_of(name)
        except ProfileError as exc:
            raise ConfigError(f"{flag} {name}: {exc}") from exc
    return name


def device_list(flag: str, spec: str | None) -> str | None:
    if spec is not None:
        try:
            items = parse_devices(spec)
        except ValueError as exc:
            raise ConfigError(f"{flag} {spec!r}: {exc}") from exc
        for item in items:
            device("--device", item)
    return spec
