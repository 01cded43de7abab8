"""Render the screenshots of the user guide (docs/images/*.png) in a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/render_screenshots.py [--out docs/images]

A *shown* napari window is needed: canvas screenshots of a hidden viewer come out black.
The script opens the sample data with ``run_demo_in_viewer`` (the four dock widgets,
layers selected, a SPoD-Net recovery with the shipped model, or FISTA without it), then
drives each widget to a meaningful state and grabs the whole window. The widgets are docked
as the Plugins menu docks them (``viewer.window.add_plugin_dock_widget``):

* ``overview.png``: the observation and the SPoD-Net orientation composite side by side,
  Recover widget in front;
* ``recover_widget.png``: the Recover widget after the recovery, zoomed-in composite;
* ``data_widget.png``: the SPoD data widget with its checks, after the paper's
  preprocessing (median 5, minimum 7) into a new layer, which the canvas shows;
* ``train_widget.png``: the Train widget after a tiny real training run (loss curves);
* ``fista_widget.png``: the FISTA comparison after 200 iterations, grid view of
  observation mean | FISTA | SPoD-Net | difference.

Every PNG is checked not to be blank and kept under ``--max-kb`` (downscaled / palette
quantised if needed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _limit_threads() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


def process(seconds: float = 0.0) -> None:
    """Run the Qt event loop for ``seconds`` (at least once)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while True:
        QApplication.processEvents()
        if time.perf_counter() >= end:
            break
        time.sleep(0.01)


def wait_until(condition, timeout: float, what: str) -> None:
    """Process events until ``condition()`` is true; fail loudly after ``timeout`` seconds."""
    start = time.perf_counter()
    while not condition():
        process(0.05)
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
    print(f"  {what}: {time.perf_counter() - start:.1f} s", flush=True)


