"""Reading and writing SPoD stacks and PSFs as TIFF files (tifffile only).

A SPoD observation is a stack of ``c`` polarization images (``c = 18`` by
default). Files from microscopes, Fiji and other
tools store that stack in many layouts; :func:`read_observation` finds the
polarization axis and returns the data as ``(c, H, W)`` or ``(T, c, H, W)``.

Supported layouts (``series.axes`` is what ``tifffile`` reports for the first
series of the file, with singleton axes already squeezed):

* plain multi-page TIFF or ``tifffile.imwrite`` output: ``(c, H, W)``
  (axes ``QYX`` / ``IYX``), ``(T, c, H, W)`` (``QQYX``), channel-last
  ``(H, W, c)`` (``QYX`` with the 18 on the last axis, or ``YXS``) and
  ``(T, H, W, c)``;
* ImageJ / Fiji hyperstacks ``CYX``, ``TCYX``, ``ZCYX`` / ``TZCYX`` with a
  singleton Z, and plain ImageJ stacks whose 18 images are labelled ``Z``
  (slices), ``T`` (frames) or ``I`` (no hyperstack information);
* OME-TIFF, e.g. ``CYX``, ``TCYX`` or ``TCZYX`` with ``Z = 1``;
* any of the above with extra singleton axes (they are squeezed).

How the polarization axis is found (:func:`find_polarization_axis`):

1. If the file carries real axis labels (ImageJ, OME, TIFF samples), an axis
   labelled ``C`` of length ``n_channels`` wins; otherwise any single axis of
   length ``n_channels`` that is not ``Y`` or ``X`` (``Z``, ``T``, ``I``,
   ``Q``, ``S``, ...).
2. Without informative labels (tifffile's generic ``Q``/``I`` plus ``YX``
   guesses), candidates are the axes of length ``n_channels`` other than the
   last two (row/column), plus the last axis of a channel-last ``(..., H, W, c)``
   array. Exactly one candidate is accepted; none or several raise
   :class:`~napari_spodnet.core.validation.SPoDInputError` with a hint
   (``n_channels`` option, ``axis=`` argument).

Beside the polarization and the two image axes, at most one non-singleton axis
is allowed; whatever its label (T, Z, Q, ...), it becomes the series axis ``T``
(each stack in it is recovered independently).

Axis indices (the ``axis`` argument, :func:`peek_polarization_axis`) refer to
the first series as ``tifffile.imread(path)`` returns it.

Data types are kept as stored (``uint16`` camera counts stay ``uint16``); the
core converts to float32 when it computes. :func:`write_stack` writes float32
ImageJ hyperstacks that Fiji opens with the right number of channels and that
carry our processing metadata as JSON.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

from .core.validation import DEFAULT_CHANNELS, SPoDInputError, check_psf

__all__ = [
    "ObservationFile",
    "find_polarization_axis",
    "read_observation",
    "peek_polarization_axis",
    "read_psf",
    "average_psfs",
    "write_stack",
    "read_stack_metadata",
    "METADATA_KEY",
]

#: Key under which :func:`write_stack` stores our metadata in the JSON ``Info``.
METADATA_KEY = "napari_spodnet"

# tifffile labels that carry no information about what an axis holds: 'Q' is
# "unknown", 'I' a plain image sequence, and for files without ImageJ/OME
# metadata 'Y'/'X' are only guesses about the last two dimensions.
_UNINFORMATIVE_LABELS = frozenset("QIYX")

_WRITE_AXES = ("CYX", "TCYX", "YX")

_LENGTH_TO_UM = {
    "nm": 1e-3,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}


@dataclass
class ObservationFile:
    """An observation read from a file, already in the core's axis order.

    ``data`` is ``(c, H, W)`` or ``(T, c, H, W)`` in the file's own dtype
    (possibly a read-only ``np.memmap`` view); ``axes`` is ``"CYX"`` or
    ``"TCYX"``; ``source_axes`` is the axis string of the stored series as
    tifffile reports it (e.g. ``"QYX"``, ``"YXS"``, ``"TCYX"``); ``metadata``
    holds what was found in the file: ``format``, ``stored_shape``,
    ``stored_axes_unsqueezed``, ``polarization_axis``, ``series_axis_label``,
    ``pixel_size``/``pixel_size_unit`` (micrometres) when known, and under
    ``METADATA_KEY`` our own metadata if :func:`write_stack` wrote the file.
    """

    data: np.ndarray
    axes: str
    source_axes: str
    path: str
    metadata: dict = field(default_factory=dict)

    @property
    def is_time_series(self) -> bool:
        return self.axes.startswith("T")

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[-3])


# --------------------------------------------------------------------------- axes


def _check_n_channels(n_channels) -> int:
    if isinstance(n_channels, bool) or not isinstance(n_channels, (int, np.integer)) or n_channels < 2:
        raise SPoDInputError(
            f"n_channels must be a whole number >= 2 (the number of polarization images), got {n_channels!r}."
        )
    return int(n_channels)


def _informative(axes: str | None) -> bool:
    return axes is not None and any(a not in _UNINFORMATIVE_LABELS for a in axes)


def _describe(shape, axes: str | None) -> str:
    shape = tuple(int(s) for s in shape)
    return f"shape {shape}" + (f" (axes {axes})" if axes else "")


def _no_axis_error(shape, axes, n: int) -> SPoDInputError:
    hint = " It is a single 2-D image." if len(shape) < 3 else ""
    return SPoDInputError(
        f"No polarization axis found: got {_describe(shape, axes)}, but a SPoD observation needs "
        f"an axis of length {n} (one image per polarization step), e.g. ({n}, H, W), "
        f"(T, {n}, H, W) or (H, W, {n}).{hint} If your instrument records a different number of "
        "polarization steps, set the n_channels option."
    )


def find_polarization_axis(shape, axes: str | None = None, n_channels: int = DEFAULT_CHANNELS) -> int:
    """Return the index of the axis that holds the ``n_channels`` polarization images.

    ``axes`` are tifffile-style labels (one letter per axis, e.g. ``"TCYX"``).
    See the module docstring for the rules. Raises ``SPoDInputError`` when no
    axis or more than one axis qualifies.
    """
    n = _check_n_channels(n_channels)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if axes is not None:
        axes = str(axes).upper()
        if len(axes) != ndim:
            raise SPoDInputError(f"Axis labels {axes!r} do not match {_describe(shape, None)}.")

    if _informative(axes):
        candidates = [i for i, a in enumerate(axes) if a == "C" and shape[i] == n]
        if not candidates:
            candidates = [i for i, a in enumerate(axes) if a not in "YX" and shape[i] == n]
    else:
        candidates = [i for i in range(max(ndim - 2, 0)) if shape[i] == n]
        # channel-last (H, W, c) / (T, H, W, c): with no real labels the 18 can
        # sit on the last axis, which tifffile mislabels as X
        if ndim >= 3 and shape[-1] == n:
            candidates.append(ndim - 1)

    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise _no_axis_error(shape, axes, n)
    raise SPoDInputError(
        f"Ambiguous polarization axis: {_describe(shape, axes)} has {len(candidates)} axes of length "
        f"{n} (axes {candidates}). Choose one by passing axis=<index> (e.g. axis={candidates[0]})."
    )


@dataclass
class _Layout:
    pol: int
    y: int
    x: int
    series: int | None  # the one extra non-singleton axis, used as T
    singletons: list


def _plan_layout(shape, axes: str | None, n_channels: int, axis: int | None) -> _Layout:
    """Work out how to turn the stored array into (c, H, W) / (T, c, H, W)."""
    n = _check_n_channels(n_channels)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim < 3:
        raise _no_axis_error(shape, axes, n)
    if axis is None:
        pol = find_polarization_axis(shape, axes, n)
    else:
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
            raise SPoDInputError(f"axis={axis!r} is not a valid axis index for {_describe(shape, axes)}.")
        pol = int(axis) % ndim
        if shape[pol] != n:
            raise SPoDInputError(
                f"Axis {pol} of {_describe(shape, axes)} has length {shape[pol]}, not {n}; "
                f"set n_channels={shape[pol]} if that axis really holds the polarization images."
            )

    rest = [i for i in range(ndim) if i != pol]
    y = x = None
    if _informative(axes) and axes.count("Y") == 1 and axes.count("X") == 1:
        y, x = axes.index("Y"), axes.index("X")
        if pol in (y, x):
            y = x = None
    if y is None:
        y, x = rest[-2], rest[-1]
    extras = [i for i in rest if i not in (y, x)]
    big = [i for i in extras if shape[i] > 1]
    if len(big) > 1:
        what = ", ".join(
            f"axis {i}" + (f" '{axes[i]}'" if axes else "") + f" (length {shape[i]})" for i in big
        )
        raise SPoDInputError(
            f"Too many axes: {_describe(shape, axes)} has {len(big)} extra axes besides the {n} "
            f"polarization images and the image plane: {what}. Only one extra axis (a time series) "
            "is supported; save one stack per time point or z-plane."
        )
    if big and axis is None and axes and _informative(axes) and axes[big[0]] == "C":
        raise SPoDInputError(
            f"The file labels {shape[big[0]]} channels (axis {big[0]} 'C') besides an axis of length {n} "
            f"({_describe(shape, axes)}); which one holds the polarization images is unclear. Pass "
            f"axis=<index> (e.g. axis={pol}) if axis {pol} holds them, or set n_channels={shape[big[0]]}."
        )
    if big and axes and _informative(axes) and axes[big[0]] == "S":
        raise SPoDInputError(
            f"The file has {shape[big[0]]} samples per pixel (an RGB image?) besides the {n} "
            f"polarization images ({_describe(shape, axes)}); save the stack as grayscale."
        )
    return _Layout(
        pol=pol,
        y=y,
        x=x,
        series=big[0] if big else None,
        singletons=[i for i in extras if shape[i] == 1],
    )


def _apply_layout(data: np.ndarray, layout: _Layout) -> np.ndarray:
    tail = ([layout.series] if layout.series is not None else []) + [layout.pol, layout.y, layout.x]
    # transposing and indexing (not reshaping) keeps a memmap a lazy view
    arr = np.transpose(data, layout.singletons + tail)
    if layout.singletons:
        arr = arr[(0,) * len(layout.singletons)]
    return arr


# --------------------------------------------------------------------------- files


def _file_error(path: Path, what: str) -> SPoDInputError:
    return SPoDInputError(f"Cannot read {path.name}: {what}")


def _check_readable(path) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise SPoDInputError(f"File not found: {p}")
    if p.is_dir():
        raise SPoDInputError(f"{p} is a folder, not a TIFF file.")
    return p


#: Decoded bytes allowed per stored byte for compressed pixel data (deflate tops out near
#: 1000:1 on constant data; camera data compress about 2:1), and a floor below which the
#: ratio is not checked: a small file may not decode into gigabytes.
_MAX_COMPRESSION_RATIO = 200
_RATIO_FLOOR_BYTES = 64 * 2**20


def _open_tiff(p: Path, series: bool = True) -> tifffile.TiffFile:
    """Open a TIFF; with ``series`` also build and vet its first series (see :func:`_first_series`)."""
    try:
        tf = tifffile.TiffFile(p)
    except Exception as exc:  # tifffile raises several types for non-TIFF / damaged headers
        raise _file_error(p, f"not a TIFF file or the file is damaged ({exc}).") from exc
    if series:
        try:
            _first_series(tf, p)
        except BaseException:
            tf.close()
            raise
    return tf


def _declared_planes_ok(tf: tifffile.TiffFile, p: Path, file_size: int) -> None:
    """Refuse OME / ImageJ metadata declaring more data than the file can hold, before
    tifffile builds a series from it (it allocates per declared plane)."""
    page = tf.pages.first
    plane_bytes = max(1, int(np.prod(page.shape, dtype=np.float64)) * np.dtype(page.dtype).itemsize
                      if page.dtype is not None else 1)
    limit = file_size if page.compression == 1 else max(_RATIO_FLOOR_BYTES, _MAX_COMPRESSION_RATIO * file_size)
    declared = []
    if tf.is_ome:
        text = tf.pages.first.description or ""
        root = ET.fromstring(text)
        for el in root.iter():
            if el.tag.endswith("Pixels"):
                dims = [el.attrib.get(k, "1") for k in ("SizeC", "SizeZ", "SizeT", "SizeX", "SizeY")]
                values = [int(v) for v in dims]
                if min(values) < 1:
                    raise _file_error(p, f"the OME metadata declare a zero or negative size ({dict(zip('CZTXY', dims))}).")
                declared.append(math.prod(values) * np.dtype(page.dtype).itemsize)
                break
    if tf.is_imagej:
        meta = tf.imagej_metadata or {}
        for key in ("images", "channels", "slices", "frames"):
            value = meta.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise _file_error(p, f"the ImageJ metadata hold an invalid {key}={value!r}; the file is damaged.")
        planes = max(int(meta.get("images", 1)),
                     math.prod(int(meta.get(k, 1)) for k in ("channels", "slices", "frames")))
        declared.append(planes * plane_bytes)
        if planes > 1 and file_size < 2**32 - 2**20 and len(tf.pages) < planes and page.compression == 1 \
                and tf.pages.first.dataoffsets and int(tf.pages.first.dataoffsets[0]) + planes * plane_bytes > file_size:
            raise _file_error(p, f"the file is truncated: its ImageJ metadata declare {planes} images but only "
                                 f"{len(tf.pages)} are stored. Re-export or copy the file again.")
    for nbytes in declared:
        if nbytes > limit:
            raise _file_error(p, f"the metadata declare {nbytes / 2**20:.1f} MiB of pixels but the file is only "
                                 f"{file_size / 2**20:.3f} MiB; it is truncated or damaged.")


def _first_series(tf: tifffile.TiffFile, p: Path):
    """The first image series, checked against the file before any pixel is read.

    Refuses (with :class:`SPoDInputError`) declared sizes the file cannot hold, data
    offsets past the end of the file (truncated files, which tifffile would fill with
    zeros), missing frames, zero-length axes and non-real pixel types.
    """
    try:
        file_size = os.fstat(tf.filehandle.handle.fileno()).st_size
    except Exception:
        file_size = p.stat().st_size
    try:
        _declared_planes_ok(tf, p, file_size)
        all_series = tf.series
        if not all_series:
            raise _file_error(p, "the TIFF file contains no images.")
        series = all_series[0]
        shape = tuple(int(s) for s in series.shape)
        axes = str(series.axes)
        dtype = np.dtype(series.dtype)
        pages = list(getattr(series, "_pages", []))
        n_pages = len(series)
        keyframe = series.keyframe
        compressed = keyframe.compression != 1
        extents = []
        if any(page is None for page in pages):
            missing = sum(page is None for page in pages)
            raise _file_error(p, f"{missing} of the {len(pages)} images the metadata declare are missing; "
                                 "the file is truncated or damaged.")
        offset = series.dataoffset if not compressed else None
        if offset is None:
            for page in pages:
                extents.extend(zip((int(o) for o in page.dataoffsets), (int(c) for c in page.databytecounts)))
        tile = getattr(keyframe, "tile", None)
        tile_bytes = (math.prod(int(t) for t in tile) * keyframe.samplesperpixel * dtype.itemsize) if tile else 0
    except SPoDInputError:
        raise
    except Exception as exc:  # tifffile, XML, numpy and struct errors of a damaged file
        raise _file_error(p, f"the TIFF structure is damaged ({type(exc).__name__}: {exc}).") from exc
    if len(axes) != len(shape):
        raise _file_error(p, f"the axis labels {axes!r} do not match the data shape {shape}; the file is damaged.")
    if not shape or min(shape) < 1:
        raise _file_error(p, f"the image has a zero-length axis (shape {shape}).")
    if dtype.kind not in "uif":
        raise _file_error(p, f"pixel type {dtype} is not a real number type; save the data as integers or floats.")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset is not None:
        if offset + nbytes > file_size:
            raise _file_error(p, f"the file is truncated: {nbytes} bytes of pixels declared from offset {offset}, "
                                 f"but the file ends at {file_size}. Re-export or copy the file again.")
    else:
        stored = 0
        for start, count in extents:
            if start < 0 or count < 0 or start + count > file_size:
                raise _file_error(p, "the file is truncated: image data are declared past its end. "
                                     "Re-export or copy the file again.")
            stored += count
        if len(pages) < n_pages:
            raise _file_error(p, f"the series declares {n_pages} images but the file holds {len(pages)}.")
        if not compressed and stored < nbytes:
            raise _file_error(p, f"the file is truncated: {nbytes} bytes of pixels declared, {stored} stored.")
        if compressed and nbytes > max(_RATIO_FLOOR_BYTES, _MAX_COMPRESSION_RATIO * max(stored, 1)):
            raise _file_error(p, f"the compressed data ({stored} bytes) declare {nbytes / 2**20:.1f} MiB of pixels; "
                                 "the file is damaged.")
        if tile_bytes > max(_RATIO_FLOOR_BYTES, 4 * nbytes):
            raise _file_error(p, "the file declares implausibly large tiles; it is damaged.")
    return series


def _normalise_unit(unit) -> str | None:
    if unit is None:
        return None
    u = str(unit).strip().lower()
    u = u.replace("\\u00b5", "u").replace("µ", "u").replace("μ", "u")
    return {"micron": "um", "microns": "um", "micrometer": "um", "micrometre": "um"}.get(u, u)


def _to_um(value, unit) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    factor = _LENGTH_TO_UM.get(_normalise_unit(unit) or "")
    if factor is None or not math.isfinite(value) or value <= 0:
        return None
    return value * factor


def _pixel_size(tf: tifffile.TiffFile) -> float | None:
    """Pixel size in micrometres from OME, ImageJ or TIFF resolution tags, if recorded."""
    try:
        if tf.is_ome and tf.ome_metadata:
            root = ET.fromstring(tf.ome_metadata)
            for el in root.iter():
                if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                    return _to_um(el.attrib["PhysicalSizeX"], el.attrib.get("PhysicalSizeXUnit", "um"))
        page = tf.pages[0]
        tag = page.tags.get("XResolution")
        if tag is None:
            return None
        num, den = tag.value
        if not num or not den:
            return None
        per_pixel = den / num  # XResolution is pixels per unit
        if tf.is_imagej:
            return _to_um(per_pixel, (tf.imagej_metadata or {}).get("unit"))
        unit_tag = page.tags.get("ResolutionUnit")
        unit = int(unit_tag.value) if unit_tag is not None else 2
        return _to_um(per_pixel, {2: "inch", 3: "cm"}.get(unit))
    except Exception:  # pixel size is a courtesy; odd metadata must not block reading
        return None


def _our_metadata(tf: tifffile.TiffFile) -> dict:
    texts = []
    try:
        if tf.is_imagej:
            info = (tf.imagej_metadata or {}).get("Info")
            if isinstance(info, str) and info:
                texts.append(info)
    except Exception:  # damaged ImageJ metadata: our metadata are a courtesy
        pass
    try:
        texts.append(tf.pages[0].description)
    except Exception:
        pass
    for text in texts:
        if not isinstance(text, str) or len(text) > 2**24:
            continue
        try:
            obj = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get(METADATA_KEY), dict):
            return obj[METADATA_KEY]
    return {}


def read_observation(
    path,
    n_channels: int = DEFAULT_CHANNELS,
    axis: int | None = None,
    memmap: bool = False,
) -> ObservationFile:
    """Read a SPoD observation from a TIFF / OME-TIFF / ImageJ file.

    Returns an :class:`ObservationFile` whose ``data`` is ``(c, H, W)`` or
    ``(T, c, H, W)`` in the stored dtype. ``axis`` overrides the automatic
    search (an index into ``tifffile.imread(path).shape``). With ``memmap`` the
    pixels are memory-mapped read-only when the file is uncompressed and
    contiguous, so long time series can be processed frame by frame; otherwise
    the file is read into memory.
    """
    n = _check_n_channels(n_channels)
    p = _check_readable(path)
    tf = _open_tiff(p, series=False)
    try:
        series = _first_series(tf, p)
        shape, axes = tuple(int(s) for s in series.shape), str(series.axes)
        try:
            layout = _plan_layout(shape, axes, n, axis)
        except SPoDInputError as exc:
            raise SPoDInputError(f"{p.name}: {exc}") from exc
        dtype = np.dtype(series.dtype)
        try:
            unsqueezed = series.get_axes(False)
            n_series = len(tf.series)
        except Exception:  # informative only
            unsqueezed, n_series = axes, 1
        metadata: dict[str, Any] = {
            "format": getattr(series, "kind", "") or "tiff",
            "stored_shape": shape,
            "stored_axes_unsqueezed": unsqueezed,
            "polarization_axis": layout.pol,
            "series_axis_label": axes[layout.series] if layout.series is not None else None,
            "dtype": str(dtype),
        }
        if n_series > 1:
            metadata["n_series"] = n_series
        size = _pixel_size(tf)
        if size is not None:
            metadata["pixel_size"] = size
            metadata["pixel_size_unit"] = "um"
        ours = _our_metadata(tf)
        if ours:
            metadata[METADATA_KEY] = ours

        data = None
        try:
            mappable = memmap and series.dataoffset is not None
        except Exception:
            mappable = False
        if mappable:
            try:
                data = tifffile.memmap(p, series=0, mode="r")
            except Exception:  # not mappable after all (e.g. odd byte layout): read instead
                data = None
        if data is not None and tuple(data.shape) != shape:
            data = None
        metadata["memmap"] = data is not None
        if data is None:
            try:
                data = series.asarray()
            except Exception as exc:
                raise _file_error(p, f"the pixel data could not be decoded ({type(exc).__name__}: {exc}).") from exc
    finally:
        tf.close()
    if tuple(data.shape) != shape or np.dtype(data.dtype).kind not in "uif":
        raise _file_error(p, f"the decoded pixels {tuple(data.shape)} do not match the declared shape {shape}.")

    arr = _apply_layout(data, layout)
    return ObservationFile(
        data=arr,
        axes="TCYX" if arr.ndim == 4 else "CYX",
        source_axes=axes,
        path=str(p),
        metadata=metadata,
    )


def peek_polarization_axis(path, n_channels: int = DEFAULT_CHANNELS) -> int | None:
    """Cheaply tell whether ``path`` holds a SPoD stack; return its polarization axis or None.

    Reads TIFF metadata only (no pixel data). Returns the axis index in the
    stored series when :func:`read_observation` would accept the layout, and
    None for anything else (ordinary images, ambiguous layouts, non-TIFF or
    unreadable files). Never raises.
    """
    try:
        p = Path(os.fspath(path))
        with tifffile.TiffFile(p) as tf:
            series = _first_series(tf, p)
            return _plan_layout(tuple(series.shape), series.axes, n_channels, None).pol
    except Exception:  # the napari reader probes arbitrary files: any failure means "not ours"
        return None


# --------------------------------------------------------------------------- PSFs


def _centre_crop(arr: np.ndarray, shape) -> np.ndarray:
    slices = tuple(slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(arr.shape, shape))
    return arr[slices]


def average_psfs(psfs: Sequence[np.ndarray], crop: bool = False) -> np.ndarray:
    """Average several measured PSFs (each normalised to sum 1 first) into one float32 PSF.

    Normalising first keeps a bright bead from dominating the average. PSFs of
    different shapes raise ``SPoDInputError`` unless ``crop=True``, which
    centre-crops all of them to the smallest common shape (and renormalises)
    before averaging. A 3-D array is taken as a stack of 2-D PSFs.
    """
    items = list(psfs)
    if not items:
        raise SPoDInputError("No PSFs to average.")
    checked = []
    for i, psf in enumerate(items):
        try:
            checked.append(check_psf(psf, normalize=True))
        except SPoDInputError as exc:
            raise SPoDInputError(f"PSF {i}: {exc}") from exc
    shapes = {a.shape for a in checked}
    if len(shapes) > 1:
        if not crop:
            raise SPoDInputError(
                f"The PSFs have different shapes {sorted(shapes)}; crop them to the same size first "
                "(or pass crop=True to centre-crop them to the smallest common shape)."
            )
        common = tuple(min(s[d] for s in shapes) for d in range(2))
        checked = [check_psf(_centre_crop(a, common), normalize=True) for a in checked]
    mean = np.mean(np.stack(checked).astype(np.float64), axis=0)
    return (mean / mean.sum()).astype(np.float32)


def read_psf(path) -> np.ndarray:
    """Read a PSF image as an ``(a, b)`` float32 array normalised to sum 1.

    A 2-D image is used as is; a 3-D stack (one measured PSF per slice) is
    averaged with :func:`average_psfs`. ``.npy`` files are accepted too.
    """
    p = _check_readable(path)
    if p.suffix.lower() == ".npy":
        try:
            # memory-mapped first: numpy then checks the declared shape against the file size
            arr = np.array(np.load(p, allow_pickle=False, mmap_mode="r"))
        except Exception as exc:
            raise _file_error(p, f"not a valid .npy file ({exc}).") from exc
        axes = None
    else:
        tf = _open_tiff(p, series=False)
        try:
            series = _first_series(tf, p)
            axes = series.axes
            try:
                arr = series.asarray()
            except Exception as exc:
                raise _file_error(p, f"the pixel data could not be decoded ({type(exc).__name__}: {exc}).") from exc
        finally:
            tf.close()
    if axes and axes.endswith("S") and arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        raise SPoDInputError(f"The PSF in {p.name} is a colour (RGB) image; save it as grayscale.")
    arr = np.squeeze(np.asarray(arr))
    try:
        if arr.ndim == 3:
            psf = average_psfs(arr)
        elif arr.ndim == 2:
            psf = check_psf(arr, normalize=True)
        else:
            raise SPoDInputError(
                f"expected a 2-D PSF image or a 3-D stack of PSFs, got shape {arr.shape}."
            )
    except SPoDInputError as exc:
        raise SPoDInputError(f"PSF file {p.name}: {exc}") from exc
    return np.ascontiguousarray(psf, dtype=np.float32)


# --------------------------------------------------------------------------- writing


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_stack(
    path,
    array,
    axes: str = "CYX",
    metadata: dict | None = None,
    pixel_size: float | None = None,
) -> Path:
    """Write ``array`` as a float32 ImageJ hyperstack TIFF and return the path.

    ``axes`` is ``"CYX"``, ``"TCYX"`` or ``"YX"``; a CYX stack becomes an
    ImageJ hyperstack with ``channels = c`` (grayscale mode), so Fiji shows the
    orientations as channels. ``metadata`` (method, lambda, iterations, ...;
    anything JSON-serialisable, numpy scalars included) is stored as JSON in the
    ImageJ ``Info`` property and returned by :func:`read_stack_metadata`.
    ``pixel_size`` is in micrometres. The file is written to a temporary file
    in the same folder and moved into place, so a failed write never leaves a
    partial file (and never destroys an existing one).
    """
    axes = str(axes).upper()
    if axes not in _WRITE_AXES:
        raise SPoDInputError(f"axes must be one of {', '.join(_WRITE_AXES)}, got {axes!r}.")
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise SPoDInputError(f"Cannot write an array of dtype {arr.dtype}; it must hold real numbers.")
    if arr.ndim != len(axes):
        raise SPoDInputError(f"axes {axes!r} need a {len(axes)}-D array, got shape {arr.shape}.")
    arr = np.ascontiguousarray(arr, dtype=np.float32)

    ij_meta: dict[str, Any] = {"axes": axes}
    ij_meta["Info"] = json.dumps(
        {METADATA_KEY: dict(metadata or {}), f"{METADATA_KEY}_version": _package_version()},
        default=_json_default,
    )
    finite = np.isfinite(arr)
    if finite.any():
        # ImageJ otherwise shows float stacks with the range of the first slice only
        ij_meta["min"] = float(np.min(arr, where=finite, initial=np.inf))
        ij_meta["max"] = float(np.max(arr, where=finite, initial=-np.inf))
    kwargs: dict[str, Any] = {}
    if pixel_size is not None:
        size = float(pixel_size)
        if not math.isfinite(size) or size <= 0:
            raise SPoDInputError(f"pixel_size must be a positive number (micrometres), got {pixel_size!r}.")
        kwargs["resolution"] = (1.0 / size, 1.0 / size)
        ij_meta["unit"] = "um"

    target = Path(os.fspath(path)).expanduser()
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SPoDInputError(f"Cannot write {target.name}: folder {folder} does not exist.")
    # a unique name in the same folder (same file system) makes os.replace atomic;
    # opened with 'xb' rather than mkstemp so the file gets the usual permissions
    tmp = folder / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as fh:
            tifffile.imwrite(fh, arr, imagej=True, metadata=ij_meta, **kwargs)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise SPoDInputError(f"Cannot write {target}: {exc}") from exc
        raise
    return target


def _package_version() -> str:
    try:
        from . import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def read_stack_metadata(path) -> dict:
    """Return the metadata stored by :func:`write_stack` (``{}`` if the file has none)."""
    p = _check_readable(path)
    tf = _open_tiff(p, series=False)
    try:
        return _our_metadata(tf)
    finally:
        tf.close()
