"""The procedural check of the click fit runs end to end (tiny untrained model, two scenes)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def scenes(benchmark_module):
    with benchmark_module("click_fit_scenes") as module:
        yield module


def test_scenes_are_reproducible_and_labelled(scenes) -> None:
    image, semantic, membrane = scenes.scene(3)
    again, same, _ = scenes.scene(3)
    assert image.shape == semantic.shape == scenes.SHAPE
    assert (image == again).all() and (semantic == same).all()
    assert membrane == 0 or membrane == semantic.max()


def test_every_task_is_scored_with_and_without_the_fit(scenes, predictor) -> None:
    rows = scenes.run(predictor, range(0, 2), [5])
    assert rows and all(r.points == 5 for r in rows)
    for r in rows:
        assert 0.0 <= r.network <= 1.0 and 0.0 <= r.gated <= 1.0
        assert r.fitted or r.gated == r.network
    text = scenes.summary(rows, [5])
    assert text.startswith(" 5 + 5 : ") and f"{len(rows)} tasks" in text
