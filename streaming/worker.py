"""The model worker: one thread per device that owns all model compute for every session.

Each turn it asks every session for its next chunk (the session runs its audio features on the new audio), groups
the chunks by denoiser settings, runs each group as one batched UNet call per step and one decode per decoder in
use, and hands the frames back. It measures what that costs, which is what admission control uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import torch

from .cost_model import CostModel, Demand
from .denoiser import ChunkJob, DenoiserSettings

log = logging.getLogger(__name__)

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _release_memory(exc: BaseException) -> None:
    """After the device ran out of memory, give the cached blocks back before the next try."""
    if isinstance(exc, OUT_OF_MEMORY) and torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        self.costs = CostModel()  # seconds per call by settings and batch size: what admission control reads
        self.chunk_log: deque[dict] = deque(maxlen=10000)  # per chunk: trigger, ready, compute (for the bench)
        self.compute_log: deque[tuple[float, float]] = deque(maxlen=20000)  # (start, end) of model compute
        self.errors = 0
        self.batch_retries = 0  # batches that failed and were run again one session at a time
        self.failures_in_row = 0  # failed sessions/turns since the last successful call: the device's health

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
                self.failures_in_row += 1
                log.exception("model worker turn failed")

    # -- one turn --------------------------------------------------------------------------------------------
    def turn(self) -> bool:
        """Collect one chunk per session and run them. Returns whether any work was done."""
        work = []
        for session in self.engine.sessions():
            t0 = time.monotonic()
            try:
                with self.engine.stages("audio_features"):
                    job = session.next_job()  # runs the audio features on new audio: model compute
            except Exception as exc:
                _release_memory(exc)
                self._fail(session, exc)
                continue
            self.compute_log.append((t0, time.monotonic()))
            if job is not None:
                job.meta["features_s"] = time.monotonic() - t0
                self.costs.record_features(job.meta["features_s"])
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
        noise = [job.state.generator.get_state() for job in jobs]  # to replay a failed batch's noise
        t0 = time.perf_counter()
        try:
            with self.engine.model_lock, self.engine.stages("unet"):
                outputs = self.engine.denoiser(settings).run(jobs)
        except Exception as exc:
            _release_memory(exc)
            if len(items) == 1:
                self._fail(items[0][0], exc)
                return
            # One bad session (or a batch too big for the device) must not take its batch mates down: run each
            # window alone, with the noise it would have drawn (a denoiser call changes a stream only on success).
            self.batch_retries += 1
            log.warning(
                "a batch of %d windows failed (%s: %s); running them one by one", len(items), type(exc).__name__, exc
            )
            for item, state in zip(items, noise):
                item[1].state.generator.set_state(state)
                self._run(settings, [item])
            return
        images = self._decode(items, outputs)
        if any(image is not None for image in images):
            self.failures_in_row = 0  # the device computes: failures so far were the sessions' own
        seconds = time.perf_counter() - t0
        self.record_chunk(settings, len(jobs), seconds)
        ready = time.monotonic()
        self.compute_log.append((ready - seconds, ready))
        for (session, job), out, decoded in zip(items, outputs, images):
            if decoded is None:
                continue  # its decode failed: the session has ended
            frames = [(payload, image, latent) for (payload, latent), image in zip(out, decoded)]
            session.deliver(frames)
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

    def _decode(self, items: list, outputs: list) -> list:
        """Each session's frames as images: one call per decoder in use (sessions that shared a UNet call may
        have chosen different decoders). When a call fails, one call per session, so that only the session(s)
        whose decode fails end. None for those."""
        latents = [[latent for _, latent in out] for out in outputs]
        by_decoder: dict[str, list[int]] = {}
        for i, (session, _) in enumerate(items):
            by_decoder.setdefault(session.config.decoder, []).append(i)
        images: list = [None] * len(items)
        for decoder, indices in by_decoder.items():
            flat = [x for i in indices for x in latents[i]]
            try:
                with self.engine.model_lock:
                    decoded = self.engine.decode(torch.stack(flat), decoder) if flat else []
            except Exception as exc:
                _release_memory(exc)
                if len(indices) == 1:
                    self._fail(items[indices[0]][0], exc)
                    continue
                for i in indices:
                    images[i] = self._decode_alone(items[i][0], latents[i], decoder)
                continue
            k = 0
            for i in indices:
                images[i] = decoded[k : k + len(latents[i])]
                k += len(latents[i])
        return images

    def _decode_alone(self, session, latents: list, decoder: str):
        try:
            with self.engine.model_lock:
                return self.engine.decode(torch.stack(latents), decoder) if latents else []
        except Exception as exc:
            _release_memory(exc)
            self._fail(session, exc)
            return None

    def _fail(self, session, exc: Exception) -> None:
        """A failure confined to one session (bad state, out of memory alone): it ends with an `error` event,
        the others go on."""
        self.errors += 1
        self.failures_in_row += 1
        oom = isinstance(exc, OUT_OF_MEMORY)
        log.error("session %s: model worker failed", session.id, exc_info=exc)
        code, what = ("out_of_memory", "the device ran out of memory") if oom else ("model_error", "generation failed")
        session.fail(code, f"{what}: {type(exc).__name__}: {exc}")

    # -- cost model for admission control ----------------------------------------------------------------
    def record_chunk(self, settings: DenoiserSettings, batch: int, seconds: float) -> None:
        """One call over `batch` sessions' windows took `seconds` (UNet and decode)."""
        self.chunks += 1
        self._busy.append((time.monotonic(), seconds))
        self.costs.record_call(settings, batch, seconds)

    def estimated_load(self, configs: list) -> float | None:
        """Fraction of the worker's time the given sessions need, batched as the worker batches them; None
        before any measurement."""
        demands = [Demand(c.denoiser_settings(), c.fps) for c in configs]
        return self.costs.load(demands, self.max_batch)

    def compute_between(self, start: float, end: float) -> float:
        """Seconds of model compute (any session's) inside [start, end]: what a chunk waited on that was not
        engine overhead."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self.compute_log if e > start and s < end)

    def busy_fraction(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        busy = sum(sec for end, sec in self._busy if now - end <= window_s)
        return min(1.0, busy / window_s)
