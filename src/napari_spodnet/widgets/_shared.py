"""Small reusable parts of the napari-spodnet dock widgets.

Nothing here computes: every number a widget shows or produces comes from
:mod:`napari_spodnet.core` (or :mod:`napari_spodnet.io`). This module holds the
glue shared by the four widgets:

* :class:`SpodnetSettings` / :func:`get_settings`: one evented settings object for the
  whole napari session, so that lambda, device, preset, ... persist between widget uses
  and stay in sync between widgets (:class:`SettingsBinder` ties Qt controls to it);
* :class:`ModelRegistry` / :func:`get_model_registry`: networks trained in this session,
  offered by every :class:`ModelSourcePicker`;
* :class:`LayerPicker` / :class:`LayerListPicker`: combo / list boxes that follow
  ``viewer.layers`` (inserted, removed, renamed);
* :class:`DevicePicker`, :class:`CurvePlot` (matplotlib loss / objective curve);
* :class:`Job`: one background job on a napari thread worker, with queued or yielded
  progress, cooperative cancel and errors turned into notifications.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
from psygnal import Signal, evented
from qtpy.QtCore import QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.recover import DEFAULT_MODEL_PATH, RecoveryCancelled
from ..core.solvers import DEFAULT_LAMBDA
from ..core.training import PRESETS
from ..core.validation import DEFAULT_CHANNELS, SPoDInputError, check_observation

METADATA_KEY = "spodnet"
KINDS = ("observation", "psf", "recovered", "intensity", "orientation", "truth", "preprocessed", "mean",
         "difference")


# --------------------------------------------------------------------------- settings


def _default_device() -> str:
    try:
        from ..core.devices import resolve_device

        return str(resolve_device(None))
    except Exception:  # no torch device query must ever stop the GUI from opening
        return "cpu"


@evented
@dataclass
class SpodnetSettings:
    """Settings the user tunes; one instance per Python session (:func:`get_settings`)."""

    n_channels: int = DEFAULT_CHANNELS
    lam: float = DEFAULT_LAMBDA
    device: str = field(default_factory=_default_device)
    # training
    preset: str = "quick"
    n_layers: int = 10
    alpha: float = 0.1
    momentum: bool = True              # learned FISTA momentum (the shipped model has it)
    lr: float = PRESETS["quick"]["lr"]
    epochs: int = PRESETS["quick"]["epochs"]
    batch_size: int = PRESETS["quick"]["batch_size"]
    n_crops: int = PRESETS["quick"]["n_crops"]
    crop_size: int = PRESETS["quick"]["crop_size"]
    # recovery
    tile: int = 0                      # 0: whole frames
    all_frames: bool = True
    # FISTA comparison
    fista_iterations: int = 500
    fista_tol: float = 1e-6
    fista_restart: bool = True
    compare_spodnet: bool = True
    # preprocessing (paper: median 5, minimum 7)
    median: int = 5
    minimum: int = 7
    preprocess_mode: str = "subtract"
    # shared selections (layer names) and the last model source
    observation_layer: str = ""
    psf_layer: str = ""
    model_source: str = ""
    checkpoint_path: str = ""


_SETTINGS: SpodnetSettings | None = None


def get_settings() -> SpodnetSettings:
    """The session-wide settings object (created on first use)."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = SpodnetSettings()
    return _SETTINGS


def reset_settings() -> SpodnetSettings:
    """Forget every tuned setting and trained model (tests use this for isolation)."""
    global _SETTINGS, _REGISTRY
    _SETTINGS = SpodnetSettings()
    _REGISTRY = None
    return _SETTINGS


