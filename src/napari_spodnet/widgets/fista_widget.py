"""Dock widget 4, "FISTA comparison": FISTA with a live objective curve, then side by side with SPoD-Net.

FISTA runs in a napari worker through :func:`core.recover.recover`; its progress
callback queues each iteration's objective value for the live curve and returns True
once Cancel was pressed. SPoD-Net then recovers the same frame through :func:`core.recover.recover`
(objective evaluated with the same λ). The result is laid out in napari's grid: the
observation's mean over polarizations, FISTA, SPoD-Net and ``|FISTA − SPoD-Net|``
(intensities), with each method's objective value and time in the layer names, the
canvas text overlay and this widget.
"""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from ..core.compare import compare_at_equal_objective
from ..core.recover import RecoveryResult, recover
from ._controls import ProgressRow, make_spin
from ._jobs import Job, JobWidget, StepChain
from ._layers import (
    add_or_update_image,
    current_frame,
    display_range,
    grid_cell,
    grid_model,
    is_observation_candidate,
    is_psf_candidate,
    layer_key,
    observation_problem,
    psf_array,
    registered_placement,
    show_scale_bar_if_physical,
    spod_meta,
    text_overlay,
    value_problem,
)
from ._notify import error_message
from ._pickers import DevicePicker, LayerPicker, ModelSourcePicker
from ._plots import CurvePlot

_ROLES = ("cmp_mean", "cmp_fista", "cmp_spodnet", "cmp_difference")
#: live-curve points sent from the worker per second at most (the whole history is plotted at the end)
LIVE_POINTS_PER_SECOND = 20


def fista_frame(control, frame, psf, lam: float, iterations: int, tol: float, restart: bool, device: str,
                n_channels: int) -> RecoveryResult:
    """FISTA on one (c, H, W) frame through :func:`core.recover.recover`.

    Reports ``("fista", iteration, objective)`` to ``control`` for the live curve, at most
    :data:`LIVE_POINTS_PER_SECOND` times a second. The result's ``info["fista_times"]`` holds
    the seconds from the start of the call to the end of each iteration (same clock as
    ``RecoveryResult.seconds``), for the comparison at equal objective.
    """
    start = time.perf_counter()
    times: list[float] = []
    last_sent = [0.0]

    def on_progress(update) -> bool:
        if update.iteration is not None:
            now = time.perf_counter()
            times.append(now - start)
            if now - last_sent[0] >= 1.0 / LIVE_POINTS_PER_SECOND or update.iteration == iterations:
                last_sent[0] = now
                control.report(("fista", int(update.iteration), float(update.objective)))
        return control.cancelled()

    result = recover(frame, psf, method="fista", lam=lam, iterations=iterations, tol=tol, restart=restart,
                     device=device, n_channels=n_channels, progress=on_progress)
    result.info["fista_times"] = times
    return result


def _compare_work(control, frame, psf, lam, iterations, tol, restart, device, n_channels, model, compare):
    out = {"fista": fista_frame(control, frame, psf, lam, iterations, tol, restart, device, n_channels)}
    if compare:
        control.report(("spodnet", None, None))
        # the chosen PSF, so that the network's objective is measured on FISTA's problem
        out["spodnet"] = recover(frame, psf, method="spodnet", model=model, device=device, lam=lam,
                                 n_channels=n_channels, progress=lambda _p: control.cancelled())
    out["views"] = comparison_images(frame, out["fista"], out.get("spodnet"))
    return out


