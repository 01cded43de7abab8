"""napari writer: image layers (recovered stacks above all) to ImageJ-compatible TIFF.

The data go through :func:`napari_spodnet.io.write_stack` (float32 ImageJ hyperstack;
a ``(c, h, w)`` stack opens in Fiji with one channel per orientation). The layer's
``metadata["spodnet"]`` (method, lambda, objective, time, model, ...) plus its name,
translate, scale, colormap and contrast limits are stored as JSON in the file, so napari-spodnet restores the layer
exactly and anyone can read them with :func:`napari_spodnet.io.read_stack_metadata`.
"""

from __future__ import annotations

import numpy as np

from . import io as spod_io
from .core.validation import SPoDInputError

_AXES = {2: "YX", 3: "CYX", 4: "TCYX"}
#: layer kinds whose 3-D data are (T, h, w) time series, not (c, h, w) stacks
_SERIES_OF_PLANES = ("intensity", "mean", "difference")


def write_spod_tiff(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer for image layers; returns the written path."""
    from .widgets._layers import METADATA_KEY, jsonable

    arr = np.asarray(data[0] if meta.get("multiscale") else data)
    shape = tuple(int(s) for s in arr.shape)
    rgb = bool(meta.get("rgb", False))
    info = dict((meta.get("metadata") or {}).get(METADATA_KEY) or {})
    info.setdefault("kind", "image")
    if rgb:
        # colour composites are stored channels-first: an ImageJ stack with 3 (or 4) channels
        arr = np.moveaxis(arr, -1, -3)
    elif arr.ndim == 3 and info["kind"] in _SERIES_OF_PLANES:
        # a time series of single images (T, h, w): ImageJ frames of one channel
        arr = arr[:, None]
    axes = _AXES.get(arr.ndim)
    if axes is None:
        raise SPoDInputError(f"Cannot write a {arr.ndim}-D layer as an ImageJ stack (2-D, (c, H, W) or "
                             f"(T, c, H, W) only); shape {arr.shape}.")
    info.update(
        layer_name=meta.get("name"),
        shape=list(shape),
        rgb=rgb,
        translate=[float(v) for v in meta.get("translate", ())] or None,
        scale=[float(v) for v in meta.get("scale", ())] or None,
    )
    if not rgb:  # how the layer was shown, so that the reader restores the same view
        colormap = meta.get("colormap")
        name = colormap.get("name") if isinstance(colormap, dict) else colormap
        if isinstance(name, str):
            info["colormap"] = name
        if meta.get("contrast_limits") is not None:
            info["contrast_limits"] = [float(v) for v in meta["contrast_limits"]]
    pixel_size = info.get("pixel_size")
    written = spod_io.write_stack(path, arr, axes=axes, metadata=jsonable(info),
                                  pixel_size=float(pixel_size) if pixel_size else None)
    return [str(written)]