class SettingsBinder:
    """Two-way binding between Qt controls and :class:`SpodnetSettings` fields.

    The settings object holds this binder only weakly (a bound method), so a closed widget
    is never kept alive by the session-wide settings.
    """

    def __init__(self, settings: SpodnetSettings | None = None):
        self.settings = settings or get_settings()
        self._controls: dict[str, QWidget] = {}
        self._updating = False
        self.settings.events.connect(self._on_settings_changed)

    def bind(self, key: str, control: QWidget) -> QWidget:
        self._controls[key] = control
        self._set_control(control, getattr(self.settings, key))
        if isinstance(control, (QSpinBox, QDoubleSpinBox)):
            control.valueChanged.connect(lambda value, k=key: self._to_settings(k, value))
        elif isinstance(control, QCheckBox):
            control.toggled.connect(lambda value, k=key: self._to_settings(k, bool(value)))
        elif isinstance(control, QComboBox):
            control.currentIndexChanged.connect(lambda _i, k=key, c=control: self._to_settings(k, _combo_value(c)))
        elif isinstance(control, QLineEdit):
            control.editingFinished.connect(lambda k=key, c=control: self._to_settings(k, c.text()))
        else:  # pragma: no cover - programming error
            raise TypeError(f"cannot bind {type(control).__name__}")
        return control

    def _to_settings(self, key: str, value) -> None:
        if self._updating or value is None:
            return
        if getattr(self.settings, key) != value:
            setattr(self.settings, key, value)

    def _on_settings_changed(self, info) -> None:
        key = info.signal.name
        control = self._controls.get(key)
        if control is None:
            return
        try:
            self._set_control(control, info.args[0])
        except RuntimeError:  # the Qt control is gone (widget closed)
            self._controls.pop(key, None)

    def _set_control(self, control: QWidget, value) -> None:
        self._updating = True
        try:
            if isinstance(control, (QSpinBox, QDoubleSpinBox)):
                control.setValue(value)
            elif isinstance(control, QCheckBox):
                control.setChecked(bool(value))
            elif isinstance(control, QComboBox):
                idx = control.findData(value)
                if idx < 0:
                    idx = control.findText(str(value))
                if idx >= 0:
                    control.setCurrentIndex(idx)
            elif isinstance(control, QLineEdit):
                control.setText(str(value))
        finally:
            self._updating = False


def _combo_value(combo: QComboBox):
    data = combo.currentData()
    return data if data is not None else (combo.currentText() or None)


# --------------------------------------------------------------------------- model registry


@dataclass
class RegisteredModel:
    name: str
    net: Any
    info: dict = field(default_factory=dict)


class ModelRegistry:
    """Networks trained in this napari session (newest last); ``changed`` fires on every addition."""

    changed = Signal()

    def __init__(self):
        self._models: dict[str, RegisteredModel] = {}

    def add(self, net, name: str | None = None, info: dict | None = None) -> str:
        base = name or f"trained {time.strftime('%H:%M:%S')} ({net.n_layers} layers)"
        name, i = base, 2
        while name in self._models:
            name, i = f"{base} #{i}", i + 1
        self._models[name] = RegisteredModel(name, net, dict(info or {}))
        self.changed.emit()
        return name

    def get(self, name: str) -> RegisteredModel | None:
        return self._models.get(name)

    def names(self) -> list[str]:
        return list(self._models)

    def latest(self) -> RegisteredModel | None:
        return next(reversed(self._models.values()), None) if self._models else None

    def __len__(self) -> int:
        return len(self._models)


_REGISTRY: ModelRegistry | None = None


def get_model_registry() -> ModelRegistry:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = ModelRegistry()
    return _REGISTRY


# --------------------------------------------------------------------------- layers


def spod_meta(layer) -> dict:
    meta = getattr(layer, "metadata", None) or {}
    value = meta.get(METADATA_KEY)
    return value if isinstance(value, dict) else {}


def spod_kind(layer) -> str | None:
    return spod_meta(layer).get("kind")


def _is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and not getattr(layer, "rgb", False)


#: plugin outputs that are never offered as observations (a recovered stack also has c channels)
_RESULT_KINDS = ("recovered", "truth", "intensity", "orientation", "mean", "difference", "psf")


