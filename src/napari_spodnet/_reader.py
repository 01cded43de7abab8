"""napari reader: SPoD observations (and files our writer wrote) from TIFF.

The reader claims a ``.tif`` / ``.tiff`` file only when it holds a SPoD stack (an axis of
``c = 18`` polarization images, found from the TIFF metadata alone by
:func:`napari_spodnet.io.peek_polarization_axis`) or when napari-spodnet wrote it (its
metadata say what the layer was). Any other TIFF gets ``None`` and opens with napari's
own reader; a small 2-D PSF image therefore opens as an ordinary image layer, which the
PSF pickers accept.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import io as spod_io
from .core.validation import DEFAULT_CHANNELS, SPoDInputError

_EXTENSIONS = (".tif", ".tiff")
#: kinds whose files are restored as written (not re-read as observations)
_RESTORED_KINDS = ("recovered", "intensity", "orientation", "truth", "psf", "mean", "difference")


def _layer_meta_kind(path) -> dict:
    """Our metadata in a file written by :func:`napari_spodnet._writer.write_spod_tiff` ({} otherwise)."""
    try:
        meta = spod_io.read_stack_metadata(path)
    except Exception:  # probing arbitrary files: any failure means "not ours"
        return {}
    return meta if isinstance(meta, dict) and meta.get("kind") else {}


def _claims(path) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(os.fspath(path))
    if p.suffix.lower() not in _EXTENSIONS or not p.is_file():
        return False
    if spod_io.peek_polarization_axis(p, DEFAULT_CHANNELS) is not None:
        return True
    return _layer_meta_kind(p).get("kind") in _RESTORED_KINDS


def napari_get_reader(path):
    """npe2 reader hook: a reader function for SPoD TIFFs, None for anything else."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    if not paths or not all(_claims(p) for p in paths):
        return None
    return read_spod_tiff


def read_spod_tiff(path) -> list[tuple]:
    """Read one or several SPoD TIFFs into napari layer data tuples."""
    from .widgets._shared import METADATA_KEY, display_range, jsonable

    paths = path if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        p = Path(os.fspath(p))
        ours = _layer_meta_kind(p)
        if ours.get("kind") in _RESTORED_KINDS:
            layers.append(_restore_written(p, ours))
            continue
        big = p.stat().st_size > 512 * 2**20
        obs = spod_io.read_observation(p, memmap=big)
        data = obs.data
        series = obs.is_time_series
        file_meta = obs.metadata
        info = {
            "kind": ours.get("kind", "observation") if ours.get("kind") in ("observation", "preprocessed")
            else "observation",
            "path": str(p),
            "axes": obs.axes,
            "source_axes": obs.source_axes,
            "polarization_axis": file_meta.get("polarization_axis"),
            "dtype": file_meta.get("dtype"),
        }
        kwargs = {
            "name": p.stem,
            "metadata": {METADATA_KEY: jsonable(info), "file": jsonable({k: v for k, v in file_meta.items()
                                                                          if k != spod_io.METADATA_KEY})},
            "axis_labels": ("t", "polarization", "y", "x") if series else ("polarization", "y", "x"),
            "contrast_limits": display_range(data[0] if series else data),
        }
        size = file_meta.get("pixel_size")
        if size:
            kwargs["scale"] = (1.0,) * (data.ndim - 2) + (float(size), float(size))
            info["pixel_size"] = float(size)
        layers.append((data, kwargs, "image"))
    return layers


def _restore_written(p: Path, ours: dict) -> tuple:
    """A layer our writer saved: same data layout, kind, translate and scale as before."""
    import tifffile

    from .widgets._shared import METADATA_KEY, display_range

    try:
        data = np.asarray(tifffile.imread(p))
    except Exception as exc:
        raise SPoDInputError(f"Cannot read {p.name}: {exc}") from exc
    rgb = bool(ours.get("rgb"))
    shape = tuple(int(s) for s in ours.get("shape") or ())
    if rgb and data.ndim >= 3:
        data = np.moveaxis(data, -3, -1)
    if shape and data.shape != shape and data.size == int(np.prod(shape)):
        data = data.reshape(shape)  # singleton axes ImageJ added or dropped
    kwargs = {"name": ours.get("layer_name") or p.stem, "metadata": {METADATA_KEY: dict(ours)}, "rgb": rgb}
    layer_ndim = data.ndim - (1 if rgb else 0)
    for key in ("translate", "scale"):
        value = ours.get(key)
        if isinstance(value, (list, tuple)) and len(value) == layer_ndim:
            kwargs[key] = tuple(float(v) for v in value)
    if not rgb:
        kwargs["contrast_limits"] = display_range(data)
    return data, kwargs, "image"
