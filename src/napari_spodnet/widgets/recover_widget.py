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

from qtpy.QtWidgets import QCheckBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout

from ..core.recover import RecoveryCancelled, RecoveryProgress, orientation_composite, recover
from ._controls import ProgressRow, make_spin
from ._jobs import Job, JobWidget
from ._layers import (
    add_or_update_image,
    current_frame,
    display_range,
    is_observation_candidate,
    is_psf_candidate,
    observation_problem,
    plane_series,
    psf_array,
    registered_placement,
    series_plane_placement,
    show_scale_bar_if_physical,
    spod_meta,
    value_problem,
)
from ._legend import wheel_pixmap
from ._notify import error_message
from ._pickers import DevicePicker, LayerPicker, ModelSourcePicker


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


def progress_wording(message: str) -> str:
    """The core's progress message in plain words ("frames 3-3 of 8" -> "frame 3 of 8")."""
    import re

    match = re.fullmatch(r"frames (\d+)-(\d+) of (\d+)", message)
    if match and match.group(1) == match.group(2):
        return f"frame {match.group(1)} of {match.group(3)}"
    return message


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
    """Add (or refresh) the stack, intensity and orientation layers, registered to ``source_layer``.

    * (c, H, W) source: (c, h, w) stack, (h, w) intensity and (h, w, 3) composite;
    * one frame of a (T, c, H, W) series: the same, without a t axis (named "t=<frame>");
    * a whole series: (T, c, h, w) stack, and intensity / composite as (T, 1, h, w[, 3]) so
      that napari puts them on the t axis and they follow the t slider
      (:func:`._layers.series_plane_placement`).
    """
    one_frame_of_series = frame is not None and source_layer.ndim == 4
    whole_series = result.image.ndim == 4
    base = source_layer.name + (f" t={frame}" if one_frame_of_series else "")
    if whole_series:
        stack_place = registered_placement(source_layer, result.translate)
        flat_place = series_plane_placement(source_layer, result.translate)
        intensity_data, composite_data = plane_series(result.intensity), plane_series(composite)
        flat_labels = tuple(source_layer.axis_labels)
    else:
        lead_drop = (0,) if one_frame_of_series else ()
        stack_place = registered_placement(source_layer, result.translate, drop=lead_drop)
        flat_place = registered_placement(source_layer, result.translate, drop=lead_drop + (-3,))
        intensity_data, composite_data = result.intensity, composite
        flat_labels = ("y", "x")
    stack = add_or_update_image(
        viewer, result.image, f"{base} {label}", "recovered", info, visible=False, colormap="gray",
        axis_labels=("t", "orientation", "y", "x") if whole_series else ("orientation", "y", "x"), **stack_place)
    intensity = add_or_update_image(
        viewer, intensity_data, f"{base} {label} intensity", "intensity", info, colormap="gray",
        visible=False, axis_labels=flat_labels, contrast_limits=display_range(intensity_data), **flat_place)
    orientation = add_or_update_image(
        viewer, composite_data, f"{base} {label} orientation", "orientation", info, rgb=True,
        axis_labels=flat_labels, **flat_place)
    show_scale_bar_if_physical(viewer, source_layer)
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
        # what the orientation composite's colours mean
        self.legend = QLabel()
        self.legend.setPixmap(wheel_pixmap(84))
        self.legend_text = QLabel("Orientation composite: hue = dipole angle, brightness = intensity. "
                                  "Angles counter-clockwise from the x axis (0° → red, 60° → green, "
                                  "120° → blue); opposite sides of the ring are the same orientation.")
        self.legend_text.setWordWrap(True)
        legend_box = QGroupBox("Orientation colours")
        legend_row = QHBoxLayout(legend_box)
        legend_row.addWidget(self.legend)
        legend_row.addWidget(self.legend_text, 1)

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
        layout.addWidget(legend_box)
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
            self.refuse("choose an observation layer.")
            return None
        n = self.settings.n_channels
        problem = observation_problem(layer.data.shape, n)
        if problem:
            self.refuse(problem)
            return None
        try:
            model = self.model_picker.model_argument()
        except Exception as exc:
            self.refuse(error_message(exc))
            return None
        frame = None
        stack = layer.data
        if layer.ndim == 4 and not self.settings.all_frames:
            frame = current_frame(self.viewer, layer)
            stack = layer.data[frame]
        problem = value_problem(stack)
        if problem:
            self.refuse(f"'{layer.name}': {problem}")
            return None
        psf_layer = self.psf_picker.layer()
        try:
            psf = None if psf_layer is None else psf_array(psf_layer)
        except Exception as exc:
            self.refuse(f"PSF '{psf_layer.name}': {error_message(exc)}")
            return None
        wanted = self.model_picker.model_psf_shape()
        if psf is not None and wanted is not None and tuple(psf.shape) != wanted:
            self.refuse(f"the model was trained for a {wanted[0]} x {wanted[1]} PSF; the PSF '{psf_layer.name}' is "
                        f"{psf.shape[0]} x {psf.shape[1]}. Choose a model trained for this PSF, or no PSF check.")
            return None
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
            self.progress.set_text(progress_wording(update.message))

    def _on_finished(self) -> None:
        self.run_button.setText("Recover")

