"""The support-gate probe's fit and cross-validation (its data sets are not needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_revolver.core.model.guide import point_masks
from napari_revolver.core.prior import dense_support


@pytest.fixture(scope="module")
def gate(benchmark_module):
    with benchmark_module("support_gate") as module:
        yield module


def test_logistic_separates_and_weighs_samples(gate, rng) -> None:
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] - 0.5 * x[:, 1] > 0.2).astype(float)
    xs = np.c_[x, np.ones(len(x))]
    beta = gate.logistic(xs, y, np.ones(len(x)), 0.1)
    assert np.mean((xs @ beta > 0) == (y > 0)) > 0.97
    assert beta[0] > 0 > beta[1]
    # Samples of weight zero do not count: with the positives weightless, all is negative.
    only_negatives = gate.logistic(xs, y, (y == 0).astype(float), 0.1)
    assert np.all(xs @ only_negatives < 0)


def test_samples_give_each_class_half_the_weight(gate) -> None:
    masks = np.zeros((2, 10))
    masks[0, [1, 2]] = [0.6, 0.2]
    masks[1, [5, 6, 7]] = [0.3, 0.3, 0.1]
    idx, y, w = gate.samples(masks, np.ones(10))
    assert sorted(idx[y == 1]) == [1, 2] and sorted(idx[y == 0]) == [5, 6, 7]
    assert w[y == 1].sum() == pytest.approx(len(w) / 2)
    assert w[y == 0].sum() == pytest.approx(len(w) / 2)
    idx, y, _ = gate.samples(masks, (np.arange(10) < 6).astype(float))
    assert sorted(idx[y == 0]) == [5]


def test_probe_scores_every_candidate(gate, predictor, make_blobs) -> None:
    image = make_blobs((3, 64, 64), n_blobs=4)
    fg = image > 0.5
    probe = gate.Probe(predictor, image, fg)
    _, (h, w) = probe.feats(0)
    stride = predictor.model.fine_stride
    dense = dense_support(fg[0], (h, w), stride).reshape(2, -1).numpy()
    ious, cv = probe.run(0, dense, True, [1, 2], [1.0], lam=10.0)
    assert set(ious) == set(cv) == {"net", "net+1*fit", "fit"}
    assert all(0.0 <= v <= 1.0 for v in [*ious.values(), *cv.values()])
    # The blobs are bright on a dark ground: a linear fit of the features finds them.
    assert ious["fit"] > 0.7 and cv["fit"] > 0.7
    pos, neg = np.argwhere(fg[0])[::40][:6], np.argwhere(~fg[0])[::200][:6]
    pts = np.concatenate([pos, neg]).astype(float)
    lab = np.repeat([1, 0], [len(pos), len(neg)]).astype(np.int8)
    clicks = point_masks(torch.from_numpy(pts), torch.from_numpy(lab), (h, w), stride)
    ious, cv = probe.run(0, clicks.reshape(2, -1).numpy(), False, [1, 2], [1.0], lam=10.0)
    assert all(0.0 <= v <= 1.0 for v in cv.values())
