"""napari-spodnet dock widgets: SPoD data, Train SPoD-Net, Recover, FISTA comparison.

``dock_all_widgets(viewer)`` docks all four (used by ``spodnet demo`` and the screenshot
script); ``run_demo_in_viewer(viewer)`` opens the sample, docks the widgets, selects the
layers and starts a recovery (shipped default model if installed, else FISTA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from qtpy.QtWidgets import QWidget

__all__ = ["WIDGETS", "dock_all_widgets", "run_demo_in_viewer"]

#: (key, dock title, "module:Class")
WIDGETS = (
    ("data", "SPoD data and PSF", "napari_spodnet.widgets.data_widget:SpodDataWidget"),
    ("train", "Train SPoD-Net", "napari_spodnet.widgets.train_widget:TrainWidget"),
    ("recover", "Recover (SPoD-Net)", "napari_spodnet.widgets.recover_widget:RecoverWidget"),
    ("fista", "FISTA comparison", "napari_spodnet.widgets.fista_widget:FistaWidget"),
)


PLUGIN_NAME = "napari-spodnet"


def dock_all_widgets(viewer, area: str = "right", tabify: bool = True) -> "dict[str, QWidget]":
    """Dock the four widgets as the Plugins menu does (tabbed); returns ``{key: widget}``.

    Through ``viewer.window.add_plugin_dock_widget``: each widget gets napari's proxy of the
    viewer, exactly as when a user docks it from *Plugins > SPoD-Net* (``area`` is napari's
    choice there, kept in the signature for callers).
    """
    widgets = {}
    for key, title, _path in WIDGETS:
        _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN_NAME, title, tabify=tabify)
        widgets[key] = widget
    return widgets


def run_demo_in_viewer(viewer, widgets: dict | None = None, fista_iterations: int = 200) -> "dict[str, QWidget]":
    """Open the synthetic sample, dock the widgets, select the layers and start a recovery.

    With the shipped default model a SPoD-Net recovery runs (Recover widget); without it a
    FISTA run (FISTA widget) so the demo still shows recovered layers. Returns the widgets;
    the job runs in the background (``widgets["recover"].is_running()`` /
    ``widgets["fista"].is_running()``).
    """
    from napari.layers import Layer

    from .._sample_data import sample_observation
    from ..core.recover import DEFAULT_MODEL_PATH
    from ._shared import get_settings

    added = []
    for data, meta, layer_type in sample_observation():
        added.append(viewer.add_layer(Layer.create(data, meta, layer_type)))
    observation, psf = added[0], added[1]
    if widgets is None:
        widgets = dock_all_widgets(viewer)
    settings = get_settings()
    settings.observation_layer = observation.name
    settings.psf_layer = psf.name
    for key in ("data", "recover", "fista"):
        widgets[key].observation_picker.set_layer(observation)
    widgets["data"].psf_picker.set_layer(psf)
    widgets["fista"].psf_picker.set_layer(psf)
    widgets["train"].psf_picker.set_layer(psf)
    widgets["train"].layers_list.set_selected([observation])
    if DEFAULT_MODEL_PATH.is_file():
        widgets["recover"].model_picker.set_source("default")
        _raise_dock(viewer, widgets["recover"])
        widgets["recover"].start()
    else:
        settings.fista_iterations = fista_iterations
        settings.compare_spodnet = False
        _raise_dock(viewer, widgets["fista"])
        widgets["fista"].start()
    return widgets


def _raise_dock(viewer, widget) -> None:
    """Bring the dock tab holding ``widget`` to the front (best effort)."""
    try:
        parent = widget.parentWidget()
        while parent is not None and parent.__class__.__name__ != "QtViewerDockWidget":
            parent = parent.parentWidget()
        if parent is not None:
            parent.raise_()
    except RuntimeError:
        pass
