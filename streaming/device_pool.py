"""Every device of a machine: one `Engine` per device (its own models, avatars and model worker thread), and the
placement of each new session on the device with the most real-time headroom.

The pool offers what a transport uses of one engine (avatars, sessions, admission, warm-up, stats), so a server
holds a pool in every case: one engine is a pool of one. The workers are threads of one process, not processes: a
thread waiting on its GPU (graph replays, synchronisation) does not hold the GIL, so N device workers overlap their
device time and only their host-side Python (eager launches, bookkeeping) takes turns.

* **Avatars** are pre-encoded on every device when registered (in parallel, one thread per device; with a disk
  cache the first device encodes and the others load its entry): a session can then open on whichever device has
  room at once, with no encode (seconds at 512x512) on the open path, and a device failing later loses nothing.
  The cost is a copy of each avatar's reference features (and idle clip) per device.
* **Placement**: among the healthy devices that admit the session (`Engine.can_admit`: slots and the measured cost
  model), the one whose headroom after adding it (`Engine.headroom`) is largest; ties go to the device with fewer
  sessions. Devices with a recent failure come after those without.
* **Failover**: a worker whose calls keep failing (`FAILED_IN_ROW` sessions in a row failed on it with no
  successful call between: a CUDA error, a lost device) marks its device failed. Its sessions have already ended
  with an `error` event (the worker fails each one); new sessions go to the other devices; the pool stays ready
  while one device is healthy. A failed device is not retried in-process: restart the server to recover it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from vexpress_rt.errors import VExpressError

from .avatar import AvatarInfo
from .decoder import FrameDecoder
from .engine import CapacityError, Engine, EngineConfig
from .session import SessionConfig, StreamSession
from .sim.profile import is_simulated

T = TypeVar("T")

log = logging.getLogger(__name__)

FAILED_IN_ROW = 2  # one failed session is that session's problem; two in a row with no success is the device's
HEADROOM_TIE = 1e-3  # headrooms closer than this are a tie (measured costs are noisy)
# engine.stats() figures that add up over devices; the others (latency, load, cache sizes) take the worst device's
SUMMED_STATS = frozenset(
    (
        "sessions",
        "frames_generated",
        "worker_errors",
        "worker_batch_retries",
        "decode_fp32_fallback_frames",
        "dropped_frames",
        "underruns",
        "ready_frames",
    )
)


def parse_devices(spec: str) -> list[str]:
    """`--devices`: "all", or devices separated by commas ("cuda:0,cuda:1", "cpu,cpu": two CPU workers)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("no device given")
    if items == ["all"]:
        return items
    for item in items:
        if is_simulated(item):  # sim:<profile>: checked when the engine is built (streaming/sim/)
            continue
        try:
            device = torch.device(item)
        except RuntimeError as exc:
            raise ValueError(f"{item!r} is not a device (cuda, cuda:N, cpu or sim:<profile>)") from exc
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"{item!r}: only cuda and cpu devices serve sessions")
    return items


def device_names(devices: Sequence[str]) -> list[str]:
    """Labels for /readyz, /metrics and /v1/info: the device itself, numbered where it repeats ("cpu#0", "cpu#1")."""
    names = [str(d) for d in devices]
    return [f"{n}#{names[:i].count(n)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


@dataclass
class DeviceStatus:
    """One device as /readyz, /metrics and /v1/info report it."""

    name: str
    device: str
    healthy: bool
    warm: bool
    admits: bool  # one more session of the default settings (slots and measured cost)
    sessions: int
    max_sessions: int
    headroom: float | None  # real-time margin left for one more default session; None before any measurement
    estimated_load: float | None  # fraction of the worker's time the running sessions take
    busy_fraction: float
    frames_generated: int
    worker_errors: int
    simulated: bool = False  # sim:<profile>: the model's calls only wait the profile's times (streaming/sim/)

    @property
    def state(self) -> str:
        if not self.healthy:
            return "failed"
        if not self.warm:
            return "warming"
        return "ready" if self.admits else "full"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state}