def comparison_images(frame, fista_res: RecoveryResult, spod_res: RecoveryResult | None) -> dict:
    """The images of the side-by-side view with their contrast limits, ``{name: (image, (lo, hi))}``.

    Computed in the worker, so that the GUI thread only hands finished arrays to napari:
    "mean" (H, W) over polarizations; "fista" and "spodnet" (h, w) intensities on FISTA's
    contrast; "difference" ``|FISTA − SPoD-Net|`` (h, w) where both have the same shape.
    """
    mean = np.asarray(frame, dtype=np.float32).mean(axis=0)
    limits = display_range(fista_res.intensity)
    views = {"mean": (mean, display_range(mean)), "fista": (fista_res.intensity, limits)}
    if spod_res is not None:
        views["spodnet"] = (spod_res.intensity, limits)
        if spod_res.intensity.shape == fista_res.intensity.shape:
            diff = np.abs(fista_res.intensity - spod_res.intensity)
            views["difference"] = (diff, display_range(diff))
    return views


def equal_objective_comparison(fista_res: RecoveryResult, spod_res: RecoveryResult):
    """:func:`core.compare.compare_at_equal_objective` for the two results of one comparison run."""
    history = np.asarray(fista_res.info.get("fista_history"), dtype=float).reshape(-1)
    times = fista_res.info.get("fista_times")
    return compare_at_equal_objective(float(spod_res.objective), float(spod_res.seconds), history,
                                      times if times is not None and len(times) == history.size else None,
                                      float(fista_res.seconds))


