"""Named model builders (as in segment-anything's ``sam_model_registry``).

The registry is a leaf: it imports only the network itself. Builders that need an optional
package (the torchvision backbones) live in their own module, which registers them with
:func:`register_model` when it is imported; the registry knows their names and that module, and
imports it the first time one of those names is built. torchvision itself is imported only when
such a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .guided_net import GuidedNet, ModelConfig

__all__ = [
    "DEFAULT_MODEL",
    "available_models",
    "build_from_config",
    "build_model",
    "register_model",
]

DEFAULT_MODEL = "revolver-s"

_BUILDERS: dict[str, Callable[[], GuidedNet]] = {
    "revolver-s": lambda: GuidedNet(
        ModelConfig(key="revolver-s", local_prior=True, wide_context=True, task_fit=True)
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
            task_fit=True,
        )
    ),
}

#: Keys whose builders are registered by importing a module of this package (relative name).
_LAZY: dict[str, str] = {
    "tv-vgg16": ".torchvision_encoder",
    "tv-resnet18": ".torchvision_encoder",
}


def register_model(key: str, builder: Callable[[], GuidedNet]) -> None:
    """Add a named builder (for example one with a torchvision backbone).

    Parameters
    ----------
    key : str
        Name accepted by :func:`build_model` afterwards.
    builder : callable
        ``builder()`` returns a new, untrained :class:`GuidedNet`.

    Raises
    ------
    ValueError
        If ``key`` already has a builder.
    """
    if key in _BUILDERS:
        raise ValueError(f"model {key!r} is already registered")
    _BUILDERS[key] = builder


def available_models() -> list[str]:
    """List the keys :func:`build_model` accepts.

    Returns
    -------
    list of str
        Sorted keys, including those whose builders need an optional package.
    """
    return sorted(set(_BUILDERS) | set(_LAZY))


def _builder(key: str) -> Callable[[], GuidedNet]:
    """Return the builder of ``key``, importing the module that registers it if need be."""
    if key not in _BUILDERS and key in _LAZY:
        importlib.import_module(_LAZY[key], __package__)
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {key!r}; expected one of {available_models()}")
    return _BUILDERS[key]


def build_model(key: str = DEFAULT_MODEL) -> GuidedNet:
    """Build an untrained model by name.

    Parameters
    ----------
    key : str
        One of :func:`available_models`.

    Returns
    -------
    GuidedNet
        A new model in training mode, with random weights.

    Raises
    ------
    ValueError
        If ``key`` is unknown; the message lists the known keys.
    ImportError
        If the model needs an optional package that does not import (``tv-*`` without
        torchvision: ``pip install napari-revolver[torchvision]``).
    """
    return _builder(key)()


def build_from_config(config: ModelConfig) -> GuidedNet:
    """Build the architecture a checkpoint describes.

    Parameters
    ----------
    config : ModelConfig
        The configuration stored with the checkpoint.

    Returns
    -------
    GuidedNet
        An untrained model whose parameters match the checkpoint's. Models with a replaced
        encoder (``tv-*``) come from their named builder, since ``config`` does not describe
        the encoder.
    """
    if config.key.startswith("tv-"):
        return build_model(config.key)
    return GuidedNet(config)
