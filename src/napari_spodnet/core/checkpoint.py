"""Safe SPoD-Net checkpoints: safetensors weights plus JSON metadata.

Loading never executes code: a safetensors file is a JSON header and raw tensor
bytes. Everything needed to rebuild the network (architecture, sizes, lambda, alpha,
the PSF itself, the intensity normalisation, a training summary) is in the header.
Writes are atomic (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .network import ARCHITECTURES, UnrolledISTA, build_network
from .validation import SPoDInputError

FORMAT = "napari-spodnet-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(SPoDInputError):
    """A file that is not a usable napari-spodnet checkpoint."""


def save_checkpoint(net: UnrolledISTA, path, extra_metadata: dict | None = None) -> Path:
    """Write ``net`` to ``path`` (``.safetensors`` is conventional); returns the path."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(net.config(), separators=(",", ":")),
        "metadata": json.dumps({**net.metadata, **(extra_metadata or {})}, default=str, separators=(",", ":")),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a model is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint_metadata(path) -> tuple[dict, dict]:
    """(config, metadata) from a checkpoint's header, without reading the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} is not a napari-spodnet checkpoint (not a safetensors file: {exc}).") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not a napari-spodnet checkpoint.")
    try:
        version = int(header.get("format_version", "0"))
        config, metadata = json.loads(header["config"]), json.loads(header.get("metadata", "{}"))
    except (KeyError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path.name}: damaged checkpoint header ({exc}).") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path.name} was written by a newer napari-spodnet (format {version}); please upgrade.")
    required = {"architecture", "n_channels", "n_layers", "psf_shape"}
    if not isinstance(config, dict) or not isinstance(metadata, dict) or not required <= set(config):
        raise CheckpointError(f"{path.name}: damaged checkpoint header (incomplete configuration).")
    return config, metadata


def load_checkpoint(path, device=None, n_channels: int | None = None, psf_shape=None) -> UnrolledISTA:
    """Rebuild a network from a checkpoint; never runs code from the file.

    With ``n_channels`` / ``psf_shape`` the checkpoint must match them (clear error otherwise).
    """
    path = Path(path)
    config, metadata = read_checkpoint_metadata(path)
    if config.get("architecture") not in ARCHITECTURES:
        raise CheckpointError(f"{path.name}: unknown architecture {config.get('architecture')!r}.")
    if n_channels is not None and int(config["n_channels"]) != int(n_channels):
        raise CheckpointError(f"{path.name} was trained for {config['n_channels']} polarization channels, "
                              f"the data have {n_channels}.")
    if psf_shape is not None and tuple(config["psf_shape"]) != tuple(psf_shape):
        raise CheckpointError(f"{path.name} was trained with a {tuple(config['psf_shape'])} PSF, "
                              f"the given PSF is {tuple(psf_shape)}; train a model for this PSF.")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name}: could not read the weights ({exc}).") from None
    if "psf" not in tensors:
        raise CheckpointError(f"{path.name}: the checkpoint holds no PSF.")
    try:
        net = build_network(config, tensors["psf"].numpy())
        net.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: weights do not fit the stored architecture ({exc}).") from None
    for name, value in net.state_dict().items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path.name}: parameter {name} holds NaN or infinite values.")
    net.metadata = metadata
    net.eval()
    return net.to(device) if device is not None else net
