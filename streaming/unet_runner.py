"""How the denoiser's UNet windows run: eagerly (the CPU path, CI) or replayed from CUDA graphs (the GPU path).

Why CUDA graphs and not `torch.compile(mode="reduce-overhead")`: on the H100 the eager UNet is launch-bound (98 ms
for a 2-frame window, 102 ms for 8); replayed from a graph the same windows take 28 / 58 ms, while a compiled
8-frame window took 57.5 ms after 137 s of compiling (one shape; the engine needs several shapes and batch buckets,
and the warm-up must stay under 60 s). A graph capture costs a few warm-up calls per shape, the replay removes the
launch cost entirely, and the math is the eager module's, unchanged (`../shared/docs/GPU.md`).

Both runners take named per-row inputs (the attention weights, one per row or per frame, and the pose features of
each frame: tensors with the batch first, passed by keyword to the UNet and never named here), so sessions with
different controls share one call and one graph; and they take the batch's per-row references (a pre-encoded
avatar, or None for a row of zeros: the unconditional branch under guidance) instead of ready-made K/V, so that
the batched K/V are built once per batch composition, not once per call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from vexpress_rt.models.attention import KeyValue

from .device import CAPTURE_LOCK

BUCKETS = (1, 2, 4, 8)  # batch sizes a graph is captured for; a batch is padded up to the next one
# bucket x window frames of the largest graph on CUDA (the default settings with guidance at bucket 8: 8 x 8)
MAX_GRAPH_FRAMES = 64
COMPOSITIONS_KEPT = 2  # batched K/V kept by the eager runner (a composition changes when a session comes or goes)


class Reference(Protocol):
    """What a row reads from its avatar (`streaming.avatar.PreEncodedAvatar`)."""

    reference_kv: dict[str, KeyValue]  # per block: (1, heads, N, d) keys and values


Refs = Sequence[Reference | None]
RowInputs = dict[str, torch.Tensor | float]  # named per-row (B, ...) inputs, passed to the UNet by keyword


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket that holds n rows; None when n is larger than every bucket."""
    return next((b for b in sorted(buckets) if b >= n), None)


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """The buckets an engine of `max_batch` windows per call needs: powers of two up to twice it (guidance
    doubles the batch), at least BUCKETS."""
    buckets, b = set(BUCKETS), 1
    while b < 2 * max_batch:
        b *= 2
        buckets.add(b)
    return tuple(sorted(buckets))


def _groups(refs: Refs) -> list[Reference | None]:
    """The fewest equal runs of identical consecutive refs that make up `refs` ([A, A, B, B] -> [A, B]): the
    attention lets one K/V entry serve a run of consecutive rows without copies."""
    n = len(refs)
    for g in range(1, n + 1):
        if n % g:
            continue
        run = n // g
        if all(refs[i] is refs[i - i % run] for i in range(n)):
            return [refs[i * run] for i in range(g)]
    return list(refs)


