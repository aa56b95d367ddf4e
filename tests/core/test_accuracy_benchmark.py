"""The accuracy benchmark's support design (its data sets are not needed)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def accuracy(benchmark_module):
    with benchmark_module("accuracy") as module:
        yield module


def test_every_candidate_support_is_used_once_per_count(accuracy) -> None:
    first_query = 20
    candidates = list(range(first_query - accuracy.MAX_SUPPORT, first_query))
    for k in (1, 2, 4):
        groups = accuracy.support_groups(first_query, k)
        assert all(len(g) == k for g in groups)
        assert sorted(s for g in groups for s in g) == candidates
        # Consecutive slices, none of them a query.
        assert all(np.all(np.diff(g) == 1) and max(g) < first_query for g in groups)
    assert accuracy.support_groups(first_query, 1, nearest_only=True) == [[first_query - 1]]
    assert accuracy.support_groups(first_query, 2, nearest_only=True) == [
        [first_query - 2, first_query - 1]
    ]
    with pytest.raises(ValueError, match="must divide"):
        accuracy.support_groups(first_query, 3)


def test_pooled_spread_counts_within_and_between_groups(accuracy) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 3)) + np.arange(4)[:, None]  # groups x seeds
    mean, std = accuracy.pooled(list(values.mean(1)), list(values.std(1)))
    assert mean == pytest.approx(values.mean())
    assert std == pytest.approx(values.std())
    assert accuracy.pooled([0.5], [0.0]) == (0.5, 0.0)
