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
from typing import Protocol

import torch

from vexpress_rt.models.attention import KeyValue

BUCKETS = (1, 2, 4, 8)  # batch sizes a graph is captured for; a batch is padded up to the next one
COMPOSITIONS_KEPT = 2  # batched K/V kept by the eager runner (a composition changes when a session comes or goes)


class Reference(Protocol):
    """What a row reads from its avatar (`streaming.avatar.PreEncodedAvatar`)."""

    reference_kv: dict[str, KeyValue]  # per block: (1, heads, N, d) keys and values


Refs = Sequence[Reference | None]
RowInputs = dict[str, torch.Tensor | float]  # named per-row (B, ...) inputs, passed to the UNet by keyword


def bucket_for(n: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket that holds n rows; None when n is larger than every bucket."""
    return next((b for b in sorted(buckets) if b >= n), None)


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


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture: warm-up calls on a side stream (lazy initialisation, kernel choices), then
    one capture into a memory pool shared by all graphs of the device (they never run concurrently: one worker)."""

    def __init__(self, device: torch.device, warmup_calls: int = 2):
        self.device = torch.device(device)
        self.warmup_calls = warmup_calls
        self.pool = torch.cuda.graph_pool_handle()
        self.captures = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_calls):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads may touch CUDA (e.g. copies) while the worker captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        self.captures += 1

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class _Graph:
    """One captured window shape at one bucket: its static inputs and its replay."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, rows: dict[str, torch.Tensor]):
        self.x, self.t, self.tokens = x, t, tokens
        self.rows = rows  # the named per-row inputs, (bucket, ...) each
        self.replay: Callable[[], torch.Tensor] | None = None


class GraphedUNet:
    """UNet windows replayed from captured graphs: one per (window shape, timestep layout, batch bucket, per-row
    input shapes), captured on first use (or by the engine's warm-up) and reused. A batch is padded up to its
    bucket; the padding rows compute on whatever their buffers hold and are dropped (rows of a UNet batch never
    mix).

    The inputs of a call are copied into the graph's static buffers, the named per-row ones (attention weights,
    pose features: whatever the denoiser hands over) without the runner knowing what they mean. The per-row
    reference K/V live in slots shared by every graph (graph b reads slots [:b]); row i reads slot i, which is
    rewritten only when the reference in row i changes, so a replay always computes with the references of the
    rows it serves. Batches larger than the largest bucket run eagerly."""

    def __init__(
        self,
        unet: torch.nn.Module,
        backend: CaptureBackend,
        buckets: Sequence[int] = BUCKETS,
    ):
        self.unet = unet
        self.backend = backend
        self.buckets = tuple(sorted(buckets))
        self.eager = EagerUNet(unet)
        self._graphs: dict[tuple[object, ...], _Graph] = {}
        self._slot_refs: list[Reference | None] = [None] * self.buckets[-1]
        self._slot_filled = [False] * self.buckets[-1]
        self._kv: dict[str, KeyValue] | None = None
        self.slot_copies = 0  # rows whose reference was copied into a slot (a test and the bench read it)

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def _fill_slots(self, refs: Refs) -> dict[str, KeyValue]:
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
        """Release `ref` (a deleted avatar): slots keep copies of its K/V, never the avatar itself, once it is gone."""
        for i, slot_ref in enumerate(self._slot_refs):
            if slot_ref is ref:
                self._slot_refs[i], self._slot_filled[i] = None, False  # rewritten by the next row that uses slot i
        self.eager.forget(ref)

    def _graph(
        self, bucket: int, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, rows: dict[str, torch.Tensor]
    ) -> _Graph:
        per_frame = t.ndim > 0
        row_shapes = tuple((name, tuple(v.shape[1:]), v.dtype) for name, v in sorted(rows.items()))
        key = (bucket, tuple(x.shape[1:]), per_frame, tuple(tokens.shape[1:]), x.dtype, row_shapes)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        frames = x.shape[2]
        graph = _Graph(
            x.new_zeros((bucket, *x.shape[1:])),
            t.new_zeros((bucket * frames,)) if per_frame else t.new_zeros(()),
            tokens.new_zeros((bucket * frames, *tokens.shape[1:])),
            {name: v.new_zeros((bucket, *v.shape[1:])) for name, v in rows.items()},
        )
        assert self._kv is not None  # filled before the first graph
        kv = {name: (k[:bucket], v[:bucket]) for name, (k, v) in self._kv.items()}

        def forward() -> torch.Tensor:
            v: torch.Tensor = self.unet(graph.x, graph.t, graph.tokens, kv, **graph.rows)
            return v

        graph.x.copy_(x[:1].expand_as(graph.x))  # capture on sane values (the padding rows keep them)
        for name, value in rows.items():
            graph.rows[name].copy_(value[:1].expand_as(graph.rows[name]))
        graph.replay = self.backend.capture(forward)
        self._graphs[key] = graph
        return graph

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, refs: Refs, **rows: torch.Tensor
    ) -> torch.Tensor:
        """v for the n windows x (n, 4, T, h, w); t a scalar or per frame (n*T,); tokens (n*T, q, d); `rows`
        the named per-row tensors (n, ...) the UNet takes by keyword."""
        n = x.shape[0]
        bucket = bucket_for(n, self.buckets)
        if bucket is None:
            return self.eager(x, t, tokens, refs, **rows)
        self._fill_slots(refs)
        graph = self._graph(bucket, x, t, tokens, rows)
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