class EagerUNet:
    """The UNet called as it is. Batched reference K/V are built once per batch composition and kept (a few
    compositions): no concatenation or zero-filling per call."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        # (ids of the groups, rows) -> (the groups, their K/V)
        self._kept: OrderedDict[tuple[tuple[int, ...], int], tuple[list[Reference | None], dict[str, KeyValue]]]
        self._kept = OrderedDict()
        self.compositions_built = 0  # how often the K/V were (re)assembled (a test and the bench read it)

    def reference(self, refs: Refs) -> dict[str, KeyValue]:
        """K/V with one entry per run of identical rows."""
        groups = _groups(refs)
        key = (tuple(id(r) for r in groups), len(refs))
        kept = self._kept.get(key)
        if kept is not None and all(a is b for a, b in zip(kept[0], groups)):  # ids are only unique while alive
            self._kept.move_to_end(key)
            return kept[1]
        like = next(r for r in groups if r is not None)
        if len(groups) == 1:
            kv = like.reference_kv
        else:

            def cat(name: str, i: int) -> torch.Tensor:
                t = like.reference_kv[name][i]
                return torch.cat([r.reference_kv[name][i] if r is not None else torch.zeros_like(t) for r in groups])

            kv = {name: (cat(name, 0), cat(name, 1)) for name in like.reference_kv}
        self._kept[key] = (groups, kv)
        self.compositions_built += 1
        while len(self._kept) > COMPOSITIONS_KEPT:
            self._kept.popitem(last=False)
        return kv

    def forget(self, ref: Reference) -> None:
        """Drop every kept composition that holds `ref` (a deleted avatar): the cache must not keep its memory."""
        for key in [k for k, (groups, _) in self._kept.items() if any(g is ref for g in groups)]:
            del self._kept[key]

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, refs: Refs, **rows: torch.Tensor | float
    ) -> torch.Tensor:
        v: torch.Tensor = self.unet(x, t, tokens, self.reference(refs), **rows)
        return v


class CaptureBackend(Protocol):
    captures: int  # graphs captured so far (tests and the warm-up report read it)

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `fn` (which reads and writes only static tensors) and return a replay that redoes it and
        returns the same output tensor."""


class RerunBackend:
    """The CPU stand-in for graphs: a 'replay' runs the function again on the static buffers, so the bucketing,
    padding and slot bookkeeping around it is exercised exactly as with a real graph."""

    def __init__(self) -> None:
        self.captures = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        self.captures += 1
        fn()  # a capture runs the function once, as a graph capture does
        return fn


