"""Tests for the per-slice feature cache, the zarr feature store and resumable precompute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from napari_revolver.core.features import (
    FeatureCache,
    FeatureSignature,
    FeatureStore,
    SignatureMismatch,
    data_fingerprint,
)
from napari_revolver.core.model.encoder import EncoderOutput
from napari_revolver.core.predictor import RevolverPredictor

COARSE = (4, 4, 4)
FINE = (2, 8, 8)


def _feats(value: float) -> EncoderOutput:
    return EncoderOutput(torch.full((1, *COARSE), value), torch.full((1, *FINE), value))


def _entry_bytes() -> int:
    return 2 * (int(np.prod(COARSE)) + int(np.prod(FINE)))  # float16


def _signature(**changes: object) -> FeatureSignature:
    base = {
        "data": "abc",
        "model_key": "revolver-tiny",
        "weights_sha256": "0" * 64,
        "preprocessing": "pct1-99.8-c3",
        "slice_shape": (32, 32),
    }
    base.update(changes)
    return FeatureSignature(**base)  # type: ignore[arg-type]


def _store(
    path: Path,
    signature: FeatureSignature | None = None,
    n: int = 3,
    on_mismatch: str = "recompute",
) -> FeatureStore:
    return FeatureStore(path, signature or _signature(), n, COARSE, FINE, on_mismatch)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ cache


def test_cache_stores_float16_cpu_copies_and_counts_hits_and_misses() -> None:
    cache = FeatureCache(10 * _entry_bytes())
    assert cache.get(0) is None
    stored = cache.put(0, _feats(1.5))
    assert stored.coarse.dtype == torch.float16 and stored.fine.dtype == torch.float16
    got = cache.get(0)
    assert got is not None
    torch.testing.assert_close(got.coarse.float(), torch.full((1, *COARSE), 1.5))
    assert (cache.hits, cache.misses) == (1, 1)
    assert 0 in cache and 1 not in cache
    assert cache.nbytes == _entry_bytes()


def test_cache_lru_evicts_least_recently_used_beyond_max_bytes() -> None:
    cache = FeatureCache(3 * _entry_bytes())
    for k in range(3):
        cache.put(k, _feats(k))
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(3, _feats(3))
    assert len(cache) == 3
    assert 1 not in cache
    assert all(k in cache for k in (0, 2, 3))
    assert cache.nbytes <= cache.max_bytes
    cache.put(4, _feats(4))
    assert 2 not in cache and 0 in cache


def test_cache_keeps_the_newest_entry_even_when_it_alone_exceeds_the_budget() -> None:
    cache = FeatureCache(_entry_bytes() // 2)
    cache.put(0, _feats(0))
    cache.put(1, _feats(1))
    assert len(cache) == 1 and 1 in cache and 0 not in cache


def test_cache_rejects_non_positive_budget() -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        FeatureCache(0)


def test_cache_clear_forgets_memory_but_store_keeps_slices(tmp_path: Path) -> None:
    cache = FeatureCache(1 << 20, _store(tmp_path / "s.zarr"))
    cache.put(1, _feats(2.0))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    assert 1 in cache  # from the store
    got = cache.get(1)
    assert got is not None and float(got.fine[0, 0, 0, 0]) == 2.0


# ------------------------------------------------------------------------------------ store


def test_store_round_trips_float16_features(tmp_path: Path, rng: np.random.Generator) -> None:
    store = _store(tmp_path / "s.zarr")
    coarse = torch.from_numpy(rng.standard_normal((1, *COARSE)).astype(np.float32))
    fine = torch.from_numpy(rng.standard_normal((1, *FINE)).astype(np.float32))
    assert not store.done().any()
    store.write(1, EncoderOutput(coarse, fine))
    np.testing.assert_array_equal(store.done(), [False, True, False])
    assert 1 in store and 0 not in store
    back = store.read(1)
    assert back.coarse.shape == (1, *COARSE) and back.fine.shape == (1, *FINE)
    assert back.coarse.dtype == torch.float16
    torch.testing.assert_close(back.coarse, coarse.half())
    torch.testing.assert_close(back.fine, fine.half())


def test_store_reopened_with_same_signature_is_reused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path).write(2, _feats(7.0))
    again = _store(path)
    np.testing.assert_array_equal(again.done(), [False, False, True])
    assert float(again.read(2).coarse[0, 0, 0, 0]) == 7.0


def test_store_with_other_signature_is_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path).write(0, _feats(1.0))
    fresh = _store(path, _signature(data="other"), on_mismatch="recompute")
    assert not fresh.done().any()
    assert zarr.open_group(str(path), mode="r").attrs["signature"]["data"] == "other"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_key", "revolver-s"),
        ("weights_sha256", "1" * 64),
        ("data", "changed"),
        ("slice_shape", (64, 32)),
    ],
)
def test_store_with_other_signature_raises_naming_the_field(
    tmp_path: Path, field: str, value: object
) -> None:
    path = tmp_path / "s.zarr"
    _store(path).write(0, _feats(1.0))
    with pytest.raises(SignatureMismatch, match=field):
        _store(path, _signature(**{field: value}), on_mismatch="raise")
    # The refused store is untouched.
    assert _store(path).done()[0]


def test_store_with_other_slice_count_raises(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path, n=3)
    with pytest.raises(SignatureMismatch, match="n_slices"):
        _store(path, n=4, on_mismatch="raise")


def test_store_path_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notastore"
    path.mkdir()
    (path / "something.txt").write_text("hello")
    with pytest.raises(SignatureMismatch, match="not a feature store"):
        _store(path)


# ------------------------------------------------------------------------------ fingerprint


def test_data_fingerprint_is_stable_for_equal_data(rng: np.random.Generator) -> None:
    vol = rng.integers(0, 1000, (5, 40, 40)).astype(np.uint16)
    assert data_fingerprint(vol) == data_fingerprint(vol.copy())
    assert len(data_fingerprint(vol)) == 32


@pytest.mark.parametrize("z", [0, 2, 4])  # the sampled slices of 5: first, middle, last
def test_data_fingerprint_changes_when_a_sampled_slice_changes(
    rng: np.random.Generator, z: int
) -> None:
    vol = rng.integers(0, 1000, (5, 40, 40)).astype(np.uint16)
    changed = vol.copy()
    changed[z] += 1
    assert data_fingerprint(changed) != data_fingerprint(vol)


def test_data_fingerprint_depends_on_shape_and_dtype() -> None:
    vol = np.arange(5 * 40 * 40, dtype=np.uint16).reshape(5, 40, 40)
    assert data_fingerprint(vol) != data_fingerprint(vol.astype(np.float32))
    assert data_fingerprint(vol) != data_fingerprint(vol[:4])


def test_data_fingerprint_of_rgb_image_samples_the_whole_plane(rng: np.random.Generator) -> None:
    img = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
    changed = img.copy()
    changed[14:21, 14:21] = 255 - changed[14:21, 14:21]  # a patch away from rows 0, 32, 63
    assert data_fingerprint(changed, rgb=True) != data_fingerprint(img, rgb=True)


# ------------------------------------------------------------------------- resumable precompute


def test_precompute_with_store_is_resumable(
    tmp_path: Path, tiny_weights: Path, count_encoder_calls, make_blobs
) -> None:
    vol = make_blobs((6, 32, 32))
    store = tmp_path / "features.zarr"
    first = RevolverPredictor(tiny_weights, "cpu", batch_size=2)
    first.set_volume(vol, store=store)
    calls = count_encoder_calls(first)
    gen = first.precompute()
    assert next(gen) == (0, 6)
    assert next(gen) == (2, 6)
    gen.close()  # interrupted after the first batch
    assert calls == [2]
    np.testing.assert_array_equal(first.cache.store.done(), [1, 1, 0, 0, 0, 0])

    second = RevolverPredictor(tiny_weights, "cpu", batch_size=2)
    second.set_volume(vol, store=store)
    calls2 = count_encoder_calls(second)
    progress = list(second.precompute())
    assert progress[0] == (2, 6)
    assert progress[-1] == (6, 6)
    assert sum(calls2) == 4
    assert second.cache.store.done().all()

    # Everything is stored now: a third predictor encodes nothing, even to predict.
    third = RevolverPredictor(tiny_weights, "cpu")
    third.set_volume(vol, store=store)
    calls3 = count_encoder_calls(third)
    assert list(third.precompute()) == [(6, 6)]
    task = third.guide([[3, 16, 16]], [1])
    assert third.predict_slice(5, task).shape == (32, 32)
    assert calls3 == []


def test_store_features_match_freshly_computed_ones(
    tmp_path: Path, tiny_weights: Path, make_blobs
) -> None:
    vol = make_blobs((3, 40, 40))
    a = RevolverPredictor(tiny_weights, "cpu")
    a.set_volume(vol, store=tmp_path / "f.zarr")
    list(a.precompute())
    b = RevolverPredictor(tiny_weights, "cpu")
    b.set_volume(vol)
    for k in range(3):
        fa, fb = a.cache.store.read(k), b.features(k)
        torch.testing.assert_close(fa.coarse, fb.coarse)
        torch.testing.assert_close(fa.fine, fb.fine)


def test_set_volume_with_stale_store_and_raise_refuses(
    tmp_path: Path, tiny_weights: Path, make_blobs
) -> None:
    store = tmp_path / "f.zarr"
    p = RevolverPredictor(tiny_weights, "cpu")
    p.set_volume(make_blobs((3, 32, 32), seed=0), store=store)
    with pytest.raises(SignatureMismatch, match="data"):
        p.set_volume(make_blobs((3, 32, 32), seed=1), store=store, on_mismatch="raise")
    info = p.set_volume(make_blobs((3, 32, 32), seed=1), store=store, on_mismatch="recompute")
    assert info.n_slices == 3
    assert not p.cache.store.done().any()
