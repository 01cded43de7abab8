"""Safe SPoD-Net checkpoints: safetensors weights plus JSON metadata.

Loading never executes code: a safetensors file is a JSON header and raw tensor
bytes. Everything needed to rebuild the network (architecture, sizes, lambda, alpha,
the PSF itself, the intensity normalisation, a training summary) is in the header.
Writes are atomic (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .network import ARCHITECTURES, PARAMETERIZATIONS, UnrolledISTA, build_network
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


_MAX_HEADER_BYTES = 64 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_MAX_UNKNOWN_INT = 10**6


def _check_path(path) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give the .safetensors file.")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} not found.")
    return path


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header and the size of the data section, bounded by the file size."""
    size = path.stat().st_size
    not_ours = f"{path.name} is not a napari-spodnet checkpoint (not a safetensors file"
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{not_ours}: only {size} bytes).")
            n = int.from_bytes(head, "little")
            if n < 2 or n > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{not_ours}: its header length {n} does not fit the {size}-byte file).")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"Cannot read {path}: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{not_ours}: damaged header, {type(exc).__name__}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{not_ours}: the header is not a JSON object).")
    data_size = size - 8 - n
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path.name}: damaged checkpoint header (metadata are not strings).")
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: damaged tensor entry {name!r} ({exc!r}).") from None
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has type {dtype!r}; a checkpoint holds floats.")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 2**31 for d in shape) or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
            raise CheckpointError(f"{path.name}: tensor {name!r} has an invalid shape or offsets.")
        nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise CheckpointError(f"{path.name}: tensor {name!r} ({shape}) does not fit the file; it is truncated "
                                  "or damaged.")
        total += nbytes
    if total > data_size:
        raise CheckpointError(f"{path.name}: the tensors declare more bytes than the file holds.")
    return header, data_size


def _number(config, key, path, *, integer=False, low=None, high=None, low_open=False, required=True):
    value = config.get(key)
    if value is None and not required:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and integer:
        ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if ok:
        ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
            (high is None or value <= high)
    if not ok:
        rng = f"{'(' if low_open else '['}{low}, {high}]" if low is not None else ""
        raise CheckpointError(f"{path.name}: damaged checkpoint header: {key} = {value!r} is not "
                              f"{'a whole number' if integer else 'a finite number'}{' in ' + rng if rng else ''}.")
    return int(value) if integer else float(value)


