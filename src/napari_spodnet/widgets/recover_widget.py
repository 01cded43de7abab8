"""Dock widget 3, "Recover": one SPoD-Net pass over an observation or a time series.

The model is the one just trained in this session, a checkpoint file or the shipped
default (:class:`ModelSourcePicker`). :func:`core.recover.recover` runs in a napari
worker; its progress callback queues :class:`RecoveryProgress` items for the GUI thread
and returns True once Cancel was pressed, which makes the core raise
:class:`RecoveryCancelled` (handled quietly). Results come back as three layers
registered to the observation (method.md section 2): the orientation-resolved stack,
the summed intensity and an orientation-coloured composite.
"""

from __future__ import annotations

from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QLabel, QPushButton, QVBoxLayout

from ..core.recover import RecoveryCancelled, RecoveryProgress, orientation_composite, recover
from ._shared import (
    JobWidget,
    DevicePicker,
    Job,
    LayerPicker,
    ModelSourcePicker,
    ProgressRow,
    add_or_update_image,
    current_frame,
    error_message,
    is_observation_candidate,
    is_psf_candidate,
    make_spin,
    notify_error,
    observation_problem,
    registered_placement,
    spod_meta,
)


def _recover_work(control, stack, model, psf, device: str, tile: int, n_channels: int):
    """Worker: core.recover with a progress callback that queues updates and polls Cancel."""

    def progress(update: RecoveryProgress) -> bool:
        control.report(update)
        return control.cancelled()

    if control.cancelled():
        raise RecoveryCancelled("cancelled before the start")
    result = recover(stack, psf, method="spodnet", model=model, tile=tile or None, device=device,
                     n_channels=n_channels, progress=progress)
    composite = orientation_composite(result.intensity, result.orientation)
    return result, composite


def result_info(result, source_layer, model_text: str, frame: int | None) -> dict:
    """Layer metadata for a RecoveryResult (written to TIFF by the writer)."""
    info = {
        "method": result.method,
        "lam": result.lam,
        "seconds": round(float(result.seconds), 4),
        "objective": result.objective,
        "translate": list(result.translate),
        "model": model_text if result.method == "spodnet" else None,
        "device": result.info.get("device"),
        "tiles": result.info.get("tiles"),
        "normalization": {"offset": result.normalization.offset, "scale": result.normalization.scale},
        "source": source_layer.name,
        "frame": frame,
    }
    if result.info.get("psf_mismatch") is not None:
        info["psf_mismatch"] = result.info["psf_mismatch"]
    if result.info.get("fista_iterations"):
        info["fista_iterations"] = result.info["fista_iterations"]
    pixel_size = spod_meta(source_layer).get("pixel_size")
    if pixel_size:
        info["pixel_size"] = pixel_size
    return info


def add_result_layers(viewer, result, composite, source_layer, info: dict, frame: int | None,
                      label: str = "SPoD-Net") -> dict:
    """Add (or refresh) the stack, intensity and orientation layers, registered to ``source_layer``."""
    one_frame_of_series = frame is not None and source_layer.ndim == 4
    lead_drop = (0,) if one_frame_of_series else ()
    stack_place = registered_placement(source_layer, result.translate, drop=lead_drop)
    flat_place = registered_placement(source_layer, result.translate, drop=lead_drop + (-3,))
    series = result.image.ndim == 4
    base = source_layer.name + (f" t={frame}" if one_frame_of_series else "")
    stack = add_or_update_image(
        viewer, result.image, f"{base} {label}", "recovered", info, visible=False, colormap="gray",
        axis_labels=("t", "orientation", "y", "x") if series else ("orientation", "y", "x"), **stack_place)
    intensity = add_or_update_image(
        viewer, result.intensity, f"{base} {label} intensity", "intensity", info, colormap="gray",
        visible=False, **flat_place)
    orientation = add_or_update_image(
        viewer, composite, f"{base} {label} orientation", "orientation", info, rgb=True, **flat_place)
    return {"recovered": stack, "intensity": intensity, "orientation": orientation}


