"""Torch device discovery shared by the CLI and the device picker widget."""

from __future__ import annotations

import torch

from .validation import SPoDInputError


def available_devices() -> list[tuple[str, str]]:
    """``[(device string, human label), ...]``: CPU, each CUDA device by name, MPS where present."""
    devices = [("cpu", "CPU")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append((f"cuda:{i}", f"GPU {i}: {torch.cuda.get_device_name(i)}"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append(("mps", "Apple GPU (MPS)"))
    return devices


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` picks the first GPU when there is one, else the CPU; others are checked."""
    if device is None or device == "auto":
        return torch.device(available_devices()[min(1, len(available_devices()) - 1)][0])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SPoDInputError(f"Unknown device {device!r} ({exc}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SPoDInputError(f"Device {device!r} asked for, but no CUDA GPU is available; use 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SPoDInputError(f"Device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SPoDInputError("Device 'mps' asked for, but MPS is not available here.")
    return dev
