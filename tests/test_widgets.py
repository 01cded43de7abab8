"""The four dock widgets, headless (Xvfb): workers, progress, cancel, errors, shared settings.

Every long job is awaited with ``qtbot.waitUntil`` so the Qt event loop keeps running
while the worker thread computes (as in napari).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from qtpy.QtCore import QTimer

from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint
from napari_spodnet.core.network import SPoDNet
from napari_spodnet.core.recover import DEFAULT_MODEL_PATH
from napari_spodnet.core.simulate import simulate
from napari_spodnet.widgets import dock_all_widgets, run_demo_in_viewer
from napari_spodnet.widgets._shared import (
    get_model_registry,
    get_settings,
    grid_cell,
    grid_model,
    reset_settings,
)
from napari_spodnet.widgets.data_widget import SpodDataWidget
from napari_spodnet.widgets.fista_widget import FistaWidget
from napari_spodnet.widgets.recover_widget import RecoverWidget
from napari_spodnet.widgets.train_widget import TrainWidget

TIMEOUT_MS = 60_000


@pytest.fixture(autouse=True)
def fresh_settings():
    """Each test starts from default settings and an empty model registry."""
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="module")
def sim():
    return simulate((64, 64), seed=0)


@pytest.fixture
def notifications():
    """Every napari notification shown during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen = []

    def record(notification):
        seen.append((str(notification.severity).lower(), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def tiny_checkpoint(tmp_path, sim):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(SPoDNet(sim.psf, n_layers=2), path, extra_metadata={"name": "tiny"})
    return path


def _viewer_with_data(make_napari_viewer, sim, **obs_kwargs):
    viewer = make_napari_viewer()
    obs = viewer.add_image(sim.observation, name="obs", metadata={"spodnet": {"kind": "observation"}},
                           **obs_kwargs)
    psf = viewer.add_image(sim.psf, name="psf")  # unmarked, as napari's own reader opens a PSF file
    return viewer, obs, psf


def _wait_done(qtbot, widget, timeout=TIMEOUT_MS):
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=timeout)


def _errors(notes):
    return [m for s, m in notes if s == "error"]


# --------------------------------------------------------------------------- docking, settings, manifest


def test_manifest_validates_with_imports():
    from npe2.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["validate", "napari-spodnet", "--imports"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_dock_all_widgets_and_settings_persist(make_napari_viewer, sim):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    widgets = dock_all_widgets(viewer)
    assert set(widgets) == {"data", "train", "recover", "fista"}
    assert isinstance(widgets["fista"], FistaWidget) and isinstance(widgets["train"], TrainWidget)
    # pickers found the layers (the PSF was not marked by the plugin: any 2-D image qualifies)
    assert widgets["recover"].observation_picker.layer() is obs
    assert widgets["fista"].psf_picker.layer() is psf
    assert widgets["data"].psf_picker.layer() is psf
    # a λ typed in one widget is the λ of the others, and of widgets opened later
    widgets["fista"].lam_spin.setValue(0.123)
    assert get_settings().lam == pytest.approx(0.123)
    assert widgets["train"].lam_spin.value() == pytest.approx(0.123)
    widgets["train"].preset_combo.setCurrentIndex(widgets["train"].preset_combo.findData("paper"))
    later = TrainWidget(viewer)
    assert later.lam_spin.value() == pytest.approx(0.123)
    assert later.preset_combo.currentData() == "paper" and later.crop_spin.value() == 96
    assert later.dense_spin.value() == 0  # the paper's Algorithm 1 has no dense stage
    later.preset_combo.setCurrentIndex(later.preset_combo.findData("standard"))
    assert later.dense_spin.value() == 60 and get_settings().preset == "standard"
    assert later.config().dense_stage_epochs == 60
    later.epochs_spin.setValue(3)  # editing a preset value makes the preset "custom"
    assert get_settings().preset == "custom"
    assert later.device_picker.device() == get_settings().device
    later.close()
    # choosing the observation in one picker moves the others (shared selection)
    other = viewer.add_image(sim.observation[None].repeat(2, 0), name="series")
    widgets["data"].observation_picker.set_layer(other)
    assert widgets["fista"].observation_picker.layer() is other
    # pickers follow renames and removals
    psf.name = "bead"
    assert widgets["fista"].psf_picker.currentText() == "bead"
    viewer.layers.remove(psf)
    assert widgets["fista"].psf_picker.layer() is None


# --------------------------------------------------------------------------- data widget


def test_data_widget_status_fix_preprocess_average(make_napari_viewer, qtbot, sim, notifications):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = SpodDataWidget(viewer)
    qtbot.addWidget(w)
    assert w.observation_picker.layer() is obs
    assert w.observation_status_text().startswith("✓")
    assert "scale" in w.scale_label.text()
    assert w.psf_status.text().startswith("✓")

    three = viewer.add_image(np.ones((3, 64, 64), np.float32), name="rgb-like stack")
    w.observation_picker.set_layer(three)
    assert w.observation_status_text().startswith("✗") and "18" in w.observation_status_text()
    assert not w.fix_axes_button.isVisibleTo(w)

    last = viewer.add_image(np.moveaxis(sim.observation, 0, -1), name="channel last")
    w.observation_picker.set_layer(last)
    assert w.fix_axes_button.isVisibleTo(w)
    w.fix_axes_button.click()
    fixed = w.observation_picker.layer()
    assert fixed.data.shape == (18, 64, 64)
    np.testing.assert_array_equal(fixed.data, sim.observation)

    w.observation_picker.set_layer(obs)
    w.start_preprocess()
    _wait_done(qtbot, w)
    pre = w.observation_picker.layer()
    assert pre.name == "obs preprocessed" and pre.data.shape == obs.data.shape
    assert pre.metadata["spodnet"]["preprocessed"] == {"median": 5, "minimum": 7, "mode": "subtract"}

    viewer.add_image(np.pad(sim.psf, 1), name="bead 2")  # different size: needs cropping
    w.psf_list.set_selected([lay for lay in viewer.layers if lay.ndim == 2])
    assert w.average_selected_psfs() is None
    assert any("different shapes" in m for m in _errors(notifications))
    w.crop_check.setChecked(True)
    avg = w.average_selected_psfs()
    assert avg.data.shape == (32, 32) and avg.data.sum() == pytest.approx(1, abs=1e-5)
    assert w.psf_picker.layer() is avg


# --------------------------------------------------------------------------- training


def _tiny_training(widget, epochs=1):
    s = get_settings()
    s.n_layers, s.epochs, s.n_crops, s.batch_size, s.crop_size, s.dense_stage_epochs = 2, epochs, 4, 2, 48, 2
    assert s.preset == "custom"
    cfg = widget.config()
    assert (cfg.n_layers, cfg.epochs, cfg.n_crops, cfg.batch_size, cfg.crop_size, cfg.dense_stage_epochs) == \
        (2, epochs, 4, 2, 48, 2)


def test_train_quick_then_save(make_napari_viewer, qtbot, sim, tmp_path):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    recover = RecoverWidget(viewer)
    qtbot.addWidget(recover)
    assert w.layers_list.selected_layers() == [obs] and w.psf_picker.layer() is psf
    _tiny_training(w)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    w.start_button.click()
    assert w.is_running() and w.start_button.text() == "Stop"
    _wait_done(qtbot, w)
    timer.stop()
    assert len(ticks) > 3  # the event loop kept running during training
    xs, train = w.plot.series("train")
    _, val = w.plot.series("validation")
    # custom settings start from the end-to-end ``quick`` recipe: one point per epoch, train and validation
    assert len(xs) >= 1 and len(val) == len(xs)
    assert np.isfinite(train).all()
    assert w.model is not None and w.model.n_layers == 2
    assert w.start_button.text() == "Start training"
    # the Recover widget offers the new model at once
    assert recover.model_picker.source() == ("registry", w.model_name)
    path = w.save_checkpoint_to(tmp_path / "trained")
    assert path.suffix == ".safetensors"
    assert load_checkpoint(path).n_layers == 2


def test_fine_tune_a_session_model(make_napari_viewer, qtbot, sim, notifications):
    """'start from': a model trained in this session, trained further (rates a fifth of the preset's)."""
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    _tiny_training(w)
    assert "quick recipe" in w.preset_description.text()  # "custom" says what it is built on
    w.start_button.click()
    _wait_done(qtbot, w)
    first, first_name = w.model, w.model_name
    items = [w.start_from_combo.itemText(i) for i in range(w.start_from_combo.count())]
    assert items == ["new network (FISTA steps)", "fine-tune the shipped model", f"fine-tune '{first_name}'"]
    w.start_from_combo.setCurrentIndex(2)
    get_settings().n_layers = 5  # ignored: the network's own layer count
    before = [p.detach().clone() for p in first.parameters()]
    w.start_button.click()
    _wait_done(qtbot, w)
    assert w.model is not first and w.model.n_layers == first.n_layers == 2
    # a fine-tuning that handed back the network it started from says so
    assert ("unchanged" in w.model_label.text()) == w.model.metadata["training"]["unchanged"]
    assert all(torch.equal(a, b) for a, b in zip(before, first.parameters()))  # the session model is kept
    assert w.model.metadata["training"]["config"]["scalar_lr"] == pytest.approx(0.06 * 0.2)
    assert first.metadata["training"]["config"]["dense_stage_epochs"] == 2
    # fine-tuning adapts to the user's data: no dense stage (the field is greyed out)
    assert w.model.metadata["training"]["config"].get("dense_stage_epochs", 0) == 0
    assert not w.dense_spin.isEnabled()
    assert len(get_model_registry()) == 2
    # the shipped model was trained with the 32 x 32 Airy PSF: another PSF is refused before any work
    small = viewer.add_image(np.full((9, 9), 1 / 81, dtype=np.float32), name="psf 9")
    w.psf_picker.set_layer(small)
    w.start_from_combo.setCurrentIndex(1)
    assert w.start() is None
    assert any("trained with a 32 x 32 PSF" in m for m in _errors(notifications))
    w.psf_picker.set_layer(psf)
    # a layer-wise preset cannot fine-tune
    w.start_from_combo.setCurrentIndex(2)
    w.set_preset("quick-layerwise")
    assert w.start() is None
    assert any("end-to-end preset" in m for m in _errors(notifications))


def test_train_stop_keeps_best_model(make_napari_viewer, qtbot, sim):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    _tiny_training(w, epochs=500)
    w.start()
    qtbot.waitUntil(lambda: len(w.plot.series("train")[0]) >= 1, timeout=TIMEOUT_MS)
    t0 = time.perf_counter()
    w.start_button.click()  # "Stop"
    _wait_done(qtbot, w)
    assert time.perf_counter() - t0 < 5.0  # stops within a step (< 1 s on an idle machine)
    assert w.model is not None
    assert w.model.metadata["training"]["cancelled"] is True
    assert len(get_model_registry()) == 1
    assert "Stopped early" in w.model_label.text()


def test_training_bad_input_notifies(make_napari_viewer, qtbot, sim, notifications):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    w.layers_list.set_selected([])
    assert w.start() is None
    assert any("select one or more" in m for m in _errors(notifications))
    w.layers_list.set_selected([obs])
    get_settings().crop_size = 200  # larger than the 64 x 64 observation: the core says so
    w.start()
    _wait_done(qtbot, w)
    assert any("crop size" in m for m in _errors(notifications))
    assert w.model is None and w.start_button.text() == "Start training"


# --------------------------------------------------------------------------- recovery


def test_recover_with_checkpoint_registers_layers(make_napari_viewer, qtbot, sim, tiny_checkpoint):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim, translate=(0, 10, 20), scale=(1, 0.5, 0.5))
    w = RecoverWidget(viewer)
    qtbot.addWidget(w)
    w.model_picker.set_checkpoint(tiny_checkpoint)
    assert "2-layer spodnet" in w.model_picker.info_label.text()
    w.run_button.click()
    _wait_done(qtbot, w)
    layers = w.result_layers
    h = 64 + 32 - 1
    assert layers["recovered"].data.shape == (18, h, h)
    assert layers["intensity"].data.shape == (h, h)
    assert layers["orientation"].rgb and layers["orientation"].data.shape == (h, h, 3)
    np.testing.assert_allclose(layers["recovered"].translate, (0, 10 - 15.5 * 0.5, 20 - 15.5 * 0.5))
    np.testing.assert_allclose(layers["intensity"].translate, (10 - 15.5 * 0.5, 20 - 15.5 * 0.5))
    np.testing.assert_allclose(layers["intensity"].scale, (0.5, 0.5))
    meta = layers["recovered"].metadata["spodnet"]
    assert meta["kind"] == "recovered" and meta["method"] == "spodnet" and meta["seconds"] > 0
    assert "s on cpu" in w.result_label.text()
    # running again refreshes the same layers instead of adding copies
    n = len(viewer.layers)
    w.start()
    _wait_done(qtbot, w)
    assert len(viewer.layers) == n


def test_recover_time_series_and_current_frame(make_napari_viewer, qtbot, sim):
    viewer = make_napari_viewer()
    series = np.stack([sim.observation] * 3)
    layer = viewer.add_image(series, name="series")
    get_model_registry().add(SPoDNet(sim.psf, n_layers=2), name="fixture")
    w = RecoverWidget(viewer)
    qtbot.addWidget(w)
    assert w.model_picker.source() == ("registry", "fixture")
    w.start()
    _wait_done(qtbot, w)
    assert w.result_layers["recovered"].data.shape == (3, 18, 95, 95)
    # on the t axis: a length-1 polarization axis stretched over the 18 steps
    assert w.result_layers["orientation"].data.shape == (3, 1, 95, 95, 3)
    assert w.result_layers["intensity"].data.shape == (3, 1, 95, 95)
    np.testing.assert_allclose(w.result_layers["intensity"].translate, (0, 8.5, -15.5, -15.5))
    np.testing.assert_allclose(w.result_layers["intensity"].scale, (1, 18, 1, 1))
    w.all_frames_check.setChecked(False)
    viewer.dims.set_point(0, 2)
    w.start()
    _wait_done(qtbot, w)
    assert w.result_layers["recovered"].data.shape == (18, 95, 95)
    assert w.result_layers["recovered"].metadata["spodnet"]["frame"] == 2
    assert layer.name == "series"


@pytest.mark.skipif(not DEFAULT_MODEL_PATH.is_file(), reason="the shipped default model is not installed yet")
def test_recover_with_shipped_default(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-spodnet", "spod_sample")
    w = RecoverWidget(viewer)
    qtbot.addWidget(w)
    w.model_picker.set_source("default")
    w.start()
    _wait_done(qtbot, w)
    assert w.result_layers["intensity"].data.shape == (287, 287)


def test_recover_cancel_is_quiet(make_napari_viewer, qtbot, sim, tiny_checkpoint, notifications):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = RecoverWidget(viewer)
    qtbot.addWidget(w)
    w.model_picker.set_checkpoint(tiny_checkpoint)
    n = len(viewer.layers)
    w.start()
    w.run_button.click()  # "Cancel"
    _wait_done(qtbot, w)
    assert len(viewer.layers) == n
    assert "cancelled" in w.progress.text().lower()
    assert not _errors(notifications)


def test_bad_inputs_notify_without_crash(make_napari_viewer, qtbot, sim, tmp_path, notifications):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    rec = RecoverWidget(viewer)
    fis = FistaWidget(viewer)
    qtbot.addWidget(rec)
    qtbot.addWidget(fis)
    # a 3-channel stack
    three = viewer.add_image(np.ones((3, 64, 64), np.float32), name="three channels")
    rec.observation_picker.set_layer(three)
    get_model_registry().add(SPoDNet(sim.psf, n_layers=1))
    assert rec.start() is None
    assert any("18 polarization" in m for m in _errors(notifications))
    # no PSF chosen
    fis.observation_picker.set_layer(obs)
    fis.psf_picker.setCurrentIndex(0)
    assert fis.start() is None
    assert any("PSF" in m for m in _errors(notifications))
    # a corrupt checkpoint: a warning when chosen, an error when used, never a crash
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    rec.observation_picker.set_layer(obs)
    rec.model_picker.set_checkpoint(bad)
    assert any("corrupt.safetensors" in m for s, m in notifications if s == "warning")
    assert rec.start() is None  # refused before any worker starts, with the reason in the status line
    assert any("Recovery" in m and "corrupt.safetensors" in m for m in _errors(notifications))
    assert rec.progress.text().startswith("Not started") and "corrupt.safetensors" in rec.progress.text()
    assert rec.run_button.text() == "Recover"
    # a checkpoint file not chosen at all
    rec.model_picker.path_edit.setText("")
    assert rec.start() is None
    assert any("choose a checkpoint" in m for m in _errors(notifications))


# --------------------------------------------------------------------------- FISTA


def test_fista_comparison_side_by_side(make_napari_viewer, qtbot, sim):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    get_model_registry().add(SPoDNet(sim.psf, n_layers=2), name="fixture")
    w = FistaWidget(viewer)
    qtbot.addWidget(w)
    s = get_settings()
    s.fista_iterations, s.fista_tol = 12, 0.0
    w.run_button.click()
    _wait_done(qtbot, w)
    xs, objective = w.plot.series("FISTA")
    assert xs == list(range(1, 13))  # the whole history once done (the live curve is throttled)
    assert objective[-1] <= objective[0]
    assert len(w.plot.series("SPoD-Net")[0]) == 2
    layers = w.comparison_layers
    assert set(layers) == {"mean", "fista", "spodnet", "difference"}
    assert layers["mean"].data.shape == (64, 64) and layers["fista"].data.shape == (95, 95)
    np.testing.assert_allclose(layers["fista"].translate, (-15.5, -15.5))
    np.testing.assert_allclose(layers["difference"].data,
                               np.abs(layers["fista"].data - layers["spodnet"].data))
    assert layers["fista"].name.startswith("FISTA: L=") and layers["spodnet"].name.startswith("SPoD-Net: L=")
    assert layers["fista"].metadata["spodnet"]["objective"] == pytest.approx(objective[-1], rel=1e-5)
    assert grid_model(viewer).enabled
    cells = [grid_cell(viewer, layers[k]) for k in ("mean", "fista", "spodnet", "difference")]
    assert cells == [(0, 0), (0, 1), (1, 0), (1, 1)]  # reading order
    assert not obs.visible  # only the comparison occupies the grid
    text = w.result_label.text()
    assert "SPoD-Net:" in text and "objective" in text
    assert ("at equal objective" in text) or ("did not reach SPoD-Net's objective" in text)
    assert w.comparison is not None and w.comparison.fista_iterations == 12
    w.leave_grid()
    assert not grid_model(viewer).enabled and obs.visible
    assert not any(layer.visible for layer in layers.values())  # the comparison does not cover the view


def test_fista_cancel_within_a_second(make_napari_viewer, qtbot, sim, notifications):
    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = FistaWidget(viewer)
    qtbot.addWidget(w)
    s = get_settings()
    s.fista_iterations, s.fista_tol, s.compare_spodnet = 100_000, 0.0, False
    n = len(viewer.layers)
    w.start()
    qtbot.waitUntil(lambda: len(w.plot.series("FISTA")[0]) >= 5, timeout=TIMEOUT_MS)
    t0 = time.perf_counter()
    w.run_button.click()  # "Cancel"
    _wait_done(qtbot, w)
    assert time.perf_counter() - t0 < 2.0
    assert len(viewer.layers) == n and not grid_model(viewer).enabled
    assert w.progress.text() == "FISTA comparison cancelled."
    assert not _errors(notifications)


# --------------------------------------------------------------------------- demo


def test_run_demo_in_viewer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widgets = run_demo_in_viewer(viewer, fista_iterations=10)
    assert viewer.layers[0].data.shape == (18, 256, 256)
    job_widget = widgets["recover"] if DEFAULT_MODEL_PATH.is_file() else widgets["fista"]
    _wait_done(qtbot, job_widget)
    kinds = {layer.metadata.get("spodnet", {}).get("kind") for layer in viewer.layers}
    assert "intensity" in kinds


# --------------------------------------------------------------------------- live plot and GUI steps


def _curve_pixels(plot):
    """How many pixels of the plot's canvas have the first curve's colour."""
    from matplotlib.colors import to_rgba

    rgba = np.asarray(plot.canvas.buffer_rgba())
    colour = np.array(to_rgba(next(iter(plot._lines.values())).get_color())) * 255
    return int((np.abs(rgba[..., :3].astype(float) - colour[:3]).sum(axis=-1) < 30).sum())


def test_live_plot_redraws_only_the_curve_while_the_data_fit(qtbot, monkeypatch):
    from napari_spodnet.widgets import _plots

    monkeypatch.setattr(_plots, "MAX_REDRAWS_PER_SECOND", 1e6)  # every append draws
    plot = _plots.CurvePlot(xlabel="iteration", ylabel="objective")
    qtbot.addWidget(plot)
    plot.set_x_range(0, 100)
    plot.append("FISTA", 1, 1.0)
    full = plot.full_redraws
    short = _curve_pixels(plot)
    for it in range(2, 40):  # inside the limits fitted at the first point (log room x3)
        plot.append("FISTA", it, 1.0 - 0.01 * it)
    assert plot.full_redraws == full  # the axes were not redrawn ...
    assert plot.redraws >= full + 38
    assert _curve_pixels(plot) > short + 20  # ... but the curve grew on the canvas
    plot.append("FISTA", 40, 1e-3)  # below the y limits: the axes are refitted
    assert plot.full_redraws == full + 1
    lo, hi = plot.axes.get_ylim()
    assert lo <= 1e-3 and hi >= 1.0 and plot.axes.get_yscale() == "log"
    plot.flush()
    assert plot.series("FISTA")[0] == list(range(1, 41))


def test_live_plot_draws_at_a_bounded_rate(qtbot):
    from napari_spodnet.widgets._plots import MAX_REDRAWS_PER_SECOND, CurvePlot

    plot = CurvePlot()
    qtbot.addWidget(plot)
    start = plot.redraws
    t0 = time.perf_counter()
    for it in range(1, 500):
        plot.append("train", it, 1.0 / it)
    qtbot.wait(int(1500 / MAX_REDRAWS_PER_SECOND) + 300)  # the trailing redraw shows the last point
    elapsed = time.perf_counter() - t0
    assert plot.redraws - start <= MAX_REDRAWS_PER_SECOND * elapsed + 2
    assert not plot._dirty


def test_step_chain_runs_one_step_per_event_loop_turn(qtbot, notifications):
    from qtpy.QtWidgets import QWidget

    from napari_spodnet.widgets._jobs import StepChain

    parent = QWidget()
    qtbot.addWidget(parent)
    ran, done = [], []
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(len(ran)))
    timer.start(0)
    chain = StepChain(parent, "Test", [lambda i=i: ran.append(i) for i in range(5)], on_done=lambda: done.append(1))
    chain.start()
    assert ran == [] and chain.running  # nothing happens inside start()
    qtbot.waitUntil(lambda: not chain.running, timeout=5000)
    timer.stop()
    assert ran == [0, 1, 2, 3, 4] and done == [1]
    assert len(set(ticks)) >= 3  # other events ran between the steps

    def fail():
        raise ValueError("broken step")

    ran.clear()
    chain = StepChain(parent, "Test", [lambda: ran.append(0), fail, lambda: ran.append(2)], on_done=lambda: done.append(2))
    chain.run_all()
    assert ran == [0] and done == [1, 2] and not chain.running
    assert any("broken step" in m for sev, m in notifications if sev == "error")


def test_train_progress_names_the_stage(make_napari_viewer, qtbot, sim):
    from napari_spodnet.core.training import TrainingProgress

    viewer, obs, psf = _viewer_with_data(make_napari_viewer, sim)
    w = TrainWidget(viewer)
    qtbot.addWidget(w)
    for stage, label in (("end-to-end", "all layers"), ("dense", "dense-structure stage"),
                         ("step2", "layer 3/10 · step2")):
        w._on_progress([TrainingProgress(3, 10, stage, 4, 30, 0.5, 0.25, 12.0, 0.5, "", fista_equivalent=87.0,
                                         fista_equivalent_worst=31.0)])
        text = w.progress.label.text()
        assert text.startswith(f"{label} · epoch 4/30") and "worth 87 FISTA iterations (worst crop 31)" in text
    # the dense stage's losses (other crops) are curves of their own; its preparation is news, not a point
    assert w.plot.series("train (with dense clusters)")[1] == [0.5]
    assert w.plot.series("validation (with dense clusters)")[1] == [0.25] and len(w.plot.series("train")[0]) == 2
    w._on_progress([TrainingProgress(10, 10, "dense", 0, 30, 0.5, 0.25, 13.0, 0.6, "dense stage: simulating…")])
    assert w.progress.label.text() == "dense stage: simulating…"
    assert len(w.plot.series("train (with dense clusters)")[0]) == 1
    w.plot.flush()
    dense_line, first_line = w.plot._lines["train (with dense clusters)"], w.plot._lines["train"]
    from matplotlib.colors import to_rgb

    assert dense_line.get_linestyle() == "--" and to_rgb(dense_line.get_color()) == to_rgb(first_line.get_color())


def test_log_axis_labels_minor_ticks_only_within_about_a_decade(qtbot):
    from napari_spodnet.widgets._plots import CurvePlot

    plot = CurvePlot(logy=True)
    qtbot.addWidget(plot)
    plot.set_series("a", [1, 2], [2.1e-4, 2.6e-4])
    plot.flush()
    assert plot._minor_label(2.2e-4, 0) == "2.2e-04"
    plot.set_series("a", [1, 2], [1.5e-4, 3e-3])
    plot.flush()
    assert plot._minor_label(2e-4, 0) == ""
