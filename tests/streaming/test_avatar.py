"""Pre-encoded avatars: computed once, equal to the offline path, saved and loaded without change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from streaming.avatar import AvatarStore, PreEncodedAvatar, encode_avatar
from vexpress_rt.pipeline import encode_reference, load_reference_image


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def portrait(inputs_dir):
    return Image.open(inputs_dir / "reference.png").convert("RGB")


@pytest.fixture(scope="module")
def kps(inputs_dir):
    return np.load(inputs_dir / "reference_kps.npy")


def _unet_v(models, avatar: PreEncodedAvatar) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 6, 8, 16, generator=generator)
    tokens = torch.randn(6, 5, 768, generator=generator)
    with torch.no_grad():
        return models.denoising_unet(
            sample, 500, tokens, avatar.reference_kv, avatar.kps_feature.expand(-1, -1, 6, -1, -1), 0.95, 3.0
        )


def test_avatar_latent_is_the_offline_reference_latent(inputs_dir, models, portrait, kps):
    avatar = encode_avatar(models, portrait, kps, 128, 64)
    offline = encode_reference(models, load_reference_image(str(inputs_dir / "reference.png"), 128, 64))
    assert torch.equal(avatar.latent, offline)


def test_avatar_matches_the_original_on_the_golden_fixtures(fixtures_dir, fixture_models):
    models = fixture_models
    portrait = Image.open(fixtures_dir / "inputs" / "reference.png").convert("RGB")
    avatar = encode_avatar(models, portrait, np.load(fixtures_dir / "inputs" / "reference_kps.npy"), 128, 64)
    offline = encode_reference(models, load_reference_image(str(fixtures_dir / "inputs" / "reference.png"), 128, 64))
    assert torch.equal(avatar.latent, offline)
    banks = torch.load(fixtures_dir / "expected" / "module" / "reference_bank.pt", weights_only=True)
    expected_kv = models.denoising_unet.reference_kv(
        {k[len("bank.") :]: v for k, v in banks.items() if k.startswith("bank.")}
    )
    assert len(avatar.reference_kv) == 16
    for name, (k, v) in avatar.reference_kv.items():
        assert (k - expected_kv[name][0]).abs().max() < 1e-4
        assert (v - expected_kv[name][1]).abs().max() < 1e-4
    guider = torch.load(fixtures_dir / "expected" / "module" / "v_kps_guider.pt", weights_only=True)
    assert (avatar.kps_feature - guider["fix_face_output"]).abs().max() < 1e-4


def test_saved_avatar_loads_and_gives_identical_frames(tmp_path, models, portrait, kps):
    avatar = encode_avatar(models, portrait, kps, 128, 64)
    avatar.save(tmp_path / "a.pt")
    loaded = PreEncodedAvatar.load(tmp_path / "a.pt")
    assert loaded.image_hash == avatar.image_hash and loaded.model_id == avatar.model_id
    assert torch.equal(_unet_v(models, loaded), _unet_v(models, avatar))


def test_store_encodes_once_and_reuses_the_disk_cache(tmp_path, models, portrait, kps, monkeypatch):
    store = AvatarStore(models, tmp_path)
    first = store.get_or_encode(portrait, kps, 128, 64)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert store.get_or_encode(portrait, kps, 128, 64) is first  # memory hit

    # A new store (a restarted server) must not run the reference net again.
    fresh = AvatarStore(models, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("reference net ran although the avatar was cached")

    monkeypatch.setattr(models.reference_net, "forward", refuse)
    again = fresh.get_or_encode(portrait.copy(), kps, 128, 64)
    assert torch.equal(_unet_v(models, again), _unet_v(models, first))
    # Another size or other key points are another avatar.
    assert store.key(portrait, kps, 128, 64) != store.key(portrait, kps, 64, 64)
    assert store.key(portrait, kps, 128, 64) != store.key(portrait, kps + 1, 128, 64)
