"""The widgets on the user's own path: docked from the Plugins menu, files opened with napari.

``viewer.window.add_plugin_dock_widget("napari-spodnet", <name>)`` is what the Plugins menu
does: napari builds the widget with a *proxy* of the viewer (``PublicOnlyProxy``), through
which every layer is a fresh proxy object. Files go through ``viewer.open(path, plugin=...)``
(napari's reader machinery), buttons are clicked, workers awaited with ``qtbot.waitUntil``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from qtpy.QtCore import Qt

from napari_spodnet.core.checkpoint import save_checkpoint
from napari_spodnet.core.network import SPoDNet
from napari_spodnet.core.recover import DEFAULT_MODEL_PATH
from napari_spodnet.core.simulate import simulate_time_series
from napari_spodnet.widgets._shared import get_model_registry, get_settings, grid_model, reset_settings

PLUGIN = "napari-spodnet"
TIMEOUT_MS = 60_000
PIXEL_UM = 0.1


@pytest.fixture(autouse=True)
def fresh_settings():
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="module")
def series_sim():
    return simulate_time_series(n_frames=2, shape=(48, 48), seed=1)


@pytest.fixture
def files(tmp_path, series_sim):
    """An ImageJ (T, C, Y, X) series with a pixel size, its PSF and a checkpoint for that PSF."""
    obs = tmp_path / "series.tif"
    tifffile.imwrite(obs, series_sim.observation.astype(np.float32), imagej=True,
                     resolution=(1 / PIXEL_UM, 1 / PIXEL_UM), metadata={"axes": "TCYX", "unit": "um"})
    psf = tmp_path / "psf.tif"
    tifffile.imwrite(psf, series_sim.psf.astype(np.float32))
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(SPoDNet(series_sim.psf, n_layers=2), ckpt, extra_metadata={"name": "tiny"})
    return {"observation": obs, "psf": psf, "checkpoint": ckpt}


def _dock(viewer, name):
    _dock_widget, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _click(button):
    from qtpy.QtTest import QTest

    QTest.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=TIMEOUT_MS)


def _open_files(viewer, files):
    obs = viewer.open(str(files["observation"]), plugin=PLUGIN)[0]
    psf = viewer.open(str(files["psf"]), plugin=PLUGIN)[0]
    return obs, psf


def _displayed(layer) -> np.ndarray:
    """The 2-D slice napari shows now for ``layer`` (after the viewer's current dims)."""
    return np.asarray(layer._slice.image.view)


def test_plugin_menu_widgets_get_a_proxy_and_keep_their_layers(make_napari_viewer, qtbot, files, series_sim):
    viewer = make_napari_viewer()
    data = _dock(viewer, "SPoD data and PSF")
    from napari.utils._proxies import PublicOnlyProxy

    assert isinstance(data.viewer, PublicOnlyProxy)  # the Plugins-menu path, not the demo's real viewer
    obs, psf = _open_files(viewer, files)
    assert data.observation_picker.currentText() == obs.name
    assert data.psf_picker.currentText() == psf.name
    assert data.observation_status_text().startswith("✓") and "time series of 2" in data.observation_status_text()
    # the PSF file shows at the observation's pixel size, in µm
    np.testing.assert_allclose(psf.scale, (PIXEL_UM, PIXEL_UM))
    assert str(obs.units[-1]) == "micrometer" and str(psf.units[-1]) == "micrometer"

    # each action adds a layer and the picker selects it (identity by unique_id through the proxy)
    moved = viewer.add_image(np.moveaxis(series_sim.observation[0], 0, -1), name="channel last")
    data.observation_picker.set_layer(moved)
    _click(data.fix_axes_button)
    assert data.observation_picker.currentText() == "channel last (c, H, W)"
    data.observation_picker.set_layer(obs)
    _click(data.preprocess_button)
    _wait(qtbot, data)
    assert data.observation_picker.currentText() == f"{obs.name} preprocessed"
    assert viewer.layers[f"{obs.name} preprocessed"].data.shape == obs.data.shape
    data.psf_list.set_selected([psf])
    _click(data.average_button)
    assert data.psf_picker.currentText() == "PSF average of 1"


def test_time_series_results_follow_the_t_slider(make_napari_viewer, qtbot, files):
    viewer = make_napari_viewer()
    rec = _dock(viewer, "Recover (SPoD-Net)")
    obs, psf = _open_files(viewer, files)
    rec.model_picker.set_checkpoint(files["checkpoint"])
    _click(rec.run_button)
    assert rec.is_running()
    _wait(qtbot, rec)
    assert rec.progress.text() == "Done.", rec.progress.text()
    intensity = viewer.layers[f"{obs.name} SPoD-Net intensity"]
    orientation = viewer.layers[f"{obs.name} SPoD-Net orientation"]
    assert intensity.data.shape[:2] == (2, 1) and orientation.data.shape[:2] == (2, 1)
    assert orientation.visible and str(intensity.units[-1]) == "micrometer"
    # the sliders: t picks the frame, every polarization position shows the result
    intensity.visible = True
    t_axis, pol_axis = 0, 1
    frames = []
    for t in (0, 1):
        for pol in (0, 9, 17):
            step = list(viewer.dims.current_step)
            step[t_axis], step[pol_axis] = t, pol
            viewer.dims.current_step = tuple(step)
            shown = _displayed(intensity)
            assert shown.shape == intensity.data.shape[-2:]
            np.testing.assert_allclose(shown, intensity.data[t, 0])
            assert _displayed(orientation).shape[:2] == orientation.data.shape[2:4]
        frames.append(shown.copy())
    assert not np.allclose(frames[0], frames[1])  # the two time points differ
    assert viewer.dims.nsteps[t_axis] == 2 and viewer.dims.nsteps[pol_axis] == 18  # no extra steps
    # the scale bar is on, in µm
    assert viewer.canvas.overlays.scale_bar.visible


def test_fista_comparison_from_the_plugin_menu(make_napari_viewer, qtbot, files, notifications_seen):
    viewer = make_napari_viewer()
    rec = _dock(viewer, "Recover (SPoD-Net)")
    fis = _dock(viewer, "FISTA comparison")
    obs, psf = _open_files(viewer, files)
    # a checkpoint chosen in Recover is the one the comparison offers
    rec.model_picker.set_checkpoint(files["checkpoint"])
    assert fis.model_picker.source()[0] == "file"
    assert fis.model_picker.path_edit.text() == str(files["checkpoint"])
    s = get_settings()
    s.fista_iterations, s.fista_tol = 15, 0.0
    _click(fis.run_button)
    _wait(qtbot, fis)
    layers = fis.comparison_layers
    assert set(layers) == {"mean", "fista", "spodnet", "difference"}
    shown = {layer.name for layer in viewer.layers if layer.visible}
    assert shown == {layer.name for layer in layers.values()}  # the comparison, and nothing else, is visible
    assert grid_model(viewer).enabled
    text = fis.result_label.text()
    assert "SPoD-Net:" in text and ("at equal objective" in text or "did not reach" in text)
    assert "% lower than SPoD-Net's" in text
    assert fis.progress.fraction() == 1.0
    _click(fis.leave_grid_button)
    assert not grid_model(viewer).enabled
    assert obs.visible and not any(layer.visible for layer in layers.values())


@pytest.mark.parametrize("psf_first", [False, True], ids=["observation_then_psf", "psf_then_observation"])
def test_layers_share_units_without_a_warning(make_napari_viewer, qtbot, files, notifications_seen, psf_first):
    """An observation with a pixel size (µm) and a PSF file without one: the PSF takes the observation's units
    before napari's canvas compares them, so no "Inconsistent units across layers" toast, in either order."""
    viewer = make_napari_viewer()
    rec = _dock(viewer, "Recover (SPoD-Net)")
    fis = _dock(viewer, "FISTA comparison")
    if psf_first:
        psf = viewer.open(str(files["psf"]), plugin=PLUGIN)[0]
        obs = viewer.open(str(files["observation"]), plugin=PLUGIN)[0]
    else:
        obs, psf = _open_files(viewer, files)
    rec.model_picker.set_checkpoint(files["checkpoint"])
    _click(rec.run_button)
    _wait(qtbot, rec)
    s = get_settings()
    s.fista_iterations, s.fista_tol = 5, 0.0
    _click(fis.run_button)
    _wait(qtbot, fis)
    assert rec.progress.text() == "Done." and fis.progress.fraction() == 1.0
    warned = [m for _sev, m in notifications_seen if "units" in m.lower()]
    assert not warned, warned
    assert viewer.layers.extent.units is not None  # napari found one set of units for all layers
    for layer in viewer.layers:
        assert [str(u) for u in layer.units[-2:]] == ["micrometer", "micrometer"], (layer.name, layer.units)


def test_psf_file_opened_without_a_widget_takes_the_observation_units(make_napari_viewer, files, notifications_seen):
    """No plugin widget docked: the reader itself puts the PSF file at the observation's pixel size."""
    viewer = make_napari_viewer()
    obs, psf = _open_files(viewer, files)
    assert not [m for _sev, m in notifications_seen if "units" in m.lower()]
    np.testing.assert_allclose(psf.scale, (PIXEL_UM, PIXEL_UM))
    assert [str(u) for u in psf.units] == ["micrometer", "micrometer"]
    assert viewer.layers.extent.units is not None


def test_refusals_come_before_fista_and_reset_the_status(make_napari_viewer, qtbot, files, tmp_path,
                                                         notifications_seen):
    viewer = make_napari_viewer()
    fis = _dock(viewer, "FISTA comparison")
    obs, psf = _open_files(viewer, files)
    fis.progress.set_text("Done.")  # what a previous run left
    fis.model_picker.set_checkpoint(tmp_path)  # a folder
    _click(fis.run_button)
    assert not fis.is_running()
    assert fis.progress.text().startswith("Not started") and "is a folder" in fis.progress.text()
    assert any("is a folder" in m for sev, m in notifications_seen if sev == "error")
    # a model for another PSF size: refused before FISTA starts, in words (not image shapes)
    other = tmp_path / "other.safetensors"
    yy, xx = np.mgrid[-10:11, -10:11]
    small_psf = np.exp(-(yy**2 + xx**2) / 8.0).astype(np.float32)
    save_checkpoint(SPoDNet(small_psf / small_psf.sum(), n_layers=1), other)
    fis.model_picker.set_checkpoint(other)
    _click(fis.run_button)
    assert not fis.is_running()
    assert "trained for a 21 x 21 PSF" in fis.progress.text()
    # a NaN observation: a clear refusal, and the data widget says so
    bad = obs.data.copy()
    bad[0, 0, 5, 5] = np.nan
    nan_layer = viewer.add_image(bad, name="with NaN", metadata={"spodnet": {"kind": "observation"}})
    data = _dock(viewer, "SPoD data and PSF")
    data.observation_picker.set_layer(nan_layer)
    assert data.observation_status_text().startswith("✗") and "NaN" in data.observation_status_text()
    assert "flat" not in data.scale_label.text()
    s = get_settings()
    s.compare_spodnet = False
    _click(fis.run_button)
    assert not fis.is_running() and "NaN" in fis.progress.text()


def test_stop_keeps_a_partial_model_without_selecting_it(make_napari_viewer, qtbot, files):
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train SPoD-Net")
    rec = _dock(viewer, "Recover (SPoD-Net)")
    _open_files(viewer, files)
    rec.model_picker.set_checkpoint(files["checkpoint"])
    s = get_settings()
    s.n_layers, s.epochs, s.n_crops, s.batch_size, s.crop_size = 10, 500, 4, 2, 32
    _click(train.start_button)
    qtbot.waitUntil(lambda: len(train.plot.series("train")[0]) >= 1, timeout=TIMEOUT_MS)
    _click(train.start_button)  # Stop
    _wait(qtbot, train)
    entry = get_model_registry().latest()
    assert entry is not None and entry.stopped_early
    assert rec.model_picker.source() == ("file", None)  # the user's choice stays
    assert any(entry.name in rec.model_picker.combo.itemText(i) for i in range(rec.model_picker.combo.count()))
    assert train.progress.fraction() < 1.0 and "Stopped" in train.progress.text()


def test_plain_36_page_stack_split_into_time_points(make_napari_viewer, qtbot, tmp_path, series_sim):
    pages = tmp_path / "pages.tif"
    plain = series_sim.observation.reshape(36, 48, 48).astype(np.float32)  # t0: c0..c17, t1: c0..c17
    tifffile.imwrite(pages, plain, photometric="minisblack")
    viewer = make_napari_viewer()
    data = _dock(viewer, "SPoD data and PSF")
    layer = viewer.open(str(pages), plugin="napari")[0]  # napari's own reader: a (36, Y, X) image
    data.observation_picker.set_layer(layer)
    assert data.layout_box.isVisibleTo(data) and "2 time points" in data.layout_box.title()
    _click(data.split_button)
    split = viewer.layers[data.observation_picker.currentText()]
    assert split.data.shape == (2, 18, 48, 48)
    np.testing.assert_array_equal(split.data, series_sim.observation.astype(np.float32))
    assert data.observation_status_text().startswith("✓")


@pytest.fixture
def notifications_seen():
    from napari.utils.notifications import notification_manager

    seen = []

    def record(notification):
        seen.append((str(notification.severity).lower(), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


def test_rendered_screenshot_shows_the_result(make_napari_viewer, qtbot):
    """A real shown window under Xvfb: the result is drawn (not black) and follows the t slider."""
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("needs the shipped default model (trained for the simulator's PSF)")
    viewer = make_napari_viewer(show=True)
    rec = _dock(viewer, "Recover (SPoD-Net)")
    viewer.open_sample(PLUGIN, "spod_time_series")  # File > Open Sample: 8 frames of 128 x 128
    obs = viewer.layers["SPoD time series"]
    rec.model_picker.set_source("default")
    _click(rec.run_button)
    _wait(qtbot, rec)
    name = f"{obs.name} SPoD-Net intensity"
    for layer in viewer.layers:
        layer.visible = layer.name == name
    viewer.reset_view()
    step = list(viewer.dims.current_step)
    step[1] = 9  # a polarization position away from 0: the result must still be drawn
    shots = []
    for t in (0, 1):
        step[0] = t
        viewer.dims.current_step = tuple(step)
        shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        lit = int((shot.max(axis=-1) > 20).sum())
        layer = viewer.layers[name]
        extent = np.diff(layer.extent.world[:, -2:], axis=0).ravel()
        area = float(np.prod(extent * viewer.camera.zoom))  # screen pixels the result covers
        assert 0 < area <= shot.shape[0] * shot.shape[1] * 1.01
        # the pixels the data say must be drawn brighter than 20/255 (gray colormap, linear)
        lo, hi = layer.contrast_limits
        expected = float((layer.data[t, 0] > lo + 20 / 255 * (hi - lo)).mean())
        assert expected > 0.005
        assert lit > 0.5 * expected * area, (f"t={t}: the canvas is black where the result is ({lit} px lit, "
                                             f"{expected * area:.0f} expected)")
        shots.append(shot)
    assert np.abs(shots[0] - shots[1]).mean() > 1  # a different frame is drawn at t=1


#: per dock widget, its word-wrapped labels that take the longest texts (the checks, the result lines)
LONG_TEXT_LABELS = {
    "SPoD data and PSF": ("observation_status", "scale_label", "psf_status"),
    "Train SPoD-Net": ("model_label",),
    "Recover (SPoD-Net)": ("result_label",),
    "FISTA comparison": ("result_label",),
}


def _process_events(qtbot):
    from qtpy.QtWidgets import QApplication

    for _ in range(5):
        QApplication.processEvents()
    qtbot.wait(200)


@pytest.mark.parametrize("name", list(LONG_TEXT_LABELS))
def test_widget_text_is_never_squeezed_in_a_short_dock(make_napari_viewer, qtbot, name):
    """Docked from the Plugins menu in a shown window shorter than the widget: every wrapped label (the preset's
    description, the checks, the result lines) gets the height its text needs (a dock without scrolling squeezed
    them to a line or two, drawn over each other, or made the window taller than asked) and nothing is cut at the
    sides; the rest scrolls."""
    from qtpy.QtWidgets import QLabel

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1200, 700)
    widget = _dock(viewer, name)
    if name == "Train SPoD-Net":
        widget.set_preset("quick")
    for attr in LONG_TEXT_LABELS[name]:
        getattr(widget, attr).setText("A long line that wraps over several lines in the dock " * 4)
    _process_events(qtbot)
    assert window.height() == 700  # the dock did not force the window taller
    labels = [label for label in widget.findChildren(QLabel)
              if label.isVisible() and label.wordWrap() and label.text()
              and label.minimumHeight() != label.maximumHeight()]  # (the progress rows' status lines are fixed)
    assert len(labels) >= len(LONG_TEXT_LABELS[name])
    for label in labels:
        assert label.height() >= label.heightForWidth(label.width()) - 1, label.text()[:40]
    scroll = widget.scroll
    assert scroll.widget().width() <= scroll.viewport().width()  # no control cut off at the right
    assert scroll.verticalScrollBar().maximum() > 0  # 700 px are too few for all the controls: they scroll


@pytest.mark.parametrize("name", list(LONG_TEXT_LABELS))
def test_status_line_grows_for_a_long_final_text_and_back(make_napari_viewer, qtbot, name):
    """The progress row's status line keeps a fixed three-line height (progress at 10 Hz must not re-lay-out the
    window), but a longer text, such as "Done: new layer '<a long file name> preprocessed'", is shown whole; the
    next short text takes the three lines back."""
    from napari_spodnet.widgets._controls import ProgressRow

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 700)
    widget = _dock(viewer, name)
    _process_events(qtbot)
    row = widget.findChild(ProgressRow)
    label = row.label
    row.set_text("epoch 1/50")
    _process_events(qtbot)
    three_lines = label.height()
    assert three_lines >= 3 * label.fontMetrics().lineSpacing()
    row.set_text("Done in 0.2 s: new layer 'a_rather_long_observation_file_name_with_a_date_2026_12_07 preprocessed' "
                 "(median 5, minimum 7, subtract the background); the observation layer is unchanged. " * 2)
    _process_events(qtbot)
    assert label.height() > three_lines and label.height() >= label.heightForWidth(label.width()) - 1
    row.set_text("epoch 3/50")
    _process_events(qtbot)
    assert label.height() == three_lines


def test_stacked_docks_are_as_wide_as_the_widest_controls(make_napari_viewer, qtbot):
    """The four widgets docked one after the other from the Plugins menu (napari stacks them in one column): the
    column is as wide as the widest controls need (none is cut off at the right) and the window keeps its height."""
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1200, 700)
    widgets = [_dock(viewer, name) for name in LONG_TEXT_LABELS]
    _process_events(qtbot)
    assert window.height() == 700
    for widget in widgets:
        scroll = widget.scroll
        assert scroll.widget().width() <= scroll.viewport().width(), type(widget).__name__