def close_notifications(viewer) -> None:
    """Dismiss napari's notification toasts so that they do not cover the canvas."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # pragma: no cover - napari internals moved
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        try:
            toast.close()
            toast.deleteLater()
        except RuntimeError:
            pass
    process(0.2)


def raise_dock(viewer, widget) -> None:
    parent = widget.parentWidget()
    while parent is not None and parent.__class__.__name__ != "QtViewerDockWidget":
        parent = parent.parentWidget()
    if parent is None:
        raise RuntimeError("dock widget not found")
    parent.show()
    parent.raise_()
    process(0.3)


def show_only(viewer, layers) -> None:
    """Show these layers only (compared by unique_id: the widgets hand out napari's proxies)."""
    keep = {layer.unique_id for layer in layers}
    for layer in viewer.layers:
        layer.visible = layer.unique_id in keep


def zoom_by(viewer, factor: float) -> None:
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.zoom = camera.zoom * factor


def save_png(image: np.ndarray, path: Path, max_kb: int) -> None:
    """Save an (h, w, 3|4) uint8 screenshot as PNG, at most ``max_kb`` kB."""
    from PIL import Image

    rgb = np.asarray(image)[..., :3]
    if rgb.std() < 3 or rgb.max() < 30:
        raise RuntimeError(f"{path.name}: the screenshot looks blank (std {rgb.std():.1f}, max {rgb.max()})")
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    width = img.width
    while True:
        candidate = img if img.width == width else img.resize((width, round(img.height * width / img.width)),
                                                              Image.LANCZOS)
        # 256-colour palette: lossless-looking for the GUI, small for the noisy image panels
        quantised = candidate.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        quantised.save(path, optimize=True)
        size_kb = path.stat().st_size / 1024
        if size_kb <= max_kb or width < 600:
            break
        width = int(width * 0.9)
    print(f"  wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
          f"({candidate.width} x {candidate.height}, {size_kb:.0f} kB)", flush=True)


def grab(viewer, path: Path, max_kb: int) -> None:
    close_notifications(viewer)
    process(0.5)
    image = viewer.screenshot(canvas_only=False, flash=False)
    save_png(image, path, max_kb)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--max-kb", type=int, default=400)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--require-model", action="store_true",
                        help="fail when the shipped default model is missing (else FISTA stands in)")
    args = parser.parse_args(argv)
    _limit_threads()
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("no display: run under xvfb-run (see the docstring)", file=sys.stderr)
        return 2

    import napari

    from napari_spodnet.core.recover import DEFAULT_MODEL_PATH
    from napari_spodnet.widgets import run_demo_in_viewer
    from napari_spodnet.widgets._shared import get_settings, grid_model, text_overlay

    has_model = DEFAULT_MODEL_PATH.is_file()
    if args.require_model and not has_model:
        print(f"missing {DEFAULT_MODEL_PATH}", file=sys.stderr)
        return 2
    if not has_model:
        print("WARNING: no shipped default model; the Recover screenshots will lack a SPoD-Net result")
    args.out.mkdir(parents=True, exist_ok=True)

    viewer = napari.Viewer(title="napari-spodnet", show=True)
    qt_window = viewer.window._qt_window
    qt_window.showNormal()
    qt_window.move(0, 0)
    qt_window.resize(args.width, args.height)
    process(1.0)

    # ---- sample data, the four widgets, and the demo recovery (shipped model)
    print("demo: sample data, widgets, recovery", flush=True)
    widgets = run_demo_in_viewer(viewer)
    settings = get_settings()
    recover_w, data_w, train_w, fista_w = (widgets[k] for k in ("recover", "data", "train", "fista"))
    wait_until(lambda: not recover_w.is_running() and not fista_w.is_running(), 300, "demo recovery")
    process(1.0)
    observation = viewer.layers["SPoD sample"]
    orientation = recover_w.result_layers.get("orientation") if has_model else None

    # ---- overview: observation | SPoD-Net orientation composite, Recover widget in front
    if orientation is not None:
        print("overview", flush=True)
        show_only(viewer, [observation, orientation])
        viewer.dims.set_point(0, 9)  # polarization image 9 of 18
        grid_model(viewer).enabled = True
        viewer.reset_view()
        zoom_by(viewer, 1.05)
        viewer.layers.selection.active = orientation
        raise_dock(viewer, recover_w)
        grab(viewer, args.out / "overview.png", args.max_kb)
        grid_model(viewer).enabled = False

    # ---- Recover widget: the recovered orientation composite, zoomed in
    if orientation is not None:
        print("recover widget", flush=True)
        show_only(viewer, [orientation])
        viewer.reset_view()
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        camera.center = (0.0, 120.0, 140.0)[-len(camera.center):]
        zoom_by(viewer, 1.6)
        viewer.layers.selection.active = orientation
        raise_dock(viewer, recover_w)
        grab(viewer, args.out / "recover_widget.png", args.max_kb)

    # ---- SPoD data widget: checks, then the paper's preprocessing into a new layer
    print("data widget", flush=True)
    data_w.observation_picker.set_layer(observation)
    data_w.psf_list.set_selected([viewer.layers["SPoD sample PSF"]])
    raise_dock(viewer, data_w)
    if data_w.start_preprocess() is None:
        raise RuntimeError("preprocessing did not start")
    wait_until(lambda: not data_w.is_running(), 120, "preprocessing")
    preprocessed = data_w.observation_picker.layer()
    if preprocessed is None or preprocessed.unique_id == observation.unique_id:
        raise RuntimeError(f"preprocessing failed: {data_w.preprocess_progress.text()}")
    show_only(viewer, [preprocessed])
    viewer.dims.set_point(0, 0)
    viewer.reset_view()
    viewer.layers.selection.active = preprocessed
    raise_dock(viewer, data_w)
    grab(viewer, args.out / "data_widget.png", args.max_kb)
    # back to the raw observation for the other widgets (shared layer choice)
    viewer.layers.remove(preprocessed)
    settings.observation_layer = observation.name
    for w in (data_w, recover_w, fista_w):
        w.observation_picker.set_layer(observation)
    process(0.3)

    # ---- Train widget: a tiny real training run (2 layers, 3 epochs, 48-pixel crops, 3 dense-structure epochs)
    print("train widget", flush=True)
    settings.n_layers = 2
    settings.epochs = 3
    settings.dense_stage_epochs = 3
    settings.n_crops = 8
    settings.batch_size = 4
    settings.crop_size = 48
    settings.device = "cpu"
    train_w.layers_list.set_selected([observation])
    raise_dock(viewer, train_w)
    job = train_w.start()
    if job is None:
        raise RuntimeError("training did not start")
    wait_until(lambda: not train_w.is_running(), 240, "training")
    if train_w.model is None:
        raise RuntimeError(f"training failed: {train_w.progress.text()}")
    show_only(viewer, [observation])
    viewer.reset_view()
    viewer.layers.selection.active = observation
    raise_dock(viewer, train_w)
    process(1.0)
    grab(viewer, args.out / "train_widget.png", args.max_kb)

    # ---- FISTA comparison: 200 iterations, then SPoD-Net (shipped model) side by side
    print("FISTA widget", flush=True)
    settings.fista_iterations = 200
    settings.fista_tol = 1e-6
    settings.compare_spodnet = has_model
    if has_model:
        fista_w.model_picker.set_source("default")
    fista_w.observation_picker.set_layer(observation)
    show_only(viewer, [observation])
    raise_dock(viewer, fista_w)
    job = fista_w.start()
    if job is None:
        raise RuntimeError("FISTA did not start")
    wait_until(lambda: not fista_w.is_running(), 300, "FISTA comparison")
    if not fista_w.comparison_layers:
        raise RuntimeError(f"FISTA comparison failed: {fista_w.progress.text()}")
    viewer.reset_view()
    raise_dock(viewer, fista_w)
    process(1.0)
    grab(viewer, args.out / "fista_widget.png", args.max_kb)
    try:
        text_overlay(viewer).visible = False
    except Exception:
        pass

    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