class FistaWidget(JobWidget):
    """Run FISTA with a live objective curve and compare it with SPoD-Net side by side."""

    job_title = "FISTA comparison"
    tab_title = "FISTA"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self._presenting: StepChain | None = None  # the results being laid out, one napari call per turn
        self._hidden_keys: list = []  # layers the side-by-side view hid (by layer_key), shown again on leaving
        self.results: dict = {}
        self.comparison = None
        self.comparison_layers: dict = {}
        s = self.settings

        self.observation_picker = LayerPicker(napari_viewer, is_observation_candidate,
                                              shared_key="observation_layer", prefer_kind="observation")
        self.psf_picker = LayerPicker(napari_viewer, is_psf_candidate, shared_key="psf_layer", prefer_kind="psf")
        self.lam_spin = self.binder.bind("lam", make_spin(0.0, 100.0, s.lam, decimals=6, step=0.01,
                                                          tooltip="λ of the objective (on normalised intensities)."))
        self.iterations_spin = self.binder.bind("fista_iterations", make_spin(1, 1_000_000, s.fista_iterations,
                                                                              step=100))
        self.tol_spin = self.binder.bind("fista_tol", make_spin(0.0, 1.0, s.fista_tol, decimals=10, step=1e-6,
                                                                tooltip="Stop when the relative change of x is "
                                                                        "below this (0: run all iterations)."))
        self.restart_check = self.binder.bind("fista_restart", QCheckBox("adaptive restart"))
        self.device_picker = DevicePicker(self.binder)
        self.compare_check = self.binder.bind("compare_spodnet", QCheckBox("compare with SPoD-Net"))
        self.model_picker = ModelSourcePicker()
        self.run_button = QPushButton("Run FISTA")
        self.leave_grid_button = QPushButton("Leave the side-by-side view")
        self.leave_grid_button.setEnabled(False)
        self.progress = ProgressRow()
        self.plot = CurvePlot(xlabel="iteration", ylabel="objective L")
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)

        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        form.addRow("observation", self.observation_picker)
        form.addRow("PSF", self.psf_picker)
        fista_box = QGroupBox("FISTA")
        form = QFormLayout(fista_box)
        form.addRow("λ", self.lam_spin)
        form.addRow("iterations", self.iterations_spin)
        form.addRow("tolerance", self.tol_spin)
        form.addRow("", self.restart_check)
        form.addRow("device", self.device_picker)
        cmp_box = QGroupBox("Comparison")
        box_layout = QVBoxLayout(cmp_box)
        box_layout.addWidget(self.compare_check)
        box_layout.addWidget(self.model_picker)
        layout = self.controls_layout()
        layout.addWidget(data_box)
        layout.addWidget(fista_box)
        layout.addWidget(cmp_box)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.result_label)
        layout.addWidget(self.leave_grid_button)
        layout.addStretch(1)

        self.compare_check.toggled.connect(self.model_picker.setEnabled)
        self.model_picker.setEnabled(self.compare_check.isChecked())
        self.run_button.clicked.connect(self.toggle)
        self.leave_grid_button.clicked.connect(self.leave_grid)

    # ------------------------------------------------------------------ run
    def start(self) -> Job | None:
        if self.is_running():
            return None
        layer = self.observation_picker.layer()
        if layer is None:
            self.refuse("choose an observation layer.")
            return None
        s = self.settings
        problem = observation_problem(layer.data.shape, s.n_channels)
        if problem:
            self.refuse(problem)
            return None
        psf_layer = self.psf_picker.layer()
        if psf_layer is None:
            self.refuse("FISTA needs a PSF: choose a PSF layer (a 2-D image or a z-stack, e.g. a measured bead).")
            return None
        try:
            psf = psf_array(psf_layer)
        except Exception as exc:
            self.refuse(f"PSF '{psf_layer.name}': {error_message(exc)}")
            return None
        frame_index = current_frame(self.viewer, layer) if layer.ndim == 4 else None
        frame = layer.data[frame_index] if frame_index is not None else layer.data
        problem = value_problem(frame)
        if problem:
            self.refuse(f"'{layer.name}': {problem}")
            return None
        model, compare = None, bool(s.compare_spodnet)
        if compare:  # every reason not to compare is found before FISTA starts
            try:
                model = self.model_picker.model_argument()
            except Exception as exc:
                self.refuse(f"{error_message(exc)} (or untick 'compare with SPoD-Net').")
                return None
            wanted = self.model_picker.model_psf_shape()
            if wanted is not None and tuple(psf.shape) != wanted:
                self.refuse(f"the model was trained for a {wanted[0]} x {wanted[1]} PSF, the chosen PSF "
                            f"'{psf_layer.name}' is {psf.shape[0]} x {psf.shape[1]}: the two would not solve the "
                            "same problem. Choose a model trained for this PSF, or untick 'compare with SPoD-Net'.")
                return None
        iterations = int(s.fista_iterations)
        self._iterations = iterations
        self._source = layer
        self._frame_index = frame_index
        self._compare_model_text = self.model_picker.describe() if compare else None
        self.plot.clear()
        self.plot.set_x_range(0, iterations)
        self.result_label.setText("")
        self.progress.set_fraction(0)
        self.progress.set_text("FISTA…")
        self.run_button.setText("Cancel")
        self._job = Job(self, title="FISTA comparison", on_progress=self._on_progress, on_result=self._on_result,
                        on_cancelled=self._on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._job.start_function(_compare_work, frame, psf, float(s.lam), iterations,
                                        float(s.fista_tol), bool(s.fista_restart), self.device_picker.device(),
                                        int(s.n_channels), model, compare)

    def _on_progress(self, items) -> None:
        last_it = None
        for what, it, objective in items:
            if what == "fista":
                self.plot.append("FISTA", it, objective)
                last_it = (it, objective)
            elif what == "spodnet":
                self.progress.set_busy()
                self.progress.set_text("SPoD-Net…")
        if last_it is not None:
            it, objective = last_it
            self.progress.set_fraction(it / max(self._iterations, 1))
            self.progress.set_text(f"FISTA iteration {it}/{self._iterations}: objective {objective:.6g}")

    def _on_result(self, out) -> None:
        self.results = out
        layer, frame_index = self._source, self._frame_index
        fista_res = out["fista"]
        spod_res = out.get("spodnet")
        history = np.asarray(fista_res.info.get("fista_history"), dtype=float).reshape(-1)
        if history.size:
            self.plot.set_series("FISTA", np.arange(1, history.size + 1), history)
        self.comparison = None
        lines = [self._summary("FISTA", fista_res)]
        if spod_res is not None:
            self.plot.set_series("SPoD-Net", [1, max(history.size, 1)], [spod_res.objective] * 2)
            self.comparison = equal_objective_comparison(fista_res, spod_res)
            lines = self.comparison.lines()
            mismatch = spod_res.info.get("psf_mismatch")
            if mismatch is not None and mismatch > 0.05:
                lines.append(f"The model was trained with another PSF (L1 difference {mismatch:.0%} from the "
                             "chosen one): its objective is judged on the chosen PSF's problem.")
        self.result_label.setText("\n".join(lines))
        self.scroll.scroll_to_end()  # the result lines, below the fold of a short dock
        self.progress.set_text("Showing the results side by side…")
        # the full curve and each napari call in its own event-loop turn (see StepChain): the window stays live
        steps = [self.plot.flush] + self.side_by_side_steps(layer, frame_index, fista_res, spod_res, out.get("views"))
        self._presenting = StepChain(self, self.job_title, steps, on_done=self._presented).start()

    def _presented(self) -> None:
        self.progress.set_fraction(1)
        self.progress.set_text("Done.")
        self.run_button.setEnabled(True)

    def is_running(self) -> bool:
        """The job, or the presentation of its results, is still going on."""
        return super().is_running() or (self._presenting is not None and self._presenting.running)

    def cancel(self) -> None:
        if super().is_running():  # the presentation of finished results is not cancelled
            super().cancel()

    @staticmethod
    def _summary(name: str, res) -> str:
        its = res.info.get("fista_iterations")
        extra = f", {its[0]} iterations" if its else ""
        return f"{name}: objective {res.objective:.6g}, {res.seconds:.2f} s{extra}."

    def show_side_by_side(self, layer, frame_index, fista_res, spod_res, views: dict | None = None) -> dict:
        """Grid view: observation mean | FISTA | SPoD-Net | |FISTA − SPoD-Net| (intensities), all now."""
        StepChain(self, self.job_title, self.side_by_side_steps(layer, frame_index, fista_res, spod_res,
                                                                views)).run_all()
        return self.comparison_layers

    def side_by_side_steps(self, layer, frame_index, fista_res, spod_res, views: dict | None = None) -> list:
        """The side-by-side view as GUI steps, each bounded by one napari call that cannot be split
        (one layer added or refreshed; hiding the others; the grid switched on; the view fitted)."""
        viewer = self.viewer
        lead = (0,) if frame_index is not None else ()
        if views is None:
            frame = layer.data[frame_index] if frame_index is not None else layer.data
            views = comparison_images(frame, fista_res, spod_res)
        common = {"source": layer.name, "frame": frame_index, "lam": fista_res.lam}
        pixel_size = spod_meta(layer).get("pixel_size")
        if pixel_size:
            common["pixel_size"] = pixel_size
        place_obs = registered_placement(layer, (0.0, 0.0), drop=lead + (-3,))
        place_img = registered_placement(layer, fista_res.translate, drop=lead + (-3,))
        layers: dict = {}
        self.comparison_layers = layers
        text = f"FISTA: L={fista_res.objective:.4g} in {fista_res.seconds:.2f} s"
        # (key, layer name, kind, metadata, colormap, placement)
        specs = [("mean", f"{layer.name} mean over polarizations", "mean", common, "gray", place_obs),
                 ("fista", f"FISTA: L={fista_res.objective:.4g}, {fista_res.seconds:.2f} s", "intensity",
                  {**common, "method": "fista", "objective": fista_res.objective, "seconds": fista_res.seconds,
                   "iterations": fista_res.info.get("fista_iterations"), "translate": list(fista_res.translate)},
                  "gray", place_img)]
        if spod_res is not None:
            specs.append(("spodnet", f"SPoD-Net: L={spod_res.objective:.4g}, {spod_res.seconds:.2f} s", "intensity",
                          {**common, "method": "spodnet", "objective": spod_res.objective,
                           "seconds": spod_res.seconds, "model": self._compare_model_text,
                           "translate": list(spod_res.translate)},
                          "gray", registered_placement(layer, spod_res.translate, drop=lead + (-3,))))
            text += f"\nSPoD-Net: L={spod_res.objective:.4g} in {spod_res.seconds:.2f} s"
            if self.comparison is not None and self.comparison.fista_match_iteration is not None:
                text += (f"\nFISTA reached it at iteration {self.comparison.fista_match_iteration} "
                         f"({self.comparison.speedup:.1f}x SPoD-Net's time)")
            if "difference" in views:
                specs.append(("difference", "|FISTA − SPoD-Net|", "difference",
                              {**common, "methods": ["fista", "spodnet"]}, "magma", place_img))

        def add(key, name, kind, info, colormap, place):
            image, limits = views[key]
            layers[key] = add_or_update_image(viewer, image, name, kind, info, role=f"cmp_{key}",
                                              colormap=colormap, contrast_limits=limits, visible=True, **place)

        def hide_the_others():
            chosen = {layer_key(lay) for lay in layers.values()}
            if not self._hidden_keys:  # a second comparison keeps the first one's list of layers to restore
                self._hidden_keys = [layer_key(other) for other in viewer.layers
                                     if layer_key(other) not in chosen and other.visible]
            for other in viewer.layers:
                if layer_key(other) not in chosen and other.visible:
                    other.visible = False

        def order_in_grid():
            order = [layers[k] for k in ("mean", "fista", "spodnet", "difference") if k in layers]
            # reading order (top-left first): mean, FISTA, SPoD-Net, difference
            if [layer_key(lay) for lay in list(viewer.layers)[-len(order):]] != [layer_key(lay) for lay in order]:
                for lay in order:
                    viewer.layers.move(viewer.layers.index(lay), len(viewer.layers))

        def enable_grid():
            grid = grid_model(viewer)
            if not grid.enabled:
                grid.enabled = True
            if grid_cell(viewer, layers["mean"]) not in ((0, 0), None):  # napari versions differ in grid order
                order = [layers[k] for k in ("mean", "fista", "spodnet", "difference") if k in layers]
                for lay in reversed(order):
                    viewer.layers.move(viewer.layers.index(lay), len(viewer.layers))

        def label():
            try:
                overlay = text_overlay(viewer)
                overlay.text = text
                overlay.visible = True
            except Exception:  # the overlay is a courtesy
                pass

        def fit():
            viewer.reset_view()  # fit the grid into the canvas
            self.leave_grid_button.setEnabled(True)

        def scale_bar():
            show_scale_bar_if_physical(viewer, layer)

        adds = []
        for spec in specs:
            step = (lambda spec=spec: add(*spec))
            step.step_name = f"add_{spec[0]}"  # named in scripts/gui_walkthrough.py's report
            adds.append(step)
        return adds + [hide_the_others, order_in_grid, enable_grid, label, fit, scale_bar]

    def leave_grid(self) -> None:
        """Back to the normal view: comparison layers hidden, the layers the comparison hid shown again."""
        viewer = self.viewer
        grid_model(viewer).enabled = False
        comparison = {layer_key(lay) for lay in self.comparison_layers.values()}
        hidden = set(self._hidden_keys)
        for layer in viewer.layers:
            key = layer_key(layer)
            if key in comparison:
                layer.visible = False
            elif key in hidden:
                layer.visible = True
        self._hidden_keys = []
        try:
            text_overlay(viewer).visible = False
        except Exception:
            pass
        viewer.reset_view()
        self.leave_grid_button.setEnabled(False)

    def _on_finished(self) -> None:
        self.run_button.setText("Run FISTA")
        if self._presenting is not None and self._presenting.running:
            self.run_button.setEnabled(False)  # until the results are laid out
        if self.progress.bar.maximum() == 0:
            self.progress.set_fraction(0)
