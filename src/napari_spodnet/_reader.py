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

import math
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
    _share_pixel_size(layers, _target_viewer())
    return layers


def _target_viewer():
    """The viewer napari opens the files into (``napari.current_viewer()``); None headless or off the main thread."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import napari

        return napari.current_viewer()
    except Exception:  # napari absent or without a viewer: the reader is used on its own
        return None


def _share_pixel_size(layers: list, viewer) -> None:
    """Give PSFs the observation's pixel size (µm) before napari adds the layers.

    A PSF file carries no pixel size, an observation usually does; napari compares the units of
    all layers as soon as one is added ("Inconsistent units across layers; units will not be used
    for rendering." for a PSF in pixels beside an observation in µm), before any widget can react
    to the new layer. So a PSF read here at scale 1 takes the pixel size of the newest observation
    read with it or, else, of the newest observation in ``viewer``; and an observation read here
    puts the PSFs already in ``viewer`` at its pixel size (what the widgets'
    :func:`~napari_spodnet.widgets._layers.match_marked_psfs` would do once it is in).
    """
    from .widgets._layers import METADATA_KEY, newest_observation, place_psf, psf_placement, spod_kind

    def kind(kwargs):
        return (kwargs.get("metadata") or {}).get(METADATA_KEY, {}).get("kind")

    read = [(kwargs["scale"][-2:], kwargs["metadata"][METADATA_KEY]["pixel_size"])
            for _data, kwargs, _type in layers
            if kind(kwargs) == "observation" and kwargs["metadata"][METADATA_KEY].get("pixel_size")]
    source = read[-1] if read else None
    try:
        if source is None and viewer is not None:
            observation = newest_observation(viewer)
            if observation is not None:
                source = (tuple(observation.scale[-2:]), observation.metadata[METADATA_KEY]["pixel_size"])
        if read and viewer is not None:
            for layer in viewer.layers:
                if spod_kind(layer) == "psf":
                    place_psf(layer, *read[-1])
    except Exception:  # a courtesy: the widgets match PSFs to observations too
        pass
    if source is None:
        return
    for data, kwargs, _type in layers:
        if kind(kwargs) == "psf" and "scale" not in kwargs and not kwargs.get("rgb"):
            place = psf_placement(np.ndim(data), *source)
            if place is not None:
                kwargs.update(place)


#: bounds on the free-form part of restored metadata (method, lam, model, ...): a hostile file must
#: not hand napari a deeply nested or huge structure to copy, compare and show
_MAX_META_DEPTH = 4
_MAX_META_ITEMS = 256
_MAX_META_TEXT = 4096
#: fields the reader turns into layer properties; each is checked before use (see _restore_fields)
_PLACEMENT_FIELDS = ("translate", "scale")
_TYPED_FIELDS = ("rgb", "shape", "layer_name", *_PLACEMENT_FIELDS, "pixel_size", "contrast_limits", "colormap")


def _finite_number(value) -> float | None:
    """``value`` as a finite float when it is a real number (not a bool, a string or a container)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if np.isfinite(number) else None


def _finite_vector(value, length: int, positive: bool = False) -> tuple[float, ...] | None:
    """A list of ``length`` finite numbers (all > 0 with ``positive``) as a tuple, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != length:
        return None
    numbers = tuple(_finite_number(v) for v in value)
    if any(v is None for v in numbers) or (positive and any(v <= 0 for v in numbers)):
        return None
    return numbers


def _bounded(value, depth: int = 0):
    """Free-form metadata cut down to plain JSON scalars, short strings and small shallow containers.

    Returns ``(value, ok)``; ``ok`` is False when something had to be dropped."""
    if value is None or isinstance(value, (bool, int, float)):
        return value, True
    if isinstance(value, str):
        return (value, True) if len(value) <= _MAX_META_TEXT else (value[:_MAX_META_TEXT], False)
    if depth >= _MAX_META_DEPTH or not isinstance(value, (list, dict)) or len(value) > _MAX_META_ITEMS:
        return None, False
    ok = True
    if isinstance(value, list):
        items = []
        for item in value:
            cut, item_ok = _bounded(item, depth + 1)
            items.append(cut)
            ok &= item_ok
        return items, ok
    out = {}
    for key, item in value.items():
        cut, item_ok = _bounded(item, depth + 1)
        out[str(key)[:_MAX_META_TEXT]] = cut
        ok &= item_ok
    return out, ok


def _colormap_name(value) -> str | None:
    """A colormap name napari knows, else None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        from napari.utils.colormaps import AVAILABLE_COLORMAPS
    except Exception:  # napari absent (the reader is used headless): no colormap
        return None
    return value if value in AVAILABLE_COLORMAPS else None


def _restore_fields(ours: dict, data: np.ndarray, file_pixel_size: float | None, name: str):
    """Check the metadata our writer stored against the pixels actually read.

    Returns ``(data, kwargs, metadata, ignored)``: the data in the layer's layout, napari
    layer kwargs built only from fields of the right type and finite value, the bounded
    metadata the layer keeps (each field of ``_TYPED_FIELDS`` only with its checked value),
    and the names of fields that were ignored because they were damaged (wrong type, NaN /
    infinite, wrong length, not matching the pixels, too large).
    """
    ignored = []
    meta = {"kind": ours.get("kind")}
    for key in list(ours)[:_MAX_META_ITEMS]:
        if key in _TYPED_FIELDS or key in meta:
            continue
        value, kept = _bounded(ours[key], depth=1)
        meta[str(key)[:_MAX_META_TEXT]] = value
        if not kept:
            ignored.append(f"{str(key)[:40]} (too large or too deeply nested)")
    if len(ours) > _MAX_META_ITEMS:
        ignored.append(f"{len(ours) - _MAX_META_ITEMS} fields beyond the first {_MAX_META_ITEMS}")
    checked = {}  # typed fields that passed their check, as they go back into the metadata

    def refuse(key):
        if key in ours:
            ignored.append(key)

    rgb = ours.get("rgb", False)
    if not isinstance(rgb, bool) or (rgb and not (data.ndim >= 3 and data.shape[-3] in (3, 4))):
        refuse("rgb")  # not a flag, or the pixels are not a colour image: show them as stored
        rgb = False
    checked["rgb"] = rgb
    if rgb:
        data = np.moveaxis(data, -3, -1)
    shape = ours.get("shape")
    if shape is not None:
        dims = _finite_vector(shape, len(shape), positive=True) if isinstance(shape, list) and len(shape) <= 6 else None
        target = tuple(int(d) for d in dims) if dims is not None and all(d == int(d) for d in dims) else None
        if target is not None and data.shape != target and data.size == math.prod(target):
            data = data.reshape(target)  # singleton axes ImageJ added or dropped
        if target is None or data.shape != target:
            refuse("shape")
        else:
            checked["shape"] = list(target)

    layer_name = ours.get("layer_name")
    if isinstance(layer_name, str) and layer_name.strip() and len(layer_name) <= 256:
        checked["layer_name"] = layer_name
    elif layer_name is not None:
        refuse("layer_name")
    kwargs = {"name": checked.get("layer_name") or name, "rgb": rgb}

    layer_ndim = data.ndim - (1 if rgb else 0)
    for key in _PLACEMENT_FIELDS:
        value = ours.get(key)
        if value is None:
            continue
        vector = _finite_vector(value, layer_ndim, positive=(key == "scale"))
        if vector is None:
            refuse(key)
        else:
            kwargs[key], checked[key] = vector, list(vector)

    pixel_size = ours.get("pixel_size")
    if pixel_size is not None:
        pixel_size = _finite_number(pixel_size)
        if pixel_size is None or pixel_size <= 0:
            refuse("pixel_size")
            pixel_size = None
    pixel_size = pixel_size or file_pixel_size
    if pixel_size:
        checked["pixel_size"] = float(pixel_size)
        if "scale" in kwargs:
            from .widgets._layers import spatial_units

            kwargs["units"] = spatial_units(layer_ndim, pixel_size)

    limits = ours.get("contrast_limits")
    if limits is not None:
        pair = _finite_vector(limits, 2)
        if rgb or pair is None or not pair[1] > pair[0]:
            refuse("contrast_limits")
        else:
            kwargs["contrast_limits"], checked["contrast_limits"] = pair, list(pair)
    colormap = ours.get("colormap")
    if colormap is not None:
        if rgb or not isinstance(colormap, str) or len(colormap) > 64:
            refuse("colormap")
        else:
            checked["colormap"] = colormap
            if _colormap_name(colormap) is not None:  # a custom colormap of another session: not restored
                kwargs["colormap"] = colormap
    meta.update(checked)
    return data, kwargs, meta, ignored


def _restore_written(p: Path, ours: dict) -> tuple:
    """A layer our writer saved: same data layout, kind, translate, scale, contrast and colormap as before.

    The pixels go through io's vetted open (:func:`napari_spodnet.io._first_series`: declared
    sizes against the file, truncation, pixel type), exactly as observations and PSFs do, and
    every metadata field that becomes a layer property is type-checked first: a damaged or
    hostile field is ignored (named in a warning napari shows), never passed on to napari.
    """
    import warnings

    from .widgets._layers import METADATA_KEY, display_range

    tf = spod_io._open_tiff(p, series=False)
    try:
        series = spod_io._first_series(tf, p)
        try:
            data = np.asarray(series.asarray())
        except Exception as exc:
            raise spod_io._file_error(
                p, f"the pixel data could not be decoded ({type(exc).__name__}: {exc}).") from exc
        file_pixel_size = spod_io._pixel_size(tf)
    finally:
        tf.close()
    if tuple(data.shape) != tuple(int(s) for s in series.shape) or data.dtype.kind not in "uif":
        raise spod_io._file_error(p, f"the decoded pixels {data.shape} do not match the declared shape "
                                     f"{tuple(series.shape)}.")
    data, kwargs, meta, ignored = _restore_fields(ours, data, file_pixel_size, p.stem)
    if ignored:
        names = ", ".join(dict.fromkeys(ignored))
        meta["ignored_metadata"] = list(dict.fromkeys(ignored))
        warnings.warn(f"{p.name}: damaged napari-spodnet metadata ignored ({names}); the pixels are shown "
                      "as stored.", stacklevel=2)
    kwargs["metadata"] = {METADATA_KEY: meta}
    if not kwargs["rgb"] and "contrast_limits" not in kwargs:
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
