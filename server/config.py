"""Server settings: one dataclass, from `vexpress-rt serve` arguments, then `VEXPRESS_*` variables, then defaults.

Every flag has an environment variable named after it: `--max_sessions` / `--max-sessions` is
`VEXPRESS_MAX_SESSIONS`, `--ice-server` is `VEXPRESS_ICE_SERVER`. A flag given on the command line wins over the
variable. Repeatable flags (`--ice-server`, `--ice-host`) take several values in their variable, separated by
spaces or commas, or as a JSON array.

ICE servers are written as URLs, with TURN credentials in the user-info part, or as a JSON object:

    stun:stun.example.org:3478
    turn:alice:s3cret@turn.example.org:3478?transport=udp
    {"urls": ["turn:turn.example.org:3478"], "username": "alice", "credential": "s3cret"}
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote

from streaming.decoder import DECODER_CHOICES
from streaming.device_pool import parse_devices
from streaming.params import arg_type, field_error
from streaming.portrait import DEFAULT_PORTRAIT
from streaming.presets import PRESETS, preset_named
from streaming.session import SessionConfig
from streaming.sim.profile import ProfileError, is_simulated, profile_of
from streaming.styles import load_styles
from vexpress_rt.errors import InputError
from vexpress_rt.weights import DEFAULT_MODEL_DIR

from .outbound import parse_allow
from .proxy import parse_networks
from .security import is_loopback_host
from .tts import parse_template

ENV_PREFIX = "VEXPRESS_"
DEFAULT_AVATAR = DEFAULT_PORTRAIT  # package data of streaming (streaming/assets/)
# The page lives at the repository root, next to this package: run the server from a checkout, an editable
# install or the Docker image (which copies web_client/), or point --web_root at a copy of it.
DEFAULT_WEB_ROOT = Path(__file__).resolve().parents[1] / "web_client"
MAX_TURN_TTL_S = 86400.0  # TURN credentials live a day at most (they cannot be revoked before their expiry)
OUTPUT_MODES = ("on", "off", "api-key")


# Flags that turn a setting off (`--no-admission` sets `admission` False): their variable works too.
NEGATED_FLAGS = {"no_admission": "admission"}
# VEXPRESS_* variables read by other parts of the project (the example bot, the tests, deploy/compose.yaml), not
# by `serve`: not warned about.
OTHER_VARIABLES = {"URL", "AVATAR_ID", "FIXTURES", "REFERENCE", "SOAK_S", "CHROMIUM", "ARTIFACTS", "WRITE_DOCS"}
OTHER_VARIABLES |= {"CERT_DIR"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`VEXPRESS_*` variables that name no setting, each with the closest setting's variable when one is close
    (a typo, or a flag's spelling): what `serve` warns about at start-up instead of ignoring them silently."""
    known = {f.name.upper() for f in fields(ServerConfig)} | {n.upper() for n in NEGATED_FLAGS} | OTHER_VARIABLES
    out = []
    for variable in sorted(environ):
        name = variable[len(ENV_PREFIX) :]
        if not variable.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name.replace("-", "_"), sorted(known), n=1, cutoff=0.75)
        out.append(f"{variable} (did you mean {ENV_PREFIX}{close[0]}?)" if close else variable)
    return out


class ConfigError(InputError):
    """A setting that cannot be used (bad value, unknown address...)."""


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


def _split_env_list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"cannot parse JSON list {value!r}: {exc}") from exc
        return [json.dumps(i) if isinstance(i, dict) else str(i) for i in items]
    return [v for v in re.split(r"[\s,]+", value) if v]


def _parse_bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


