"""The graph runner's bookkeeping on the CPU: a 'replay' reruns the captured function on the static buffers
(`RerunBackend`), so bucketing, padding and the per-row reference slots are checked exactly as a CUDA graph would
use them; the results must equal the eager UNet's for the same inputs."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from streaming.avatar import PreEncodedAvatar
from streaming.denoiser import ChunkJob, DenoiserSettings, StreamDenoiser
from streaming.device import CAPTURE_LOCK, release_cached_memory
from streaming.params import GenerationParams
from streaming.unet_runner import (
    CudaCalls,
    CudaGraphBackend,
    EagerUNet,
    GraphBank,
    GraphedUNet,
    RerunBackend,
    bucket_for,
    graph_buckets,
    static_like,
)

H, W, T = 8, 16, 4  # latent size of a 128x64 frame, window frames


def _weights(refs) -> dict[str, torch.Tensor]:
    """A different pair of attention weights per row (sessions of different strengths batched together), and each
    row's pose features (its avatar's, zero for guidance's unconditional row): the runner's per-row inputs."""
    n = len(refs)
    like = next(r for r in refs if r is not None).kps_feature
    kps = [(r.kps_feature if r is not None else torch.zeros_like(like)).expand(-1, -1, T, -1, -1) for r in refs]
    return {
        "reference_attention_weight": torch.linspace(0.95, 0.5, n),
        "audio_attention_weight": torch.linspace(3.0, 1.0, n),
        "kps_features": torch.cat(kps),
    }


def _avatar(models, seed: int) -> PreEncodedAvatar:
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, H, W, generator=g)
    with torch.no_grad():
        kv = models.denoising_unet.reference_kv(models.reference_net(latent))
        kps = models.v_kps_guider(torch.rand(1, 3, 1, 8 * H, 8 * W, generator=g))
    return PreEncodedAvatar(f"a{seed}", "random", 8 * W, 8 * H, np.zeros((3, 2), np.float32), latent, kv, kps)


@pytest.fixture(scope="module")
def avatars(tiny_models):
    return [_avatar(tiny_models, s) for s in range(3)]


def _inputs(models, n: int, seed: int, per_frame: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, T, H, W, generator=g)
    t = torch.randint(0, 1000, (n * T,), generator=g) if per_frame else torch.tensor(500)
    tokens = torch.randn(n * T, 5, models.unet_config.cross_attention_dim, generator=g)
    return x, t, tokens


def _eager_rows(models, x, t, tokens, refs):
    """Each row alone through the plain UNet: the reference a padded, batched replay must reproduce."""
    like = next(r for r in refs if r is not None)
    zero = PreEncodedAvatar(  # guidance's unconditional row: zero K/V and kps, written out here independently
        "zero",
        "random",
        8 * W,
        8 * H,
        like.reference_kps,
        like.latent,
        {k: (torch.zeros_like(a), torch.zeros_like(b)) for k, (a, b) in like.reference_kv.items()},
        torch.zeros_like(like.kps_feature),
    )
    rows = []
    weights = _weights(refs)
    for i, ref in enumerate(refs):
        ti = t[i * T : (i + 1) * T] if t.ndim else t
        row = {name: w[i].item() for name, w in weights.items() if w.ndim == 1}  # floats, as offline passes them
        row["kps_features"] = (ref or zero).kps_feature.expand(-1, -1, T, -1, -1)
        row_tokens = tokens[i * T : (i + 1) * T]
        rows.append(EagerUNet(models.denoising_unet)(x[i : i + 1], ti, row_tokens, [ref or zero], **row))
    return torch.cat(rows)


def test_bucket_for():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


@torch.no_grad()
def test_a_padded_bucket_replay_equals_the_unpadded_eager_rows(tiny_models, avatars):
    a, b, _ = avatars
    graphed = GraphedUNet(tiny_models.denoising_unet, RerunBackend())
    for per_frame in (True, False):  # staggered windows (a timestep per frame) and chunked ones (one per call)
        x, t, tokens = _inputs(tiny_models, 3, seed=1, per_frame=per_frame)
        refs = [a, b, a]  # 3 rows padded to the bucket of 4
        expected = _eager_rows(tiny_models, x, t, tokens, refs)
        torch.testing.assert_close(graphed(x, t, tokens, refs, **_weights(refs)), expected)
    assert graphed.graphs == 2 and graphed.backend.captures == 2


@torch.no_grad()
def test_replays_follow_the_references_when_sessions_change(tiny_models, avatars):
    """Rows change avatars between calls (sessions come, go, reorder): each replay must read the new ones,
    while unchanged rows are not copied again."""
    a, b, c = avatars
    graphed = GraphedUNet(tiny_models.denoising_unet, RerunBackend())
    copies = []
    for step, refs in enumerate([[a, b], [a, b], [b, a], [c], [None, c]]):  # [None, c]: guidance's zero row
        x, t, tokens = _inputs(tiny_models, len(refs), seed=10 + step)
        expected = _eager_rows(tiny_models, x, t, tokens, refs)
        torch.testing.assert_close(graphed(x, t, tokens, refs, **_weights(refs)), expected)
        copies.append(graphed.slot_copies)
    assert copies == [2, 2, 4, 5, 7]  # a repeated batch copies nothing; only rows whose avatar changed are copied
    assert graphed.graphs == 2  # bucket 2 and bucket 1, each captured once and replayed since


@torch.no_grad()
def test_a_batch_beyond_the_largest_bucket_runs_eagerly(tiny_models, avatars):
    graphed = GraphedUNet(tiny_models.denoising_unet, RerunBackend(), buckets=(1, 2))
    refs = [avatars[0], avatars[1], avatars[2]]
    x, t, tokens = _inputs(tiny_models, 3, seed=3)
    expected = _eager_rows(tiny_models, x, t, tokens, refs)
    torch.testing.assert_close(graphed(x, t, tokens, refs, **_weights(refs)), expected)
    assert graphed.graphs == 0


@torch.no_grad()
def test_the_eager_runner_assembles_a_batch_composition_once(tiny_models, avatars):
    a, b, _ = avatars
    eager = EagerUNet(tiny_models.denoising_unet)
    kv = eager.reference([a, a, a])
    assert kv is a.reference_kv  # one avatar for the whole batch: its K/V serve every row, no copy
    for _ in range(3):
        eager.reference([None, None, a, a])  # guidance: zero rows then the avatar's
    assert eager.compositions_built == 2
    kv = eager.reference([a, b])
    assert next(iter(kv.values()))[0].shape[0] == 2


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_the_graphed_denoiser_makes_the_eager_denoisers_frames(tiny_models, avatars, strategy, guidance):
    """Three sessions (two share an avatar) for two calls: the same frames through graphs as eagerly."""
    params = [_params(strategy, guidance)] * 3
    settings = DenoiserSettings.of(params[0])
    silence = torch.zeros(5, tiny_models.unet_config.cross_attention_dim)
    refs = [avatars[0], avatars[1], avatars[0]]
    frames = []
    for graphs in (None, RerunBackend()):
        denoiser = StreamDenoiser(tiny_models, settings, graphs)
        states = [denoiser.new_state(a, seed=i, silence=silence) for i, a in enumerate(refs)]
        out = []
        for turn in range(2):  # the second call runs on the state the first left
            tokens = torch.randn(2, 5, silence.shape[1], generator=torch.Generator().manual_seed(turn))
            jobs = [ChunkJob(s, a, tokens, [(turn, k) for k in range(2)], p) for s, a, p in zip(states, refs, params)]
            out += [latent for job_out in denoiser.run(jobs) for _, latent in job_out]
        frames.append(torch.stack(out))
    assert len(frames[0]) > 0
    torch.testing.assert_close(frames[1], frames[0])


def _params(strategy: str, guidance: float, **weights: float) -> GenerationParams:
    return GenerationParams(
        steps=2, new_frames=2, context_frames=2, strategy=strategy, guidance_scale=guidance, **weights
    )


@pytest.mark.parametrize("strategy", ["staggered", "chunked"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@torch.no_grad()
def test_sessions_of_different_strengths_share_one_unet_call(tiny_models, avatars, strategy, guidance):
    """Weights and guidance scale are per row: three sessions of different expression strength, reference weight
    and guidance run in one UNet call per step and make the frames each makes alone (and strength matters)."""
    other_guidance = 1.5 * guidance if guidance > 1 else 1.0  # guidance on or off is the batch's shape
    params = [
        _params(strategy, guidance, audio_attention_weight=3.0),
        _params(strategy, other_guidance, audio_attention_weight=0.5, reference_attention_weight=0.6),
        _params(strategy, guidance, audio_attention_weight=7.0),
    ]
    assert len({DenoiserSettings.of(p) for p in params}) == 1  # one denoiser, one batching key
    silence = torch.zeros(5, tiny_models.unet_config.cross_attention_dim)
    tokens = torch.randn(2, 5, silence.shape[1], generator=torch.Generator().manual_seed(7))
    denoiser = StreamDenoiser(tiny_models, DenoiserSettings.of(params[0]))
    calls = []
    unet = denoiser.unet
    denoiser.unet = lambda *a, **kw: calls.append(a[0].shape[0]) or unet(*a, **kw)

    def run(rows: list[int]) -> list[torch.Tensor]:
        states = [denoiser.new_state(avatars[0], seed=i, silence=silence) for i in rows]
        made: list[list[torch.Tensor]] = [[] for _ in rows]
        for turn in range(2):  # staggered: the first frames leave on the second call
            jobs = [ChunkJob(states[k], avatars[0], tokens, [turn, turn], params[i]) for k, i in enumerate(rows)]
            for k, out in enumerate(denoiser.run(jobs)):
                made[k] += [latent for _, latent in out]
        return [torch.stack(m) for m in made]

    batched = run([0, 1, 2])
    assert calls == [3 * (2 if guidance > 1 else 1)] * (4 if strategy == "chunked" else 2)  # one call per step
    alone = [run([i])[0] for i in range(3)]
    for b, a in zip(batched, alone):  # a batch of 3 (or 6) rows runs other CPU kernel blockings than 1 (or 2):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)  # float noise only (test_engine allows 2 levels)
    assert not torch.allclose(alone[0], alone[2])  # the strength reaches the attention


# -- capture discipline: which device and stream a capture happens on (a CUDA-free stand-in for torch.cuda) --------
class _WatchedCuda(CudaCalls):
    """torch.cuda as the backend calls it, with CPU stand-ins that remember the current device and stream: each
    capture records (current device, the stream it captured on, the device that stream was made on, whether the
    process-wide capture lock was held, captures running at once)."""

    def __init__(self) -> None:
        self.current: list[torch.device] = [torch.device("cuda", 0)]  # a new thread's current device
        self.stream_device: dict[int, torch.device] = {}
        self.records: list[dict[str, object]] = []
        self.running = 0

    def resolve(self, device):
        device = torch.device(device)
        return device if device.index is not None else torch.device("cuda", 0)

    def on_device(self, device):
        watched = self

        class _On:
            def __enter__(self):
                watched.current.append(torch.device(device))

            def __exit__(self, *exc):
                watched.current.pop()

        return _On()

    def new_stream(self, device):
        stream = _Stream()
        self.stream_device[id(stream)] = self.current[-1]
        return stream

    def current_stream(self, device):
        return _Stream()

    def on_stream(self, stream):
        return nullcontext()

    def new_pool(self):
        return object()

    def record(self, fn, pool, stream):
        self.running += 1
        time.sleep(0.05)  # long enough for a second thread's capture to overlap, were it not locked out
        self.records.append(
            {
                "device": self.current[-1],
                "stream_device": self.stream_device.get(id(stream)),
                "locked": _lock_held(),
                "at_once": self.running,
            }
        )
        out = fn()
        self.running -= 1
        return lambda: out


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def _lock_held() -> bool:
    """Whether some thread holds the process-wide capture lock (it is re-entrant: try from another thread)."""
    took: list[bool] = []
    probe = threading.Thread(target=lambda: took.append(CAPTURE_LOCK.acquire(blocking=False)))
    probe.start()
    probe.join()
    if took[0]:
        CAPTURE_LOCK.release()
    return not took[0]


def test_each_backend_captures_on_its_own_device_and_stream_one_capture_at_a_time():
    """Two engines' backends on cuda:0 and cuda:1 warming up at once (two threads): each capture happens with
    its backend's device current, on a capture stream made on that device (not PyTorch's shared default capture
    stream of device 0), under the process-wide lock, never two at once."""
    cuda = _WatchedCuda()
    backends = [CudaGraphBackend(f"cuda:{i}", warmup_calls=1, cuda=cuda) for i in (0, 1)]
    assert backends[0].stream is not backends[1].stream
    threads = [
        threading.Thread(target=lambda b=b: [b.capture(lambda: torch.zeros(1)) for _ in range(2)]) for b in backends
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cuda.records) == 4
    assert sorted(str(r["device"]) for r in cuda.records) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert all(r["stream_device"] == r["device"] for r in cuda.records)
    assert all(r["locked"] and r["at_once"] == 1 for r in cuda.records)
    assert [b.captures for b in backends] == [2, 2]


def test_releasing_cached_memory_waits_for_a_capture():
    """`release_cached_memory` (after an out-of-memory) takes the capture lock: it cannot empty the allocator's
    cache in the middle of another thread's capture."""
    order: list[str] = []
    with CAPTURE_LOCK:
        releaser = threading.Thread(target=lambda: (release_cached_memory(), order.append("released")))
        releaser.start()
        time.sleep(0.1)
        order.append("capture done")
    releaser.join()
    assert order == ["capture done", "released"]


