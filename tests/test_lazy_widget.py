"""The Recover widget's lazy time series, on the user's path: docked from the Plugins menu, the
series opened with napari's reader, real button clicks, the t slider moved.

Lazy layers appear at once and show frame t's recovery when the slider is at t; "Recover all"
fills every frame in a worker (progress, Cancel) so that scrubbing afterwards recovers
nothing; "Save to…" streams the series to OME-Zarr in a worker and refuses the input file;
another model rebuilds the layers (never a stale frame).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
import torch
from qtpy.QtCore import Qt

from napari_spodnet.core.checkpoint import save_checkpoint
from napari_spodnet.core.network import SPoDNet
from napari_spodnet.core.recover import recover
from napari_spodnet.core.simulate import simulate_time_series
from napari_spodnet.widgets._shared import reset_settings

PLUGIN = "napari-spodnet"
WIDGET = "Recover (SPoD-Net)"  # napari.yaml display name
TIMEOUT_MS = 60_000
N_FRAMES = 6  # more than LAZY_DEFAULT_ABOVE_FRAMES: lazy is the default


@pytest.fixture(autouse=True)
def fresh_settings():
    reset_settings()
    yield
    reset_settings()


@pytest.fixture(scope="module")
def series_sim():
    return simulate_time_series(n_frames=N_FRAMES, shape=(40, 40), seed=3)


@pytest.fixture
def files(tmp_path, series_sim):
    obs = tmp_path / "series.tif"
    tifffile.imwrite(obs, series_sim.observation.astype(np.float32), imagej=True, metadata={"axes": "TCYX"})
    first = tmp_path / "first.safetensors"
    save_checkpoint(SPoDNet(series_sim.psf, n_layers=2), first, extra_metadata={"name": "first"})
    other_net = SPoDNet(series_sim.psf, n_layers=2)
    with torch.no_grad():
        other_net.layers[0].theta.mul_(4.0)  # same shapes, other weights: another token
    other = tmp_path / "other.safetensors"
    save_checkpoint(other_net, other, extra_metadata={"name": "other"})
    return {"observation": obs, "first": first, "other": other}


@pytest.fixture(scope="module")
def reference_cache():
    return {}


def reference(series_sim, checkpoint, cache):
    """The eager recovery of the whole series (what the lazy frames must equal)."""
    key = str(checkpoint)
    if key not in cache:
        cache[key] = recover(series_sim.observation, None, model=checkpoint)
    return cache[key]


def _click(button):
    from qtpy.QtTest import QTest

    QTest.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.is_running(), timeout=TIMEOUT_MS)


def _displayed(layer) -> np.ndarray:
    return np.asarray(layer._slice.image.view)


def _lazy_setup(make_napari_viewer, qtbot, files, show=False):
    viewer = make_napari_viewer(show=show)
    _dock, rec = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    obs = viewer.open(str(files["observation"]), plugin=PLUGIN)[0]
    rec.model_picker.set_checkpoint(files["first"])
    rec.observation_picker.set_layer(obs)
    assert rec.lazy_check.isEnabled() and rec.lazy_check.isChecked()  # the default for > 4 frames
    assert not rec.recover_all_button.isEnabled() and not rec.save_button.isEnabled()
    _click(rec.run_button)
    _wait(qtbot, rec)
    assert rec.progress.text() == "Lazy layers ready.", rec.progress.text()
    return viewer, rec, obs


class CountingRecoveries:
    """Counts (and optionally slows, to make Cancel deterministic) the frames a recoverer recovers."""

    def __init__(self, engine, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self.first_started = threading.Event()
        original = engine.recover_frames

        def counting(frames, *args, **kwargs):
            self.calls += len(frames)
            self.first_started.set()
            if self.delay:
                threading.Event().wait(self.delay)
            return original(frames, *args, **kwargs)

        engine.recover_frames = counting


def test_lazy_layers_appear_at_once_and_follow_the_t_slider(make_napari_viewer, qtbot, files, series_sim,
                                                            reference_cache):
    viewer, rec, obs = _lazy_setup(make_napari_viewer, qtbot, files)
    ref = reference(series_sim, files["first"], reference_cache)
    intensity = viewer.layers[f"{obs.name} SPoD-Net intensity"]
    orientation = viewer.layers[f"{obs.name} SPoD-Net orientation"]
    stack = viewer.layers[f"{obs.name} SPoD-Net"]
    assert type(intensity.data).__module__.startswith("dask")  # lazy: nothing recovered but the frame shown
    assert intensity.data.shape == (N_FRAMES, 1, *ref.intensity.shape[-2:])
    assert orientation.rgb and orientation.data.shape == (N_FRAMES, 1, *ref.intensity.shape[-2:], 3)
    assert stack.data.shape == ref.image.shape and not stack.visible
    shown = int(viewer.dims.current_step[0])  # napari puts a new slider in the middle
    assert [rec.lazy.is_filled(t) for t in range(N_FRAMES)] == [t == shown for t in range(N_FRAMES)]
    np.testing.assert_allclose(intensity.translate[-2:], ref.translate)
    counter = CountingRecoveries(rec.lazy.engine)
    intensity.visible = True
    for t in ((shown + 1) % N_FRAMES, (shown + 3) % N_FRAMES):
        viewer.dims.set_current_step(0, t)
        viewer.dims.set_current_step(1, 9)  # shown at any polarization position
        np.testing.assert_allclose(_displayed(intensity), ref.intensity[t], rtol=1e-4, atol=1e-4)
        assert _displayed(orientation).shape[:2] == ref.intensity.shape[-2:]
    assert 2 <= counter.calls <= 4  # the frames shown (napari may look at a neighbour), not all six
    assert not rec.lazy.is_filled((shown + 2) % N_FRAMES)
    assert rec.recover_all_button.isEnabled() and rec.save_button.isEnabled()
    # the lazy image is never offered as an observation
    assert rec.observation_picker.currentText() == obs.name
    assert all(stack.name != rec.observation_picker.itemText(i) for i in range(rec.observation_picker.count()))


def test_recover_all_fills_every_frame_cancel_keeps_what_is_done(make_napari_viewer, qtbot, files, series_sim,
                                                                  reference_cache):
    viewer, rec, obs = _lazy_setup(make_napari_viewer, qtbot, files)
    ref = reference(series_sim, files["first"], reference_cache)
    # Cancel: frames made slow so that the click lands mid-run
    slow = CountingRecoveries(rec.lazy.engine, delay=0.4)
    _click(rec.recover_all_button)
    assert rec.is_running() and rec.recover_all_button.text() == "Cancel" and not rec.save_button.isEnabled()
    assert not rec.run_button.isEnabled()
    assert slow.first_started.wait(20)
    _click(rec.recover_all_button)
    _wait(qtbot, rec)
    filled = [rec.lazy.is_filled(t) for t in range(N_FRAMES)]
    assert rec.progress.text() == f"Recover all cancelled: {sum(filled)} of {N_FRAMES} frames are in the cache."
    assert 2 <= sum(filled) < N_FRAMES  # the frame shown and those finished before Cancel stay cached
    assert rec.recover_all_button.text() == "Recover all"
    # Recover all again: only the missing frames, with frames/s
    slow.delay = 0.0
    before = slow.calls
    _click(rec.recover_all_button)
    _wait(qtbot, rec)
    assert rec.progress.text().startswith(f"Recovered all: {N_FRAMES} frames"), rec.progress.text()
    assert "frames/s" in rec.progress.text() and rec.progress.fraction() == 1
    assert slow.calls - before == N_FRAMES - sum(filled)
    # scrubbing afterwards recovers nothing and shows the right frames
    intensity = viewer.layers[f"{obs.name} SPoD-Net intensity"]
    intensity.visible = True
    done = slow.calls
    for t in range(N_FRAMES):
        viewer.dims.set_current_step(0, t)
        np.testing.assert_allclose(_displayed(intensity), ref.intensity[t], rtol=1e-4, atol=1e-4)
    assert slow.calls == done


def test_save_to_streams_the_series_and_refuses_the_input(make_napari_viewer, qtbot, files, series_sim,
                                                          reference_cache, tmp_path, monkeypatch):
    import zarr

    from napari_spodnet.widgets import recover_widget

    viewer, rec, obs = _lazy_setup(make_napari_viewer, qtbot, files)
    ref = reference(series_sim, files["first"], reference_cache)
    chosen = {"path": str(files["observation"])}
    monkeypatch.setattr(recover_widget.QFileDialog, "getSaveFileName",
                        staticmethod(lambda *args, **kwargs: (chosen["path"], "")))
    before = files["observation"].read_bytes()
    _click(rec.save_button)
    assert not rec.is_running()
    assert rec.progress.text().startswith("Not started:") and "is the input file" in rec.progress.text()
    assert files["observation"].read_bytes() == before
    # a save cancelled mid-run leaves a partial output; saving again resumes it
    out = tmp_path / "saved.zarr"
    chosen["path"] = str(out)
    from napari_spodnet.core.recover import FrameRecoverer

    started = threading.Event()
    original = FrameRecoverer.recover_frames

    def slow_frames(self, frames, *args, **kwargs):  # slow frames, so that Cancel lands mid-run
        started.set()
        threading.Event().wait(0.4)
        return original(self, frames, *args, **kwargs)

    monkeypatch.setattr(FrameRecoverer, "recover_frames", slow_frames)
    _click(rec.save_button)
    assert rec.is_running() and rec.save_button.text() == "Cancel"
    # Cancel once a frame is written (a cancel inside a frame stops before writing it)
    qtbot.waitUntil(lambda: rec.progress.text().startswith(("Saving: 1/", "Saving: 2/")), timeout=TIMEOUT_MS)
    assert "frames/s" in rec.progress.text()
    _click(rec.save_button)
    _wait(qtbot, rec)
    assert rec.progress.text().startswith("Save cancelled"), rec.progress.text()
    assert not out.exists() and (tmp_path / "saved.partial.zarr").is_dir()
    monkeypatch.setattr(FrameRecoverer, "recover_frames", original)
    _click(rec.save_button)
    _wait(qtbot, rec)
    text = rec.progress.text()
    assert text.startswith(f"Saved {N_FRAMES} frames to saved.zarr") and "from an earlier run" in text, text
    store = zarr.open_group(str(out), mode="r")
    np.testing.assert_allclose(np.asarray(store["intensity"]["0"]), ref.intensity, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(store["orientation"]["0"]), ref.orientation, atol=1e-3)


def test_another_model_rebuilds_the_lazy_layers(make_napari_viewer, qtbot, files, series_sim, reference_cache):
    viewer, rec, obs = _lazy_setup(make_napari_viewer, qtbot, files)
    first = reference(series_sim, files["first"], reference_cache)
    other = reference(series_sim, files["other"], reference_cache)
    assert not np.allclose(first.intensity[2], other.intensity[2], rtol=1e-3)
    intensity = viewer.layers[f"{obs.name} SPoD-Net intensity"]
    intensity.visible = True
    viewer.dims.set_current_step(0, 2)
    np.testing.assert_allclose(_displayed(intensity), first.intensity[2], rtol=1e-4, atol=1e-4)
    old_token = rec.lazy.token
    rec.model_picker.set_checkpoint(files["other"])  # the model changes: the layers are rebuilt
    qtbot.waitUntil(lambda: rec.lazy.token != old_token and not rec.is_running(), timeout=TIMEOUT_MS)
    intensity = viewer.layers[f"{obs.name} SPoD-Net intensity"]
    intensity.refresh()
    np.testing.assert_allclose(_displayed(intensity), other.intensity[2], rtol=1e-4, atol=1e-4)
    assert intensity.metadata["spodnet"]["token"] == rec.lazy.token
    assert not any(key[0] == old_token for key in rec.lazy.map_cache._frames)  # the old frames are gone
    # unticking lazy recovers eagerly into the same layers; Recover all / Save are then off
    rec.lazy_check.click()
    assert not rec.lazy_check.isChecked()
    _click(rec.run_button)
    _wait(qtbot, rec)
    assert isinstance(viewer.layers[f"{obs.name} SPoD-Net intensity"].data, np.ndarray)
    assert not rec.recover_all_button.isEnabled() and not rec.save_button.isEnabled()


def test_rendered_lazy_frames_are_drawn(make_napari_viewer, qtbot, files):
    """A shown window under Xvfb: the lazy intensity is drawn where it lies, and changes with t."""
    viewer, rec, obs = _lazy_setup(make_napari_viewer, qtbot, files, show=True)
    name = f"{obs.name} SPoD-Net intensity"
    for layer in viewer.layers:
        layer.visible = layer.name == name
    layer = viewer.layers[name]
    viewer.reset_view()
    shots = []
    for t in (0, 4):
        viewer.dims.set_current_step(0, t)
        viewer.dims.set_current_step(1, 9)
        shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        lit = int((shot.max(axis=-1) > 20).sum())
        extent = np.diff(layer.extent.world[:, -2:], axis=0).ravel()
        area = float(np.prod(extent * (viewer.scene if hasattr(viewer, "scene") else viewer).camera.zoom))
        lo, hi = layer.contrast_limits
        expected = float((np.asarray(layer.data[t, 0]) > lo + 20 / 255 * (hi - lo)).mean())
        assert expected > 0.005
        assert lit > 0.5 * expected * area, f"t={t}: {lit} px lit, {expected * area:.0f} expected"
        shots.append(shot)
    assert np.abs(shots[0] - shots[1]).mean() > 0.5  # another frame is drawn at t=4
