"""The engine: the loaded model, the avatars, the sessions and the one model worker that serves them all.

`Engine` is what a transport (the server, a test, the benchmark) talks to. It knows nothing about HTTP or WebRTC.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vexpress_rt.errors import InputError, VExpressError
from vexpress_rt.loader import VExpressModels

from .audio_features import IncrementalAudioFeatures
from .avatar import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, Avatar, AvatarInfo, AvatarStore, PreEncodedAvatar
from .decoder import FrameDecoder
from .denoiser import ChunkJob, DenoiserSettings, StreamDenoiser, StreamState
from .device import bind_thread, synchronize, to_host, to_host_all
from .framing import PortraitPhoto
from .portrait import crop_box, crop_portrait, locate_face
from .pose import PoseFeatures
from .session import SessionConfig, StreamSession
from .stage_timer import NoStageTimer, StageTimer
from .unet_runner import MAX_GRAPH_FRAMES, CudaGraphBackend, GraphBank, RerunBackend, bucket_for, graph_buckets
from .worker import ModelWorker

log = logging.getLogger(__name__)

MAX_DENOISERS = 16  # cached denoisers (one per distinct settings); beyond, those no session uses are dropped
MAX_MOTIONS = 64  # uploaded key-point sequences kept (the oldest go first)
MAX_MOTION_FRAMES = 9000  # 5 minutes at 30 fps
IDLE_DECODE_FRAMES = 8  # frames of the idle clip decoded per call


def _graph_bank(device: torch.device, graphs: bool | None, max_batch: int) -> GraphBank | None:
    """CUDA graphs on a CUDA device unless switched off; `graphs=True` elsewhere reruns the captured function
    (the graph path's bookkeeping, for tests); otherwise eager. One bank per engine: its runners share the
    reference slots and the capture policy (captured at warm-up, sealed for serving)."""
    device = torch.device(device)
    if graphs is False or (graphs is None and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return GraphBank(CudaGraphBackend(device), graph_buckets(max_batch), MAX_GRAPH_FRAMES)
    return GraphBank(RerunBackend(), graph_buckets(max_batch))


class CapacityError(VExpressError):
    """The device cannot serve one more session in real time (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class EngineConfig:
    width: int = 512
    height: int = 512
    max_sessions: int = 4
    max_batch: int = 4  # windows of different sessions in one UNet call
    cache_dir: str | None = None
    avatar_memory_bytes: int = DEFAULT_MEMORY_BYTES  # the avatar store's in-memory cache (LRU)
    avatar_disk_bytes: int = DEFAULT_DISK_BYTES  # ... and its cache_dir (LRU)
    idle_seconds: float = 2.0  # the idle clip rendered at registration (played forth and back)
    admission: bool = True  # refuse sessions the measured worker speed cannot serve in real time
    realtime_margin: float = 0.9  # admit while the estimated worker load stays below this fraction
    insightface_root: str | None = None
    graphs: bool | None = None  # UNet windows replayed from CUDA graphs; None: on CUDA devices, eager elsewhere
    # settings whose graphs the warm-up captures at every batch bucket (besides the default session's); once warm,
    # any other settings run eagerly: no graph is captured while serving
    graph_settings: tuple[DenoiserSettings, ...] = ()
    # decode, host copy and delivery on a second thread, overlapping the next turn (streaming/finisher.py); None: on
    # CUDA devices, serial elsewhere (on a CPU both threads share the same cores)
    pipelined: bool | None = None
    default_session: SessionConfig = field(default_factory=SessionConfig)
    # what the engine reports as its device ("sim:h100" on a simulated device, streaming/sim/); None: the models'
    device_name: str | None = None
    simulated: dict[str, Any] | None = None  # a simulated device's description (profile, source); None: a real one


class Engine:
    def __init__(
        self,
        models: VExpressModels,
        config: EngineConfig | None = None,
        decoders: dict[str, FrameDecoder] | None = None,
    ):
        """`decoders`: those sessions may choose (streaming/decoder.py); default: the full VAE only."""
        self.models = models
        self.config = config or EngineConfig()
        self.decoders = decoders or {"full": FrameDecoder.full(models)}
        if self.config.default_session.decoder not in self.decoders:
            raise VExpressError(f"the default session decoder {self.config.default_session.decoder!r} is not loaded")
        self.store = AvatarStore(
            models, self.config.cache_dir, self.config.avatar_memory_bytes, self.config.avatar_disk_bytes
        )
        pipelined = self.config.pipelined
        if pipelined is None:
            pipelined = torch.device(models.device).type == "cuda"
        self.worker = ModelWorker(self, max_batch=self.config.max_batch, pipelined=pipelined)
        self.model_lock = threading.Lock()  # the worker and avatar registration take turns on the device
        self._lock = threading.RLock()
        self._avatars: dict[str, Avatar] = {}
        self._sessions: dict[str, StreamSession] = {}
        self._denoisers: dict[DenoiserSettings, StreamDenoiser] = {}
        self._silence: dict[int, torch.Tensor] = {}
        self._motions: dict[str, np.ndarray] = {}  # uploaded key-point sequences by id (add_motion)
        self.poses = PoseFeatures(models)  # per-frame pose features of the sessions' motions
        # device time per stage: nothing measured unless the benchmark installs a StageTimer
        self.stages: NoStageTimer | StageTimer = NoStageTimer()
        self._graphs = _graph_bank(models.device, self.config.graphs, self.config.max_batch)
        self.warm = False  # set by warm_up(): graphs captured, cost per batch size measured
        self.warmup: dict[str, Any] | None = None

    @property
    def device_name(self) -> str:
        """The device as /v1/info, /metrics and logs name it: "cuda:0", "cpu", or "sim:h100" when simulated."""
        return self.config.device_name or str(self.models.device)

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()

    def close(self) -> None:
        for session in list(self._sessions.values()):
            session.close()
        self.worker.stop()

    def wake(self) -> None:
        self.worker.wake()

    # -- avatars ----------------------------------------------------------------------------------------------
    def add_avatar(self, image: Image.Image, kps: np.ndarray | None = None, name: str | None = None) -> AvatarInfo:
        """Pre-encode a portrait (blocking: run it in an executor). Not a tight crop? It is cropped around the
        face. Raises InputError for pictures without a usable face."""
        bind_thread(self.models.device)  # an executor's thread: its CUDA work goes to this engine's device
        cfg = self.config
        photo, face = locate_face(image, kps, cfg.insightface_root)
        portrait, portrait_kps = crop_portrait(photo, face, cfg.width, cfg.height)
        with self.model_lock:
            encoded = self.store.get_or_encode(portrait, portrait_kps, cfg.width, cfg.height)
        avatar_id = (
            "a"
            + hashlib.sha256(self.store.key(portrait, portrait_kps, cfg.width, cfg.height).encode()).hexdigest()[:15]
        )
        with self._lock:
            if avatar_id in self._avatars:
                return self._avatars[avatar_id].info
        frames, latents = self.render_idle(encoded)
        whole = PortraitPhoto.of(photo, crop_box(face.kps, cfg.width, cfg.height))  # for framed outputs
        whole.matte()  # here, in the registration's executor: opening a cut-out session never waits for it
        info = AvatarInfo(avatar_id, name, cfg.width, cfg.height, time.time(), portrait_kps.tolist())
        with self._lock:
            self._avatars.setdefault(avatar_id, Avatar(info, encoded, frames, latents, whole))
            return self._avatars[avatar_id].info

    def get_avatar(self, avatar_id: str) -> AvatarInfo | None:
        avatar = self._avatars.get(avatar_id)
        return avatar.info if avatar else None

    def avatar(self, avatar_id: str) -> Avatar:
        return self._avatars[avatar_id]

    def avatars(self) -> list[AvatarInfo]:
        return [a.info for a in self._avatars.values()]

    def remove_avatar(self, avatar_id: str) -> bool:
        """Forget an avatar and drop it from the caches: its memory is freed once the last session using it ends."""
        with self._lock:
            avatar = self._avatars.pop(avatar_id, None)
        if avatar is None:
            return False
        self.store.forget(avatar.encoded)
        self._release_if_unused(avatar.encoded)
        return True

    def _release_if_unused(self, encoded: PreEncodedAvatar) -> None:
        """A deleted avatar that no session uses any more leaves the denoisers' cached batch references too; a
        session still using it keeps it until it ends (`release_session` asks again)."""
        with self._lock:
            if any(a.encoded is encoded for a in self._avatars.values()):
                return  # still registered
            if any(s.avatar.encoded is encoded for s in self._sessions.values()):
                return
            denoisers = list(self._denoisers.values())
        with self.model_lock:  # the worker reads the runners' caches inside its UNet calls
            for denoiser in denoisers:
                denoiser.forget(encoded)

    @torch.no_grad()
    def render_idle(self, encoded: PreEncodedAvatar) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """The idle clip: the streaming denoiser driven by silence, so idle and speech frames look alike; decoded
        by every decoder, so that a session's idle and speech frames come from the same one."""
        cfg = self.config.default_session
        settings = cfg.denoiser_settings()
        denoiser = self.denoiser(settings)
        silence = self.silence_tokens_for(cfg.fps)
        state = denoiser.new_state(encoded, seed=cfg.params.seed, silence=silence)
        n = settings.new_frames
        total = max(n, int(round(self.config.idle_seconds * cfg.fps / n)) * n)
        latents: list[torch.Tensor] = []
        tokens = silence[None].expand(n, -1, -1)
        while len(latents) < total:
            with self.model_lock:
                t0 = time.perf_counter()
                out = denoiser.run([ChunkJob(state, encoded, tokens, list(range(n)), cfg.params)])[0]
                synchronize(self.models.device)  # the measured cost must cover the compute, not its launch
                self.worker.record_chunk(settings, 1, time.perf_counter() - t0)
            latents += [latent for _, latent in out]
        stacked = torch.stack(latents[:total], dim=1)
        frames = {}
        for name in self.decoders:
            # In chunks, outside the model lock (decoders are only read, as the pipelined worker's finisher reads
            # them): one call of 50 frames of the full VAE under the lock stalled every live session ~0.75 s
            # and peaked ~20 GB on a GPU
            chunks = [
                self.decode(stacked[:, first : first + IDLE_DECODE_FRAMES].transpose(0, 1), name)
                for first in range(0, total, IDLE_DECODE_FRAMES)
            ]
            frames[name] = np.concatenate(chunks)
        return frames, stacked

    @torch.no_grad()
    def warm_up(self, avatar_id: str | None = None) -> dict[str, Any]:
        """Before serving: run the call (UNet + decode) of the default settings and of `graph_settings` at every
        batch size the worker will use (its buckets up to `max_batch`) on a registered avatar, twice each: the
        first captures the graphs (or warms up the eager path), the second is measured and calibrates the
        admission cost model. Then the graph bank is sealed: a call that finds no graph runs eagerly, never
        capturing on the serving path. Idempotent; bounded by settings x buckets x 2 calls. Returns what it did
        (seconds, call ms per batch of the default settings)."""
        if self.warmup is not None:
            return self.warmup
        bind_thread(self.models.device)  # an executor's thread: its CUDA work goes to this engine's device
        avatar = self._avatars[avatar_id] if avatar_id else next(iter(self._avatars.values()))
        cfg = self.config.default_session
        default = cfg.denoiser_settings()
        allowed = [default, *(s for s in self.config.graph_settings if s != default)]
        silence = self.silence_tokens_for(cfg.fps)
        batches = sorted({bucket_for(b) or b for b in range(1, self.worker.max_batch + 1)})
        started = time.perf_counter()
        call_ms: dict[int, float] = {}
        for settings in allowed:
            denoiser = self.denoiser(settings)
            n = settings.new_frames
            for batch in batches:
                states = [denoiser.new_state(avatar.encoded, seed=i, silence=silence) for i in range(batch)]
                latents = avatar.encoded.latent.to(self.models.device, self.models.dtype).expand(batch * n, -1, -1, -1)
                for _ in range(2):
                    jobs = [
                        ChunkJob(state, avatar.encoded, silence[None].expand(n, -1, -1), [None] * n, cfg.params)
                        for state in states
                    ]
                    with self.model_lock:
                        t0 = time.perf_counter()
                        denoiser.run(jobs)
                        self.decode(latents, cfg.decoder)  # ends with the host copy: the device is done
                        seconds = time.perf_counter() - t0
                self.worker.record_chunk(settings, batch, seconds)
                if settings == default:
                    call_ms[batch] = round(1000 * seconds, 2)
        if self._graphs is not None:
            self._graphs.seal()
        self.warmup = {
            "warmup_s": round(time.perf_counter() - started, 2),
            "graphs": self._graphs is not None,
            "graphs_captured": self._graphs.backend.captures if self._graphs is not None else 0,
            "settings": cfg.params.to_dict(),
            "call_ms_by_batch": call_ms,
        }
        self.warm = True
        log.info(
            "engine warm in %.1f s (graphs: %s); ms per call by batch size: %s",
            self.warmup["warmup_s"],
            self.warmup["graphs"],
            call_ms,
        )
        return self.warmup

    # -- motions ------------------------------------------------------------------------------------------------
    def add_motion(self, sequence: np.ndarray) -> str:
        """Keep a driving key-point sequence (N, 3, 2) pixels (`extract-kps` output); its id names it as a session's
        `motion`. The same sequence gets the same id."""
        seq = np.ascontiguousarray(sequence, dtype=np.float32)
        if seq.ndim != 3 or seq.shape[1:] != (3, 2) or not 1 <= len(seq) <= MAX_MOTION_FRAMES:
            raise InputError(f"a motion is 1 to {MAX_MOTION_FRAMES} frames of 3 (x, y) key points, got {seq.shape}")
        if not np.isfinite(seq).all():
            raise InputError("a motion's key points must be finite")
        motion_id = "m" + hashlib.sha256(seq.tobytes()).hexdigest()[:15]
        with self._lock:
            self._motions.pop(motion_id, None)
            self._motions[motion_id] = seq
            while len(self._motions) > MAX_MOTIONS:
                del self._motions[next(iter(self._motions))]
        return motion_id

    def motion(self, motion_id: str) -> np.ndarray:
        """An uploaded motion's key points (KeyError: unknown)."""
        return self._motions[motion_id]

    def remove_motion(self, motion_id: str) -> bool:
        """Forget an uploaded motion (False: unknown). Sessions following it keep their copy (`LiveControls`);
        new sessions and control changes can no longer name it."""
        with self._lock:
            return self._motions.pop(motion_id, None) is not None

    def motions(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": k, "frames": len(v)} for k, v in self._motions.items()]

    # -- sessions ---------------------------------------------------------------------------------------------
    def can_admit(self, config: SessionConfig | None = None) -> bool:
        return self._admission_problem(config or self.config.default_session) is None

    def headroom(self, config: SessionConfig | None = None) -> float | None:
        """The real-time margin left once a session of `config` joins those running (negative: over it), from
        the measured cost model; None before any measurement. What a device pool places sessions by."""
        configs = [s.config for s in self.sessions()] + [config or self.config.default_session]
        load = self.worker.estimated_load(configs)
        return None if load is None else self.config.realtime_margin - load

    def _admission_problem(self, config: SessionConfig) -> str | None:
        if len(self._sessions) >= self.config.max_sessions:
            return f"all {self.config.max_sessions} session slots are taken"
        if not self.config.admission:
            return None
        load = self.worker.estimated_load([s.config for s in self._sessions.values()] + [config])
        if load is not None and load > self.config.realtime_margin:
            return (
                f"the device cannot serve another session in real time (estimated load {load:.2f} of "
                f"{self.config.realtime_margin:.2f})"
            )
        return None

    def open_session(
        self, avatar_id: str, config: SessionConfig | None = None, now: Callable[[], float] = time.monotonic
    ) -> StreamSession:
        """A new session on a registered avatar; `now` is its clock (tests and simulations pass their own)."""
        config = config or self.config.default_session  # validated when made; sessions only read it
        if config.decoder not in self.decoders:
            raise InputError(
                f"decoder {config.decoder!r} is not available on this server (its weights are not installed); "
                f"available: {', '.join(self.decoders)}"
            )
        with self._lock:
            avatar = self._avatars[avatar_id]  # KeyError: unknown avatar
            problem = self._admission_problem(config)
            if problem:
                raise CapacityError(problem)
            session = StreamSession(self, avatar, config, now)
            self._sessions[session.id] = session
        log.info("session %s opened on avatar %s (%s)", session.id, avatar_id, config)
        self.wake()
        return session

    def get_session(self, session_id: str) -> StreamSession | None:
        return self._sessions.get(session_id)

    def sessions(self) -> list[StreamSession]:
        with self._lock:  # the worker thread and the event loop both open and close sessions
            return list(self._sessions.values())

    def release_session(self, session: StreamSession) -> None:
        """A session closed: drop it, and its avatar's cached inputs when no other session uses them."""
        with self._lock:
            self._sessions.pop(session.id, None)
        self._release_if_unused(session.avatar.encoded)
        log.info("session %s closed", session.id)

    def stats(self) -> dict[str, Any]:
        sessions = self.sessions()
        latencies = [x for s in sessions for x in list(s.latencies_ms)[-200:]]
        lat = np.array(latencies) if latencies else np.zeros(1)
        return {
            "sessions": len(sessions),
            "avatars": len(self._avatars),
            **{f"avatar_cache_{k}": v for k, v in self.store.stats().items()},
            "frames_generated": self.worker.frames_generated,
            "worker_errors": self.worker.errors,  # sessions the worker failed (each ended with an error event)
            "worker_batch_retries": self.worker.batch_retries,
            # half-precision frames with non-finite pixels, decoded again in float32 (streaming/decoder.py)
            "decode_fp32_fallback_frames": sum(d.fallback.frames for d in self.decoders.values()),
            "worker_busy_fraction": round(self.worker.busy_fraction(), 3),
            "estimated_load": self.worker.estimated_load([s.config for s in sessions]),
            "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p95_ms": float(np.percentile(lat, 95)),
            "dropped_frames": sum(s.dropped_frames for s in sessions),
            "underruns": sum(s.underruns for s in sessions),
            "ready_frames": sum(s.ready_frames for s in sessions),
            "live_idle_sessions": sum(s.live_idle for s in sessions),  # generating idle frames (motion)
        }

    # -- shared model helpers (used by sessions and the worker) --------------------------------------------
    def denoiser(self, settings: DenoiserSettings) -> StreamDenoiser:
        with self._lock:
            if settings not in self._denoisers:
                if len(self._denoisers) >= MAX_DENOISERS:  # settings are client input: keep those in use only
                    used = {s.denoiser_settings for s in self._sessions.values()}
                    used.add(self.config.default_session.denoiser_settings())
                    for key in [k for k in self._denoisers if k not in used]:
                        del self._denoisers[key]
                self._denoisers[settings] = StreamDenoiser(self.models, settings, self._graphs)
            return self._denoisers[settings]

    def denoiser_for(self, session: StreamSession) -> StreamDenoiser:
        return self.denoiser(session.denoiser_settings)

    def new_stream(self, session: StreamSession) -> StreamState:
        # The seed alone fixes a session's noise: its frames are a function of avatar, audio, settings and seed,
        # the same on any engine and whoever it is batched with or opened after (sessions wanting different
        # noise set different seeds; identical noise in two sessions driven by different audio is invisible).
        seed = session.config.params.seed
        return self.denoiser_for(session).new_state(session.avatar.encoded, seed, self.silence_tokens(session))

    def silence_tokens(self, session: StreamSession) -> torch.Tensor:
        return self.silence_tokens_for(session.config.fps)

    def silence_tokens_for(self, fps: int) -> torch.Tensor:
        """The audio tokens of silence (n, d): what idle frames and padding frames are driven by."""
        if fps not in self._silence:
            features = IncrementalAudioFeatures(self.models, fps)
            frames = features.push(np.zeros(16000 * 2, np.float32)) + features.end()
            self._silence[fps] = frames[len(frames) // 2].tokens
        return self._silence[fps]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder: str | None = None) -> np.ndarray:
        """(F, 4, h, w) latents -> uint8 (F, H, W, 3), in one call of the named decoder (default: the default
        session's)."""
        frame_decoder = self.decoders[decoder or self.config.default_session.decoder]
        with self.stages("decode"):
            images, finite = frame_decoder.checked_images(latents)
        with self.stages("host_copy"):
            if finite is None:
                return to_host(images)
            frames, finite_on_host = to_host_all([images, finite])  # the flags ride with the frames: no extra sync
        # a half-precision frame with NaN/inf pixels (black otherwise): decoded again in float32, counted
        return frame_decoder.repair(latents, frames, finite_on_host)
