"""Choosers of the dock widgets: layers (following ``viewer.layers``), device, SPoD-Net model.

Layer choosers keep layers by :func:`._layers.layer_key` (napari's ``unique_id``): a
widget docked from the Plugins menu sees every layer through a fresh proxy object, so
identity (``is``) would lose a layer the widget itself just added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.recover import DEFAULT_MODEL_PATH
from ..core.validation import SPoDInputError
from ._layers import contains_layer, layer_key, same_layer, spod_kind
from ._models import get_model_registry, model_summary
from ._notify import notify_warning
from ._settings import SettingsBinder, get_settings


def _connect_layer_events(viewer, slot) -> None:
    for name in ("inserted", "removed", "renamed"):
        getattr(viewer.layers.events, name).connect(slot)


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
        _connect_layer_events(viewer, self.refresh)
        if shared_key:
            self._settings.events.connect(self._on_settings_changed)
        self.currentIndexChanged.connect(self._on_index_changed)
        self.refresh()

    # public
    def layer(self):
        idx = self.currentIndex()
        return self._layers[idx - 1] if 1 <= idx <= len(self._layers) else None

    def set_layer(self, layer) -> None:
        key = layer_key(layer)
        for i, candidate in enumerate(self._layers):
            if key is not None and layer_key(candidate) == key:
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
            target = current if contains_layer(layers, current) else None
            if target is None and self._auto_select:
                target = self._preferred(layers)
            self.set_layer(target)
        finally:
            self.blockSignals(False)
        now = self.layer()
        if not (same_layer(now, current) or (now is None and current is None)):
            self.currentIndexChanged.emit(self.currentIndex())  # blocked above; tell the listeners once

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
        _connect_layer_events(viewer, self.refresh)
        self.refresh()

    def selected_layers(self) -> list:
        rows = sorted(self.row(item) for item in self.selectedItems())
        return [self._layers[r] for r in rows if r < len(self._layers)]

    def set_selected(self, layers: Iterable) -> None:
        wanted = {layer_key(w) for w in layers}
        for row, layer in enumerate(self._layers):
            self.item(row).setSelected(layer_key(layer) in wanted)

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


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as a checkpoint (None when its header reads fine)."""
    from ..core.checkpoint import read_checkpoint_metadata

    if not path:
        return "choose a checkpoint file (.safetensors) for the model."
    p = Path(path).expanduser()
    if p.is_dir():
        return f"{p} is a folder; choose a checkpoint file (.safetensors) inside it."
    if not p.exists():
        return f"the checkpoint {p} does not exist; check the path."
    try:
        read_checkpoint_metadata(p)
    except SPoDInputError as exc:
        return str(exc)
    return None


class ModelSourcePicker(QWidget):
    """Which SPoD-Net to use: one trained in this session, a checkpoint file or the shipped default.

    The choice (and the checkpoint path) is one session setting: a checkpoint chosen in
    the Recover widget is the one the FISTA comparison uses, and the other way round. A
    model whose training was stopped early is offered but never selected on its own.
    """

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
        self._settings.events.model_source.connect(self._on_shared_source)
        self._settings.events.checkpoint_path.connect(self._on_shared_path)
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
            problem = checkpoint_problem(path)
            if problem:
                raise SPoDInputError(f"Checkpoint: {problem}")
            return path
        if not DEFAULT_MODEL_PATH.is_file():
            raise SPoDInputError("The shipped default model is not installed; train a model (Train SPoD-Net) "
                                 "or choose a checkpoint file.")
        return None

    def model_psf_shape(self) -> tuple[int, int] | None:
        """The PSF size (a, b) the chosen model was trained with, from its header (None if unknown)."""
        from ..core.checkpoint import read_checkpoint_metadata

        try:
            model = self.model_argument()
            if model is None:
                model = DEFAULT_MODEL_PATH
            if isinstance(model, (str, Path)):
                shape = read_checkpoint_metadata(model)[0].get("psf_shape")
            else:
                shape = model.psf_shape
            return tuple(int(s) for s in shape)
        except Exception:
            return None

    def describe(self) -> str:
        kind, name = self.source()
        if kind == self.REGISTRY:
            return name or "trained model"
        if kind == self.FILE:
            return Path(self.path_edit.text().strip()).name or "checkpoint"
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
        latest = self._registry.latest(complete_only=True)
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
            entry = self._registry.latest()
            # a finished model becomes the choice; a stopped (partial) one is only offered
            self.refresh(select_latest=entry is not None and not entry.stopped_early)
        except RuntimeError:  # widget closed
            pass

    def _on_shared_source(self, value: str) -> None:
        try:
            kind, _, name = (value or "").partition(":")
            if self.source() != (kind, name or None):
                self.set_source(kind, name or None)
        except RuntimeError:  # widget closed
            pass

    def _on_shared_path(self, value: str) -> None:
        try:
            if self.path_edit.text() != value:
                self.path_edit.setText(value)
                if self.source()[0] == self.FILE:
                    self._show_checkpoint_info(notify=False)
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
            self.info_label.setText(model_summary(entry.net) if entry else "")
        elif kind == self.DEFAULT:
            self.info_label.setText("" if DEFAULT_MODEL_PATH.is_file()
                                    else "Not installed: train a model or choose a checkpoint.")
        else:
            self._show_checkpoint_info(notify=False)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a SPoD-Net checkpoint", self.path_edit.text(),
                                              "Checkpoints (*.safetensors);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def _on_path_edited(self, notify: bool = True) -> None:
        self._settings.checkpoint_path = self.path_edit.text().strip()
        self._show_checkpoint_info(notify)

    def _show_checkpoint_info(self, notify: bool) -> None:
        from ..core.checkpoint import read_checkpoint_metadata

        path = self.path_edit.text().strip()
        if not path or self.source()[0] != self.FILE:
            self.info_label.setText("")
            return
        problem = checkpoint_problem(path)
        if problem:
            self.info_label.setText(f"⚠ {problem}")
            if notify:
                notify_warning(problem)
            return
        config, _meta = read_checkpoint_metadata(path)
        self.info_label.setText(f"{config.get('n_layers')}-layer {config.get('architecture')}, PSF "
                                f"{' x '.join(str(s) for s in config.get('psf_shape', []))}, λ {config.get('lam')}")
