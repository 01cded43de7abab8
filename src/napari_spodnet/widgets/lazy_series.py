"""Lazy recovered layers for a time series in napari (not yet wired into the Recover widget).

``add_lazy_recovery(viewer, layer)`` adds, at once, layers whose frames are recovered when the
t slider shows them (:mod:`napari_spodnet.lazy`): one network pass per newly shown frame,
cached by model and settings. Placement follows the observation layer (the recovery's image
grid is offset by ``translate``, method.md section 2).
"""

from __future__ import annotations

from ..lazy import FrameCache, lazy_series

#: One cache for the lazy layers of a session (frames are keyed by model and settings).
SESSION_CACHE = FrameCache(max_frames=32)


def add_lazy_recovery(viewer, layer, model=None, psf=None, lam=None, outputs=("intensity",), device=None,
                      contrast_limits=None):
    """Add lazily recovered layers (``"image"``, ``"intensity"``, ``"orientation"``) of the (T, c, H, W)
    observation in ``layer`` (a napari Image layer or an array); returns the new layers."""
    data = getattr(layer, "data", layer)
    name = getattr(layer, "name", "observation")
    scale = tuple(getattr(layer, "scale", (1, 1, 1, 1)))
    series = lazy_series(data, psf, "spodnet", model=model, lam=lam, device=device, cache=SESSION_CACHE)
    dy, dx = series.engine.translate
    sy, sx = scale[-2:]
    base_translate = tuple(getattr(layer, "translate", (0, 0, 0, 0)))
    added = []
    for kind in outputs:
        arr = series[kind]
        spatial_translate = (base_translate[-2] + dy * sy, base_translate[-1] + dx * sx)
        lead_scale, lead_translate = (1,) * (arr.ndim - 2), (0,) * (arr.ndim - 2)
        if arr.ndim == 3 and getattr(data, "ndim", 4) == 4:
            # napari aligns trailing axes: give the maps the observation's (T, c) axes, with one
            # c pixel stretched over all c positions, so they follow the t slider and show at
            # every polarization slider position
            arr = arr[:, None]
            c = series.engine.n_channels
            lead_scale, lead_translate = (1, c), (0, (c - 1) / 2)
        kwargs = dict(name=f"{name} {kind} (lazy)", scale=lead_scale + (sy, sx),
                      translate=lead_translate + spatial_translate,
                      metadata={"spodnet": {"kind": "lazy recovery", "output": kind, "token": series.token}})
        if kind == "orientation":
            kwargs.update(colormap="hsv", contrast_limits=(0.0, 3.1416))
        elif contrast_limits is not None:
            kwargs["contrast_limits"] = contrast_limits
        else:
            # from the frame on screen only: napari would otherwise recover frames to guess them
            t = int(viewer.dims.current_step[0]) if viewer.dims.ndim >= arr.ndim else 0
            frame = series[kind][min(t, arr.shape[0] - 1)].compute()
            kwargs["contrast_limits"] = (float(frame.min()), float(frame.max()) or 1.0)
        added.append(viewer.add_image(arr, **kwargs))
    return added
