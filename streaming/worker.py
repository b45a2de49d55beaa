"""The model worker: one thread per device that owns all model compute for every session.

Each turn it asks every session for its next chunk: what audio each needs features for, then one wav2vec2 call
over every session's new audio, then each session's chunk from its features. It groups the chunks by denoiser
settings, runs each group as one batched UNet call per step and one decode per decoder in use, and hands the
frames back. It measures what that costs, which is what admission control uses.

Pipelined (`EngineConfig.pipelined`, on CUDA by default): the decode, host copy and delivery of a call run on the
finisher's thread (streaming/finisher.py) while this thread goes on with the next turn; at most one call is handed
over and not delivered, so latency and memory stay bounded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from vexpress_rt.loader import VExpressModels

from .cost_model import CostModel, Demand, PipelinedCost
from .denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
from .device import bind_thread, release_cached_memory
from .finisher import DeviceClock, Finisher, Mark
from .session import PendingChunk, SessionConfig, StreamSession
from .stage_timer import NoStageTimer, StageTimer
from .wav2vec2_batch import encode_spans

WorkItem = tuple[StreamSession, ChunkJob]  # a session and the chunk it asked for this turn
ChunkOutput = list[tuple[Any, torch.Tensor]]  # a chunk's finished frames: (payload, latent) each

log = logging.getLogger(__name__)

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _release_memory(exc: BaseException) -> None:
    """After the device ran out of memory, give the cached blocks back before the next try (never during another
    engine's graph capture: `release_cached_memory` waits for it)."""
    if isinstance(exc, OUT_OF_MEMORY):
        release_cached_memory()


class WorkerEngine(Protocol):
    """What the worker asks of its engine (streaming.engine.Engine), named here so the worker is typed without
    importing the engine (which imports the worker)."""

    models: VExpressModels
    model_lock: threading.Lock
    stages: NoStageTimer | StageTimer

    def sessions(self) -> list[StreamSession]: ...
    def denoiser(self, settings: DenoiserSettings) -> StreamDenoiser: ...
    def decode(self, latents: torch.Tensor, decoder: str | None = None) -> np.ndarray: ...


class ModelWorker:
    def __init__(self, engine: WorkerEngine, max_batch: int = 4, pipelined: bool = False):
        self.engine = engine
        self.max_batch = max_batch
        self.pipelined = pipelined
        self._finisher = Finisher(engine.models.device) if pipelined else None
        self._clock = DeviceClock(engine.models.device)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames_generated = 0
        self.chunks = 0
        self._busy: deque[tuple[float, float]] = deque(maxlen=512)  # (end time, seconds busy)
        self.costs = CostModel()  # seconds per call by settings and batch size: what admission control reads
        self._pipeline_cost = PipelinedCost()  # pipelined calls' cost from their spans (the finisher's thread)
        # per chunk: trigger, ready, compute (for the bench)
        self.chunk_log: deque[dict[str, Any]] = deque(maxlen=10000)
        self.compute_log: deque[tuple[float, float]] = deque(maxlen=20000)  # (start, end) of model compute
        # (start, end) of each turn that had work: every session's features, its UNet calls (and, serial, decodes)
        self.turn_log: deque[tuple[float, float]] = deque(maxlen=20000)
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
        if self._finisher is not None:
            self._finisher.stop()  # delivers what was handed over (closed sessions drop it), ends its thread

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait (bounded) until every call handed to the finisher has been delivered; at once when not pipelined.
        Whether everything was delivered."""
        return self._finisher is None or self._finisher.drain(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        bind_thread(self.engine.models.device)  # a new thread starts on cuda:0, whatever the engine's device
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
        turn_start = time.monotonic()
        jobs = self._collect(self.engine.sessions())
        if not jobs:
            return False
        groups: dict[DenoiserSettings, list[WorkItem]] = {}
        for session, job in jobs:
            groups.setdefault(session.denoiser_settings, []).append((session, job))
        for settings, items in groups.items():
            for i in range(0, len(items), self.max_batch):
                self._run(settings, items[i : i + self.max_batch])
        self.turn_log.append((turn_start, time.monotonic()))
        return True

    def _collect(self, sessions: list[StreamSession]) -> list[WorkItem]:
        """Every session's next chunk, in session order: first what each needs (host work), then one wav2vec2
        call over all the new audio (`encode_spans`: each span's hidden states equal to its own run), then each
        session makes its chunk from its hidden states. A failure ends only the session(s) it belongs to."""
        start = time.monotonic()
        prepared: list[tuple[StreamSession, ChunkJob | PendingChunk]] = []
        for session in sessions:
            try:
                with self.engine.stages("audio_features"):
                    job = session.prepare_job()
            except Exception as exc:
                _release_memory(exc)
                self._fail(session, exc)
                continue
            if job is not None:
                prepared.append((session, job))
        pending = [(session, job) for session, job in prepared if isinstance(job, PendingChunk)]
        hidden = self._features(pending)
        work: list[WorkItem] = []
        for session, job in prepared:
            if isinstance(job, PendingChunk):
                if session not in hidden:
                    continue  # its features failed: it has ended
                try:
                    with self.engine.stages("audio_features"):
                        chunk = session.complete_job(job, hidden[session])
                except Exception as exc:
                    _release_memory(exc)
                    self._fail(session, exc)
                    continue
                if chunk is None:
                    continue
                job = chunk
            work.append((session, job))
        end = time.monotonic()
        self.compute_log.append((start, end))
        for _, job in work:  # the features' cost per session and chunk, the batched call shared
            job.meta["features_s"] = (end - start) / len(prepared)
            self.costs.record_features(job.meta["features_s"])
        return work

    def _features(self, pending: list[tuple[StreamSession, PendingChunk]]) -> dict[StreamSession, list[torch.Tensor]]:
        """wav2vec2's hidden states of every pending session's spans, by session: one call for all; when it
        fails, one call per session, so that only the session(s) whose audio fails end."""
        spans = [span.audio for _, job in pending for span in job.spans]
        if not spans:
            return {session: [] for session, _ in pending}
        try:
            with self.engine.stages("audio_features"):
                hidden = encode_spans(self.engine.models, spans)
        except Exception as exc:
            _release_memory(exc)
            if len(pending) == 1:
                self._fail(pending[0][0], exc)
                return {}
            by_session: dict[StreamSession, list[torch.Tensor]] = {}
            for session, job in pending:
                try:
                    with self.engine.stages("audio_features"):
                        by_session[session] = encode_spans(self.engine.models, [s.audio for s in job.spans])
                except Exception as alone:
                    _release_memory(alone)
                    self._fail(session, alone)
            return by_session
        by_session = {}
        k = 0
        for session, job in pending:
            by_session[session] = hidden[k : k + len(job.spans)]
            k += len(job.spans)
        return by_session

    def _run(self, settings: DenoiserSettings, items: list[WorkItem]) -> None:
        jobs: list[ChunkJob] = [job for _, job in items]
        noise = [job.state.generator.get_state() for job in jobs]  # to replay a failed batch's noise
        t0 = time.perf_counter()
        start = self._clock.mark()
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
        if self._finisher is None:
            images = self._decode(items, outputs, self.engine.model_lock)
            self._deliver(settings, items, outputs, images, time.perf_counter() - t0)
            return
        unet_done = self._clock.mark()
        if not self._finisher.submit(partial(self._finish, settings, items, outputs, start, unet_done), unet_done):
            for session, _ in items:  # stopping, or a finisher stuck for a minute: these frames will not come
                self._fail(session, RuntimeError("the frames of this call could not be finished"))

    def _finish(
        self,
        settings: DenoiserSettings,
        items: list[WorkItem],
        outputs: list[ChunkOutput],
        start: Mark,
        unet_done: Mark,
    ) -> None:
        """On the finisher's thread (its CUDA stream queued behind the UNet call): decode, copy, deliver. The
        cost recorded is device time on CUDA, the overlap of this decode with the next UNet call counted once
        (`PipelinedCost`)."""
        try:
            for out in outputs:  # read on this thread's stream: the allocator must not reuse them before it is done
                for _, latent in out:
                    if latent.is_cuda:
                        latent.record_stream(torch.cuda.current_stream(latent.device))
            begin = self._clock.mark()
            # Without the model lock: the decoders are only read (it serialises the UNet runners' buffers), and
            # holding it would wait for the next call the worker is launching.
            images = self._decode(items, outputs, nullcontext())
            decoded = self._clock.span(begin, self._clock.mark())
            seconds = self._pipeline_cost.call(self._clock.span(start, unet_done), decoded)
            self._deliver(settings, items, outputs, images, seconds)
        except Exception:  # as a failed serial turn: counted and logged, the worker goes on
            self.errors += 1
            log.exception("model worker: finishing a call failed")

    def _deliver(
        self,
        settings: DenoiserSettings,
        items: list[WorkItem],
        outputs: list[ChunkOutput],
        images: list[np.ndarray | None],
        seconds: float,
    ) -> None:
        if any(image is not None for image in images):
            self.failures_in_row = 0  # the device computes: failures so far were the sessions' own
        self.record_chunk(settings, len(items), seconds)
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

    def _decode(
        self, items: list[WorkItem], outputs: list[ChunkOutput], lock: AbstractContextManager[Any]
    ) -> list[np.ndarray | None]:
        """Each session's frames as images: one call per decoder in use (sessions that shared a UNet call may
        have chosen different decoders). When a call fails, one call per session, so that only the session(s)
        whose decode fails end. None for those, and for sessions closed meanwhile."""
        latents = [[latent for _, latent in out] for out in outputs]
        by_decoder: dict[str, list[int]] = {}
        for i, (session, _) in enumerate(items):
            if not session.closed:  # closed (or failed) since its UNet call, pipelined: nothing to deliver
                by_decoder.setdefault(session.config.decoder, []).append(i)
        images: list[np.ndarray | None] = [None] * len(items)
        for decoder, indices in by_decoder.items():
            flat = [x for i in indices for x in latents[i]]
            try:
                with lock:
                    decoded = self.engine.decode(torch.stack(flat), decoder) if flat else np.zeros((0,), np.uint8)
            except Exception as exc:
                _release_memory(exc)
                if len(indices) == 1:
                    self._fail(items[indices[0]][0], exc)
                    continue
                for i in indices:
                    images[i] = self._decode_alone(items[i][0], latents[i], decoder, lock)
                continue
            k = 0
            for i in indices:
                images[i] = decoded[k : k + len(latents[i])]
                k += len(latents[i])
        return images

    def _decode_alone(
        self, session: StreamSession, latents: list[torch.Tensor], decoder: str, lock: AbstractContextManager[Any]
    ) -> np.ndarray | None:
        try:
            with lock:
                return self.engine.decode(torch.stack(latents), decoder) if latents else np.zeros((0,), np.uint8)
        except Exception as exc:
            _release_memory(exc)
            self._fail(session, exc)
            return None

    def _fail(self, session: StreamSession, exc: BaseException) -> None:
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

    def estimated_load(self, configs: list[SessionConfig]) -> float | None:
        """Fraction of the worker's time the given sessions need, batched as the worker batches them; None
        before any measurement."""
        demands = [Demand(c.denoiser_settings(), c.fps) for c in configs]
        return self.costs.load(demands, self.max_batch)

    def compute_between(self, start: float, end: float) -> float:
        """Seconds of model compute (any session's) inside [start, end]: what a chunk waited on that was not
        engine overhead. The union of the intervals: pipelined, the finisher's decode overlaps the next UNet call."""
        total, reach = 0.0, start
        for s, e in sorted((s, min(e, end)) for s, e in list(self.compute_log) if e > start and s < end):
            if e > reach:
                total += e - max(s, reach)
                reach = e
        return total

    def busy_fraction(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        busy = sum(sec for end, sec in self._busy if now - end <= window_s)
        return min(1.0, busy / window_s)
