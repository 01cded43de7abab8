"""napari reader: SPoD observations, PSF images and files our writer wrote, from TIFF.

What a TIFF is gets decided from its metadata alone (no pixel data is read):

* a stack with an axis of ``c = 18`` polarization images
  (:func:`napari_spodnet.io.peek_polarization_axis`): an observation layer;
* a file napari-spodnet wrote (its metadata say what the layer was): restored as written;
* a small 2-D image or a 3-D stack of small images whose slice count is not a multiple of
  18: a PSF, read with :func:`napari_spodnet.io.read_psf` (a stack is averaged, as the
  CLI does), as a layer marked ``kind: "psf"``;
* anything else: the reader still answers, with a function that raises a
  :class:`~napari_spodnet.core.validation.SPoDInputError` saying why the file is not a SPoD
  stack and what to do. napari shows that message ("Original error from plugin
  napari-spodnet: ...") where it would otherwise only say that the reader refused the file.
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
#: largest side of an image the reader takes for a PSF (measured beads are a few dozen pixels)
MAX_PSF_SIZE = 256


def _layer_meta_kind(path) -> dict:
    """Our metadata in a file written by :func:`napari_spodnet._writer.write_spod_tiff` ({} otherwise)."""
    try:
        meta = spod_io.read_stack_metadata(path)
    except Exception:  # probing arbitrary files: any failure means "not ours"
        return {}
    return meta if isinstance(meta, dict) and meta.get("kind") else {}


def _peek_shape(path) -> tuple[tuple, str] | None:
    """(shape, axes) of the first series from the TIFF header, None if unreadable."""
    import tifffile

    try:
        with tifffile.TiffFile(os.fspath(path)) as tf:
            if not tf.series:
                return None
            series = tf.series[0]
            return tuple(int(v) for v in series.shape), str(series.axes)
    except Exception:  # probing arbitrary files: any failure means "not readable"
        return None


def looks_like_psf(shape: tuple, axes: str = "") -> bool:
    """A 2-D image, or a 3-D stack of them (not a multiple of 18 slices), no side above MAX_PSF_SIZE."""
    shape = tuple(s for s in shape if s != 1)
    if axes.endswith("S") or len(shape) not in (2, 3):
        return False
    if max(shape[-2:]) > MAX_PSF_SIZE:
        return False
    return len(shape) == 2 or shape[0] % DEFAULT_CHANNELS != 0


def classify(path) -> str | None:
    """"observation", "restore", "psf" or "other" for a readable TIFF; None when it is not one."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = Path(os.fspath(path))
    if p.suffix.lower() not in _EXTENSIONS or not p.is_file():
        return None
    if _layer_meta_kind(p).get("kind") in _RESTORED_KINDS:
        return "restore"
    if spod_io.peek_polarization_axis(p, DEFAULT_CHANNELS) is not None:
        return "observation"
    peek = _peek_shape(p)
    if peek is None:
        return "other"
    return "psf" if looks_like_psf(*peek) else "other"


def napari_get_reader(path):
    """npe2 reader hook: a reader function for any TIFF (one or several), None for other paths."""
    paths = path if isinstance(path, (list, tuple)) else [path]
    kinds = [classify(p) for p in paths]
    if not paths or any(kind is None for kind in kinds):
        return None
    return read_spod_tiff


def refusal(path) -> SPoDInputError:
    """The error for a TIFF that is neither a SPoD stack nor a PSF: what it holds and what to do."""
    p = Path(os.fspath(path))
    peek = _peek_shape(p)
    if peek is None:
        return SPoDInputError(f"{p.name} could not be read as a TIFF (damaged or not a TIFF file).")
    shape, axes = peek
    n = DEFAULT_CHANNELS
    try:  # the io module's own explanation of why no polarization axis was found
        spod_io.find_polarization_axis(shape, axes, n)
        reason = ""
    except SPoDInputError as exc:
        reason = f" {exc}"
    hint = ""
    if len(shape) == 3 and shape[0] % n == 0 and shape[0] > n:
        hint = (f" It has {shape[0]} pages: if these are {shape[0] // n} time points of {n} polarization images, "
                "open it with napari's own reader (napari builtins) and use 'Split into time points' in the "
                "SPoD data widget.")
    return SPoDInputError(f"{p.name} (shape {shape}, axes {axes}) is not a SPoD stack of {n} polarization images "
                          f"nor a PSF image.{reason}{hint}")


def read_spod_tiff(path) -> list[tuple]:
    """Read one or several SPoD TIFFs into napari layer data tuples."""
    from .widgets._layers import METADATA_KEY, display_range, jsonable, spatial_units

    paths = path if isinstance(path, (list, tuple)) else [path]
    layers = []
    for p in paths:
        p = Path(os.fspath(p))
        kind = classify(p)
        if kind == "other":
            raise refusal(p)
        if kind == "psf":
            layers.append(_read_psf_layer(p))
            continue
        ours = _layer_meta_kind(p)
        if kind == "restore":
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
            kwargs["units"] = spatial_units(data.ndim, size)
            info["pixel_size"] = float(size)
            kwargs["metadata"][METADATA_KEY] = jsonable(info)
        layers.append((data, kwargs, "image"))
    return layers


def _restore_written(p: Path, ours: dict) -> tuple:
    """A layer our writer saved: same data layout, kind, translate and scale as before."""
    import tifffile

    from .widgets._layers import METADATA_KEY, display_range

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


def _read_psf_layer(p: Path) -> tuple:
    """A PSF image (or stack of PSFs, averaged) as a layer marked ``kind: "psf"``, normalised to sum 1."""
    from .widgets._layers import METADATA_KEY

    shape, _axes = _peek_shape(p) or ((), "")
    psf = spod_io.read_psf(p)
    info = {"kind": "psf", "path": str(p)}
    if len([s for s in shape if s != 1]) == 3:
        info["averaged_slices"] = int([s for s in shape if s != 1][0])
    name = p.stem + (f" (mean of {info['averaged_slices']})" if "averaged_slices" in info else "")
    return psf, {"name": name, "colormap": "magma", "metadata": {METADATA_KEY: info}}, "image"
