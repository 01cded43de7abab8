"""Layer helpers of the napari-spodnet widgets: no Qt, no computation.

Which layers the plugin made (``metadata["spodnet"]["kind"]``), which layers can serve as
observation or PSF, where a result layer goes (translate / scale registered to its
source, method.md section 2) and how results are added or refreshed.

Layer identity: widgets docked from napari's Plugins menu get a *proxy* of the viewer
(``napari.utils._proxies.PublicOnlyProxy``), and every layer read through it is a fresh
proxy object, so ``a is b`` and ``id(a)`` say nothing about whether two references mean
the same layer. Everything here compares layers by :func:`layer_key` (napari's
``Layer.unique_id``), which is the same through any proxy.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..core.validation import DEFAULT_CHANNELS, SPoDInputError, check_observation

METADATA_KEY = "spodnet"
KINDS = ("observation", "psf", "recovered", "intensity", "orientation", "truth", "preprocessed", "mean",
         "difference")
#: plugin outputs that are never offered as observations (a recovered stack also has c channels)
RESULT_KINDS = ("recovered", "truth", "intensity", "orientation", "mean", "difference", "psf")
#: plugin outputs that are 2-D images (or series of them) but not PSFs
_NOT_PSF_KINDS = ("intensity", "mean", "difference", "orientation", "truth", "recovered", "observation")
#: largest side of a 3-D stack offered as a set of PSFs (measured beads are a few dozen pixels)
MAX_PSF_SIZE = 256
#: the name napari/pint give micrometres (the unit of every pixel size the reader finds)
MICROMETRE = "micrometer"


# --------------------------------------------------------------------------- identity and marks


def layer_key(layer):
    """A key that names ``layer`` through napari's proxies (``Layer.unique_id``); None for None."""
    if layer is None:
        return None
    return layer.unique_id


def same_layer(a, b) -> bool:
    return a is not None and b is not None and layer_key(a) == layer_key(b)


def contains_layer(layers: Iterable, layer) -> bool:
    key = layer_key(layer)
    return key is not None and any(layer_key(other) == key for other in layers)


def layer_by_key(viewer, key):
    """The viewer's layer with that :func:`layer_key` (None if it was removed)."""
    if key is None:
        return None
    for layer in viewer.layers:
        if layer_key(layer) == key:
            return layer
    return None


def spod_meta(layer) -> dict:
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(METADATA_KEY)
    return value if isinstance(value, dict) else {}


def spod_kind(layer) -> str | None:
    return spod_meta(layer).get("kind")


def _is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and not getattr(layer, "rgb", False)


def is_observation_candidate(layer) -> bool:
    """Image layers that could be a SPoD stack: (c, H, W) or (T, c, H, W) (checked separately)."""
    return _is_image(layer) and layer.ndim in (3, 4) and spod_kind(layer) not in RESULT_KINDS


def is_psf_candidate(layer) -> bool:
    """A 2-D grayscale image, or a 3-D z-stack / set of PSFs the plugin did not make for another purpose.

    A 3-D stack is reduced as :func:`napari_spodnet.io.read_psf` reduces it (see :func:`psf_array`).
    """
    if not _is_image(layer) or spod_kind(layer) in _NOT_PSF_KINDS:
        return False
    if layer.ndim == 2:
        return True
    # a PSF z-stack (3-D): small images, a slice count that is not a multiple of the 18 polarization
    # steps (that would be an observation); plugin PSFs are always accepted
    if layer.ndim != 3:
        return False
    if spod_kind(layer) == "psf":
        return True
    depth, height, width = layer.data.shape
    return depth % DEFAULT_CHANNELS != 0 and max(height, width) <= MAX_PSF_SIZE


def psf_array(layer) -> np.ndarray:
    """The (a, b) PSF a layer stands for: the image itself, or a 3-D stack averaged over its first
    axis (one measured PSF per slice, as :func:`napari_spodnet.io.read_psf` does for files)."""
    from ..io import average_psfs

    data = np.asarray(layer.data)
    if data.ndim == 3:
        return average_psfs(data)
    return data


# --------------------------------------------------------------------------- checks