# -- capture policy: captured at warm-up, sealed for serving, one slot bank -------------------------------------------
@torch.no_grad()
def test_a_sealed_bank_runs_unwarmed_shapes_eagerly_and_captures_nothing(tiny_models, avatars):
    """After the warm-up (bank sealed), a new batch bucket runs eagerly with the same result: no capture on the
    serving path."""
    a, b, _ = avatars
    bank = GraphBank(RerunBackend())
    graphed = GraphedUNet(tiny_models.denoising_unet, bank)
    x, t, tokens = _inputs(tiny_models, 1, seed=1)
    graphed(x, t, tokens, [a], **_weights([a]))
    bank.seal()
    x, t, tokens = _inputs(tiny_models, 2, seed=2)
    out = graphed(x, t, tokens, [a, b], **_weights([a, b]))
    torch.testing.assert_close(out, _eager_rows(tiny_models, x, t, tokens, [a, b]))
    assert bank.backend.captures == 1 and graphed.graphs == 1 and bank.eager_calls == 1


@torch.no_grad()
def test_graphs_over_the_frame_cap_run_eagerly(tiny_models, avatars):
    """bucket x window frames above the bank's cap is never captured (the graph pool would keep its memory)."""
    a, b, _ = avatars
    bank = GraphBank(RerunBackend(), max_frames=2 * T)
    graphed = GraphedUNet(tiny_models.denoising_unet, bank)
    for n in (1, 2, 3):  # buckets 1, 2 fit; 3 rows pad to bucket 4: 4 x T frames, over the cap
        refs = [a, b, a][:n]
        x, t, tokens = _inputs(tiny_models, n, seed=n)
        torch.testing.assert_close(
            graphed(x, t, tokens, refs, **_weights(refs)), _eager_rows(tiny_models, x, t, tokens, refs)
        )
    assert bank.backend.captures == 2 and bank.eager_calls == 1


