"""Shared fixtures for the napari-revolver test suite.

Everything here is small, seeded and synthetic: the tests run on a CPU next to other work.
Slow tests are marked ``@pytest.mark.slow`` and run only with ``--runslow``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from napari_revolver.core.model.guided_net import GuidedNet
from napari_revolver.core.model.registry import build_model
from napari_revolver.core.predictor import RevolverPredictor
from napari_revolver.core.weights import save_weights

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def _benchmark_module(script: str) -> Iterator[ModuleType]:
    """Import ``benchmarks/<script>.py`` for a test, and forget it (and what it imported) after."""
    before = set(sys.modules)
    path = BENCHMARKS / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        # The scripts import their siblings (``accuracy``) from the benchmarks folder.
        for name in set(sys.modules) - before:
            where = getattr(sys.modules.get(name), "__file__", None) or ""
            if name == spec.name or where.startswith(str(BENCHMARKS)):
                sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def benchmark_module() -> Callable[[str], Any]:
    """Factory: ``with benchmark_module("accuracy") as module:`` imports a benchmark script."""
    return _benchmark_module


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def make_tiny_model(seed: int = 0) -> GuidedNet:
    """An untrained ``revolver-tiny`` with deterministic parameters."""
    torch.manual_seed(seed)
    return build_model("revolver-tiny")


def blob_image(shape: tuple[int, ...] = (48, 48), seed: int = 0, n_blobs: int = 3) -> np.ndarray:
    """Bright discs on a noisy background, float32; every leading index gets the same discs."""
    rng = np.random.default_rng(seed)
    h, w = shape[-2:]
    yy, xx = np.mgrid[0:h, 0:w]
    plane = np.zeros((h, w), np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        r = rng.uniform(0.08, 0.15) * min(h, w)
        plane[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1.0
    out = np.broadcast_to(plane, shape).astype(np.float32)
    return out + 0.1 * rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_model() -> GuidedNet:
    """A fresh, unfused, seeded ``revolver-tiny``."""
    return make_tiny_model(0)


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    """A safetensors checkpoint of the seeded tiny model (built here, so never a fused one)."""
    return save_weights(make_tiny_model(0), tmp_path / "tiny.safetensors")


@pytest.fixture
def predictor(tiny_model: GuidedNet) -> RevolverPredictor:
    return RevolverPredictor(model=tiny_model, device="cpu")


@pytest.fixture
def make_blobs() -> Callable[..., np.ndarray]:
    """Factory: ``make_blobs(shape, seed=0, n_blobs=3)`` -> float32 image with bright discs."""
    return blob_image


@pytest.fixture
def make_tiny() -> Callable[[int], GuidedNet]:
    """Factory: ``make_tiny(seed)`` -> a fresh unfused tiny model."""
    return make_tiny_model


@pytest.fixture
def count_encoder_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[RevolverPredictor], list[int]]:
    """``count_encoder_calls(predictor)`` records the batch size of each later encoder call."""

    def start(predictor: RevolverPredictor) -> list[int]:
        calls: list[int] = []
        original = predictor._encode

        def counting(images):
            calls.append(len(images))
            return original(images)

        monkeypatch.setattr(predictor, "_encode", counting)
        return calls

    return start