class RecoverWidget(JobWidget):
    """Recover an observation (or time series) with a SPoD-Net."""

    job_title = "Recovery"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.last_result = None
        self.result_layers: dict = {}

        self.model_picker = ModelSourcePicker()
        self.observation_picker = LayerPicker(napari_viewer, is_observation_candidate,
                                              shared_key="observation_layer", prefer_kind="observation")
        self.all_frames_check = self.binder.bind("all_frames", QCheckBox("all time points (else the current one)"))
        self.psf_picker = LayerPicker(napari_viewer, is_psf_candidate, none_text="(the model's own PSF)",
                                      auto_select=False)
        self.psf_picker.setToolTip("Optional: a PSF to check against the model's (a warning if they differ).")
        self.device_picker = DevicePicker(self.binder)
        self.tile_spin = self.binder.bind("tile", make_spin(
            0, 16384, self.settings.tile, step=64,
            tooltip="Observation tile size in pixels for large images (0: whole frames)."))
        self.tile_spin.setSpecialValueText("whole frames")
        self.run_button = QPushButton("Recover")
        self.progress = ProgressRow()
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)

        model_box = QGroupBox("Model")
        QVBoxLayout(model_box).addWidget(self.model_picker)
        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        form.addRow("observation", self.observation_picker)
        form.addRow("", self.all_frames_check)
        form.addRow("PSF check", self.psf_picker)
        form.addRow("device", self.device_picker)
        form.addRow("tile size", self.tile_spin)
        layout = QVBoxLayout(self)
        layout.addWidget(model_box)
        layout.addWidget(data_box)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.result_label)
        layout.addStretch(1)

        self.observation_picker.currentIndexChanged.connect(self._update_frames_option)
        self.run_button.clicked.connect(self.toggle)
        self._update_frames_option()

    def _update_frames_option(self, *_):
        layer = self.observation_picker.layer()
        self.all_frames_check.setEnabled(layer is not None and layer.ndim == 4)

    def start(self) -> Job | None:
        if self.is_running():
            return None
        layer = self.observation_picker.layer()
        if layer is None:
            notify_error("Recover: choose an observation layer.")
            return None
        n = self.settings.n_channels
        problem = observation_problem(layer.data.shape, n)
        if problem:
            notify_error(f"Recover: {problem}")
            return None
        try:
            model = self.model_picker.model_argument()
        except Exception as exc:
            notify_error(f"Recover: {error_message(exc)}")
            return None
        frame = None
        stack = layer.data
        if layer.ndim == 4 and not self.settings.all_frames:
            frame = current_frame(self.viewer, layer)
            stack = layer.data[frame]
        psf_layer = self.psf_picker.layer()
        psf = None if psf_layer is None else psf_layer.data
        model_text = self.model_picker.describe()
        self.run_button.setText("Cancel")
        self.progress.set_fraction(0)
        self.progress.set_text(f"Recovering '{layer.name}' with {model_text}…")

        def on_result(out):
            result, composite = out
            info = result_info(result, layer, model_text, frame)
            self.last_result = result
            self.result_layers = add_result_layers(self.viewer, result, composite, layer, info, frame)
            n_frames = 1 if result.image.ndim == 3 else result.image.shape[0]
            obj = result.objective
            obj_text = (f"objective {obj:.4g}" if isinstance(obj, float)
                        else "" if obj is None else f"mean objective {float(sum(obj) / len(obj)):.4g}")
            text = (f"Recovered {n_frames} frame(s) in {result.seconds:.2f} s on {result.info.get('device')}"
                    f" ({result.info.get('tiles')} tile(s)); {obj_text}.")
            self.result_label.setText(text)
            self.progress.set_fraction(1)
            self.progress.set_text("Done.")

        self._job = Job(self, title="Recovery", on_progress=self._on_progress, on_result=on_result,
                        on_cancelled=self._on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._job.start_function(_recover_work, stack, model, psf, self.device_picker.device(),
                                        int(self.settings.tile), n)

    def _on_progress(self, items) -> None:
        update = items[-1]
        if isinstance(update, RecoveryProgress):
            self.progress.set_fraction(update.fraction)
            self.progress.set_text(f"{update.message} ({update.done}/{update.total})")

    def _on_finished(self) -> None:
        self.run_button.setText("Recover")