class CudaCalls:
    """The torch.cuda calls a capture makes, in one place: a CPU test passes its own to watch on which device
    and stream each one happens (tests/streaming/test_unet_runner.py); the GPU tests run these."""

    def resolve(self, device: torch.device) -> torch.device:
        """`cuda` -> `cuda:<current>`: a backend always names its device's index."""
        device = torch.device(device)
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def on_device(self, device: torch.device) -> AbstractContextManager[Any]:
        return torch.cuda.device(device)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def on_stream(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def record(self, fn: Callable[[], torch.Tensor], pool: Any, stream: Any) -> Callable[[], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA (e.g. the finisher's copies) meanwhile
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture on the backend's own device: warm-up calls on its own capture stream (lazy
    initialisation, kernel choices), then one capture into a memory pool shared by all graphs of the device
    (they never run concurrently: one worker). Everything happens inside `torch.cuda.device(device)` and under
    the process-wide CAPTURE_LOCK: PyTorch's shared default capture stream lives on device 0, so an engine on
    cuda:1 capturing there records nothing and replays a stale output forever; two devices warming up at once
    would share it too."""

    def __init__(self, device: torch.device, warmup_calls: int = 2, cuda: CudaCalls | None = None):
        self.cuda = cuda or CudaCalls()
        self.device = self.cuda.resolve(device)
        self.warmup_calls = warmup_calls
        with self.cuda.on_device(self.device):
            self.stream = self.cuda.new_stream(self.device)  # the capture stream, on this backend's device
            self.pool = self.cuda.new_pool()
        self.captures = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        with CAPTURE_LOCK, self.cuda.on_device(self.device):
            current = self.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with self.cuda.on_stream(self.stream):
                for _ in range(self.warmup_calls):
                    fn()
            current.wait_stream(self.stream)
            replay = self.cuda.record(fn, self.pool, self.stream)
            current.wait_stream(self.stream)
            self.captures += 1
        return replay


class GraphBank:
    """What the graph runners of one engine share (one runner per denoiser settings): the capture backend, one
    bank of per-row reference K/V slots (~370 MB at 512x512 for 8 rows: once per engine, not once per settings
    combination), and the capture policy. Graphs are captured while the bank is open (start-up: the engine's
    warm-up captures every bucket of its allow-listed settings); once `seal`ed, a call with no graph runs
    eagerly: a capture (a device sync, two eager warm-up calls, the capture) never happens on the serving path,
    where it would stall every session. `max_frames` caps bucket x window frames of a graph (the graph pool keeps
    its largest capture's memory: a 32-frame window at bucket 8 would reserve 15-20 GB); larger calls run eagerly."""

    def __init__(self, backend: CaptureBackend, buckets: Sequence[int] = BUCKETS, max_frames: int | None = None):
        self.backend = backend
        self.buckets = tuple(sorted(buckets))
        self.max_frames = max_frames
        self.sealed = False
        self.eager_calls = 0  # calls that ran eagerly for want of a graph (sealed, too large, too many rows)
        size = self.buckets[-1]
        self._slot_refs: list[Reference | None] = [None] * size
        self._slot_filled = [False] * size
        self._kv: dict[str, KeyValue] | None = None
        self.slot_copies = 0  # rows whose reference was copied into a slot (a test and the bench read it)

    def seal(self) -> None:
        self.sealed = True

    def fill_slots(self, refs: Refs) -> dict[str, KeyValue]:
        """Row i's reference in slot i (rewritten only when the row's reference changed); all slots."""
        if self._kv is None:
            like = next(r for r in refs if r is not None)
            size = self.buckets[-1]
            self._kv = {
                name: (k.new_zeros((size, *k.shape[1:])), v.new_zeros((size, *v.shape[1:])))
                for name, (k, v) in like.reference_kv.items()
            }
        for i, ref in enumerate(refs):
            if self._slot_filled[i] and self._slot_refs[i] is ref:
                continue
            for name, (k, v) in self._kv.items():
                if ref is None:
                    k[i].zero_()
                    v[i].zero_()
                else:
                    k[i].copy_(ref.reference_kv[name][0][0])
                    v[i].copy_(ref.reference_kv[name][1][0])
            self._slot_refs[i], self._slot_filled[i] = ref, True
            self.slot_copies += 1
        return self._kv

    def forget(self, ref: Reference) -> None:
        for i, slot_ref in enumerate(self._slot_refs):
            if slot_ref is ref:
                self._slot_refs[i], self._slot_filled[i] = None, False  # rewritten by the next row that uses slot i


def static_like(value: torch.Tensor, bucket: int) -> torch.Tensor:
    """Zeros of `value`'s shape with `bucket` rows, laid out in memory as `value` is. The pose features arrive as
    a frame-major view (B, C0, T, h, w) of a (B, T, C0, h, w) stack: a contiguous static buffer made every replay
    copy them strided into it, and the graph copy them back to frame-major inside the UNet; in value's own layout
    the first is a plain copy and the UNet's frame-major view is free."""
    strides = value.stride()
    order = sorted(range(value.ndim), key=lambda d: (-strides[d], d))  # dims from outermost in memory
    shape = (bucket, *value.shape[1:])
    stored = value.new_zeros([shape[d] for d in order])
    return stored.permute([order.index(d) for d in range(value.ndim)])


class _Graph:
    """One captured window shape at one bucket: its static inputs and its replay."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, rows: dict[str, torch.Tensor]):
        self.x, self.t, self.tokens = x, t, tokens
        self.rows = rows  # the named per-row inputs, (bucket, ...) each
        self.replay: Callable[[], torch.Tensor] | None = None


class GraphedUNet:
    """UNet windows replayed from captured graphs: one per (window shape, timestep layout, batch bucket, per-row
    input shapes), captured on first use while its `GraphBank` is open (the engine's warm-up) and reused. A batch
    is padded up to its bucket; the padding rows compute on whatever their buffers hold and are dropped (rows of
    a UNet batch never mix).

    The inputs of a call are copied into the graph's static buffers, the named per-row ones (attention weights,
    pose features: whatever the denoiser hands over) without the runner knowing what they mean. The per-row
    reference K/V live in the bank's slots, shared by every graph of every runner of the engine (graph b reads
    slots [:b]; callers take turns under the engine's model lock); row i reads slot i, which is rewritten only
    when the reference in row i changes, so a replay always computes with the references of the rows it serves.
    Calls with no graph and a sealed bank, batches larger than the largest bucket and graphs over the bank's
    frame cap run eagerly."""

    def __init__(self, unet: torch.nn.Module, graphs: CaptureBackend | GraphBank, buckets: Sequence[int] = BUCKETS):
        """`graphs`: the engine's shared bank, or a capture backend (a bank of its own with `buckets`)."""
        self.unet = unet
        self.bank = graphs if isinstance(graphs, GraphBank) else GraphBank(graphs, buckets)
        self.buckets = self.bank.buckets
        self.eager = EagerUNet(unet)
        self._graphs: dict[tuple[object, ...], _Graph] = {}

    @property
    def backend(self) -> CaptureBackend:
        return self.bank.backend

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    @property
    def slot_copies(self) -> int:
        return self.bank.slot_copies

    def forget(self, ref: Reference) -> None:
        """Release `ref` (a deleted avatar): slots keep copies of its K/V, never the avatar itself, once it is gone."""
        self.bank.forget(ref)
        self.eager.forget(ref)

    @staticmethod
    def _key(
        bucket: int, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, rows: dict[str, torch.Tensor]
    ) -> tuple[object, ...]:
        row_shapes = tuple((name, tuple(v.shape[1:]), v.dtype) for name, v in sorted(rows.items()))
        return (bucket, tuple(x.shape[1:]), t.ndim > 0, tuple(tokens.shape[1:]), x.dtype, row_shapes)

    def _capture(
        self,
        bucket: int,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        rows: dict[str, torch.Tensor],
        slots: dict[str, KeyValue],
    ) -> _Graph:
        frames = x.shape[2]
        graph = _Graph(
            x.new_zeros((bucket, *x.shape[1:])),
            t.new_zeros((bucket * frames,)) if t.ndim > 0 else t.new_zeros(()),
            tokens.new_zeros((bucket * frames, *tokens.shape[1:])),
            {name: static_like(v, bucket) for name, v in rows.items()},
        )
        kv = {name: (k[:bucket], v[:bucket]) for name, (k, v) in slots.items()}

        def forward() -> torch.Tensor:
            v: torch.Tensor = self.unet(graph.x, graph.t, graph.tokens, kv, **graph.rows)
            return v

        graph.x.copy_(x[:1].expand_as(graph.x))  # capture on sane values (the padding rows keep them)
        for name, value in rows.items():
            graph.rows[name].copy_(value[:1].expand_as(graph.rows[name]))
        graph.replay = self.bank.backend.capture(forward)
        return graph

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, refs: Refs, **rows: torch.Tensor
    ) -> torch.Tensor:
        """v for the n windows x (n, 4, T, h, w); t a scalar or per frame (n*T,); tokens (n*T, q, d); `rows`
        the named per-row tensors (n, ...) the UNet takes by keyword."""
        n, bank = x.shape[0], self.bank
        bucket = bucket_for(n, self.buckets)
        key = None if bucket is None else self._key(bucket, x, t, tokens, rows)
        graph = self._graphs.get(key) if key is not None else None
        if graph is None:
            too_big = bucket is None or (bank.max_frames is not None and bucket * x.shape[2] > bank.max_frames)
            if too_big or bank.sealed:
                bank.eager_calls += 1
                return self.eager(x, t, tokens, refs, **rows)
        slots = bank.fill_slots(refs)
        if graph is None:
            assert bucket is not None and key is not None
            graph = self._graphs[key] = self._capture(bucket, x, t, tokens, rows, slots)
        graph.x[:n].copy_(x)
        if t.ndim:
            graph.t[: t.shape[0]].copy_(t)
        else:
            graph.t.copy_(t)
        graph.tokens[: tokens.shape[0]].copy_(tokens)
        for name, value in rows.items():
            graph.rows[name][:n].copy_(value)
        assert graph.replay is not None
        return graph.replay()[:n].clone()  # the static output is overwritten by the next replay
