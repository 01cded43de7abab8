"""Session state of the napari-spodnet widgets: one evented settings object.

:class:`SpodnetSettings` / :func:`get_settings`: lambda, device, preset, ... persist between
widget uses and stay in sync between widgets; :class:`SettingsBinder` ties Qt controls to
its fields (two-way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psygnal import evented
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from ..core.solvers import DEFAULT_LAMBDA
from ..core.training import PRESETS
from ..core.validation import DEFAULT_CHANNELS


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
    dense_stage_epochs: int = PRESETS["quick"]["dense_stage_epochs"]
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
    global _SETTINGS
    from ._models import reset_model_registry

    _SETTINGS = SpodnetSettings()
    reset_model_registry()
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
