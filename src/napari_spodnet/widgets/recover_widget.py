"""Dock widget 3, "Recover": one SPoD-Net pass over an observation or a time series.

The model is the one just trained in this session, a checkpoint file or the shipped
default (:class:`ModelSourcePicker`). :func:`core.recover.recover` runs in a napari
worker; its progress callback queues :class:`RecoveryProgress` items for the GUI thread
and returns True once Cancel was pressed, which makes the core raise
:class:`RecoveryCancelled` (handled quietly). Results come back as three layers
registered to the observation (method.md section 2): the orientation-resolved stack,
the summed intensity and an orientation-coloured composite.

A (T, c, H, W) series can instead be recovered *lazily* (the default beyond
:data:`LAZY_DEFAULT_ABOVE_FRAMES` frames): the same three layers appear at once as dask
arrays whose frames are recovered when the t slider shows them
(:mod:`napari_spodnet.lazy`, :func:`.lazy_series.add_lazy_recovery`). "Recover all" fills
every frame's maps in a worker (progress, frames/s, Cancel) into the cache the layers
read, so scrubbing afterwards recovers nothing; "Save to…" streams the series to BigTIFF
or OME-Zarr (:func:`napari_spodnet.stream.recover_to_file`, resumable) in a worker.
Frames are keyed by a token of the model's weights, lambda and settings: recovering with
another model gives new arrays and never shows a stale frame, and changing the model
while lazy layers are shown rebuilds them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QPushButton, QVBoxLayout)

from ..core.recover import FrameRecoverer, RecoveryCancelled, RecoveryProgress, orientation_composite, recover
from ..lazy import FillProgress, LazyRecovery
from ..stream import StreamProgress, recover_to_file, refuse_overwriting_input
from ._controls import ProgressRow, make_spin
from ._jobs import Job, JobWidget, StepChain
from ._layers import (
    add_or_update_image,
    contains_layer,
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
from ._notify import error_message, notify_info
from ._pickers import DevicePicker, LayerPicker, ModelSourcePicker
from .lazy_series import SESSION_CACHE, lazy_layer_steps

#: Series with more frames than this are recovered lazily unless the user says otherwise
#: (recovering 8 frames of 512 x 512 eagerly takes ~4 s and holds ~170 MB of results).
LAZY_DEFAULT_ABOVE_FRAMES = 4
#: "Save to…" output choices: label -> stream.recover_to_file's ``outputs``
SAVE_OUTPUTS = {"intensity + orientation": "intensity,orientation", "all (stack, intensity, orientation)": "all",
                "orientation-resolved stack": "image"}


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


def _lazy_work(control, data, model, psf, device: str, tile: int, n_channels: int, frame: int):
    """Worker: build the lazy series (model, normalisation fitted on up to 8 frames) and recover
    the frame on screen, so the layers appear with it already cached. Returns
    ``(series, saturation, seconds of the first frame)``."""
    control.report(RecoveryProgress(0, 2, "loading the model and fitting the normalisation"))
    engine = FrameRecoverer.create(psf, method="spodnet", model=model, tile=tile or None, device=device,
                                   n_channels=n_channels)
    series = LazyRecovery(data, engine=engine, cache=SESSION_CACHE, n_channels=n_channels)
    if control.cancelled():
        raise RecoveryCancelled("cancelled")
    control.report(RecoveryProgress(1, 2, f"recovering frame {frame + 1} (the one shown)"))
    start = time.perf_counter()
    top = series.saturation(frame)
    return series, top, time.perf_counter() - start


def _fill_work(control, series: LazyRecovery):
    """Worker: recover every frame the map cache can keep ("Recover all"); cancel between frames."""
    return series.fill(progress=lambda state: control.report(state) or control.cancelled())


def _save_work(control, series: LazyRecovery, data, output: str, outputs: str):
    """Worker: stream the series to ``output`` with the lazy layers' model and settings (a copy of
    their recoverer, so fitting it again here never races the layers); resumes a partial output
    of the same settings. Cancel between frames (and FISTA iterations) keeps the partial output."""
    engine = copy.copy(series.engine)
    return recover_to_file(data, output, engine=engine, outputs=outputs, resume=True,
                           n_channels=engine.n_channels,
                           progress=lambda state: control.report(state) or control.cancelled())


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
    """Add (or refresh) the result layers now (all of :func:`result_layer_steps` in this turn)."""
    layers: dict = {}
    for step in result_layer_steps(viewer, result, composite, source_layer, info, frame, layers, label):
        step()
    return layers


def result_layer_steps(viewer, result, composite, source_layer, info: dict, frame: int | None, layers: dict,
                       label: str = "SPoD-Net") -> list:
    """The stack, intensity and orientation layers, registered to ``source_layer``, as GUI steps of one
    napari call each (for :class:`._jobs.StepChain`); they fill ``layers`` (recovered / intensity /
    orientation).

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
    def stack():
        layers["recovered"] = add_or_update_image(
            viewer, result.image, f"{base} {label}", "recovered", info, visible=False, colormap="gray",
            axis_labels=("t", "orientation", "y", "x") if whole_series else ("orientation", "y", "x"),
            **stack_place)

    def intensity():
        layers["intensity"] = add_or_update_image(
            viewer, intensity_data, f"{base} {label} intensity", "intensity", info, colormap="gray",
            visible=False, axis_labels=flat_labels, contrast_limits=display_range(intensity_data), **flat_place)

    def orientation():
        layers["orientation"] = add_or_update_image(
            viewer, composite_data, f"{base} {label} orientation", "orientation", info, rgb=True,
            axis_labels=flat_labels, **flat_place)

    return [stack, intensity, orientation, lambda: show_scale_bar_if_physical(viewer, source_layer)]


