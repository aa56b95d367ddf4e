"""Named model builders (as in segment-anything's ``sam_model_registry``)."""

from __future__ import annotations

from collections.abc import Callable

from .guided_net import GuidedNet, ModelConfig

DEFAULT_MODEL = "revolver-s"

_BUILDERS: dict[str, Callable[[], GuidedNet]] = {
    "revolver-s": lambda: GuidedNet(
        ModelConfig(key="revolver-s", local_prior=True, wide_context=True)
    ),
    # A tiny variant for tests and quick experiments (about 30k parameters).
    "revolver-tiny": lambda: GuidedNet(
        ModelConfig(
            key="revolver-tiny",
            widths=(8, 12, 16, 24, 32),
            coarse_channels=16,
            fine_channels=8,
            head_width=16,
            head_fine_width=8,
            local_prior=True,
            wide_context=True,
        )
    ),
}


def register_model(key: str, builder: Callable[[], GuidedNet]) -> None:
    """Add a named builder (for example one with a torchvision backbone)."""
    if key in _BUILDERS:
        raise ValueError(f"model {key!r} is already registered")
    _BUILDERS[key] = builder


def available_models() -> list[str]:
    """Keys accepted by :func:`build_model`."""
    from . import torchvision_encoder  # noqa: F401  (registers its builders lazily)

    return sorted(_BUILDERS)


def build_model(key: str = DEFAULT_MODEL) -> GuidedNet:
    """Build an untrained model by name.

    Raises
    ------
    ValueError
        If ``key`` is unknown; the message lists the known keys.
    """
    if key not in _BUILDERS and key.startswith("tv-"):
        from . import torchvision_encoder  # noqa: F401

    if key not in _BUILDERS:
        raise ValueError(f"unknown model {key!r}; expected one of {available_models()}")
    return _BUILDERS[key]()


def build_from_config(config: ModelConfig) -> GuidedNet:
    """Build the architecture a checkpoint describes."""
    if config.key.startswith("tv-"):
        return build_model(config.key)
    return GuidedNet(config)