def is_observation_candidate(layer) -> bool:
    """Image layers that could be a SPoD stack: (c, H, W) or (T, c, H, W) (checked separately)."""
    return _is_image(layer) and layer.ndim in (3, 4) and spod_kind(layer) not in _RESULT_KINDS


def is_psf_candidate(layer) -> bool:
    """Any 2-D grayscale image layer can serve as a PSF (except the plugin's own 2-D results)."""
    return _is_image(layer) and layer.ndim == 2 and spod_kind(layer) not in ("intensity", "mean", "difference")


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


def registered_placement(source_layer, offset_yx=(0.0, 0.0), drop: tuple = ()) -> dict:
    """``translate`` / ``scale`` for a new layer registered to ``source_layer``.

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
    return {"translate": tuple(translate), "scale": tuple(scale)}


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


def add_or_update_image(viewer, data, name: str, kind: str, info: dict | None = None, role: str | None = None,
                        **kwargs):
    """Add an image layer marked ``metadata["spodnet"]["kind"]``, or refresh the layer of that name and kind
    (or of that ``role``, then renamed to ``name``).

    Re-running a recovery therefore updates its result layers instead of piling up copies.
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
        for key in ("translate", "scale", "contrast_limits", "colormap", "blending", "visible", "opacity"):
            if key in kwargs:
                setattr(existing, key, kwargs[key])
        if "contrast_limits" not in kwargs and not rgb:
            existing.reset_contrast_limits()
        return existing
    if existing is not None:
        viewer.layers.remove(existing)
    return viewer.add_image(data, name=name, metadata={METADATA_KEY: meta}, **kwargs)


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


# --------------------------------------------------------------------------- pickers


