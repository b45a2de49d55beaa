"""Server settings: one dataclass, from `vexpress-rt serve` arguments, then `VEXPRESS_*` variables, then defaults.

Each setting is declared once, below, as a field of `ServerConfig` (`setting.py`): its default, type, check,
help and README row. Every flag has an environment variable named after it: `--max_sessions` / `--max-sessions`
is `VEXPRESS_MAX_SESSIONS`, `--ice-server` is `VEXPRESS_ICE_SERVER`. A flag given on the command line wins over
the variable. Repeatable flags (`--ice-server`, `--ice-host`) take several values in their variable, separated by
spaces or commas, or as a JSON array. README's settings table is `python -m server.settings --markdown`.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from streaming.decoder import DECODER_CHOICES
from streaming.params import arg_type
from streaming.portrait import DEFAULT_PORTRAIT
from streaming.presets import PRESETS, preset_named
from streaming.session_config import SessionConfig
from vexpress_rt.weights import DEFAULT_MODEL_DIR

from ..access.origins import is_loopback_host
from . import values as v
from .setting import (
    ENV_PREFIX,
    ConfigError,
    Setting,
    at_least_one,
    empty_is_none,
    integer_from,
    off_or_positive,
    one_of,
    positive,
    setting,
    table,
)
from .values import MAX_TURN_TTL_S, IceServer, parse_ice_host, parse_ice_server, parse_origin

__all__ = [  # what the rest of the server imports from here
    "DEFAULT_AVATAR",
    "ENV_PREFIX",
    "MAX_TURN_TTL_S",
    "SETTINGS",
    "ConfigError",
    "IceServer",
    "ServerConfig",
    "add_serve_arguments",
    "parse_ice_host",
    "parse_ice_server",
    "parse_origin",
    "unknown_variables",
]

DEFAULT_AVATAR = DEFAULT_PORTRAIT  # package data of streaming (streaming/assets/)
# The page lives at the repository root, next to this package: run the server from a checkout, an editable
# install or the Docker image (which copies web_client/), or point --web_root at a copy of it.
DEFAULT_WEB_ROOT = Path(__file__).resolve().parents[2] / "web_client"
OUTPUT_MODES = ("on", "off", "api-key")
DTYPES = ("auto", "fp16", "fp32", "bf16")
# VEXPRESS_* variables read by other parts of the project (the example bot, the tests, deploy/compose.yaml), not
# by `serve`: not warned about.
OTHER_VARIABLES = {"URL", "AVATAR_ID", "FIXTURES", "REFERENCE", "SOAK_S", "CHROMIUM", "ARTIFACTS", "WRITE_DOCS"}
OTHER_VARIABLES |= {"CERT_DIR"}

# Each field: setting(default, --help text, doc=README row text (None: the row above), check=..., ...). The order
# is README's.


@dataclass
class ServerConfig:
    model_dir: str = setting(DEFAULT_MODEL_DIR, "model folder in the released layout", doc="the released model folder")
    host: str = setting(
        "127.0.0.1",
        "address to listen on (0.0.0.0 in the Docker image)",
        doc="where to listen (`0.0.0.0` in the Docker image: then `--api-key` or `--insecure-no-auth` is required)",
    )
    port: int = setting(8080, "TCP port", check=v.tcp_port)
    avatar: str = setting(  # the portrait every session uses unless it names another avatar
        str(DEFAULT_AVATAR),
        "default portrait (PNG/JPEG)",
        doc="default portrait (PNG/JPEG) of the sessions that name no other avatar",
        shown="the packaged portrait",
    )
    avatar_kps: str | None = setting(
        None,
        "key points of --avatar (JSON/.npy, 3 or 5 [x, y])",
        doc="key points of `--avatar` (JSON/`.npy`, 3 or 5 `[x, y]`)",
        shown="`<avatar>.json` when present, else detected",
    )
    fps: int = setting(
        25,
        "default session frame rate (integer)",
        doc="defaults of new sessions (integer fps dividing 48000)",
        check=v.frame_rate,
    )
    steps: int | None = setting(
        None,
        "default denoising steps per window; default: the preset's",
        check=v.steps,
        flag_type=arg_type("steps"),
        shown="the preset's (2)",
    )
    preset: str | None = setting(
        None,
        f"default schedule of new sessions: {', '.join(PRESETS)} (docs/streaming.md); default: default",
        doc="the schedule of new sessions: `default` (2 steps x 4 new frames a call) or `low_latency` (1 x 2); a "
        'session may name another (`"preset"`); [docs/streaming.md](docs/streaming.md)',
        check=v.preset,
        shown="`default`",
    )
    max_sessions: int = setting(
        4,
        "sessions served at once (the engine may admit fewer)",
        doc="sessions at once; the engine also refuses sessions it measures it cannot serve in real time "
        "(`--no-admission` turns that off)",
        check=at_least_one,
    )
    admission: bool = setting(  # also refuse sessions the engine measures it cannot serve in real time
        True,
        "admit up to --max_sessions even when the engine measures that it cannot keep up in real time",
        negated=True,
        dashed=True,
    )
    ice_server: list[IceServer] = setting(  # none: no STUN/TURN (host candidates only)
        [],
        "STUN/TURN server, repeatable: stun:host:port, turn:user:pass@host:port or a JSON object",
        doc="STUN/TURN servers: `stun:host:port`, `turn:user:pass@host:port[?transport=tcp]` (user and password "
        'URL-encoded), or `{"urls": [...], "username": ..., "credential": ...}`; in the variable: several '
        "separated by spaces, or a JSON array",
        item=v.ice_server_item,
        dashed=True,
    )
    # HTTPS (server/serving/tls.py): a certificate and its key (PEM), or a throw-away self-signed certificate
    tls_cert: str | None = setting(
        None,
        "serve HTTPS with this certificate (PEM, the chain after it); needs --tls-key",
        doc="serve HTTPS (page, API, websockets, WHEP, all on the one port) with this certificate (PEM, chain after "
        "it) and its unencrypted key; missing, unreadable or mismatched files: exit 2 before the port opens "
        "([Deploying](#deploying))",
        shown="none (HTTP)",
        dashed=True,
    )
    tls_key: str | None = setting(None, "the private key (PEM, unencrypted) of --tls-cert", shown="", dashed=True)
    tls_self_signed: bool = setting(
        False,
        "serve HTTPS with a throw-away self-signed certificate for the served names and addresses (a LAN test; "
        "browsers warn until it is accepted; its SHA-256 fingerprint is printed)",
        doc="serve HTTPS with a throw-away self-signed certificate (EC P-256, 30 days) for `localhost`, 127.0.0.1, "
        "`--host` (with `0.0.0.0`: the host name and every address of this machine) and the `--allowed-host` "
        "names; prints its SHA-256 fingerprint; for a LAN test",
        dashed=True,
    )
    # TURN REST API credentials (server/webrtc/turn.py): each session gets its own, expiring, signed with the
    # secret the TURN server shares (coturn: use-auth-secret + static-auth-secret)
    turn_secret: str | None = setting(
        None,
        "hand each session short-lived TURN credentials signed with this secret (TURN REST API; coturn: "
        "use-auth-secret, static-auth-secret=SECRET); needs --turn-url",
        doc="a TURN server's shared secret and URLs (`turn:host:3478?transport=udp`, `turns:host:5349`): each "
        "session's creation reply carries its own TURN credentials, valid `--turn_ttl_s` seconds (at most 86400, "
        "else exit 2) and never past the session's `--max_session_s` (TURN REST API; "
        "[TURN](#turn-for-browsers-behind-nat-or-firewalls))",
        check=empty_is_none,
        dashed=True,
    )
    turn_url: list[str] = setting(
        [],
        "the TURN server for --turn-secret, repeatable: turn:host:port[?transport=udp|tcp], turns:host:port",
        check=v.turn_urls,
        dashed=True,
    )
    turn_ttl_s: float = setting(  # never past the session's end
        3600.0,
        "lifetime of the --turn-secret credentials in seconds (at most 86400; never past the session's "
        "--max_session_s)",
        check=v.turn_ttl,
    )
    ice_host: list[str] = setting(
        [],
        "only offer host candidates on this IP address, repeatable",
        doc="the only host addresses offered as ICE candidates (e.g. `127.0.0.1` for loopback-only tests); "
        "process-wide",
        shown="every interface",
        item=parse_ice_host,
        dashed=True,
    )
    api_key: str | list[str] | None = setting(  # one key, or several (--api-key repeated)
        None,
        "require this key (Authorization: Bearer or X-API-Key) on control endpoints; repeatable (any is accepted)",
        doc="when set, required as `Authorization: Bearer <key>` or `X-API-Key: <key>` on control endpoints (any "
        "of the keys)",
        check=v.api_keys,
        dashed=True,
    )
    # access and limits (SECURITY.md); 0 turns a time limit off
    allowed_host: list[str] = setting(
        [],
        "a host name (host or host:port) clients reach the server by, repeatable; requests naming another Host are "
        "refused (DNS rebinding); IP addresses and localhost are always accepted",
        doc="DNS names (`name` or `name:port`) the server answers to; other `Host` headers get 403 (DNS rebinding, "
        "[SECURITY.md](SECURITY.md#browser-origins-cors))",
        shown="IP addresses and `localhost`",
        check=v.host_names,
        dashed=True,
    )
    trusted_proxy: list[str] = setting(
        [],
        "a reverse proxy's address or network (CIDR), repeatable: its X-Forwarded-Proto/-For (or Forwarded) "
        "headers are believed, so session URLs read https:// and wss:// behind it",
        doc="a reverse proxy's address or network (`127.0.0.1`, `10.0.0.0/8`) whose `X-Forwarded-Proto`/"
        "`X-Forwarded-For` (or `Forwarded`) headers are believed: behind it session URLs read `https://`/`wss://` "
        "and quotas see the client's address ([docs/deploy.md](docs/deploy.md))",
        check=v.networks,
        dashed=True,
    )
    insecure_no_auth: bool = setting(
        False,
        "serve off loopback without --api-key: anyone who reaches the port may use the whole API",
        doc="serve off loopback without `--api-key` (refused otherwise); logged as a loud warning",
        dashed=True,
    )
    allowed_origin: list[str] = setting(
        [],
        "a browser origin (scheme://host[:port]) allowed to call the API besides the server's own, repeatable; "
        "* allows any",
        doc="browser origins (`https://app.example.com`, `*`) that may call the API besides the server's own; "
        "others get 403 ([SECURITY.md](SECURITY.md#browser-origins-cors))",
        shown="same origin only",
        check=v.origins,
        dashed=True,
    )
    max_upload_mb: float = setting(
        20.0,
        "largest upload (portrait, audio file) in MiB",
        doc="sizes: uploads, portrait pixels (checked before decoding), SDP offers, websocket messages, seconds of "
        "pushed audio ahead of playback",
        check=positive,
    )
    max_image_pixels: int = setting(
        40_000_000, "largest portrait in pixels (width x height), checked before decoding", check=positive
    )
    max_sdp_bytes: int = setting(65536, "largest SDP offer in bytes (JSON bodies: this plus 16 KiB)", check=positive)
    max_ws_message_bytes: int = setting(1 << 20, "largest websocket message in bytes", check=positive)
    max_buffer_s: float = setting(120.0, "seconds of pushed audio a session holds ahead of playback", check=positive)
    max_session_s: float = setting(
        14400.0,
        "a session ends after this many seconds (4 h by default); 0: never",
        doc="a session ends (an `error` event `max_duration` / `idle_timeout` first) after this long, or this long "
        "without audio or requests; 0: never",
        check=off_or_positive,
    )
    idle_timeout_s: float = setting(
        300.0, "a session with no audio and no call for this many seconds ends; 0: never", check=off_or_positive
    )
    max_sessions_per_key: int = setting(
        0,
        "sessions one API key (without keys: one client address) may hold; 0: max_sessions",
        doc="sessions one API key (without keys: one client address) holds, WHEP viewers per session, registered "
        "portraits; every limit and its error: [SECURITY.md](SECURITY.md#limits)",
        shown="`max_sessions`",
        check=off_or_positive,
    )
    max_viewers: int = setting(4, "WHEP viewers per session", check=positive)
    max_avatars: int = setting(16, "registered portraits, the default included", check=positive)
    motion_video_budget_s: float = setting(
        180.0,
        "time one motion video's key-point extraction may take before it is refused (413)",
        doc="time one motion video's key-point extraction may take (checked between frames); beyond: 413 "
        "([SECURITY.md](SECURITY.md#motion-uploads))",
        check=positive,
    )
    max_frames_sockets: int = setting(  # each may hold a queue of full frames
        4,
        "frames websockets per session",
        doc="frames / bot websockets per session (429 `socket_limit` beyond)",
        check=positive,
    )
    max_bot_sockets: int = setting(2, "bot websockets per session", check=positive)
    max_control_changes_per_s: float = setting(  # server/api/controls.py
        10.0,
        "live control changes a second per session (PATCH /v1/sessions/{id} and bot control messages), in bursts "
        "of 2 s' worth; beyond: 429 + Retry-After (websocket: error event rate_limited)",
        doc="live control changes a second per session (`PATCH /v1/sessions/{id}` and the bot's `control` messages "
        "together; bursts of 2 s' worth); beyond: 429 `rate_limited` + `Retry-After` (websocket: `error` event "
        "`rate_limited`)",
        check=positive,
    )
    max_ws_messages_per_s: float = setting(  # server/access/limits.py MessageRate
        500.0,
        "messages a second one websocket connection may send, in bursts of 2 s' worth (beyond: dropped with an "
        "error event; flooding on: closed with 1008)",
        doc="messages a second one websocket connection may send (bursts of 2 s' worth; a bot pushing 20 ms chunks "
        "at 5x real time sends 250); beyond: dropped with an `error` event `rate_limited`, and a client that keeps "
        "flooding is closed (1008)",
        check=positive,
    )
    width: int = setting(512, "video width (multiple of 8)", doc="video size (multiples of 8)", check=v.frame_side)
    height: int = setting(512, "video height (multiple of 8)", check=v.frame_side)
    cache_dir: str | None = setting(
        None, "keep pre-encoded avatars here across restarts", doc="keeps pre-encoded avatars across restarts"
    )
    decoder: str = setting(  # the sessions' default; auto: TAESD ("tiny") when installed, else the full VAE
        "auto",
        "latents -> frames: tiny (TAESD), full (sd-vae-ft-mse) or auto (tiny when <model_dir>/taesd is there); "
        "sessions may choose another",
        doc="latents -> frames: `tiny` (TAESD, `<model_dir>/taesd`, fetched by `download-weights`; 11x cheaper "
        "than the full decoder on an H100), `full` (sd-vae-ft-mse, as the offline `generate`) or `auto` (`tiny` "
        'when its weights are there, else `full` with a warning); a session may ask for the other with `"decoder"` '
        "([docs/streaming.md](docs/streaming.md#decoder))",
        check=one_of(DECODER_CHOICES),
    )
    cache_dir_mb: float = setting(
        8192.0,
        "most MiB of pre-encoded avatars kept in --cache_dir (least recently used go)",
        doc="MiB of pre-encoded avatars kept in `--cache_dir` and in memory (least recently used go first)",
        check=positive,
    )
    avatar_cache_mb: float = setting(  # for re-registration (LRU)
        2048.0, "most MiB of pre-encoded avatars cached in memory for re-registration", check=positive
    )
    device: str = setting(
        "cuda",
        "cuda or cpu (no CUDA: the CPU); sim:h100 (or sim:<profile.json>): a simulated device for design and tests, "
        "no model runs, frames marked SIMULATED (docs/simulator.md)",
        doc="`auto`: fp16 on CUDA, fp32 on the CPU; no CUDA: the CPU, with a warning",
        check=v.device,
    )
    dtype: str = setting("auto", "auto (fp16 on CUDA, fp32 on CPU), fp16, fp32 or bf16", check=one_of(DTYPES))
    devices: str | None = setting(  # one model worker per device; None: --device
        None,
        "one model worker per device: all (every visible GPU), or a list such as cuda:0,cuda:1 (cpu,cpu: two CPU "
        "workers); new sessions go to the device with the most headroom",
        doc="one model worker per device: `all`, `cuda:0,cuda:1`, or `cpu,cpu` (two CPU workers, for tests); each "
        "new session goes to the device with the most real-time headroom "
        "([Deploying](#one-machine-with-several-gpus))",
        shown="`--device` (`cuda`: every visible GPU)",
        check=v.device_list,
    )
    mark_frames: bool = setting(
        False,
        "diagnostics: stamp the frame index into the video and a chirp into the audio every second",
        doc="diagnostics: the frame index as a barcode along the top of the video and a 10 ms chirp at the start of "
        "every 25th frame's audio, so a receiver can measure A/V offset (see `server/media/marks.py`)",
        dashed=True,
    )
    connect_timeout_s: float = setting(
        60.0,
        "close a session no peer connected to within this many seconds",
        doc="a session no peer connects to within this is closed",
        check=positive,
    )
    styles: str | None = setting(
        None,
        "JSON file of expression styles {name: {field: value}} added to the built-in ones (docs/controls.md)",
        doc="a JSON file of expression styles `{name: {field: value}}` added to the built-in `neutral`, `calm`, "
        "`lively`, `presenter` ([docs/controls.md](docs/controls.md#styles))",
        check=v.styles_file,
    )
    recording_dir: str | None = setting(
        None,
        "folder for MP4 recordings of sessions (server/outputs/recording.py); a temporary one is deleted at shutdown",
        doc="where MP4 recordings go; deleted at shutdown ([docs/websocket.md](docs/websocket.md#recording))",
        shown="a temporary folder",
    )
    recording_retention_s: float = setting(
        3600.0,
        "delete a finished recording this many seconds after it stopped",
        doc="a finished recording is deleted this long after it stopped",
        check=positive,
    )
    recordings_quota_mb: float = setting(
        4096.0,
        "MiB of disk all recordings may take (running ones stop, new ones get 507)",
        doc="MiB of disk all recordings may take: running ones stop, new ones get 507",
        check=positive,
    )
    jpeg_quality: int = setting(
        80,
        "JPEG quality (1-95) of the frames websocket",
        doc="JPEG quality of the frames websocket (a client may ask for another with `?quality=`)",
        check=integer_from(1, 95),
    )
    # scripts (server/script/): text items are spoken by this command ({text}, {out} placeholders; server/script/tts.py)
    tts_command: str | None = setting(
        None,
        "speak script text items with this command, run without a shell: {text} is the text, {out} the WAV file "
        'it writes, e.g. "espeak-ng -w {out} {text}"; none: text items refused',
        doc="speaks script text items: run without a shell, `{text}` and `{out}` (the WAV it writes) replaced, "
        'e.g. `"espeak-ng -w {out} {text}"` ([docs/websocket.md](docs/websocket.md#scripts))',
        check=v.tts_command,
        dashed=True,
    )
    tts_timeout_s: float = setting(30.0, "a --tts-command run is killed after this many seconds", check=positive)
    tts_max_procs: int = setting(
        2,
        "--tts-command processes running at once on the server (503 beyond)",
        doc="`--tts-command` processes running at once on the whole server; a script with text items posted while "
        "all are busy gets 503 + Retry-After ([SECURITY.md](SECURITY.md#scripts-tts-and-speak))",
        check=positive,
    )
    script_audio_mb: float = setting(
        128.0,
        "decoded audio (mono int16 at the session's rate) one script holds at once, in MiB",
        doc="MiB of decoded audio (mono int16 at the session's output rate) one script holds at once: the item "
        "playing and the next ([SECURITY.md](SECURITY.md#scripts-tts-and-speak))",
        check=positive,
    )
    decoded_audio_mb: float = setting(
        512.0,
        "decoded audio the whole server holds at once (scripts and /speak), in MiB (503 beyond)",
        doc="MiB of decoded audio the whole server holds at once (scripts and `/speak`); beyond: 503 + Retry-After",
        check=positive,
    )
    max_speak_decodes: int = setting(
        2,
        "/speak requests reading and decoding a file at once (503 beyond)",
        doc="`/speak` requests reading and decoding a file at once; beyond: 503 + Retry-After",
        check=positive,
    )
    # live outputs (server/outputs/, server/access/outbound.py): who may add them, and where they may connect
    outputs: str = setting(
        "on",
        "live outputs (RTMP/SRT/WHIP pushes): on, off, or api-key (only requests with an API key may add them)",
        doc="live outputs (RTMP/SRT/WHIP pushes): `on`, `off` (403 `outputs_disabled`), or `api-key` (only requests "
        "with an API key may add them; needs `--api-key`) "
        "([SECURITY.md](SECURITY.md#outbound-connections-live-outputs))",
        check=one_of(OUTPUT_MODES),
    )
    output_allow: list[str] = setting(
        [],
        "a host name, address or CIDR (with :port: that port only) outputs may connect to besides public "
        "addresses, repeatable, e.g. 127.0.0.1:1935 for a local ingest",
        doc="`host`, address or CIDR, with `:port` for that port only, that outputs may connect to besides public "
        "addresses, e.g. `127.0.0.1:1935` for a local ingest; loopback, private, link-local, CGNAT, ULA and "
        "multicast targets are refused otherwise (400 `target_not_allowed`)",
        shown="public addresses only",
        check=v.output_rules,
        dashed=True,
    )
    subscriber_queue_frames: int = setting(
        6,
        "frames queued per track for a receiver that stalls; beyond, the oldest are dropped",
        doc="frames queued per WebRTC track for a receiver that stalls; beyond, the oldest are dropped",
        check=at_least_one,
    )
    web_root: str = setting(
        str(DEFAULT_WEB_ROOT),
        "folder of the browser page",
        doc="folder of the browser page",
        shown="`web_client/` next to the server package",
    )

    def validate(self) -> ServerConfig:
        """Each setting's check (normalising its value), then the checks across settings; ConfigError on the first
        bad one."""
        for s in SETTINGS:
            if s.check is not None:
                setattr(self, s.name, s.check(s.flag, getattr(self, s.name)))
        for check in CROSS_CHECKS:
            message = check(self)
            if message:
                raise ConfigError(message)
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
        for s in SETTINGS:
            given = getattr(args, s.name, None)
            if given is not None and given != []:
                values[s.name] = s.convert(given)
            elif s.env in environ:
                values[s.name] = s.convert(environ[s.env], from_env=True)
            elif s.negated and s.env_names[1] in environ:  # VEXPRESS_NO_ADMISSION=1, as the flag --no-admission
                values[s.name] = not s.convert(environ[s.env_names[1]], from_env=True)
        return cls(**values).validate()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> ServerConfig:
        return cls.from_args(argparse.Namespace(**overrides), environ)


SETTINGS: tuple[Setting, ...] = table(ServerConfig)


# --- checks across settings: each returns the message of what is wrong, or None --------------------------------


def _key_off_loopback(c: ServerConfig) -> str | None:
    if c.api_key is None and not c.insecure_no_auth and not is_loopback_host(c.host):
        return (
            f"--host {c.host} serves other machines: give --api-key (or VEXPRESS_API_KEY), or "
            "--insecure-no-auth to serve the whole API to anyone who can reach it"
        )
    return None


def _tls_files(c: ServerConfig) -> str | None:
    if c.tls_self_signed and (c.tls_cert or c.tls_key):
        return "--tls-self-signed makes its own certificate: give it or --tls-cert/--tls-key, not both"
    if bool(c.tls_cert) != bool(c.tls_key):
        return "--tls-cert and --tls-key go together: give both (PEM files) or neither"
    return None


def _turn_pair(c: ServerConfig) -> str | None:
    if bool(c.turn_secret) != bool(c.turn_url):
        return "--turn-secret and --turn-url go together: the TURN server's shared secret and its URLs"
    return None


def _outputs_need_a_key(c: ServerConfig) -> str | None:
    if c.outputs == "api-key" and c.api_key is None:
        return "--outputs api-key restricts outputs to API-key holders: give --api-key too"
    return None


CROSS_CHECKS: tuple[Callable[[ServerConfig], str | None], ...] = (
    _key_off_loopback,
    _tls_files,
    _turn_pair,
    _outputs_need_a_key,
)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The `serve` flags, one per setting. Every default is None so that `from_args` can tell a given flag from an
    absent one."""
    for s in SETTINGS:
        s.add_flag(p)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """`VEXPRESS_*` variables that name no setting, each with the closest setting's variable when one is close
    (a typo, or a flag's spelling): what `serve` warns about at start-up instead of ignoring them silently."""
    known = {env[len(ENV_PREFIX) :] for s in SETTINGS for env in s.env_names} | OTHER_VARIABLES
    out = []
    for variable in sorted(environ):
        name = variable[len(ENV_PREFIX) :]
        if not variable.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name.replace("-", "_"), sorted(known), n=1, cutoff=0.75)
        out.append(f"{variable} (did you mean {ENV_PREFIX}{close[0]}?)" if close else variable)
    return out