class DevicePool:
    def __init__(self, engines: Sequence[Engine], names: Sequence[str] | None = None):
        if not engines:
            raise VExpressError("a device pool needs at least one engine")
        self.engines = list(engines)
        self.names = list(names) if names else device_names([e.device_name for e in self.engines])
        if len(self.names) != len(self.engines):
            raise VExpressError("one name per engine")
        self._lock = threading.Lock()  # placement: check and open as one step
        # one thread per device for avatar registration and warm-up, so devices encode at the same time
        self._executor = (
            ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="device") if len(engines) > 1 else None
        )

    # -- what every device shares -------------------------------------------------------------------------------
    @property
    def config(self) -> EngineConfig:
        return self.engines[0].config

    @property
    def decoders(self) -> dict[str, FrameDecoder]:
        return self.engines[0].decoders

    @property
    def device(self) -> torch.device:
        """The first device: what /v1/info's `model.device` has always said."""
        return self.engines[0].models.device

    @property
    def device_name(self) -> str:
        """The first device as /v1/info names it ("sim:h100" when simulated)."""
        return self.engines[0].device_name

    @property
    def simulated(self) -> dict[str, Any] | None:
        """The simulated device's description (profile and its source) when the engines run on one; else None."""
        return self.engines[0].config.simulated

    @property
    def warm(self) -> bool:
        return all(e.warm for e in self.engines)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_every_device(self, call: Callable[[Engine], T], first_alone: bool = False) -> list[T | None]:
        """`call(engine)` for each engine, at the same time (`first_alone`: the first one before the others); the
        first failure of a healthy device is raised (a failed device's own errors are logged: it serves nobody)."""
        if self._executor is None:
            return [call(self.engines[0])]
        futures: list[Future[T]] = []
        if first_alone:
            futures.append(self._executor.submit(call, self.engines[0]))
            self._result(0, futures[0])  # a bad portrait fails here, before the other devices try it
        futures += [self._executor.submit(call, engine) for engine in self.engines[len(futures) :]]
        return [self._result(i, future) for i, future in enumerate(futures)]

    def _result(self, index: int, future: Future[T]) -> T | None:
        try:
            return future.result()
        except Exception:
            if self.healthy(self.engines[index]):
                raise
            log.warning("device %s (failed) could not take part", self.names[index], exc_info=True)
            return None

    def warm_up(self, avatar_id: str | None = None) -> dict[str, Any]:
        """Every device's warm-up (graphs captured, cost model calibrated), at the same time."""
        results = self._on_every_device(lambda engine: engine.warm_up(avatar_id))
        return {"devices": dict(zip(self.names, results))}

    # -- avatars: registered on every device ----------------------------------------------------------------------
    def add_avatar(self, image: Image.Image, kps: np.ndarray | None = None, name: str | None = None) -> AvatarInfo:
        # With a disk cache (--cache_dir, shared by the devices) the first device encodes and writes the entry, the
        # others then load it: one writer per file, and a load is cheaper than an encode.
        def register(engine: Engine) -> AvatarInfo:
            return engine.add_avatar(image, kps, name)

        infos = [
            i for i in self._on_every_device(register, first_alone=self.config.cache_dir is not None) if i is not None
        ]
        if len({info.id for info in infos}) != 1:  # ids hash the portrait and the model: the same everywhere
            raise VExpressError(f"the devices registered the portrait under different ids: {[i.id for i in infos]}")
        return infos[0]

    def get_avatar(self, avatar_id: str) -> AvatarInfo | None:
        return next((info for e in self.engines if (info := e.get_avatar(avatar_id)) is not None), None)

    def avatars(self) -> list[AvatarInfo]:
        seen: dict[str, AvatarInfo] = {}
        for engine in self.engines:
            for info in engine.avatars():
                seen.setdefault(info.id, info)
        return list(seen.values())

    def remove_avatar(self, avatar_id: str) -> bool:
        return any([engine.remove_avatar(avatar_id) for engine in self.engines])  # a list: every device forgets

    def add_motion(self, sequence: np.ndarray) -> str:
        """Every device keeps the motion (a session may be placed on any); the same id on each."""
        return [engine.add_motion(sequence) for engine in self.engines][0]

    def remove_motion(self, motion_id: str) -> bool:
        """Forget the motion on every device (False: unknown)."""
        return any([engine.remove_motion(motion_id) for engine in self.engines])

    def motions(self) -> list[dict[str, Any]]:
        return self.engines[0].motions()

    # -- health and placement ---------------------------------------------------------------------------------------
    @staticmethod
    def healthy(engine: Engine) -> bool:
        return engine.worker.failures_in_row < FAILED_IN_ROW

    def healthy_count(self) -> int:
        return sum(self.healthy(e) for e in self.engines)

    def _rank(self, engine: Engine, config: SessionConfig) -> tuple[bool, float, int]:
        """Sort key, best first: no recent failure, most headroom (unmeasured: none), fewest sessions."""
        headroom = engine.headroom(config)
        rounded = -math.inf if headroom is None else round(headroom / HEADROOM_TIE)
        return (engine.worker.failures_in_row > 0, -rounded, len(engine.sessions()))

    def place(self, config: SessionConfig | None = None) -> Engine | None:
        """The engine a new session of `config` would open on; None when no healthy device admits it."""
        config = config or self.config.default_session
        candidates = [e for e in self.engines if self.healthy(e) and e.can_admit(config)]
        return min(candidates, key=lambda e: self._rank(e, config), default=None)

    def can_admit(self, config: SessionConfig | None = None) -> bool:
        return self.place(config) is not None

    def open_session(
        self, avatar_id: str, config: SessionConfig | None = None, now: Callable[[], float] = time.monotonic
    ) -> StreamSession:
        """A new session on the device with the most headroom. CapacityError when no healthy device admits it,
        KeyError for an unknown avatar."""
        config = config or self.config.default_session
        if self.get_avatar(avatar_id) is None:
            raise KeyError(avatar_id)
        with self._lock:
            if not self.healthy_count():
                raise CapacityError("every device of this server has failed; it needs a restart", retry_after=30)
            engine = self.place(config)
            if engine is None and len(self.engines) == 1:
                engine = self.engines[0]  # it refuses with its own reason
            if engine is None:
                failed = len(self.engines) - self.healthy_count()
                raise CapacityError(
                    f"none of the {len(self.engines)} devices can serve another session in real time"
                    + (f" ({failed} failed)" if failed else "")
                )
            session = engine.open_session(avatar_id, config, now)
        if len(self.engines) > 1:
            log.info("session %s placed on %s", session.id, self.name_of(engine))
        return session

    def name_of(self, engine: Engine) -> str:
        return self.names[self.engines.index(engine)]

    def device_of(self, session_id: str) -> str | None:
        """The name of the device serving the session, if any does."""
        return next((n for n, e in zip(self.names, self.engines) if e.get_session(session_id)), None)

    # -- sessions -------------------------------------------------------------------------------------------------
    def get_session(self, session_id: str) -> StreamSession | None:
        return next((s for e in self.engines if (s := e.get_session(session_id)) is not None), None)

    def sessions(self) -> list[StreamSession]:
        return [s for e in self.engines for s in e.sessions()]

    # -- figures --------------------------------------------------------------------------------------------------
    def status(self) -> list[DeviceStatus]:
        out = []
        for name, engine in zip(self.names, self.engines):
            sessions = engine.sessions()
            worker = engine.worker
            out.append(
                DeviceStatus(
                    name=name,
                    device=engine.device_name,
                    healthy=self.healthy(engine),
                    warm=engine.warm,
                    admits=engine.can_admit(),
                    sessions=len(sessions),
                    max_sessions=engine.config.max_sessions,
                    headroom=engine.headroom(),
                    estimated_load=worker.estimated_load([s.config for s in sessions]),
                    busy_fraction=round(worker.busy_fraction(), 3),
                    frames_generated=worker.frames_generated,
                    worker_errors=worker.errors,
                    simulated=engine.config.simulated is not None,
                )
            )
        return out

    def stats(self) -> dict[str, Any]:
        """One engine's figures as they are; several: summed counts, the worst of the rest (latency, load)."""
        per_device = [engine.stats() for engine in self.engines]
        if len(per_device) == 1:
            return per_device[0]
        merged: dict[str, Any] = {}
        for stats in per_device:
            for key, value in stats.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    merged.setdefault(key, value)
                elif key in SUMMED_STATS:
                    merged[key] = merged.get(key, 0) + value
                else:
                    old = merged.get(key)
                    merged[key] = value if not isinstance(old, (int, float)) else max(old, value)
        return {**merged, "devices": len(self.engines), "healthy_devices": self.healthy_count()}

    def turn_spans(self) -> list[tuple[float, float]]:
        """Every worker's turns (start, end), in order of their end."""
        return sorted((span for e in self.engines for span in list(e.worker.turn_log)), key=lambda s: s[1])

    def compute_spans(self) -> list[tuple[float, float]]:
        """Every worker's spans of model compute (start, end), in order of their end."""
        if len(self.engines) == 1:
            return list(self.engines[0].worker.compute_log)
        return sorted((span for e in self.engines for span in list(e.worker.compute_log)), key=lambda s: s[1])