class LayerPicker(QComboBox):
    """Combo box of the viewer's layers that pass ``accept``; follows inserted/removed/renamed.

    The first entry is ``none_text`` (nothing chosen). With ``shared_key`` the choice is
    mirrored in the session settings, so every picker of that key shows the same layer.
    ``prefer_kind`` picks a layer the plugin marked with that kind when nothing is chosen.
    """

    def __init__(self, viewer, accept: Callable, *, none_text: str = "(none)", shared_key: str | None = None,
                 prefer_kind: str | None = None, auto_select: bool = True, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self._accept = accept
        self._none_text = none_text
        self._shared_key = shared_key
        self._prefer_kind = prefer_kind
        self._auto_select = auto_select
        self._layers: list = []
        self._settings = get_settings()
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.renamed.connect(self.refresh)
        if shared_key:
            self._settings.events.connect(self._on_settings_changed)
        self.currentIndexChanged.connect(self._on_index_changed)
        self.refresh()

    # public
    def layer(self):
        idx = self.currentIndex()
        return self._layers[idx - 1] if 1 <= idx <= len(self._layers) else None

    def set_layer(self, layer) -> None:
        for i, candidate in enumerate(self._layers):
            if candidate is layer:
                self.setCurrentIndex(i + 1)
                return
        self.setCurrentIndex(0)

    def layers(self) -> list:
        return list(self._layers)

    def refresh(self, event=None) -> None:
        try:
            self._refresh()
        except RuntimeError:  # the Qt widget or the viewer is going away
            pass

    def _refresh(self) -> None:
        current = self.layer()
        layers = [layer for layer in self.viewer.layers if self._accept(layer)]
        self.blockSignals(True)
        try:
            self.clear()
            self.addItem(self._none_text)
            self._layers = layers
            for layer in layers:
                self.addItem(layer.name)
            target = current if current is not None and any(lay is current for lay in layers) else None
            if target is None and self._auto_select:
                target = self._preferred(layers)
            self.set_layer(target)
        finally:
            self.blockSignals(False)
        if self.layer() is not current:
            self._on_index_changed(self.currentIndex())

    # internals
    def _preferred(self, layers):
        if self._shared_key:
            name = getattr(self._settings, self._shared_key)
            for layer in layers:
                if layer.name == name:
                    return layer
        if self._prefer_kind:
            marked = [layer for layer in layers if spod_kind(layer) == self._prefer_kind]
            if marked:
                return marked[-1]
        # else the newest layer the plugin did not make for another purpose (e.g. a PSF file
        # opened with napari's own reader)
        unmarked = [layer for layer in layers if spod_kind(layer) is None]
        return unmarked[-1] if unmarked else None

    def _on_index_changed(self, _index: int) -> None:
        layer = self.layer()
        if self._shared_key and layer is not None and getattr(self._settings, self._shared_key) != layer.name:
            setattr(self._settings, self._shared_key, layer.name)

    def _on_settings_changed(self, info) -> None:
        if info.signal.name != self._shared_key:
            return
        try:
            name = info.args[0]
            current = self.layer()
            if current is not None and current.name == name:
                return
            for layer in self._layers:
                if layer.name == name:
                    self.set_layer(layer)
                    return
        except RuntimeError:  # Qt object deleted
            pass


class LayerListPicker(QListWidget):
    """Multi-selection list of the viewer's layers that pass ``accept`` (training data, PSFs to average)."""

    def __init__(self, viewer, accept: Callable, *, prefer_kind: str | None = None, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self._accept = accept
        self._prefer_kind = prefer_kind
        self._layers: list = []
        self.setSelectionMode(QListWidget.SelectionMode.ExtendedSelection)
        self.setMaximumHeight(90)
        viewer.layers.events.inserted.connect(self.refresh)
        viewer.layers.events.removed.connect(self.refresh)
        viewer.layers.events.renamed.connect(self.refresh)
        self.refresh()

    def selected_layers(self) -> list:
        rows = sorted(self.row(item) for item in self.selectedItems())
        return [self._layers[r] for r in rows if r < len(self._layers)]

    def set_selected(self, layers: Iterable) -> None:
        wanted = list(layers)
        for row, layer in enumerate(self._layers):
            self.item(row).setSelected(any(layer is w for w in wanted))

    def refresh(self, event=None) -> None:
        try:
            self._refresh()
        except RuntimeError:  # the Qt widget or the viewer is going away
            pass

    def _refresh(self) -> None:
        selected = self.selected_layers()
        first = not self._layers
        layers = [layer for layer in self.viewer.layers if self._accept(layer)]
        self.blockSignals(True)
        try:
            self.clear()
            self._layers = layers
            for layer in layers:
                self.addItem(QListWidgetItem(layer.name))
            if not selected and (first or not self.selectedItems()) and self._prefer_kind:
                selected = [layer for layer in layers if spod_kind(layer) == self._prefer_kind][-1:]
            self.set_selected(selected)
        finally:
            self.blockSignals(False)


class DevicePicker(QComboBox):
    """CPU, each CUDA device by name, MPS where present (core.devices.available_devices)."""

    def __init__(self, binder: SettingsBinder | None = None, parent=None):
        super().__init__(parent)
        from ..core.devices import available_devices

        for dev, label in available_devices():
            self.addItem(label, dev)
        self.setToolTip("Where the computation runs (PyTorch device).")
        if binder is not None:
            settings = binder.settings
            if self.findData(settings.device) < 0:
                settings.device = self.itemData(0)
            binder.bind("device", self)

    def device(self) -> str:
        return self.currentData() or "cpu"


class ModelSourcePicker(QWidget):
    """Which SPoD-Net to use: one trained in this session, a checkpoint file or the shipped default."""

    REGISTRY, FILE, DEFAULT = "registry", "file", "default"

    def __init__(self, parent=None):
        super().__init__(parent)
        self._settings = get_settings()
        self._registry = get_model_registry()
        self.combo = QComboBox()
        self.path_edit = QLineEdit(self._settings.checkpoint_path)
        self.path_edit.setPlaceholderText("checkpoint .safetensors")
        self.browse_button = QPushButton("…")
        self.browse_button.setMaximumWidth(30)
        self.info_label = QLabel("")
        self.info_label.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path_edit)
        row.addWidget(self.browse_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo)
        layout.addLayout(row)
        layout.addWidget(self.info_label)
        self.browse_button.clicked.connect(self._browse)
        self.path_edit.editingFinished.connect(self._on_path_edited)
        self.combo.currentIndexChanged.connect(self._on_combo_changed)
        self._registry.changed.connect(self._on_registry_changed)
        self.refresh(select_latest=False)

    # public
    def source(self) -> tuple[str, str | None]:
        data = self.combo.currentData()
        return tuple(data) if data else (self.DEFAULT, None)

    def set_source(self, kind: str, name: str | None = None) -> None:
        for i in range(self.combo.count()):
            data = self.combo.itemData(i)
            if data and data[0] == kind and (name is None or data[1] == name):
                self.combo.setCurrentIndex(i)
                return

    def set_checkpoint(self, path) -> None:
        self.path_edit.setText(str(path))
        self.set_source(self.FILE)
        self._on_path_edited()

    def model_argument(self):
        """What :func:`core.recover.recover` takes as ``model``; raises SPoDInputError with a clear message."""
        kind, name = self.source()
        if kind == self.REGISTRY:
            entry = self._registry.get(name)
            if entry is None:
                raise SPoDInputError(f"The model {name!r} is no longer available; train again or choose another.")
            return entry.net
        if kind == self.FILE:
            path = self.path_edit.text().strip()
            if not path:
                raise SPoDInputError("Choose a checkpoint file (.safetensors) for the model.")
            return path
        if not DEFAULT_MODEL_PATH.is_file():
            raise SPoDInputError("The shipped default model is not installed; train a model (Train SPoD-Net) "
                                 "or choose a checkpoint file.")
        return None

    def describe(self) -> str:
        kind, name = self.source()
        if kind == self.REGISTRY:
            return name or "trained model"
        if kind == self.FILE:
            return self.path_edit.text().strip() or "checkpoint"
        return "shipped default"

    def refresh(self, select_latest: bool = False) -> None:
        previous = self.source() if self.combo.count() else None
        self.combo.blockSignals(True)
        try:
            self.combo.clear()
            for name in reversed(self._registry.names()):
                self.combo.addItem(f"Trained here: {name}", (self.REGISTRY, name))
            self.combo.addItem("Checkpoint file…", (self.FILE, None))
            default_label = "Shipped default" + ("" if DEFAULT_MODEL_PATH.is_file() else " (not installed)")
            self.combo.addItem(default_label, (self.DEFAULT, None))
        finally:
            self.combo.blockSignals(False)
        latest = self._registry.latest()
        if select_latest and latest is not None:
            self.set_source(self.REGISTRY, latest.name)
        elif previous is not None and previous != (self.DEFAULT, None):
            self.set_source(*previous)
        elif self._settings.model_source:
            kind, _, name = self._settings.model_source.partition(":")
            self.set_source(kind, name or None)
        elif latest is not None:
            self.set_source(self.REGISTRY, latest.name)
        elif DEFAULT_MODEL_PATH.is_file():
            self.set_source(self.DEFAULT)
        elif self._settings.checkpoint_path:
            self.set_source(self.FILE)
        self._on_combo_changed()

    # internals
    def _on_registry_changed(self) -> None:
        try:
            self.refresh(select_latest=True)
        except RuntimeError:  # widget closed
            pass

    def _on_combo_changed(self, *_):
        kind, name = self.source()
        is_file = kind == self.FILE
        self.path_edit.setVisible(is_file)
        self.browse_button.setVisible(is_file)
        self._settings.model_source = f"{kind}:{name or ''}"
        if kind == self.REGISTRY:
            entry = self._registry.get(name)
            self.info_label.setText(_model_summary(entry.net) if entry else "")
        elif kind == self.DEFAULT:
            self.info_label.setText("" if DEFAULT_MODEL_PATH.is_file()
                                    else "Not installed: train a model or choose a checkpoint.")
        else:
            self._on_path_edited(notify=False)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a SPoD-Net checkpoint", self.path_edit.text(),
                                              "Checkpoints (*.safetensors);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def _on_path_edited(self, notify: bool = True) -> None:
        from ..core.checkpoint import read_checkpoint_metadata

        path = self.path_edit.text().strip()
        self._settings.checkpoint_path = path
        if not path or self.source()[0] != self.FILE:
            self.info_label.setText("")
            return
        try:
            config, _meta = read_checkpoint_metadata(path)
        except SPoDInputError as exc:
            self.info_label.setText(f"⚠ {exc}")
            if notify:
                notify_warning(str(exc))
            return
        self.info_label.setText(f"{config.get('n_layers')}-layer {config.get('architecture')}, PSF "
                                f"{' x '.join(str(s) for s in config.get('psf_shape', []))}, λ {config.get('lam')}")


def _model_summary(net) -> str:
    training = (getattr(net, "metadata", {}) or {}).get("training") or {}
    best = training.get("best_val_loss")
    text = f"{net.n_layers}-layer {getattr(net, 'architecture', 'network')}, PSF {net.psf_shape[0]} x {net.psf_shape[1]}"
    if best is not None:
        text += f", best validation loss {best:.4g}"
    if training.get("cancelled"):
        text += " (stopped early)"
    return text


# --------------------------------------------------------------------------- plot


class CurvePlot(QWidget):
    """A small matplotlib plot of named curves (loss, objective), redrawn at most ~8 times a second."""

    def __init__(self, xlabel: str = "", ylabel: str = "", logy: bool = True, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 2.2), dpi=80, tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(150)
        self.axes = self.figure.add_subplot(111)
        self._xlabel, self._ylabel, self._logy = xlabel, ylabel, logy
        self._series: dict[str, tuple[list, list]] = {}
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(125)
        self._timer.timeout.connect(self._redraw)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._redraw(force=True)

    def clear(self) -> None:
        self._series.clear()
        self._redraw(force=True)

    def append(self, name: str, x: float, y: float) -> None:
        xs, ys = self._series.setdefault(name, ([], []))
        xs.append(float(x))
        ys.append(float(y))
        self._mark_dirty()

    def set_series(self, name: str, xs, ys) -> None:
        self._series[name] = ([float(v) for v in xs], [float(v) for v in ys])
        self._mark_dirty()

    def series(self, name: str) -> tuple[list, list]:
        xs, ys = self._series.get(name, ([], []))
        return list(xs), list(ys)

    def flush(self) -> None:
        self._redraw(force=True)

    def _mark_dirty(self) -> None:
        self._dirty = True
        if not self._timer.isActive():
            self._timer.start()

    def _redraw(self, force: bool = False) -> None:
        if not (self._dirty or force):
            self._timer.stop()
            return
        self._dirty = False
        ax = self.axes
        ax.clear()
        ax.set_xlabel(self._xlabel, fontsize=8)
        ax.set_ylabel(self._ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        plotted = False
        for name, (xs, ys) in self._series.items():
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.2, marker="." if len(xs) < 30 else None)
                plotted = True
        if plotted:
            positive = all(y > 0 for _xs, ys in self._series.values() for y in ys)
            if self._logy and positive:
                ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper right")
        self.canvas.draw_idle()


# --------------------------------------------------------------------------- notifications


def notify_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)


