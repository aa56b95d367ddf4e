"""The local prior: clicks act by position on their own slice, and through the stack on request."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_revolver.core.episodes import EpisodeConfig, LabelledStack, StackEpisodes
from napari_revolver.core.model.guide import PRIOR_CHANNELS, local_prior, point_masks
from napari_revolver.core.model.guided_net import GuidedNet, ModelConfig
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.task import Task, load_task
from napari_revolver.core.train import warm_start
from napari_revolver.core.weights import save_weights


@pytest.fixture
def stack_task(predictor: RevolverPredictor) -> Task:
    rng = np.random.default_rng(4)
    predictor.set_volume(rng.random((4, 48, 48)).astype(np.float32))
    return predictor.guide([[1, 12, 12], [1, 14, 30], [1, 36, 36]], [1, 1, 0])


def test_local_prior_scales_one_point_to_about_one_and_masks_by_the_flag() -> None:
    masks = point_masks(torch.tensor([[18.0, 18.0]]), torch.tensor([1]), (12, 12), 4)
    prior = local_prior(masks[None], torch.tensor([1.0]))
    assert prior.shape == (1, PRIOR_CHANNELS, 12, 12)
    assert 0.9 <= float(prior[0, 0].max()) <= 1.0
    assert float(prior[0, 1].max()) == 0.0  # no negative point
    assert torch.all(prior[0, 2] == 1.0)
    off = local_prior(masks[None], torch.tensor([0.0]))
    assert float(off.abs().max()) == 0.0


def test_task_remembers_its_volume_and_keeps_it_in_the_file(
    predictor: RevolverPredictor, stack_task: Task, tmp_path: Path
) -> None:
    assert stack_task.source == predictor.info.fingerprint != ""
    again = load_task(stack_task.save(tmp_path / "t.revolver-task.json"))
    assert again.source == stack_task.source


def test_clicks_act_by_position_on_their_own_slice_only_unless_local(
    predictor: RevolverPredictor, stack_task: Task
) -> None:
    blind = replace(stack_task, source="")  # the same guidance without positions
    # The annotated slice sees the positions...
    assert not np.allclose(
        predictor.predict_proba(1, stack_task), predictor.predict_proba(1, blind)
    )
    # ...other slices only with local=True.
    np.testing.assert_array_equal(
        predictor.predict_proba(2, stack_task), predictor.predict_proba(2, blind)
    )
    assert not np.allclose(
        predictor.predict_proba(2, stack_task, local=True), predictor.predict_proba(2, blind)
    )
    # propagate agrees with predict_proba, in both modes.
    for local in (False, True):
        steps = predictor.propagate(stack_task, output="probabilities", local=local)
        for step in steps:
            np.testing.assert_allclose(
                step.result,
                predictor.predict_proba(step.index, stack_task, local=local),
                atol=1e-6,
            )


def test_positions_never_apply_to_another_volume(
    predictor: RevolverPredictor, stack_task: Task
) -> None:
    rng = np.random.default_rng(5)
    predictor.set_volume(rng.random((4, 48, 48)).astype(np.float32))
    blind = replace(stack_task, source="")
    for k in (1, 2):
        np.testing.assert_array_equal(
            predictor.predict_proba(k, stack_task, local=True), predictor.predict_proba(k, blind)
        )


def test_dense_task_keeps_its_mask_as_a_prior_and_merges_it(predictor: RevolverPredictor) -> None:
    rng = np.random.default_rng(6)
    predictor.set_volume(rng.random((3, 40, 40)).astype(np.float32))
    mask = np.zeros((40, 40), bool)
    mask[8:20, 8:20] = True
    t0 = predictor.guide_mask(0, mask)
    t1 = predictor.guide_mask(2, mask)
    assert len(t0.support_masks) == 1 and t0.support_masks[0][0] == (0,)
    merged = t0.merge(t1)
    assert [k for k, _ in merged.support_masks] == [(0,), (2,)]
    blind = replace(merged, source="")
    assert not np.allclose(predictor.predict_proba(2, merged), predictor.predict_proba(2, blind))
    np.testing.assert_array_equal(
        predictor.predict_proba(1, merged), predictor.predict_proba(1, blind)
    )


def test_warm_start_adds_prior_inputs_and_context_without_changing_the_output(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    cfg = dict(
        widths=(8, 12, 16, 24, 32),
        coarse_channels=16,
        fine_channels=8,
        head_width=16,
        head_fine_width=8,
    )
    old = GuidedNet(ModelConfig(key="revolver-tiny", local_prior=False, **cfg)).eval()
    path = save_weights(old, tmp_path / "old.safetensors")
    new = GuidedNet(ModelConfig(key="revolver-tiny", local_prior=True, wide_context=True, **cfg))
    widened = warm_start(new, path)
    assert sorted(widened[:2]) == ["segmentor.fine_fuse.weight", "segmentor.fuse.weight"]
    # The wide-context blocks are new and start as identities.
    assert len(widened) == 10 and all(".context." in k for k in widened[2:])
    new.eval()
    x = torch.randn(2, 3, 64, 64)
    masks = torch.rand(1, 2, 16, 16) * 0.1
    with torch.no_grad():
        a = old(x[:1], masks, x[1:])
        b = new(x[:1], masks, x[1:], torch.ones(1))
    torch.testing.assert_close(a, b)


def test_warm_start_refuses_a_different_architecture(tmp_path: Path) -> None:
    small = GuidedNet(ModelConfig(key="revolver-tiny", widths=(8, 12, 16, 24, 32)))
    path = save_weights(small, tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="only extra input channels"):
        warm_start(GuidedNet(ModelConfig(key="revolver-tiny", widths=(8, 12, 16, 24, 40))), path)


def test_aligned_episodes_share_geometry_and_carry_the_flag() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((2, 96, 96), np.int32)
    labels[:, 10:40, 50:90] = 1  # an asymmetric object: a flip or turn would move it
    images = (labels * 200 + rng.integers(0, 30, labels.shape)).astype(np.uint8)
    stack = LabelledStack("toy", list(images), list(labels), True, True)
    cfg = EpisodeConfig(crop=64, p_dense=1.0, p_same_slice=1.0, p_local_off=0.0)
    episodes = StackEpisodes([stack], cfg, seed=1)
    for _ in range(10):
        ep = next(episodes)
        assert ep.aligned == 1.0
        # Dense support mask on the fine grid equals the query target pooled the same way.
        pooled = ep.target.reshape(16, 4, 16, 4).mean(axis=(1, 3))
        np.testing.assert_allclose(ep.masks[0], pooled, atol=1e-6)


def test_local_positions_come_from_the_nearest_annotated_slice(
    predictor: RevolverPredictor,
) -> None:
    rng = np.random.default_rng(7)
    predictor.set_volume(rng.random((6, 48, 48)).astype(np.float32))
    both = predictor.guide([[0, 10, 10], [0, 30, 30], [5, 20, 36], [5, 40, 8]], [1, 0, 1, 0])
    # The same guidance, with only one slice's points kept for positions.
    first = replace(both, points=both.points[:2], labels=both.labels[:2])
    last = replace(both, points=both.points[2:], labels=both.labels[2:])
    for k, near in ((1, first), (4, last)):
        np.testing.assert_array_equal(
            predictor.predict_proba(k, both, local=True),
            predictor.predict_proba(k, near, local=True),
        )
    assert not np.allclose(
        predictor.predict_proba(1, both, local=True), predictor.predict_proba(1, last, local=True)
    )


def test_invert_reverses_intensities_and_keys_the_features(predictor: RevolverPredictor) -> None:
    from napari_revolver.core.preprocess import Preprocessing, normalize_slice

    img = np.random.default_rng(8).random((32, 32)).astype(np.float32)
    plain = normalize_slice(img)
    inverted = normalize_slice(img, Preprocessing(invert=True))
    np.testing.assert_allclose(inverted, -plain, atol=1e-6)
    assert Preprocessing(invert=True).key() != Preprocessing().key()
    volume = np.random.default_rng(9).random((2, 48, 48)).astype(np.float32)
    predictor.set_volume(volume)
    a = predictor.features(0).coarse
    predictor.set_volume(volume, invert=True)
    assert predictor.preprocessing.invert
    assert "-inv" in predictor.signature().preprocessing
    assert not torch.allclose(a, predictor.features(0).coarse)
    # Dark-on-light data inverted gives the same features as its bright-on-dark original.
    predictor.set_volume(1.0 - volume, invert=True)
    torch.testing.assert_close(a, predictor.features(0).coarse, atol=2e-3, rtol=0)
