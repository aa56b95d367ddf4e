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


# ---------------------------------------------------------------------------------- healing


def _chunk_file(store_path: Path, array: str, index: int) -> Path:
    return store_path / array / "c" / str(index) / "0" / "0" / "0"


def _filled(path: Path, n: int = 3) -> FeatureStore:
    store = _store(path, n=n)
    for k in range(n):
        store.write(k, _feats(float(k + 1)))
    return store


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "checksum"),
        ("truncate", ""),
        ("garbage", ""),
        ("delete", "missing"),
    ],
)
def test_unreadable_chunk_is_recomputed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, reason: str
) -> None:
    path = tmp_path / "s.zarr"
    _filled(path)
    chunk = _chunk_file(path, "fine", 1)
    if damage == "flip":
        _flip(chunk)
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:7])
    elif damage == "garbage":  # right length and checksum position, wrong compressed stream
        chunk.write_bytes(b"\x00" * len(chunk.read_bytes()))
    else:
        chunk.unlink()
    cache = FeatureCache(1 << 20, _store(path))
    assert 1 in cache  # the done flag still says so; the read finds out
    with caplog.at_level("WARNING", logger="napari_revolver.core.features"):
        assert cache.get(1) is None
    assert "slice 1 is unreadable" in caplog.text and reason in caplog.text
    assert 1 not in cache.store and cache.misses == 1
    # The other slices are unaffected, and writing the slice again heals the store.
    assert float(cache.get(2).coarse[0, 0, 0, 0]) == 3.0
    cache.put(1, _feats(2.0))
    again = _store(path)
    assert again.done().all()
    assert float(again.read(1).fine[0, 0, 0, 0]) == 2.0


def test_unreadable_done_flags_are_rebuilt_from_the_chunks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    _filled(path)
    _chunk_file(path, "coarse", 2).unlink()
    _flip(path / "done" / "c" / "0")
    with caplog.at_level("WARNING", logger="napari_revolver.core.features"):
        store = _store(path)
        np.testing.assert_array_equal(store.done(), [True, True, False])
    assert "done flags were unreadable" in caplog.text
    assert float(store.read(0).coarse[0, 0, 0, 0]) == 1.0


def test_unreadable_store_metadata_is_recomputed_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _filled(path)
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(SignatureMismatch, match="unreadable store metadata"):
        _store(path, on_mismatch="raise")
    fresh = _store(path)
    assert not fresh.done().any()


def test_store_of_an_older_format_is_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _filled(path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["format_version"] = 1
    with pytest.raises(SignatureMismatch, match="format_version: stored 1"):
        _store(path, on_mismatch="raise")
    assert not _store(path).done().any()


def test_chunks_are_checksummed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    _store(path)
    for name in ("coarse", "fine", "done"):
        codecs = zarr.open_array(str(path / name), mode="r").metadata.codecs
        assert any(type(c).__name__ == "Crc32cCodec" for c in codecs), (name, codecs)


def test_zarr_temporaries_of_a_killed_writer_are_removed_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    _filled(path)
    stale = _chunk_file(path, "fine", 0).with_suffix(".0123abcd.partial")
    stale.write_bytes(b"half")
    with caplog.at_level("WARNING", logger="napari_revolver.core.features"):
        _store(path)
    assert not stale.exists()
    assert "left by a killed writer" in caplog.text


# ------------------------------------------------------------------------------- two writers


def test_two_stores_on_one_path_share_it(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    a, b = _store(path), _store(path)
    a.write(0, _feats(1.0))
    b.write(1, _feats(2.0))
    a.write(2, _feats(3.0))
    np.testing.assert_array_equal(a.done(), [True, True, True])
    np.testing.assert_array_equal(b.done(), [True, True, True])
    assert float(b.read(2).coarse[0, 0, 0, 0]) == 3.0


def test_store_replaced_by_another_writer_is_detached_not_mixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.zarr"
    old = _store(path)
    old.write(0, _feats(1.0))
    new = _store(path, _signature(data="other"))  # empties the store for other data
    cache = FeatureCache(1 << 20, old)
    with caplog.at_level("WARNING", logger="napari_revolver.core.features"):
        stored = cache.put(1, _feats(5.0))
    assert "was replaced" in caplog.text
    assert not new.done().any()  # the old volume's features did not land in the new store
    assert cache.get(1) is stored  # still served from memory
    assert 0 not in old and old.read(0) is None


def test_lock_held_by_another_process_times_out_naming_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from napari_revolver.core.features import LOCK_NAME, StoreLocked

    path = tmp_path / "s.zarr"
    _store(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"f = open({str(path / LOCK_NAME)!r}, 'r+b')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.seek(0); f.truncate(); f.write(f'{os.getpid()} somehost holder'.encode())\n"
            "f.flush(); print('locked', flush=True); time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=rf"locked by process {holder.pid} on somehost"):
            FeatureStore(path, _signature(), 3, COARSE, FINE, lock_timeout=0.2)
    finally:
        holder.kill()
        holder.wait()
    # The kernel releases the lock of a killed process.
    assert not FeatureStore(path, _signature(), 3, COARSE, FINE, lock_timeout=0.2).done().any()


def test_slice_bounds_are_found_once_per_volume_and_never_carried_over(
    predictor: RevolverPredictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import napari_revolver.core.encoding as encoding
    from napari_revolver.core.preprocess import normalize_slice

    calls: list[int] = []
    bounds = encoding.intensity_bounds

    def counted(image, prep):
        calls.append(1)
        return bounds(image, prep)

    monkeypatch.setattr(encoding, "intensity_bounds", counted)
    rng = np.random.default_rng(0)
    first = rng.random((3, 40, 40)).astype(np.float32)
    predictor.set_volume(first)
    for _ in range(3):
        x = predictor._prepare(1).numpy()
    np.testing.assert_array_equal(x, normalize_slice(first[1], predictor.preprocessing))
    assert len(calls) == 1
    second = 10 * first + 5  # other intensities, same shape
    for invert in (False, True):
        predictor.set_volume(second, invert=invert)
        np.testing.assert_array_equal(
            predictor._prepare(1).numpy(), normalize_slice(second[1], predictor.preprocessing)
        )
    assert predictor.preprocessing.invert and len(calls) == 3


def test_features_of_the_same_data_read_the_same_way_are_taken_over(
    predictor: RevolverPredictor,
) -> None:
    rng = np.random.default_rng(0)
    vol = rng.random((4, 40, 40)).astype(np.float32)
    predictor.set_volume(vol)
    for k in (0, 2):
        predictor.features(k)
    again = predictor.clone()
    again.set_volume(vol.copy())
    assert again.adopt_features(predictor) == 2
    assert 0 in again.cache and 2 in again.cache and 1 not in again.cache
    torch.testing.assert_close(again.features(2).fine, predictor.features(2).fine)
    # Other data, another reading, or no volume: nothing is taken over.
    for data, invert in ((vol[:, ::-1].copy(), False), (vol, True)):
        other = predictor.clone()
        other.set_volume(data, invert=invert)
        assert other.adopt_features(predictor) == 0 and len(other.cache) == 0
    assert predictor.clone().adopt_features(predictor) == 0
