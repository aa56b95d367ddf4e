"""Choice of the torch device, shared by inference and training."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str | torch.device) -> torch.device:
    """Return the torch device for ``name``.

    Parameters
    ----------
    name : str or torch.device
        ``"auto"`` picks CUDA, then MPS, then the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
        ``"mps"`` ask for that device.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        An unknown name, or an explicit device that torch cannot use here.
    """
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', 'mps'; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but torch sees no CUDA GPU")
    if name == "mps" and not _mps_available():
        raise ValueError("device='mps' was requested but torch's MPS backend is not available")
    return torch.device(name)