def _validate_config(config: dict, metadata: dict, path: Path) -> None:
    """Every known configuration value finite and in range; unknown numbers finite and bounded."""
    if config.get("architecture") not in ARCHITECTURES:
        raise CheckpointError(f"{path.name}: unknown architecture {config.get('architecture')!r}.")
    c = _number(config, "n_channels", path, integer=True, low=1, high=10_000)
    _number(config, "n_layers", path, integer=True, low=1, high=1000)
    _number(config, "lam", path, low=0, high=1e30, required=False)
    _number(config, "alpha", path, low=0, high=1, required=False)
    lip = _number(config, "lipschitz", path, low=1e-30, high=1e30, required=False)
    lam = config.get("lam") or 0.0
    if lip is not None and lam / lip > 1e30:
        raise CheckpointError(f"{path.name}: damaged checkpoint header: lam / lipschitz overflows.")
    shape = config.get("psf_shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 512 for d in shape):
        raise CheckpointError(f"{path.name}: damaged checkpoint header: psf_shape = {shape!r} is not two sizes "
                              "in 1..512.")
    if c * (16 + shape[0] - 1) * (16 + shape[1] - 1) > 2**25:
        raise CheckpointError(f"{path.name}: {c} channels with a {tuple(shape)} PSF is implausibly large.")
    for key, choices in (("threshold", ("lst", "nst")), ("orientation", ("harmonic", "full"))):
        if key in config and config[key] not in choices:
            raise CheckpointError(f"{path.name}: damaged checkpoint header: {key} = {config[key]!r}.")
    if "n_harmonics" in config:
        _number(config, "n_harmonics", path, integer=True, low=0, high=max(0, (c - 1) // 2))
    for key in ("momentum", "untied", "preconditioned", "noise_adaptive"):
        if key in config and not isinstance(config[key], bool):
            raise CheckpointError(f"{path.name}: damaged checkpoint header: {key} = {config[key]!r}.")
    if "parameterization" in config and config["parameterization"] not in PARAMETERIZATIONS:
        raise CheckpointError(f"{path.name}: damaged checkpoint header: parameterization = "
                              f"{config['parameterization']!r}.")
    if config.get("preconditioned") and (config.get("architecture") != "spodnet"
                                         or config.get("orientation", "harmonic") != "harmonic"):
        raise CheckpointError(f"{path.name}: damaged checkpoint header: a preconditioned network must be a "
                              "harmonic SPoD-Net.")
    known = {"architecture", "n_channels", "n_layers", "lam", "alpha", "lipschitz", "psf_shape", "threshold",
             "orientation", "n_harmonics", "momentum", "untied", "preconditioned", "parameterization",
             "noise_adaptive"}
    for key, value in config.items():
        if key not in known:  # parameters added by newer code: sane numbers only
            _check_unknown(value, f"{path.name}: damaged checkpoint header: {key}")
    norm = metadata.get("normalization")
    if norm is not None:
        from .preprocess import NormalizationSettings

        try:
            NormalizationSettings.from_dict(norm)
        except SPoDInputError as exc:
            raise CheckpointError(f"{path.name}: damaged checkpoint metadata: {exc}") from None


def _check_unknown(value, what: str, depth: int = 0) -> None:
    if depth > 8:
        raise CheckpointError(f"{what} is nested too deeply.")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > _MAX_UNKNOWN_INT:
            raise CheckpointError(f"{what} = {value} is implausibly large.")
        return
    if isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e30:
            raise CheckpointError(f"{what} = {value!r} is not a finite number.")
        return
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        _check_unknown(item, what, depth + 1)


def read_checkpoint_metadata(path) -> tuple[dict, dict]:
    """(config, metadata) from a checkpoint's header, without reading the weights.

    Raises :class:`CheckpointError` for anything but a well-formed napari-spodnet header
    whose configuration values are finite and in range.
    """
    path = _check_path(path)
    header, _ = _read_header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name} is a safetensors file but not a napari-spodnet checkpoint.")
    try:
        version = int(meta.get("format_version", "0"))
        config, metadata = json.loads(meta["config"]), json.loads(meta.get("metadata", "{}"))
    except (KeyError, ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path.name}: damaged checkpoint header ({type(exc).__name__}: {exc}).") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path.name} was written by a newer napari-spodnet (format {version}); please upgrade.")
    required = {"architecture", "n_channels", "n_layers", "psf_shape"}
    if not isinstance(config, dict) or not isinstance(metadata, dict) or not required <= set(config):
        raise CheckpointError(f"{path.name}: damaged checkpoint header (incomplete configuration).")
    _validate_config(config, metadata, path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    psf = tensors.get("psf")
    if psf is None:
        raise CheckpointError(f"{path.name}: the checkpoint holds no PSF.")
    if list(psf["shape"]) != list(config["psf_shape"]):
        raise CheckpointError(f"{path.name}: the stored PSF {psf['shape']} does not match psf_shape "
                              f"{config['psf_shape']}; the file is damaged.")
    layer_ids = {int(k.split(".")[1]) for k in tensors if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if layer_ids != set(range(int(config["n_layers"]))):
        raise CheckpointError(f"{path.name}: weights do not fit the stored architecture (n_layers = "
                              f"{config['n_layers']}, the file holds {len(layer_ids)} layers).")
    return config, metadata


def _probe(net: UnrolledISTA, path: Path) -> None:
    """Run the rebuilt network on a small observation; a usable model gives a finite result."""
    c = net.n_channels
    rows = torch.arange(16, dtype=torch.float32)
    pattern = (rows[:, None] + rows[None, :]).remainder(4) / 2  # values 0..1.5, some structure
    y = torch.ones((c, 16, 16)) * 0.25 + pattern * (torch.arange(c, dtype=torch.float32)[:, None, None] % 3 == 0)
    try:
        out = net.recover(y.to(dtype=net.psf.dtype))
    except (RuntimeError, ValueError, SPoDInputError) as exc:
        raise CheckpointError(f"{path.name}: the network fails on a test observation "
                              f"({type(exc).__name__}: {exc or 'no message'}).") from None
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(f"{path.name}: the network gives NaN or infinite values on a test observation; "
                              "the weights are damaged.")


def load_checkpoint(path, device=None, n_channels: int | None = None, psf_shape=None) -> UnrolledISTA:
    """Rebuild a network from a checkpoint; never runs code from the file.

    The header is validated before anything is allocated, every weight must be finite, and
    the rebuilt network must give a finite result on a small test observation.
    With ``n_channels`` / ``psf_shape`` the checkpoint must match them (clear error otherwise).
    """
    path = _check_path(path)
    config, metadata = read_checkpoint_metadata(path)
    if n_channels is not None and int(config["n_channels"]) != int(n_channels):
        raise CheckpointError(f"{path.name} was trained for {config['n_channels']} polarization channels, "
                              f"the data have {n_channels}.")
    if psf_shape is not None and tuple(config["psf_shape"]) != tuple(psf_shape):
        raise CheckpointError(f"{path.name} was trained with a {tuple(config['psf_shape'])} PSF, "
                              f"the given PSF is {tuple(psf_shape)}; train a model for this PSF.")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise CheckpointError(f"{path.name}: could not read the weights ({exc}).") from None
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path.name}: parameter {name} holds NaN or infinite values.")
    try:
        net = build_network(config, tensors["psf"].float().numpy())
    except SPoDInputError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: damaged checkpoint header ({exc}).") from None
    try:
        net.load_state_dict(tensors, strict=True)
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path.name}: weights do not fit the stored architecture ({exc}).") from None
    for name, value in net.state_dict().items():
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path.name}: parameter {name} holds NaN or infinite values.")
    net.metadata = metadata
    net.eval()
    _probe(net, path)
    return net.to(device) if device is not None else net