def error_message(exc: BaseException) -> str:
    """A message for the user: our own errors speak for themselves, others get their type."""
    if isinstance(exc, SPoDInputError):
        return str(exc)
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


# --------------------------------------------------------------------------- jobs


class JobControl:
    """Handed to a job's work function (in the worker thread): report progress, poll for cancel."""

    def __init__(self):
        self._cancel = threading.Event()
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()

    def report(self, item) -> None:
        self.queue.put(item)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when cancel is requested (immediately if it already was)."""
        with self._lock:
            self._hooks.append(hook)
            already = self._cancel.is_set()
        if already:
            hook()

    def cancel(self) -> None:
        with self._lock:
            self._cancel.set()
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:  # a cancel hook must never break the GUI
                traceback.print_exc()


@dataclass
class _Outcome:
    status: str                 # "ok", "cancelled" or "error"
    value: Any = None
    error: Optional[BaseException] = None


def _failure(exc: Exception) -> _Outcome:
    """An error outcome; unexpected errors (not the user-facing SPoDInputError) keep their traceback on stderr."""
    if not isinstance(exc, SPoDInputError):
        traceback.print_exc()
    return _Outcome("error", error=exc)


class Job(QObject):
    """One background job on a napari thread worker.

    ``start_function(func, *args)``: ``func(control, *args)`` runs in a FunctionWorker and
    reports progress with ``control.report(item)`` (queued; a timer on the GUI thread hands
    batches of items to ``on_progress``). ``start_generator(gen_func, *args)``: a
    GeneratorWorker whose yields go to ``on_progress``. Cancel (``cancel()``) sets a flag the
    work polls and runs the hooks it registered (e.g. ``Trainer.cancel``);
    :class:`~napari_spodnet.core.recover.RecoveryCancelled` ends a job quietly. Any other
    exception is caught in the worker and shown as a napari error notification; the
    ``on_result`` callback only ever sees successful results.
    """

    def __init__(self, parent: QObject, *, title: str, on_progress: Callable[[list], None] | None = None,
                 on_result: Callable[[Any], None] | None = None, on_cancelled: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_finished: Callable[[], None] | None = None):
        super().__init__(parent)
        self.title = title
        self.control = JobControl()
        self.worker = None
        self.outcome: _Outcome | None = None
        self.running = False
        self._on_progress = on_progress
        self._on_result = on_result
        self._on_cancelled = on_cancelled
        self._on_error = on_error
        self._on_finished = on_finished
        self._timer = QTimer(self)
        self._timer.setInterval(50)
        self._timer.timeout.connect(self._drain)
        self.started_at = 0.0

    # ---- starting
    def start_function(self, func: Callable, *args) -> "Job":
        control = self.control

        def run():
            try:
                return _Outcome("ok", func(control, *args))
            except RecoveryCancelled:
                return _Outcome("cancelled")
            except Exception as exc:
                return _failure(exc)

        return self._start(run)

    def start_generator(self, gen_func: Callable, *args) -> "Job":
        control = self.control

        def run():
            try:
                value = yield from gen_func(control, *args)
                return _Outcome("ok", value)
            except RecoveryCancelled:
                return _Outcome("cancelled")
            except Exception as exc:
                return _failure(exc)

        return self._start(run)

    def _start(self, run) -> "Job":
        from napari.qt.threading import create_worker

        worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._finish)
        if hasattr(worker, "yielded"):
            worker.yielded.connect(self._on_yielded)
        self.worker = worker
        self.running = True
        self.started_at = time.perf_counter()
        self._timer.start()
        worker.start()
        return self

    # ---- control
    def cancel(self) -> None:
        self.control.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self.control.cancelled()

    # ---- GUI-thread slots
    def _drain(self) -> None:
        items = []
        while True:
            try:
                items.append(self.control.queue.get_nowait())
            except queue.Empty:
                break
        if items and self._on_progress is not None:
            self._safe(self._on_progress, items)

    def _on_yielded(self, item) -> None:
        if self._on_progress is not None:
            self._safe(self._on_progress, [item])

    def _on_returned(self, outcome) -> None:
        self.outcome = outcome if isinstance(outcome, _Outcome) else _Outcome("ok", outcome)

    def _finish(self) -> None:
        self._timer.stop()
        self._drain()
        self.running = False
        outcome = self.outcome or _Outcome("cancelled")  # aborted from napari's activity dock
        if outcome.status == "ok" and self.control.cancelled() and outcome.value is None:
            outcome = _Outcome("cancelled")
        if outcome.status == "ok":
            if self._on_result is not None:
                self._safe(self._on_result, outcome.value)
        elif outcome.status == "cancelled":
            if self._on_cancelled is not None:
                self._safe(self._on_cancelled)
            else:
                notify_info(f"{self.title} cancelled.")
        else:
            if self._on_error is not None:
                self._safe(self._on_error, outcome.error)
            else:
                notify_error(f"{self.title} failed: {error_message(outcome.error)}")
        if self._on_finished is not None:
            self._safe(self._on_finished)

    def _safe(self, fn, *args) -> None:
        """GUI callbacks never crash napari: a failure becomes an error notification."""
        try:
            fn(*args)
        except RuntimeError as exc:
            if "deleted" in str(exc):  # the widget was closed while the job ran
                return
            traceback.print_exc()
            notify_error(f"{self.title}: {error_message(exc)}")
        except Exception as exc:
            traceback.print_exc()
            notify_error(f"{self.title}: {error_message(exc)}")


# --------------------------------------------------------------------------- small widget helpers


def make_spin(minimum: float, maximum: float, value: float, *, decimals: int | None = None, step: float | None = None,
              tooltip: str = "", suffix: str = "") -> QSpinBox | QDoubleSpinBox:
    if decimals is None:
        spin = QSpinBox()
        spin.setRange(int(minimum), int(maximum))
        spin.setValue(int(value))
        if step:
            spin.setSingleStep(int(step))
    else:
        spin = QDoubleSpinBox()
        spin.setDecimals(decimals)
        spin.setRange(minimum, maximum)
        spin.setValue(value)
        if step:
            spin.setSingleStep(step)
    if suffix:
        spin.setSuffix(suffix)
    if tooltip:
        spin.setToolTip(tooltip)
    spin.setKeyboardTracking(False)
    return spin


class ProgressRow(QWidget):
    """A progress bar with a status line and a time readout."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.label)

    def set_fraction(self, fraction: float) -> None:
        self.bar.setRange(0, 1000)
        self.bar.setValue(int(round(1000 * min(max(fraction, 0.0), 1.0))))

    def set_busy(self) -> None:
        self.bar.setRange(0, 0)

    def set_text(self, text: str) -> None:
        self.label.setText(text)

    def text(self) -> str:
        return self.label.text()


class JobWidget(QWidget):
    """A dock widget that runs one background :class:`Job` at a time: one button starts it
    and, while it runs, cancels it; closing the widget cancels it too."""

    #: Names the job in status lines and notifications ("Recovery failed: ...").
    job_title = "Job"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = get_settings()
        self.binder = SettingsBinder(self.settings)
        self._job: Job | None = None

    def _on_cancelled(self) -> None:
        self.progress.set_fraction(0)
        self.progress.set_text(f"{self.job_title} cancelled.")

    def _on_error(self, exc) -> None:
        self.progress.set_fraction(0)
        self.progress.set_text(f"{self.job_title} failed: {error_message(exc)}")
        notify_error(f"{self.job_title} failed: {error_message(exc)}")

    def is_running(self) -> bool:
        return self._job is not None and self._job.running

    def toggle(self) -> None:
        if self.is_running():
            self.cancel()
        else:
            self.start()

    def start(self):  # pragma: no cover - each widget defines it
        raise NotImplementedError

    def cancel(self) -> None:
        if self.is_running():
            self._job.cancel()
            self.progress.set_text("Cancelling…")

    def closeEvent(self, event):  # noqa: N802 (Qt)
        if self.is_running():
            self._job.cancel()
        super().closeEvent(event)