class RecoverWidget(JobWidget):
    """Recover an observation (or time series) with a SPoD-Net."""

    job_title = "Recovery"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.last_result = None
        self.result_layers: dict = {}
        self._presenting: StepChain | None = None  # result layers being added, one napari call per turn

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
        self.lazy_check = QCheckBox("Recover lazily (frames on demand)")
        self.lazy_check.setToolTip("For a time series: the result layers appear at once and each frame is "
                                   "recovered when the t slider shows it (one network pass). 'Recover all' "
                                   "fills the rest in the background; 'Save to…' writes the series to disk.")
        self._lazy_choice_made = False  # the user ticked or cleared it: keep their choice
        self.lazy_check.clicked.connect(self._on_lazy_clicked)
        self.run_button = QPushButton("Recover")
        self.recover_all_button = QPushButton("Recover all")
        self.recover_all_button.setToolTip("Recover every frame of the lazy series in the background, so that "
                                           "moving the t slider afterwards is instant.")
        self.save_button = QPushButton("Save to…")
        self.save_button.setToolTip("Write the lazy series to disk (BigTIFF, or OME-Zarr for a .zarr name), "
                                    "frame by frame; a cancelled save is resumed by saving to the same name.")
        self.save_outputs = QComboBox()
        for label, value in SAVE_OUTPUTS.items():
            self.save_outputs.addItem(label, value)
        self.lazy: LazyRecovery | None = None
        self._lazy_source = None   # the observation layer of the lazy series
        self._lazy_model = None    # the model argument and its description used to build it
        self._job_button: QPushButton | None = None
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
        form.addRow("", self.lazy_check)
        form.addRow("PSF check", self.psf_picker)
        form.addRow("device", self.device_picker)
        form.addRow("tile size", self.tile_spin)
        layout = self.controls_layout()
        layout.addWidget(model_box)
        layout.addWidget(data_box)
        layout.addWidget(self.run_button)
        series_box = QGroupBox("Lazy series")
        series_form = QFormLayout(series_box)
        series_row = QHBoxLayout()
        series_row.addWidget(self.recover_all_button)
        series_row.addWidget(self.save_button)
        series_form.addRow(series_row)
        series_form.addRow("save", self.save_outputs)
        layout.addWidget(series_box)
        layout.addWidget(self.progress)
        layout.addWidget(self.result_label)
        layout.addWidget(legend_box)
        layout.addStretch(1)

        self.observation_picker.currentIndexChanged.connect(self._on_observation_changed)
        self.run_button.clicked.connect(lambda: self._toggle(self.run_button, self.start))
        self.recover_all_button.clicked.connect(lambda: self._toggle(self.recover_all_button, self.recover_all))
        self.save_button.clicked.connect(self._save_clicked)
        # a model change (here or in another widget: the choice is a session setting) is looked at
        # once the event loop is back, after every part of the choice (source, path) has changed
        self._model_timer = QTimer(self)
        self._model_timer.setSingleShot(True)
        self._model_timer.setInterval(0)
        self._model_timer.timeout.connect(self._rebuild_for_new_model)
        self._rebuild_pending = False
        self.settings.events.model_source.connect(self._on_model_changed)
        self.settings.events.checkpoint_path.connect(self._on_model_changed)
        self.lazy_check.toggled.connect(self._update_frames_option)
        napari_viewer.layers.events.removed.connect(self._on_layer_removed)
        self._on_observation_changed()
        self._update_series_buttons()

    # ---------------------------------------------------------------- options
    def _on_lazy_clicked(self, *_):
        self._lazy_choice_made = True

    def _on_observation_changed(self, *_):
        layer = self.observation_picker.layer()
        if layer is not None and layer.ndim == 4 and not self._lazy_choice_made:
            self.lazy_check.setChecked(layer.data.shape[0] > LAZY_DEFAULT_ABOVE_FRAMES)
        self._update_frames_option()

    def _update_frames_option(self, *_):
        layer = self.observation_picker.layer()
        series = layer is not None and layer.ndim == 4
        self.lazy_check.setEnabled(series)
        self.all_frames_check.setEnabled(series and not self.lazy_check.isChecked())

    def recovers_lazily(self, layer) -> bool:
        """Whether Recover builds lazy layers for ``layer``: a (T, c, H, W) series with the box ticked."""
        return layer is not None and layer.ndim == 4 and self.lazy_check.isChecked()

    def _lazy_layers_shown(self) -> bool:
        """Whether the layers of the current lazy series are still in the viewer with its data."""
        if self.lazy is None:
            return False
        token = self.lazy.token
        return any(spod_meta(layer).get("token") == token for layer in self.viewer.layers)

    def _update_series_buttons(self) -> None:
        running = self.is_running()
        has_series = self._lazy_layers_shown()
        for button in (self.run_button, self.recover_all_button, self.save_button):
            if button is self._job_button and running:
                button.setEnabled(True)
            elif button is self.run_button:
                button.setEnabled(not running)
            else:
                button.setEnabled(has_series and not running)

    def _on_layer_removed(self, event=None) -> None:
        try:
            self._update_series_buttons()
        except RuntimeError:  # the widget is being closed
            pass

    def _toggle(self, button, start) -> None:
        """A job button: starts its job, or cancels it while it runs (the others wait)."""
        if self.is_running():
            if button is self._job_button:
                self.cancel()
            return
        start()

    def _started(self, job: Job | None, button) -> Job | None:
        """Mark ``button`` as the one that cancels the job just started."""
        if job is not None:
            self._job_button = button
            button.setText("Cancel")
            self._update_series_buttons()
        return job

    def _on_model_changed(self, *_):
        try:
            self._model_timer.start()
        except RuntimeError:  # the widget was closed
            pass

    def _rebuild_for_new_model(self) -> None:
        """Another model: lazy layers built with the old one are rebuilt (their frames belong to
        the old model's token and are never shown for the new one)."""
        if self.lazy is None or not self._lazy_layers_shown():
            return
        if self.is_running():
            self._rebuild_pending = True  # after the job
            return
        try:
            model = self.model_picker.model_argument()
        except Exception:
            return  # an unusable choice: Recover says why when pressed
        if model is self._lazy_model or (isinstance(model, str) and model == self._lazy_model):
            return
        source = self._lazy_source
        if source is not None and contains_layer(self.viewer.layers, source):
            self.observation_picker.set_layer(source)
            self._toggle(self.run_button, self.start)

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
        lazily = self.recovers_lazily(layer)
        if layer.ndim == 4 and not self.settings.all_frames and not lazily:
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
        if lazily:
            return self._start_lazy(layer, model, model_text, psf)
        self.run_button.setText("Cancel")
        self.progress.set_fraction(0)
        self.progress.set_text(f"Recovering '{layer.name}' with {model_text}…")

        def on_result(out):
            result, composite = out
            info = result_info(result, layer, model_text, frame)
            self.last_result = result
            layers: dict = {}
            # One napari call per event-loop turn (adding a layer costs 150-400 ms): the window stays live.
            steps = result_layer_steps(self.viewer, result, composite, layer, info, frame, layers)

            def presented():
                self.result_layers = layers
                if result.image.ndim == 4:
                    self.lazy = None  # the lazy layers (same names) now hold the recovered arrays
                n_frames = 1 if result.image.ndim == 3 else result.image.shape[0]
                obj = result.objective
                obj_text = (f"objective {obj:.4g}" if isinstance(obj, float)
                            else "" if obj is None else f"mean objective {float(sum(obj) / len(obj)):.4g}")
                text = (f"Recovered {n_frames} frame(s) in {result.seconds:.2f} s on {result.info.get('device')}"
                        f" ({result.info.get('tiles')} tile(s)); {obj_text}.")
                self.result_label.setText(text)
                self.scroll.scroll_to_end()  # the result line, below the fold of a short dock
                self.progress.set_fraction(1)
                self.progress.set_text("Done.")
                self._update_series_buttons()

            self._presenting = StepChain(self, self.job_title, steps, on_done=presented).start()

        self._job = Job(self, title="Recovery", on_progress=self._on_progress, on_result=on_result,
                        on_cancelled=self._on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._started(self._job.start_function(_recover_work, stack, model, psf, self.device_picker.device(),
                                                      int(self.settings.tile), n), self.run_button)

    def is_running(self) -> bool:
        """The job, or the presentation of its results, is still going on."""
        return super().is_running() or (self._presenting is not None and self._presenting.running)

    def cancel(self) -> None:
        if super().is_running():  # the presentation of finished results is not cancelled
            super().cancel()

    # ---------------------------------------------------------------- lazy series
    def _start_lazy(self, layer, model, model_text: str, psf) -> Job:
        frame = current_frame(self.viewer, layer)
        self.progress.set_busy()
        self.progress.set_text(f"Preparing a lazy recovery of '{layer.name}' with {model_text}…")
        n_frames = int(layer.data.shape[0])

        def on_result(out):
            series, top, first_seconds = out
            engine = series.engine
            info = {"method": "spodnet", "lam": engine.lam, "model": model_text, "device": engine.info.get("device"),
                    "translate": list(engine.translate), "source": layer.name, "frames": n_frames,
                    "normalization": {"offset": engine.normalization.offset, "scale": engine.normalization.scale}}
            pixel_size = spod_meta(layer).get("pixel_size")
            if pixel_size:
                info["pixel_size"] = pixel_size
            label = "SPoD-Net"
            names = {"image": f"{layer.name} {label}", "intensity": f"{layer.name} {label} intensity",
                     "composite": f"{layer.name} {label} orientation"}
            added: list = []
            # One napari add_image per event-loop turn (150-400 ms each): the window stays live.
            steps = lazy_layer_steps(self.viewer, layer, series=series, outputs=("image", "intensity", "composite"),
                                     names=names, info=info, added=added)

            def presented():
                if len(added) < 3:  # a step failed (reported by the chain)
                    self.progress.set_text("Lazy layers could not be added.")
                    self._update_series_buttons()
                    return
                stack, intensity, orientation = added
                intensity.visible = False
                show_scale_bar_if_physical(self.viewer, layer)
                if self.lazy is not None and self.lazy.token != series.token:
                    self.lazy.invalidate()  # frames of the previous model / settings are never shown again
                self.lazy, self._lazy_source, self._lazy_model = series, layer, model
                self.last_result = None
                self.result_layers = {"recovered": stack, "intensity": intensity, "orientation": orientation}
                self.result_label.setText(
                    f"Lazy series of {n_frames} frames with {model_text}: each frame is recovered when the t "
                    f"slider shows it (frame {frame + 1}: {first_seconds:.2f} s on {engine.info.get('device')}). "
                    "Recover all fills the rest; Save to… writes the series to disk.")
                self.scroll.scroll_to_end()
                self.progress.set_fraction(1)
                self.progress.set_text("Lazy layers ready.")
                self._update_series_buttons()  # the chain has ended: Recover all / Save to… apply to these

            self._presenting = StepChain(self, "Lazy recovery", steps, on_done=presented).start()

        self._job = Job(self, title="Lazy recovery", on_progress=self._on_progress, on_result=on_result,
                        on_cancelled=self._on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._started(self._job.start_function(
            _lazy_work, layer.data, model, psf, self.device_picker.device(), int(self.settings.tile),
            self.settings.n_channels, frame), self.run_button)

    def recover_all(self) -> Job | None:
        """Recover every frame of the lazy series in a worker (progress, frames/s, Cancel)."""
        if self.is_running():
            return None
        if not self._lazy_layers_shown():
            self.refuse("recover a time series lazily first (Recover, with 'Recover lazily' ticked).")
            return None
        series = self.lazy
        holds = series.frames_the_map_cache_holds()
        T = series.shape[0]
        note = "" if holds >= T else (f" (the cache holds {holds} of {T} frames; the others are recovered when "
                                      "shown: use Save to… for the whole series)")
        self.progress.set_fraction(0)
        self.progress.set_text(f"Recover all: 0/{holds} frames{note}…")

        def on_result(state: FillProgress):
            for layer in self.result_layers.values():
                layer.refresh()
            self.progress.set_fraction(1)
            self.progress.set_text(f"Recovered all: {state.done} frames in the cache ({state.computed} computed, "
                                   f"{state.frames_per_second:.2f} frames/s){note}; moving the t slider is instant.")

        def on_cancelled():
            kept = sum(series.is_filled(t) for t in range(T))
            for layer in self.result_layers.values():
                layer.refresh()
            self.progress.set_fraction(0)
            self.progress.set_text(f"Recover all cancelled: {kept} of {T} frames are in the cache.")

        self._job = Job(self, title="Recover all", on_progress=self._on_progress, on_result=on_result,
                        on_cancelled=on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._started(self._job.start_function(_fill_work, series), self.recover_all_button)

    def _save_clicked(self) -> None:
        if self.is_running():
            if self._job_button is self.save_button:
                self.cancel()
            return
        if self.lazy is None:
            self.refuse("recover a time series lazily first (Recover, with 'Recover lazily' ticked).")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save the recovered series", f"{self._lazy_source.name}.zarr",
                                              "OME-Zarr (*.zarr);;BigTIFF (*.tif *.tiff)")
        if path:
            self.save_to(path)

    def save_to(self, output) -> Job | None:
        """Stream the lazy series to ``output`` (``.zarr``: OME-Zarr, else BigTIFF) in a worker."""
        if self.is_running():
            return None
        if not self._lazy_layers_shown():
            self.refuse("recover a time series lazily first (Recover, with 'Recover lazily' ticked).")
            return None
        outputs = self.save_outputs.currentData()
        source = self._lazy_source
        input_path = getattr(getattr(source, "source", None), "path", None)
        try:
            refuse_overwriting_input(input_path, output, outputs)
        except Exception as exc:
            self.refuse(error_message(exc))
            return None
        if not Path(output).expanduser().parent.is_dir():
            self.refuse(f"the folder of {output} does not exist.")
            return None
        self.progress.set_fraction(0)
        self.progress.set_text(f"Saving to {Path(output).name}…")

        def on_result(summary):
            names = ", ".join(p.name for p in summary.paths)
            resumed = f", {summary.skipped} from an earlier run" if summary.skipped else ""
            self.progress.set_fraction(1)
            self.progress.set_text(f"Saved {summary.frames} frames to {names} ({summary.computed} recovered"
                                   f"{resumed}, {summary.seconds:.1f} s).")
            notify_info(f"Saved the recovered series: {names}")

        def on_cancelled():
            self.progress.set_fraction(0)
            self.progress.set_text("Save cancelled: the frames done are kept in the partial output; saving to the "
                                   "same name again resumes it.")

        self._job = Job(self, title="Save", on_progress=self._on_progress, on_result=on_result,
                        on_cancelled=on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._started(self._job.start_function(_save_work, self.lazy, source.data, str(output), outputs),
                             self.save_button)

    # ---------------------------------------------------------------- progress
    def _on_progress(self, items) -> None:
        update = items[-1]
        if isinstance(update, RecoveryProgress):
            self.progress.set_fraction(update.fraction)
            self.progress.set_text(progress_wording(update.message))
        elif isinstance(update, FillProgress):
            self.progress.set_fraction(update.fraction)
            self.progress.set_text(f"Recover all: {update.line()}")
        elif isinstance(update, StreamProgress):
            self.progress.set_fraction(update.fraction)
            self.progress.set_text(f"Saving: {update.line()}")

    def _on_finished(self) -> None:
        self.run_button.setText("Recover")
        self.recover_all_button.setText("Recover all")
        self.save_button.setText("Save to…")
        self._job_button = None
        self._update_series_buttons()
        if self._rebuild_pending:
            self._rebuild_pending = False
            self._model_timer.start()