@dataclass
class ServerConfig:
    model_dir: str = DEFAULT_MODEL_DIR
    host: str = "127.0.0.1"
    port: int = 8080
    avatar: str = str(DEFAULT_AVATAR)  # the portrait every session uses unless it names another avatar
    avatar_kps: str | None = None  # JSON/.npy key points of `avatar`; default: <avatar without suffix>.json
    fps: int = 25
    steps: int | None = None  # the sessions' default steps; None: the preset's; a session may ask for others
    preset: str | None = None  # the sessions' default schedule (streaming/presets.py); None: "default"
    max_sessions: int = 4
    ice_server: list[IceServer] = field(default_factory=list)  # none: no STUN/TURN (host candidates only)
    ice_host: list[str] = field(default_factory=list)  # none: every interface aioice finds
    api_key: str | list[str] | None = None  # one key, or several (--api-key repeated): any of them is accepted
    width: int = 512
    height: int = 512
    cache_dir: str | None = None
    avatar_cache_mb: float = 2048.0  # pre-encoded avatars kept in memory for re-registration (LRU)
    cache_dir_mb: float = 8192.0  # pre-encoded avatars kept in --cache_dir (LRU)
    device: str = "cuda"
    devices: str | None = None  # "all", "cuda:0,cuda:1", "cpu,cpu": one model worker per device; None: --device
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on the CPU
    decoder: str = "auto"  # sessions' default decoder; auto: TAESD ("tiny") when installed, else the full VAE
    web_root: str = str(DEFAULT_WEB_ROOT)
    admission: bool = True  # also refuse sessions the engine measures it cannot serve in real time
    mark_frames: bool = False  # diagnostics: frame index barcode in the video, a chirp every second in the audio
    connect_timeout_s: float = 60.0  # a session nobody connects to within this is closed
    subscriber_queue_frames: int = 6  # per track: absorbs stalls of the sender; beyond, the oldest are dropped
    recording_dir: str | None = None  # MP4 recordings (server/recording.py); default: a temporary folder
    recording_retention_s: float = 3600.0  # a finished recording is deleted this long after it stopped
    recordings_quota_mb: float = 4096.0  # disk all recordings may take; beyond, they stop and new ones get 507
    jpeg_quality: int = 80  # JPEG quality of the frames websocket (a client may ask for another with ?quality=)
    # access and limits (SECURITY.md); 0 turns a time limit off
    allowed_origin: list[str] = field(default_factory=list)  # browser origins besides the server's own; "*": any
    allowed_host: list[str] = field(default_factory=list)  # Host names the server answers to besides IPs, localhost
    trusted_proxy: list[str] = field(default_factory=list)  # networks whose X-Forwarded-Proto/-For are believed
    insecure_no_auth: bool = False  # serve off loopback without an API key (refused otherwise)
    max_upload_mb: float = 20.0  # one upload (portrait image, audio file)
    max_image_pixels: int = 40_000_000  # width x height of an uploaded portrait, checked before decoding
    motion_video_budget_s: float = 180.0  # time one motion video's key-point extraction may take
    max_sdp_bytes: int = 65536  # one SDP offer (JSON bodies: this plus 16 KiB)
    max_ws_message_bytes: int = 1 << 20  # one websocket message
    max_ws_messages_per_s: float = 500.0  # per websocket connection, bursts of 2 s' worth (server/limits.py)
    max_control_changes_per_s: float = 10.0  # PATCH and bot `control` changes per session, bursts of 2 s' worth
    max_buffer_s: float = 120.0  # pushed audio not yet played, per session
    max_session_s: float = 14400.0  # a session's whole life
    idle_timeout_s: float = 300.0  # a session with no audio and no call on it for this long ends
    max_sessions_per_key: int = 0  # sessions one API key (without keys: one client address) holds; 0: max_sessions
    max_viewers: int = 4  # WHEP viewers per session
    max_frames_sockets: int = 4  # frames websockets per session (each may hold a queue of full frames)
    max_bot_sockets: int = 2  # bot websockets per session
    max_avatars: int = 16  # registered portraits, the default one included
    # HTTPS (server/tls.py): a certificate and its key (PEM), or a throw-away self-signed certificate
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_self_signed: bool = False
    # TURN REST API credentials (server/tls.py, turn_credentials): each session gets its own, expiring, signed with
    # the secret the TURN server shares (coturn: use-auth-secret + static-auth-secret)
    turn_secret: str | None = None
    turn_url: list[str] = field(default_factory=list)  # turn:host:port[?transport=udp|tcp], turns:host:port
    turn_ttl_s: float = 3600.0  # lifetime of those credentials (at most MAX_TURN_TTL_S; never past the session's end)
    # scripts (server/script/): text items are spoken by this command ({text}, {out} placeholders; server/tts.py)
    tts_command: str | None = None
    tts_timeout_s: float = 30.0
    tts_max_procs: int = 2  # --tts-command processes running at once, whole server (503 + Retry-After beyond)
    script_audio_mb: float = 128.0  # decoded audio one script holds at once (its playing and next items)
    decoded_audio_mb: float = 512.0  # decoded audio the whole server holds at once (scripts, /speak)
    max_speak_decodes: int = 2  # /speak requests reading and decoding a file at once (503 + Retry-After beyond)
    styles: str | None = None  # JSON {name: {field: value}}: expression styles besides the built-in ones
    # live outputs (server/outputs/, server/outbound.py): who may add them, and where they may connect besides
    # public addresses
    outputs: str = "on"  # on | off | api-key (only requests carrying an API key may add outputs)
    output_allow: list[str] = field(default_factory=list)  # host|CIDR[:port] the outputs may reach besides

    def validate(self) -> ServerConfig:
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if not 5 <= self.fps <= 60 or 48000 % self.fps:
            raise ConfigError(f"--fps {self.fps} must be an integer from 5 to 60 that divides 48000")
        if self.steps is not None and field_error("steps", self.steps):  # VEXPRESS_STEPS (the flag: arg_type)
            raise ConfigError(field_error("steps", self.steps))
        if self.preset is not None:
            try:
                preset_named(self.preset)
            except InputError as exc:
                raise ConfigError(f"--preset: {exc}") from None
        try:
            load_styles(self.styles)
        except InputError as exc:
            raise ConfigError(f"--styles: {exc}") from None
        if self.max_sessions < 1:
            raise ConfigError("--max_sessions must be at least 1")
        if self.width % 8 or self.height % 8 or self.width < 8 or self.height < 8:
            raise ConfigError("--width and --height must be positive multiples of 8")
        if self.dtype not in ("auto", "fp16", "fp32", "bf16"):
            raise ConfigError(f"--dtype {self.dtype!r} is not auto, fp16, fp32 or bf16")
        if self.decoder not in DECODER_CHOICES:
            raise ConfigError(f"--decoder {self.decoder!r} is not one of {', '.join(DECODER_CHOICES)}")
        if self.subscriber_queue_frames < 1:
            raise ConfigError("--subscriber_queue_frames must be at least 1")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError("--jpeg_quality must be an integer from 1 to 95")
        if not self.recording_retention_s > 0:
            raise ConfigError("--recording_retention_s must be positive")
        if self.api_key is not None and not self.api_key:
            self.api_key = None
        if isinstance(self.api_key, (list, tuple)) and not all(isinstance(k, str) and k for k in self.api_key):
            raise ConfigError("--api-key: every key must be a non-empty string")
        self.allowed_origin = [parse_origin(o) for o in self.allowed_origin]
        self.allowed_host = [h.strip().lower() for h in self.allowed_host if h.strip()]
        try:
            parse_networks(self.trusted_proxy)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxy {exc}") from None
        if self.api_key is None and not self.insecure_no_auth and not is_loopback_host(self.host):
            raise ConfigError(
                f"--host {self.host} serves other machines: give --api-key (or VEXPRESS_API_KEY), or "
                "--insecure-no-auth to serve the whole API to anyone who can reach it"
            )
        for name in (
            "avatar_cache_mb",
            "cache_dir_mb",
            "recordings_quota_mb",
            "max_upload_mb",
            "max_image_pixels",
            "motion_video_budget_s",
            "max_sdp_bytes",
            "max_ws_message_bytes",
            "max_ws_messages_per_s",
            "max_buffer_s",
            "max_viewers",
            "max_avatars",
            "max_frames_sockets",
            "max_bot_sockets",
            "max_control_changes_per_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be positive")
        if self.tls_self_signed and (self.tls_cert or self.tls_key):
            raise ConfigError("--tls-self-signed makes its own certificate: give it or --tls-cert/--tls-key, not both")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
        self.turn_url = [u.strip() for u in self.turn_url if u.strip()]
        for url in self.turn_url:
            if not re.fullmatch(r"turns?:[^\s@/?]+(\?transport=(udp|tcp))?", url):
                raise ConfigError(
                    f"--turn-url {url!r}: expected turn:host:port[?transport=udp|tcp] or turns:host:port "
                    "(no credentials: they come from --turn-secret)"
                )
        if self.turn_secret is not None and not self.turn_secret:
            self.turn_secret = None
        if bool(self.turn_secret) != bool(self.turn_url):
            raise ConfigError("--turn-secret and --turn-url go together: the TURN server's shared secret and its URLs")
        if not 0 < self.turn_ttl_s <= MAX_TURN_TTL_S:
            raise ConfigError(
                f"--turn_ttl_s {self.turn_ttl_s:g} is out of range: TURN credentials live from 1 s to "
                f"{MAX_TURN_TTL_S:g} s (24 h); a session's credentials end with it anyway (--max_session_s)"
            )
        if self.tts_command:
            try:
                parse_template(self.tts_command)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if not self.tts_timeout_s > 0:
            raise ConfigError("--tts_timeout_s must be positive")
        for name in ("tts_max_procs", "script_audio_mb", "decoded_audio_mb", "max_speak_decodes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be positive")
        for name in ("max_session_s", "idle_timeout_s", "max_sessions_per_key"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be 0 (off) or positive")
        if self.outputs not in OUTPUT_MODES:
            raise ConfigError(f"--outputs {self.outputs!r} is not one of {', '.join(OUTPUT_MODES)}")
        if self.outputs == "api-key" and self.api_key is None:
            raise ConfigError("--outputs api-key restricts outputs to API-key holders: give --api-key too")
        self.output_allow = [a.strip() for a in self.output_allow if a.strip()]
        for rule in self.output_allow:
            try:
                parse_allow(rule)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.devices is not None:
            try:
                parse_devices(self.devices)
            except ValueError as exc:
                raise ConfigError(f"--devices {self.devices!r}: {exc}") from exc
        for item in parse_devices(self.devices) if self.devices else [self.device]:
            if is_simulated(item):
                try:
                    profile_of(item)
                except ProfileError as exc:
                    raise ConfigError(f"--device {item}: {exc}") from exc
        return self

    def avatar_kps_path(self) -> Path | None:
        """The explicit key-point file, else the portrait's `.json` sidecar when there is one."""
        if self.avatar_kps:
            return Path(self.avatar_kps)
        sidecar = Path(self.avatar).with_suffix(".json")
        return sidecar if sidecar.is_file() else None

    def session_defaults(self, base: SessionConfig) -> SessionConfig:
        """`base` (an engine's default session) with this server's `--preset`, then `--steps`."""
        if self.preset is not None:
            base = preset_named(self.preset).applied(base)
        return base if self.steps is None else base.with_params(steps=self.steps)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """CLI values that were given, else `VEXPRESS_<NAME>` variables, else the defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            given = getattr(args, f.name, None)
            env = environ.get(ENV_PREFIX + f.name.upper())
            if given is not None and given != []:
                values[f.name] = _convert(f.name, given)
            elif env is not None:
                values[f.name] = _convert(f.name, env, from_env=True)
        for flag, name in NEGATED_FLAGS.items():  # VEXPRESS_NO_ADMISSION=1, as the flag --no-admission
            env = environ.get(ENV_PREFIX + flag.upper())
            if name not in values and env is not None:
                values[name] = not _convert(name, env, from_env=True)
        return cls(**values).validate()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
        return cls.from_args(argparse.Namespace(**overrides), environ)


_INTS = {
    "port",
    "fps",
    "steps",
    "max_sessions",
    "width",
    "height",
    "subscriber_queue_frames",
    "max_image_pixels",
    "max_sdp_bytes",
    "max_ws_message_bytes",
    "max_sessions_per_key",
    "max_viewers",
    "max_avatars",
    "max_frames_sockets",
    "max_bot_sockets",
}
_FLOATS = {"connect_timeout_s", "max_upload_mb", "max_buffer_s", "max_session_s", "idle_timeout_s"}
_FLOATS |= {"max_ws_messages_per_s"}  # server/limits.py MessageRate
_INTS |= {"jpeg_quality"}  # the frames websocket (server/frames_ws.py)
_FLOATS |= {"recording_retention_s"}  # server/recording.py
_FLOATS |= {"avatar_cache_mb", "cache_dir_mb", "recordings_quota_mb"}  # the avatar store's caches
_FLOATS |= {"turn_ttl_s"}  # TURN REST API credentials
_FLOATS |= {"max_control_changes_per_s"}  # server/controls_api.py
_FLOATS |= {"tts_timeout_s"}  # script text items (server/tts.py)
_INTS |= {"tts_max_procs", "max_speak_decodes"}  # server/tts.py, server/speak.py
_FLOATS |= {"script_audio_mb", "decoded_audio_mb"}  # server/audio_file.py budgets
_FLOATS |= {"motion_video_budget_s"}  # POST /v1/motions with a video (streaming/motion_video.py)


def _convert(name: str, value, from_env: bool = False):
    try:
        if name == "ice_server":
            items = _split_env_list(value) if from_env else value
            return [i if isinstance(i, IceServer) else parse_ice_server(i) for i in items]
        if name == "ice_host":
            items = _split_env_list(value) if from_env else value
            return [parse_ice_host(i) for i in items]
        if name in ("allowed_origin", "allowed_host", "turn_url", "output_allow", "trusted_proxy"):
            return _split_env_list(value) if from_env else list(value)
        if name == "api_key":  # several: the flag repeated, or in the variable separated by spaces/commas
            keys = _split_env_list(value) if from_env else ([value] if isinstance(value, str) else list(value))
            return keys[0] if len(keys) == 1 else keys
        if name in _INTS:
            return int(value)
        if name in _FLOATS:
            return float(value)
        if name in ("mark_frames", "admission", "insecure_no_auth", "tls_self_signed"):
            return _parse_bool(value) if isinstance(value, str) else bool(value)
        return str(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` flags. Every default is None so that `from_args` can tell a given flag from an absent one."""

    def opt(name: str, help: str, **kw) -> None:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*spellings, dest=name, default=None, help=f"{help} (env {ENV_PREFIX}{name.upper()})", **kw)

    opt("model_dir", f"model folder in the released layout; default {DEFAULT_MODEL_DIR}")
    opt("host", "address to listen on; default 127.0.0.1 (0.0.0.0 in the Docker image)")
    opt("port", "TCP port; default 8080", type=int)
    opt("avatar", "default portrait (PNG/JPEG); default: the packaged portrait")
    opt("avatar_kps", "key points of --avatar (JSON/.npy, 3 or 5 [x, y]); default: <avatar>.json when present")
    opt("fps", "default session frame rate (integer); default 25", type=int)
    opt("steps", "default denoising steps per window; default: the preset's", type=arg_type("steps"))
    opt("preset", f"default schedule of new sessions: {', '.join(PRESETS)} (docs/streaming.md); default: default")
    opt("max_sessions", "sessions served at once; default 4 (the engine may admit fewer)", type=int)
    opt(
        "ice_server",
        "STUN/TURN server, repeatable: stun:host:port, turn:user:pass@host:port or a JSON object; default: none",
        action="append",
    )
    opt(
        "ice_host",
        "only offer host candidates on this IP address, repeatable; default: every interface",
        action="append",
    )
    opt(
        "api_key",
        "require this key (Authorization: Bearer or X-API-Key) on control endpoints; repeatable (any key is accepted)",
        action="append",
    )
    opt(
        "allowed_origin",
        "a browser origin (scheme://host[:port]) allowed to call the API besides the server's own, repeatable; "
        "* allows any; default: same origin only",
        action="append",
    )
    opt(
        "allowed_host",
        "a host name (host or host:port) clients reach the server by, repeatable; requests naming another Host are "
        "refused (DNS rebinding); IP addresses and localhost are always accepted; default: none",
        action="append",
    )
    opt(
        "trusted_proxy",
        "a reverse proxy's address or network (CIDR), repeatable: its X-Forwarded-Proto/-For (or Forwarded) "
        "headers are believed, so session URLs read https:// and wss:// behind it; default: none",
        action="append",
    )
    p.add_argument(
        "--insecure_no_auth",
        "--insecure-no-auth",
        dest="insecure_no_auth",
        action="store_const",
        const=True,
        default=None,
        help="serve off loopback without --api-key: anyone who reaches the port may use the whole API "
        f"(env {ENV_PREFIX}INSECURE_NO_AUTH)",
    )
    opt("max_upload_mb", "largest upload (portrait, audio file) in MiB; default 20", type=float)
    opt(
        "max_image_pixels",
        "largest portrait in pixels (width x height), checked before decoding; default 40000000",
        type=int,
    )
    opt(
        "motion_video_budget_s",
        "time one motion video's key-point extraction may take before it is refused (413); default 180",
        type=float,
    )
    opt("max_sdp_bytes", "largest SDP offer in bytes; default 65536", type=int)
    opt("max_ws_message_bytes", "largest websocket message in bytes; default 1048576", type=int)
    opt(
        "max_ws_messages_per_s",
        "messages a second one websocket connection may send, in bursts of 2 s' worth "
        "(beyond: dropped with an error event; flooding on: closed with 1008); default 500",
        type=float,
    )
    opt(
        "max_control_changes_per_s",
        "live control changes a second per session (PATCH /v1/sessions/{id} and bot control messages), in bursts "
        "of 2 s' worth; beyond: 429 + Retry-After (websocket: error event rate_limited); default 10",
        type=float,
    )
    opt("max_buffer_s", "seconds of pushed audio a session holds ahead of playback; default 120", type=float)
    opt("max_session_s", "a session ends after this many seconds; 0: never; default 14400 (4 h)", type=float)
    opt(
        "idle_timeout_s",
        "a session with no audio and no call for this many seconds ends; 0: never; default 300",
        type=float,
    )
    opt(
        "max_sessions_per_key",
        "sessions one API key (without keys: one client address) may hold; 0: max_sessions",
        type=int,
    )
    opt("max_viewers", "WHEP viewers per session; default 4", type=int)
    opt("max_frames_sockets", "frames websockets per session; default 4", type=int)
    opt("max_bot_sockets", "bot websockets per session; default 2", type=int)
    opt("max_avatars", "registered portraits, the default included; default 16", type=int)
    opt("width", "video width (multiple of 8); default 512", type=int)
    opt("height", "video height (multiple of 8); default 512", type=int)
    opt("cache_dir", "keep pre-encoded avatars here across restarts")
    opt("styles", "JSON file of expression styles {name: {field: value}} added to the built-in ones (docs/controls.md)")
    opt(
        "cache_dir_mb",
        "most MiB of pre-encoded avatars kept in --cache_dir (least recently used go); default 8192",
        type=float,
    )
    opt(
        "avatar_cache_mb",
        "most MiB of pre-encoded avatars cached in memory for re-registration; default 2048",
        type=float,
    )
    opt("recording_dir", "folder for MP4 recordings of sessions; default: a temporary folder, deleted at shutdown")
    opt(
        "recording_retention_s",
        "delete a finished recording this many seconds after it stopped; default 3600",
        type=float,
    )
    opt(
        "recordings_quota_mb",
        "MiB of disk all recordings may take (running ones stop, new ones get 507); default 4096",
        type=float,
    )
    opt("jpeg_quality", "JPEG quality (1-95) of the frames websocket; default 80", type=int)
    opt(
        "device",
        "cuda or cpu; default cuda (falls back to the CPU); sim:h100 (or sim:<profile.json>): a simulated device for "
        "design and tests, no model runs, frames marked SIMULATED (docs/simulator.md)",
    )
    opt(
        "devices",
        "one model worker per device: all (every visible GPU), or a list such as cuda:0,cuda:1 (cpu,cpu: two CPU "
        "workers); new sessions go to the device with the most headroom; default: --device, where cuda means all",
    )
    opt("dtype", "auto, fp16, fp32 or bf16; default auto (fp16 on CUDA, fp32 on CPU)")
    opt(
        "decoder",
        "latents -> frames: tiny (TAESD), full (sd-vae-ft-mse) or auto (tiny when <model_dir>/taesd "
        "is there); sessions may choose another; default auto",
    )
    opt("web_root", "folder of the browser page; default: web_client/ next to the server package")
    p.add_argument(
        "--mark_frames",
        "--mark-frames",
        dest="mark_frames",
        action="store_const",
        const=True,
        default=None,
        help="diagnostics: stamp the frame index into the video and a chirp into the audio every second "
        f"(env {ENV_PREFIX}MARK_FRAMES)",
    )
    p.add_argument(
        "--no_admission",
        "--no-admission",
        dest="admission",
        action="store_const",
        const=False,
        default=None,
        help="admit up to --max_sessions even when the engine measures that it cannot keep up in real time "
        f"(env {ENV_PREFIX}NO_ADMISSION=1, or {ENV_PREFIX}ADMISSION=0)",
    )
    opt("tls_cert", "serve HTTPS with this certificate (PEM, the chain after it); needs --tls-key; default: HTTP")
    opt("tls_key", "the private key (PEM, unencrypted) of --tls-cert")
    p.add_argument(
        "--tls_self_signed",
        "--tls-self-signed",
        dest="tls_self_signed",
        action="store_const",
        const=True,
        default=None,
        help="serve HTTPS with a throw-away self-signed certificate for the served names and addresses (a LAN "
        "test; browsers warn until it is accepted; its SHA-256 fingerprint is printed) "
        f"(env {ENV_PREFIX}TLS_SELF_SIGNED)",
    )
    opt(
        "turn_secret",
        "hand each session short-lived TURN credentials signed with this secret (TURN REST API; "
        "coturn: use-auth-secret, static-auth-secret=SECRET); needs --turn-url",
    )
    opt(
        "turn_url",
        "the TURN server for --turn-secret, repeatable: turn:host:port[?transport=udp|tcp], turns:host:port",
        action="append",
    )
    opt(
        "turn_ttl_s",
        "lifetime of the --turn-secret credentials in seconds (at most 86400; never past the session's "
        "--max_session_s); default 3600",
        type=float,
    )
    opt("connect_timeout_s", "close a session no peer connected to within this many seconds; default 60", type=float)
    opt(
        "tts_command",
        "speak script text items with this command, run without a shell: {text} is the text, {out} the WAV file "
        'it writes, e.g. "espeak-ng -w {out} {text}"; default: none (text items refused)',
    )
    opt("tts_timeout_s", "a --tts-command run is killed after this many seconds; default 30", type=float)
    opt("tts_max_procs", "--tts-command processes running at once on the server (503 beyond); default 2", type=int)
    opt(
        "script_audio_mb",
        "decoded audio (mono int16 at the session's rate) one script holds at once, in MiB; default 128",
        type=float,
    )
    opt(
        "decoded_audio_mb",
        "decoded audio the whole server holds at once (scripts and /speak), in MiB (503 beyond); default 512",
        type=float,
    )
    opt("max_speak_decodes", "/speak requests reading and decoding a file at once (503 beyond); default 2", type=int)
    opt(
        "outputs",
        "live outputs (RTMP/SRT/WHIP pushes): on, off, or api-key (only requests with an API key may add them); "
        "default on",
        choices=OUTPUT_MODES,
    )
    opt(
        "output_allow",
        "a host name, address or CIDR (with :port: that port only) outputs may connect to besides public "
        "addresses, repeatable, e.g. 127.0.0.1:1935 for a local ingest; default: public addresses only",
        action="append",
    )