def observation_problem(shape, n_channels: int = DEFAULT_CHANNELS) -> str | None:
    """The core's message for an unusable observation shape, or None when it is fine.

    Checked on a zero-byte broadcast view, so no pixel data is touched.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) in (3, 4) and shape[-3] == n_channels:
        return None
    try:  # the core's checks on shape come before it touches any value
        check_observation(np.broadcast_to(np.float32(0), shape), n_channels)
    except SPoDInputError as exc:
        return str(exc)
    return None


def value_problem(data, max_bytes: int = 64 * 2**20) -> str | None:
    """NaN or infinite values in ``data`` (the whole array up to ``max_bytes``, else its first frame)."""
    arr = data
    if getattr(arr, "nbytes", 0) > max_bytes and np.ndim(arr) == 4:
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        return None
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        return (f"the data contain {bad} NaN or infinite values; replace them (e.g. by 0 or the background) "
                "before recovery.")
    return None


def display_range(data, low: float = 0.5, high: float = 99.9, max_samples: int = 1_000_000) -> tuple[float, float]:
    """Contrast limits for display (percentiles of a strided sample); never a degenerate range."""
    arr = np.asarray(data)
    flat = arr.reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: flat.size // max_samples + 1]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(flat, [low, high]))
    if not hi > lo:
        lo, hi = float(flat.min()), float(flat.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def jsonable(value):
    """Metadata values reduced to what JSON (and ImageJ's Info) can hold."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{value.shape}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# --------------------------------------------------------------------------- placement


def spatial_units(ndim: int, pixel_size) -> tuple | None:
    """Layer ``units``: micrometres on y and x where the data carry a pixel size, else None (pixels)."""
    if not pixel_size:
        return None
    return ("pixel",) * (ndim - 2) + (MICROMETRE, MICROMETRE)


def registered_placement(source_layer, offset_yx=(0.0, 0.0), drop: tuple = ()) -> dict:
    """``translate`` / ``scale`` (and ``units``) for a new layer registered to ``source_layer``.

    ``offset_yx`` is the offset in the source's pixels (e.g. ``RecoveryResult.translate``,
    method.md section 2), added to the source's own translate in world units (times its
    scale). ``drop`` lists source axes the new layer does not have (e.g. ``(-3,)``: the
    polarization axis of an intensity image; ``(0,)``: the time axis of one frame).
    """
    scale = list(np.asarray(source_layer.scale, dtype=float))
    translate = list(np.asarray(source_layer.translate, dtype=float))
    n = len(scale)
    dropped = {d % n for d in drop}
    scale = [v for i, v in enumerate(scale) if i not in dropped]
    translate = [v for i, v in enumerate(translate) if i not in dropped]
    translate[-2] += float(offset_yx[0]) * scale[-2]
    translate[-1] += float(offset_yx[1]) * scale[-1]
    place = {"translate": tuple(translate), "scale": tuple(scale)}
    units = _source_units(source_layer, dropped)
    if units is not None:
        place["units"] = units
    return place


def series_plane_placement(source_layer, offset_yx=(0.0, 0.0)) -> dict:
    """Placement of a (T, 1, h, w) result (one plane per time point) on a (T, c, H, W) source.

    napari aligns a layer's trailing axes with the viewer's, so a (T, h, w) result would
    line up with (polarization, y, x). Keeping a length-1 polarization axis puts t on t;
    that axis is scaled by c (and centred) so that the plane covers every polarization
    step: the result shows whatever the polarization slider says.
    """
    place = registered_placement(source_layer, offset_yx)
    scale, translate = list(place["scale"]), list(place["translate"])
    c = int(source_layer.data.shape[-3])
    translate[-3] += (c - 1) / 2 * scale[-3]
    scale[-3] *= c
    place.update(scale=tuple(scale), translate=tuple(translate))
    return place


def _source_units(source_layer, dropped: set) -> tuple | None:
    pixel_size = spod_meta(source_layer).get("pixel_size")
    if not pixel_size:
        return None
    units = spatial_units(source_layer.ndim, pixel_size)
    return tuple(u for i, u in enumerate(units) if i not in dropped)


def psf_placement(ndim: int, yx_scale, pixel_size) -> dict | None:
    """``scale`` (and ``units``) that show an ``ndim`` PSF at an observation's pixel size, None at scale 1."""
    yx = tuple(float(v) for v in yx_scale)
    if yx == (1.0, 1.0):
        return None
    place = {"scale": (1.0,) * (ndim - 2) + yx}
    units = spatial_units(ndim, pixel_size)
    if units is not None:
        place["units"] = units
    return place


def match_psf_scale(psf_layer, observation_layer) -> bool:
    """Show a PSF at the observation's pixel size (a PSF is sampled on the observation's pixels).

    Only a PSF still at napari's default scale 1 is changed; returns True when it was.
    """
    if psf_layer is None or observation_layer is None:
        return False
    return place_psf(psf_layer, observation_layer.scale[-2:], spod_meta(observation_layer).get("pixel_size"))


def place_psf(psf_layer, yx_scale, pixel_size) -> bool:
    """:func:`psf_placement` applied to a PSF layer still at scale 1; True when it was changed."""
    place = psf_placement(psf_layer.ndim, yx_scale, pixel_size)
    if place is None or not all(abs(float(v) - 1.0) < 1e-12 for v in psf_layer.scale[-2:]):
        return False
    psf_layer.scale = place["scale"]
    if "units" in place:
        psf_layer.units = place["units"]
    return True


def newest_observation(viewer):
    """The newest layer marked as an observation that carries a pixel size, None if there is none."""
    observations = [layer for layer in viewer.layers
                    if spod_kind(layer) == "observation" and spod_meta(layer).get("pixel_size")]
    return observations[-1] if observations else None


def match_marked_psfs(viewer) -> None:
    """:func:`match_psf_scale` for every layer marked as a PSF, to the newest observation with a pixel size."""
    observation = newest_observation(viewer)
    if observation is None:
        return
    for layer in viewer.layers:
        if spod_kind(layer) == "psf":
            match_psf_scale(layer, observation)


def plane_series(array: np.ndarray) -> np.ndarray:
    """(T, h, w[, 3]) -> (T, 1, h, w[, 3]): the layout :func:`series_plane_placement` places."""
    return np.expand_dims(array, 1)


def current_frame(viewer, layer) -> int:
    """The time point of a (T, c, H, W) layer that the viewer shows now (0 for a single stack)."""
    if layer.ndim != 4:
        return 0
    try:
        point = layer.world_to_data(viewer.dims.point[-layer.ndim:])
        t = int(round(float(np.asarray(point)[0])))
    except Exception:
        t = 0
    return int(np.clip(t, 0, layer.data.shape[0] - 1))


# --------------------------------------------------------------------------- adding results


def find_layer(viewer, *, name: str | None = None, kind: str | None = None, role: str | None = None):
    """The newest layer with that ``role`` (plugin metadata) or else that name, of that kind; None if absent."""
    for layer in reversed(list(viewer.layers)):
        meta = spod_meta(layer)
        if role is not None:
            if meta.get("role") == role and (kind is None or meta.get("kind") == kind):
                return layer
        elif layer.name == name and (kind is None or meta.get("kind") == kind):
            return layer
    return None


_REFRESHED = ("translate", "scale", "units", "contrast_limits", "colormap", "blending", "visible", "opacity",
              "axis_labels")


def add_or_update_image(viewer, data, name: str, kind: str, info: dict | None = None, role: str | None = None,
                        **kwargs):
    """Add an image layer marked ``metadata["spodnet"]["kind"]``, or refresh the layer of that name and kind
    (or of that ``role``, then renamed to ``name``).

    Re-running a recovery therefore updates its result layers instead of piling up copies.
    Returns the layer as the viewer hands it out (a proxy for Plugins-menu widgets: compare
    it with :func:`same_layer`).
    """
    meta = {"kind": kind, **jsonable(info or {})}
    if role is not None:
        meta["role"] = role
    rgb = bool(kwargs.get("rgb", False))
    existing = find_layer(viewer, name=name, kind=kind, role=role)
    if (existing is not None and bool(getattr(existing, "rgb", False)) == rgb
            and existing.ndim == (np.ndim(data) - (1 if rgb else 0))):
        existing.data = data
        existing.metadata = {**dict(existing.metadata), METADATA_KEY: meta}
        if existing.name != name:
            existing.name = name
        for key in _REFRESHED:
            if key in kwargs:
                setattr(existing, key, kwargs[key])
        if "contrast_limits" not in kwargs and not rgb:
            existing.reset_contrast_limits()
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    # the plugin's results are single-resolution arrays: spare napari its multiscale guess
    kwargs.setdefault("multiscale", False)
    return viewer.add_image(data, name=name, metadata={METADATA_KEY: meta}, **kwargs)


# --------------------------------------------------------------------------- viewer parts


def grid_model(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` from napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def grid_cell(viewer, layer) -> tuple[int, int] | None:
    """(row, column) of ``layer`` in the grid view, or None where napari cannot say."""
    grid = grid_model(viewer)
    try:
        return tuple(grid.position(viewer.layers.index(layer), viewer.layers))
    except Exception:
        return None


def text_overlay(viewer):
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "text"):
        return overlays.text
    return viewer.text_overlay


def scale_bar(viewer):
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, "scale_bar"):
        return overlays.scale_bar
    return viewer.scale_bar


def show_scale_bar_if_physical(viewer, layer) -> None:
    """Turn napari's scale bar on where ``layer`` carries a pixel size (its units are then µm)."""
    if not spod_meta(layer).get("pixel_size"):
        return
    try:
        scale_bar(viewer).visible = True
    except Exception:  # the scale bar is a courtesy
        pass