def test_buckets_cover_guidance_at_every_max_batch():
    assert graph_buckets(4) == (1, 2, 4, 8)
    assert graph_buckets(6) == (1, 2, 4, 8, 16)  # guidance doubles 6 windows to 12 rows


def test_the_pose_static_buffer_keeps_the_frame_major_layout():
    """The pose features reach the runner as a (B, C0, T, h, w) view of a frame-major stack. Their static buffer
    has that layout, so the copy into it is a plain one and the UNet's frame-major view of it needs no copy
    (a contiguous buffer cost two strided copies per replay)."""
    stack = torch.randn(3, 4, 2, 8, 16)  # (B, T, C0, h, w) as the denoiser stacks it
    pose = stack.transpose(1, 2)  # (B, C0, T, h, w): the UNet's view
    static = static_like(pose, bucket=4)
    assert static.shape == (4, 2, 4, 8, 16) and not static.any()
    assert static.stride() == (4 * 2 * 8 * 16, 8 * 16, 2 * 8 * 16, 16, 1)  # frame-major, like the stack
    static[:3].copy_(pose)
    frame_major = static.transpose(1, 2)  # what the UNet reads (vexpress_rt/models/unet.py)
    assert frame_major.is_contiguous() and torch.equal(frame_major[:3], stack)
    contiguous = torch.randn(2, 3, 5)
    assert static_like(contiguous, 4).is_contiguous()  # other rows keep the usual layout
