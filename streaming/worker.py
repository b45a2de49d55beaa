"""The model worker: one thread per device that owns all model compute for every session.

Each turn it asks every session for its next chunk (the session runs its audio features on the new audio), groups
the chunks by denoiser settings, runs each group as one batched UNet call per step and one VAE decode, and hands
the frames back. It measures what that costs, which is what admission control uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from .denoiser import ChunkJob, DenoiserSettings

log = logging.getLogger(__name__)


class ModelWorker:
    def __init__(self, engine, max_batch: int = 4):
        self.engine = engine
        self.max_batch = max_batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_generated = 0
        self.chunks = 0
        self._busy: deque[tuple[float, float]] = deque(maxlen=512)  # (end time, seconds busy)
        self._pass_cost: float | None = None  # seconds per UNet frame-pass (EMA)
        self.chunk_log: deque[dict] = deque(maxlen=10000)  # per chunk: trigger, ready, compute (for the bench)
        self.compute_log: deque[tuple[float, float]] = deque(maxlen=20000)  # (start, end) of model compute
        self.errors = 0

    # -- thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="vexpress-model-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.02)
            self._wake.clear()
            try:
                if self.turn():
                    self._wake.set()  # there may be more ready right away
            except Exception:  # never let one bad turn kill the worker for everybody
                self.errors += 1
                log.exception("model worker turn failed")

    # -- one turn --------------------------------------------------------------------------------------------
    def turn(self) -> bool:
        """Collect one chunk per session and run them. Returns whether any work was done."""
        work = []
        for session in self.engine.sessions():
            t0 = time.monotonic()
            try:
                job = session._next_job()  # runs the audio features on new audio: model compute
            except Exception as exc:
                self._fail(session, exc)
                continue
            self.compute_log.append((t0, time.monotonic()))
            if job is not None:
                job.meta["features_s"] = time.monotonic() - t0
                work.append((session, job))
        if not work:
            return False
        groups: dict[DenoiserSettings, list] = {}
        for session, job in work:
            groups.setdefault(session.denoiser_settings, []).append((session, job))
        for settings, items in groups.items():
            for i in range(0, len(items), self.max_batch):
                self._run(settings, items[i : i + self.max_batch])
        return True

    def _run(self, settings: DenoiserSettings, items: list) -> None:
        jobs: list[ChunkJob] = [job for _, job in items]
        t0 = time.perf_counter()
        try:
            with self.engine.model_lock:
                outputs = self.engine.denoiser(settings).run(jobs)
                latents = [latent for out in outputs for _, latent in out]
                images = self.engine.decode(torch.stack(latents)) if latents else []
        except Exception as exc:
            for session, _ in items:
                self._fail(session, exc)
            return
        seconds = time.perf_counter() - t0
        self.record_chunk(settings, len(jobs), seconds)
        ready = time.monotonic()
        self.compute_log.append((ready - seconds, ready))
        k = 0
        for (session, job), out in zip(items, outputs):
            frames = []
            for payload, latent in out:
                frames.append((payload, images[k], latent))
                k += 1
            session._deliver(frames, ready)
            self.frames_generated += len(frames)
            trigger = job.meta.get("trigger")
            self.chunk_log.append(
                {
                    "session": session.id,
                    "frames": len(frames),
                    "trigger": trigger,
                    "ready": ready,
                    "compute_s": seconds + job.meta.get("features_s", 0.0),
                    "audio_times": [p.audio_time for p, _, _ in frames],
                }
            )

    def _fail(self, session, exc: Exception) -> None:
        """A failure confined to one session (bad state, out of memory in its batch): it ends, others go on."""
        self.errors += 1
        log.exception("session %s: model worker failed", session.id, exc_info=exc)
        session._fail("model_error", f"generation failed: {type(exc).__name__}: {exc}")

    # -- cost model for admission control ----------------------------------------------------------------
    def record_chunk(self, settings: DenoiserSettings, batch: int, seconds: float) -> None:
        self.chunks += 1
        self._busy.append((time.monotonic(), seconds))
        passes = settings.steps * settings.window_frames * (2 if settings.cfg else 1) * batch
        cost = seconds / passes
        self._pass_cost = cost if self._pass_cost is None else 0.8 * self._pass_cost + 0.2 * cost

    def estimated_load(self, configs: list) -> float | None:
        """Fraction of the worker's time the given sessions need at batch 1 (conservative); None before any
        measurement."""
        if self._pass_cost is None:
            return None
        total = 0.0
        for config in configs:
            s = config.denoiser_settings()
            total += self._pass_cost * s.passes_per_frame * config.fps
        return total

    def compute_between(self, start: float, end: float) -> float:
        """Seconds of model compute (any session's) inside [start, end]: what a chunk waited on that was not
        engine overhead."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.compute_log if e > start and s < end)

    def busy_fraction(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        busy = sum(sec for end, sec in self._busy if now - end <= window_s)
        return min(1.0, busy / window_s)
