"""Lazy recovered layers for a time series in napari (used by the Recover widget).

``add_lazy_recovery(viewer, layer)`` adds, at once, layers whose frames are recovered when the
t slider shows them (:mod:`napari_spodnet.lazy`): one network pass per newly shown frame,
cached by model and settings. Placement follows the observation layer (the recovery's image
grid is offset by ``translate``, method.md section 2): the (T, c, h, w) stack is registered
like the observation, the 2-D maps are (T, 1, h, w[, 3]) layers stretched over the
polarization axis (:func:`._layers.series_plane_placement`), so they follow the t slider and
show at every polarization position.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..lazy import FrameCache, LazyRecovery, lazy_series
from ._layers import add_or_update_image, current_frame, display_range, registered_placement, series_plane_placement

#: One cache of recovered frames (c, h, w) for the lazy layers of a session, keyed by model and
#: settings; the maps the layers show have their own, larger cache (lazy.DEFAULT_MAP_CACHE).
SESSION_CACHE = FrameCache(max_frames=32)

#: output -> the layer kind the plugin marks it with (pickers never offer results as inputs)
LAYER_KINDS = {"image": "recovered", "intensity": "intensity", "orientation": "orientation",
               "composite": "orientation"}


def _as_layer(layer):
    """A napari layer, or a stand-in with napari's default placement for a bare (T, c, H, W) array."""
    if hasattr(layer, "scale") and hasattr(layer, "data"):
        return layer
    ndim = layer.ndim
    return SimpleNamespace(data=layer, ndim=ndim, name="observation", scale=(1.0,) * ndim,
                           translate=(0.0,) * ndim, metadata={}, axis_labels=("t", "c", "y", "x"))


def add_lazy_recovery(viewer, layer, model=None, psf=None, lam=None, outputs=("intensity",), device=None,
                      contrast_limits=None, *, series: LazyRecovery | None = None, names: dict | None = None,
                      info: dict | None = None):
    """Add (or refresh) lazily recovered layers of the (T, c, H, W) observation in ``layer``.

    ``outputs`` from ``"image"`` (T, c, h, w), ``"intensity"``, ``"orientation"`` (angle, hsv
    colormap) and ``"composite"`` (orientation-coloured RGB), the maps as (T, 1, h, w[, 3]).
    ``series``: a :class:`~napari_spodnet.lazy.LazyRecovery` built already (else one is built
    from ``model`` / ``psf`` / ``lam`` / ``device`` with the session cache). ``names``: output ->
    layer name (default ``"<layer> <output> (lazy)"``); an existing plugin layer of that name
    and kind gets the new data. The contrast limits and the composite's brightness come from
    the frame on screen only (napari would otherwise recover frames to guess them).
    Returns the layers in the order of ``outputs``.
    """
    added: list = []
    for step in lazy_layer_steps(viewer, layer, model, psf, lam, outputs, device, contrast_limits, series=series,
                                 names=names, info=info, added=added):
        step()
    return added


def lazy_layer_steps(viewer, layer, model=None, psf=None, lam=None, outputs=("intensity",), device=None,
                     contrast_limits=None, *, series: LazyRecovery | None = None, names: dict | None = None,
                     info: dict | None = None, added: list | None = None) -> list:
    """:func:`add_lazy_recovery` as a list of steps, one napari ``add_image`` each (for
    :class:`._jobs.StepChain`: adding a layer costs 150-400 ms of GUI time, so the window answers
    between two). Each step appends its layer to ``added`` in the order of ``outputs``."""
    source = _as_layer(layer)
    if series is None:
        series = lazy_series(source.data, psf, "spodnet", model=model, lam=lam, device=device, cache=SESSION_CACHE)
    added = [] if added is None else added
    t = current_frame(viewer, source) if hasattr(layer, "unique_id") else 0
    stack_place = registered_placement(source, series.engine.translate)
    plane_place = series_plane_placement(source, series.engine.translate)
    labels = tuple(getattr(source, "axis_labels", ("t", "c", "y", "x")))
    meta = {**(info or {}), "lazy": True, "token": series.token}
    for kind in outputs:
        if kind not in LAYER_KINDS:
            raise KeyError(f"{kind!r}: choose from {', '.join(LAYER_KINDS)}")

    def add_one(kind):
        name = (names or {}).get(kind, f"{source.name} {kind} (lazy)")
        kwargs: dict = {}
        if kind == "image":
            data, place = series.image, stack_place
            kwargs.update(colormap="gray", visible=False, axis_labels=("t", "orientation", "y", "x"))
            kwargs["contrast_limits"] = contrast_limits or display_range(series.frame(t))
        elif kind == "composite":
            data, place = series.composite(series.saturation(t))[:, None], plane_place
            kwargs.update(rgb=True, axis_labels=labels, contrast_limits=(0.0, 1.0))
        elif kind == "orientation":
            data, place = series.orientation[:, None], plane_place
            kwargs.update(colormap="hsv", contrast_limits=(0.0, 3.1416), axis_labels=labels)
        else:  # intensity
            data, place = series.intensity[:, None], plane_place
            kwargs.update(colormap="gray", axis_labels=labels,
                          contrast_limits=contrast_limits or display_range(series.frame_map("intensity", t)))
        # added hidden, then shown: a new layer is sliced at t = 0 while it is built (napari), which
        # would recover frame 0 whatever the slider shows
        shown = kwargs.pop("visible", True)
        new = add_or_update_image(viewer, data, name, LAYER_KINDS[kind], {**meta, "output": kind}, visible=False,
                                  **kwargs, **place)
        new.visible = shown
        added.append(new)

    def step_for(kind):
        def step():
            add_one(kind)
        step.__name__ = f"add_{kind}"  # names the step in profiles (scripts/gui_walkthrough.py)
        return step

    return [step_for(kind) for kind in outputs]
