"""Dock widget 1, "SPoD data": choose and check the observation and the PSF.

* observation picker with a status line (the shape must be (c, H, W) or (T, c, H, W) with
  c polarization images; a stack whose polarization axis sits elsewhere can be moved into
  place with one click);
* PSF picker (any 2-D image layer) with its status;
* the intensity normalisation the core will apply (offset / scale of
  :func:`core.preprocess.fit_normalization`);
* the paper's optional preprocessing (median 5, minimum 7; :func:`core.preprocess.preprocess`)
  into a new layer, in a background worker;
* averaging several measured PSFs (:func:`io.average_psfs`) into a new layer.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ..core.preprocess import NormalizationSettings, fit_normalization, preprocess
from ..core.validation import SPoDInputError, check_psf
from ..io import average_psfs, find_polarization_axis
from ._controls import ProgressRow, make_spin
from ._jobs import Job, JobWidget
from ._layers import (
    METADATA_KEY,
    add_or_update_image,
    display_range,
    is_observation_candidate,
    is_psf_candidate,
    observation_problem,
    psf_array,
    registered_placement,
    match_psf_scale,
    spod_meta,
    value_problem,
)
from ._notify import error_message, notify_error, notify_info
from ._pickers import LayerListPicker, LayerPicker

_OK = "color: #3c3;"
_BAD = "color: #e55;"


#: how the pages of a plain (T*c, H, W) stack are ordered: (label, key)
PAGE_ORDERS = (
    ("polarization steps of one time point together (ImageJ's default)", "tc"),
    ("time points of one polarization step together", "ct"),
)


def split_pages(data, n_channels: int, order: str = "tc") -> np.ndarray:
    """A plain (T*c, H, W) stack as (T, c, H, W): ``order`` "tc" (pages t0c0, t0c1, ...) or "ct"
    (pages c0t0, c0t1, ...). A view where numpy can make one (no copy)."""
    arr = np.asarray(data)
    pages = arr.shape[0]
    if arr.ndim != 3 or pages % n_channels or pages == n_channels:
        raise SPoDInputError(f"{pages} pages cannot be split into time points of {n_channels} polarization "
                             f"images (need a multiple of {n_channels} above {n_channels}).")
    t = pages // n_channels
    if order == "tc":
        return arr.reshape(t, n_channels, *arr.shape[1:])
    return np.swapaxes(arr.reshape(n_channels, t, *arr.shape[1:]), 0, 1)


def _preprocess_work(control, data, median: int, minimum: int, mode: str):
    """Worker: core.preprocess frame by frame (cancellable between frames)."""
    if data.ndim == 3:
        control.report((0, 1))
        return preprocess(data, median=median, minimum=minimum, mode=mode)
    out = np.empty(data.shape, dtype=np.float32)
    for t in range(data.shape[0]):
        if control.cancelled():
            return None
        out[t] = preprocess(data[t], median=median, minimum=minimum, mode=mode)
        control.report((t + 1, data.shape[0]))
    return out


def _preprocess_for_display(control, data, median: int, minimum: int, mode: str):
    """Worker: :func:`_preprocess_work` and the contrast limits of its first frame (the GUI thread
    then only hands napari finished values), or None when cancelled."""
    out = _preprocess_work(control, data, median, minimum, mode)
    if out is None:
        return None
    return out, display_range(out[0] if out.ndim == 4 else out)


class SpodDataWidget(JobWidget):
    """Choose the observation and PSF layers, check them, preprocess, average PSFs."""

    job_title = "Preprocessing"
    tab_title = "SPoD data"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)

        # --- observation
        self.observation_picker = LayerPicker(napari_viewer, is_observation_candidate, shared_key="observation_layer",
                                              prefer_kind="observation")
        self.n_channels_spin = self.binder.bind("n_channels", make_spin(
            3, 360, self.settings.n_channels, tooltip="Polarization steps per observation (18 for SPoD)."))
        self.observation_status = QLabel("")
        self.observation_status.setWordWrap(True)
        self.fix_axes_button = QPushButton("Move the polarization axis into place")
        self.fix_axes_button.setVisible(False)
        # a plain stack of T*c pages (no axis metadata): the user states the page order
        self.page_order_combo = QComboBox()
        for label, key in PAGE_ORDERS:
            self.page_order_combo.addItem(label, key)
        self.split_button = QPushButton("Split into time points")
        self.layout_box = QGroupBox("Page order of a plain stack")
        layout_form = QFormLayout(self.layout_box)
        layout_form.addRow("pages", self.page_order_combo)
        layout_form.addRow(self.split_button)
        self.layout_box.setVisible(False)
        self.scale_label = QLabel("")
        self.scale_label.setWordWrap(True)
        obs_box = QGroupBox("Observation")
        form = QFormLayout(obs_box)
        form.addRow("layer", self.observation_picker)
        form.addRow("polarization steps", self.n_channels_spin)
        form.addRow(self.observation_status)
        form.addRow(self.fix_axes_button)
        form.addRow(self.layout_box)
        form.addRow(self.scale_label)

        # --- PSF
        self.psf_picker = LayerPicker(napari_viewer, is_psf_candidate, shared_key="psf_layer", prefer_kind="psf")
        self.psf_status = QLabel("")
        self.psf_status.setWordWrap(True)
        psf_box = QGroupBox("PSF")
        form = QFormLayout(psf_box)
        form.addRow("layer", self.psf_picker)
        form.addRow(self.psf_status)

        # --- preprocessing
        self.median_spin = self.binder.bind("median", make_spin(
            0, 51, self.settings.median, tooltip="Median filter size (removes noisy dots); 0 or 1 skips it."))
        self.minimum_spin = self.binder.bind("minimum", make_spin(
            0, 51, self.settings.minimum, tooltip="Minimum filter size (estimates the background); 0 or 1 skips it."))
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("subtract the background", "subtract")
        self.mode_combo.addItem("replace by the minimum filter", "replace")
        self.binder.bind("preprocess_mode", self.mode_combo)
        self.preprocess_button = QPushButton("Preprocess into a new layer")
        self.preprocess_progress = ProgressRow()
        pre_box = QGroupBox("Preprocessing (optional, paper section 5)")
        form = QFormLayout(pre_box)
        form.addRow("median", self.median_spin)
        form.addRow("minimum", self.minimum_spin)
        form.addRow("mode", self.mode_combo)
        form.addRow(self.preprocess_button)
        form.addRow(self.preprocess_progress)

        # --- PSF averaging
        self.psf_list = LayerListPicker(napari_viewer, is_psf_candidate, prefer_kind="psf")
        self.crop_check = QCheckBox("centre-crop to a common size")
        self.average_button = QPushButton("Average the selected PSFs into a new layer")
        avg_box = QGroupBox("Average measured PSFs")
        box_layout = QVBoxLayout(avg_box)
        box_layout.addWidget(self.psf_list)
        row = QHBoxLayout()
        row.addWidget(self.crop_check)
        box_layout.addLayout(row)
        box_layout.addWidget(self.average_button)

        layout = self.controls_layout()
        for box in (obs_box, psf_box, pre_box, avg_box):
            layout.addWidget(box)
        layout.addStretch(1)

        self.observation_picker.currentIndexChanged.connect(self.update_status)
        self.psf_picker.currentIndexChanged.connect(self.update_status)
        self.n_channels_spin.valueChanged.connect(self.update_status)
        self.fix_axes_button.clicked.connect(self.fix_axes)
        self.split_button.clicked.connect(self.split_time_points)
        self.preprocess_button.clicked.connect(self.start_preprocess)
        self.average_button.clicked.connect(self.average_selected_psfs)
        napari_viewer.layers.events.inserted.connect(self._on_layers_changed)
        napari_viewer.layers.events.removed.connect(self._on_layers_changed)
        self.update_status()

    # ------------------------------------------------------------------ status
    def _on_layers_changed(self, event=None) -> None:
        try:
            self.update_status()
        except RuntimeError:  # closed
            pass

    def update_status(self, *_) -> None:
        n = self.settings.n_channels
        layer = self.observation_picker.layer()
        self.fix_axes_button.setVisible(False)
        self.layout_box.setVisible(False)
        if layer is None:
            self._set_status(self.observation_status, "Choose an observation layer ((c, H, W) or (T, c, H, W)).",
                             ok=None)
            self.scale_label.setText("")
        else:
            shape = tuple(layer.data.shape)
            problem = observation_problem(shape, n)
            values = value_problem(layer.data) if problem is None else None
            if values is not None:
                self._set_status(self.observation_status, f"✗ '{layer.name}': {values}", ok=False)
                self.scale_label.setText("")
            elif problem is None:
                what = f"time series of {shape[0]} stacks" if len(shape) == 4 else "single stack"
                self._set_status(self.observation_status,
                                 f"✓ {what}: {n} polarization images of {shape[-2]} x {shape[-1]} pixels "
                                 f"(shape {shape}, {layer.data.dtype}).", ok=True)
                self._show_scale(layer)
            else:
                self._set_status(self.observation_status, f"✗ {problem}", ok=False)
                self.scale_label.setText("")
                if len(shape) == 3 and shape[0] % n == 0 and shape[0] > n:
                    self.layout_box.setTitle(f"{shape[0]} pages: {shape[0] // n} time points of {n} polarization "
                                             "images? Say how the pages are ordered:")
                    self.layout_box.setVisible(True)
                    return self._update_psf_status()
                try:
                    axis = find_polarization_axis(shape, None, n)
                    self.fix_axes_button.setVisible(axis != len(shape) - 3)
                except SPoDInputError:
                    pass
        self._update_psf_status()

    def _update_psf_status(self) -> None:
        psf = self.psf_picker.layer()
        if psf is None:
            self._set_status(self.psf_status, "Choose a PSF layer (a 2-D image or a z-stack, e.g. a measured bead).",
                             ok=None)
            return
        try:
            arr = check_psf(psf_array(psf))
        except SPoDInputError as exc:
            self._set_status(self.psf_status, f"✗ {exc}", ok=False)
            return
        how = (f"average of a stack of {psf.data.shape[0]} PSFs, " if psf.ndim == 3 else "")
        self._set_status(self.psf_status, f"✓ PSF {arr.shape[0]} x {arr.shape[1]} ({how}normalised to sum 1 "
                                          "when used).", ok=True)
        self._match_psf_scale(psf)

    def _match_psf_scale(self, psf) -> None:
        obs = self.observation_picker.layer()
        if obs is not None and not observation_problem(obs.data.shape, self.settings.n_channels):
            match_psf_scale(psf, obs)

    @staticmethod
    def _set_status(label: QLabel, text: str, ok: bool | None) -> None:
        label.setText(text)
        label.setStyleSheet("" if ok is None else (_OK if ok else _BAD))

    def _show_scale(self, layer) -> None:
        data = layer.data
        frame = data[0] if data.ndim == 4 else data
        try:
            norm = fit_normalization(np.asarray(frame), NormalizationSettings())
        except SPoDInputError as exc:
            self.scale_label.setText(f"Intensity scale: {exc}")
            return
        self.scale_label.setText(
            f"Intensity normalisation (as recovery and training apply it): offset {norm.offset:.4g}, "
            f"scale {norm.scale:.4g}; λ acts on (y − offset) / scale.")

    def observation_status_text(self) -> str:
        return self.observation_status.text()

    # ------------------------------------------------------------------ actions
    def fix_axes(self) -> None:
        layer = self.observation_picker.layer()
        if layer is None:
            return
        try:
            axis = find_polarization_axis(layer.data.shape, None, self.settings.n_channels)
        except SPoDInputError as exc:
            notify_error(str(exc))
            return
        data = np.moveaxis(np.asarray(layer.data), axis, -3)
        new = add_or_update_image(
            self.viewer, data, f"{layer.name} (c, H, W)", "observation",
            {"source": layer.name, "moved_axis": int(axis)},
            axis_labels=("t", "polarization", "y", "x") if data.ndim == 4 else ("polarization", "y", "x"),
            contrast_limits=tuple(layer.contrast_limits))
        self.observation_picker.set_layer(new)

    def split_time_points(self):
        """Reshape the chosen plain (T*c, H, W) stack into a (T, c, H, W) series in a new layer."""
        layer = self.observation_picker.layer()
        if layer is None:
            return None
        order = self.page_order_combo.currentData()
        try:
            data = split_pages(layer.data, self.settings.n_channels, order)
        except SPoDInputError as exc:
            notify_error(str(exc))
            return None
        scale = tuple(float(v) for v in layer.scale)
        translate = tuple(float(v) for v in layer.translate)
        info = {"source": layer.name, "page_order": order,
                **{k: v for k, v in spod_meta(layer).items() if k in ("path", "pixel_size")}}
        new = add_or_update_image(
            self.viewer, data, f"{layer.name} ({data.shape[0]} x {data.shape[1]})", "observation", info,
            axis_labels=("t", "polarization", "y", "x"), contrast_limits=tuple(layer.contrast_limits),
            scale=(1.0, 1.0) + scale[-2:], translate=(0.0, 0.0) + translate[-2:])
        layer.visible = False
        self.observation_picker.set_layer(new)
        return new

    def start_preprocess(self) -> Job | None:
        if self._job is not None and self._job.running:
            self._job.cancel()
            return None
        layer = self.observation_picker.layer()
        if layer is None:
            notify_error("Preprocessing: choose an observation layer first.")
            return None
        problem = observation_problem(layer.data.shape, self.settings.n_channels)
        if problem:
            notify_error(f"Preprocessing: {problem}")
            return None
        s = self.settings
        params = {"median": int(s.median), "minimum": int(s.minimum), "mode": s.preprocess_mode}
        self.preprocess_button.setText("Cancel")
        self.preprocess_progress.set_fraction(0)
        self.preprocess_progress.set_text("Preprocessing…")

        def on_progress(items):
            done, total = items[-1]
            self.preprocess_progress.set_fraction(done / max(total, 1))

        def on_result(out):
            if out is None:
                return
            data, limits = out
            info = {"source": layer.name, "preprocessed": params, **{k: v for k, v in spod_meta(layer).items()
                                                                     if k in ("path", "pixel_size")}}
            new = add_or_update_image(
                self.viewer, data, f"{layer.name} preprocessed", "observation", info,
                axis_labels=tuple(layer.axis_labels), contrast_limits=limits, **registered_placement(layer))
            self.observation_picker.set_layer(new)
            self.preprocess_progress.set_fraction(1)
            self.preprocess_progress.set_text(f"Done in {self._job_seconds():.1f} s: new layer '{new.name}'.")

        def on_cancelled():
            self.preprocess_progress.set_text("Preprocessing cancelled.")

        def on_finished():
            self.preprocess_button.setText("Preprocess into a new layer")

        self._job = Job(self, title="Preprocessing", on_progress=on_progress, on_result=on_result,
                        on_cancelled=on_cancelled, on_finished=on_finished)
        return self._job.start_function(_preprocess_for_display, layer.data, params["median"], params["minimum"],
                                        params["mode"])

    def _job_seconds(self) -> float:
        import time

        return time.perf_counter() - self._job.started_at if self._job else 0.0

    def average_selected_psfs(self):
        layers = self.psf_list.selected_layers()
        if len(layers) < 1:
            notify_error("Select one or more PSF layers to average (Ctrl/Shift-click in the list).")
            return None
        try:
            psf = average_psfs([psf_array(layer) for layer in layers], crop=self.crop_check.isChecked())
        except SPoDInputError as exc:
            notify_error(f"PSF averaging: {exc}")
            return None
        except Exception as exc:  # pragma: no cover - defensive
            notify_error(f"PSF averaging failed: {error_message(exc)}")
            return None
        new = add_or_update_image(self.viewer, psf, f"PSF average of {len(layers)}", "psf",
                                  {"sources": [layer.name for layer in layers]}, colormap="magma")
        self.psf_picker.set_layer(new)
        notify_info(f"Averaged {len(layers)} PSFs into '{new.name}' ({psf.shape[0]} x {psf.shape[1]}).")
        return new



__all__ = ["SpodDataWidget", "METADATA_KEY"]
