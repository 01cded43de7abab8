"""Walk the napari plugin the way a new user does and measure how responsive the GUI stays.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/gui_walkthrough.py [--quick] [--size 256] [--profile out.prof]

In a *shown* napari window: write a SPoD observation, a time series and their PSF to TIFF,
open them with ``viewer.open(path, plugin="napari-spodnet")``, dock the four widgets from the
Plugins menu's path (``viewer.window.add_plugin_dock_widget``, proxy viewer), then click
through: preprocessing, a short training run, recovery of the time series, and the FISTA
comparison. A 50 ms QTimer runs throughout; every gap between its ticks above 50 ms is
time the event loop could not answer the user. The script prints, per step, the job's
wall time, the number of ticks, the longest gap, the number of gaps above 100 ms and the
plugin's slowest GUI-thread callbacks (job handlers, result-layout steps; to name a gap), then
FISTA's time per iteration inside the GUI (worker thread, live curve on) against the same
FISTA run headless in this process (no event loop) on the same frame, and the machine's
load average (the numbers are noisy on a shared machine).

``walk(viewer, quick=True)`` is the same walk on small data (the tests run it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PLUGIN = "napari-spodnet"


@dataclass
class StepReport:
    step: str
    seconds: float
    ticks: int
    max_gap_ms: float
    gaps_over_100ms: int
    note: str = ""
    #: the plugin's slowest GUI-thread callbacks during the step: (name, ms), slowest first
    slowest: list = field(default_factory=list)


class CallbackTimer:
    """Times the plugin's GUI-thread callbacks (job progress / result handlers and the steps of
    :class:`~napari_spodnet.widgets._jobs.StepChain`), so that a long gap can be named."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []
        self._undo = []

    def __enter__(self):
        from napari_spodnet.widgets import _jobs

        def timed(owner, attr, label):
            original = getattr(owner, attr)

            def wrapper(obj, *args):
                fn = args[0] if args and callable(args[0]) else None
                name = label(obj, fn)
                t0 = time.perf_counter()
                try:
                    return original(obj, *args)
                finally:
                    self.calls.append((name, (time.perf_counter() - t0) * 1000))

            setattr(owner, attr, wrapper)
            self._undo.append((owner, attr, original))

        timed(_jobs.Job, "_safe", lambda job, fn: f"{job.title}: {getattr(fn, '__name__', '?')}")
        if hasattr(_jobs, "StepChain"):  # absent in versions before it (for before/after runs)
            timed(_jobs.StepChain, "_run_one",
                  lambda chain, _fn: f"{chain.title} step {_step_name(chain)}")
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)

    def slowest(self, n: int = 3) -> list:
        return sorted(self.calls, key=lambda c: -c[1])[:n]


def _step_name(chain) -> str:
    if not chain._steps:
        return "done"
    step = chain._steps[0]
    return getattr(step, "step_name", None) or getattr(step, "__name__", "?")


@dataclass
class WalkReport:
    steps: list = field(default_factory=list)
    fista_gui_ms_per_iteration: float = float("nan")
    fista_headless_ms_per_iteration: float = float("nan")
    fista_iterations: int = 0
    size: int = 0

    def table(self) -> str:
        lines = ["| step | wall time (s) | 50 ms ticks | longest gap (ms) | gaps > 100 ms "
                 "| slowest plugin GUI callbacks (ms) | note |",
                 "|---|---:|---:|---:|---:|---|---|"]
        for s in self.steps:
            slow = ", ".join(f"{name} {ms:.0f}" for name, ms in s.slowest)
            lines.append(f"| {s.step} | {s.seconds:.2f} | {s.ticks} | {s.max_gap_ms:.0f} | {s.gaps_over_100ms} "
                         f"| {slow} | {s.note} |")
        ratio = self.fista_gui_ms_per_iteration / self.fista_headless_ms_per_iteration
        lines += ["", f"FISTA at {self.size} x {self.size}, {self.fista_iterations} iterations, median time per "
                      "iteration:", "",
                  "| where | ms / iteration |", "|---|---:|",
                  f"| GUI (worker thread, live curve) | {self.fista_gui_ms_per_iteration:.1f} |",
                  f"| headless (same process, no event loop) | {self.fista_headless_ms_per_iteration:.1f} |",
                  f"| ratio GUI / headless | {ratio:.2f} |"]
        return "\n".join(lines)


class GapMonitor:
    """A 50 ms QTimer; the gaps between its ticks are how long the event loop was busy."""

    def __init__(self, interval_ms: int = 50):
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def start(self) -> None:
        self.ticks = [time.perf_counter()]
        self.timer.start()

    def stop(self) -> tuple[int, float, int]:
        self.timer.stop()
        self.ticks.append(time.perf_counter())
        gaps = np.diff(self.ticks) * 1000 if len(self.ticks) > 1 else np.zeros(1)
        return len(self.ticks) - 2, float(gaps.max()), int((gaps > 100).sum())


def process(seconds: float = 0.0) -> None:
    """Run the event loop for ``seconds``, as napari's running loop would.

    ``processEvents`` alone never handles deferred deletes (``deleteLater``), which a running
    ``exec()`` loop does: napari's "Opening Files" progress bar from ``viewer.open`` would
    then never be destroyed, and the activity spinner it starts in the status bar keeps
    animating, repainting the whole window ~18 times a second (each repaint composites
    napari's OpenGL canvas, ~50 ms with software GL), which the user never sees.
    """
    from qtpy.QtCore import QCoreApplication, QEvent
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + seconds
    while True:
        QApplication.processEvents()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
        if time.perf_counter() >= end:
            break
        time.sleep(0.005)


def _run_step(report: WalkReport, name: str, start, is_running, timeout: float = 600.0, note=None) -> None:
    """Start a job with ``start()`` (a real button click), wait for it with the monitor on."""
    monitor = GapMonitor()
    monitor.start()
    t0 = time.perf_counter()
    with CallbackTimer() as callbacks:
        start()
        while is_running():
            process(0.02)
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{name} did not finish in {timeout:.0f} s")
        seconds = time.perf_counter() - t0
        process(0.2)
    ticks, max_gap, over = monitor.stop()
    report.steps.append(StepReport(name, seconds, ticks, max_gap, over, note() if note else "",
                                   callbacks.slowest()))
    print(f"  {name}: {seconds:.2f} s, longest gap {max_gap:.0f} ms, {over} gaps > 100 ms; slowest plugin "
          f"callbacks: {callbacks.slowest()}", flush=True)


def _click(button) -> None:
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    QTest.mouseClick(button, Qt.MouseButton.LeftButton)


def _write_files(folder: Path, size: int, n_frames: int):
    import tifffile

    from napari_spodnet.core.simulate import simulate, simulate_time_series

    single = simulate((size, size), seed=0)
    series = simulate_time_series(n_frames=n_frames, shape=(size // 2, size // 2), seed=1)
    paths = {"observation": folder / "observation.tif", "series": folder / "series.tif", "psf": folder / "psf.tif"}
    tifffile.imwrite(paths["observation"], single.observation.astype(np.float32), imagej=True,
                     resolution=(10.0, 10.0), metadata={"axes": "CYX", "unit": "um"})
    tifffile.imwrite(paths["series"], series.observation.astype(np.float32), imagej=True,
                     resolution=(10.0, 10.0), metadata={"axes": "TCYX", "unit": "um"})
    tifffile.imwrite(paths["psf"], single.psf.astype(np.float32))
    return paths, single


def headless_fista_ms(frame, psf, lam: float, iterations: int) -> float:
    """Median ms per FISTA iteration through core.recover, in this thread, no GUI work in between."""
    from napari_spodnet.core.recover import recover

    stamps = []
    recover(frame, psf, method="fista", lam=lam, iterations=iterations, tol=0.0,
            progress=lambda u: stamps.append(time.perf_counter()) if u.iteration is not None else None)
    return float(np.median(np.diff(stamps)) * 1000)


def walk(viewer, quick: bool = False, size: int = 256, fista_iterations: int = 200,
         folder: Path | None = None) -> WalkReport:
    """The whole walk in ``viewer`` (a shown napari.Viewer); returns the measurements."""
    from napari_spodnet.core.recover import DEFAULT_MODEL_PATH
    from napari_spodnet.widgets._shared import get_settings

    if quick:
        size, fista_iterations = 64, 30
    folder = Path(folder or tempfile.mkdtemp(prefix="spodnet-walk-"))
    paths, single = _write_files(folder, size, n_frames=2 if quick else 8)
    report = WalkReport(size=size, fista_iterations=fista_iterations)
    settings = get_settings()
    settings.device = "cpu"

    # the Plugins menu's path: each widget gets napari's proxy of the viewer
    widgets = {}
    for key, name in (("data", "SPoD data and PSF"), ("train", "Train SPoD-Net"), ("recover", "Recover (SPoD-Net)"),
                      ("fista", "FISTA comparison")):
        widgets[key] = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=True)[1]
    process(0.3)
    # files through napari's reader machinery (as drag and drop does after choosing SPoD-Net)
    observation = viewer.open(str(paths["observation"]), plugin=PLUGIN)[0]
    series = viewer.open(str(paths["series"]), plugin=PLUGIN)[0]
    psf = viewer.open(str(paths["psf"]), plugin=PLUGIN)[0]
    process(0.3)
    data, train, recover_w, fista = (widgets[k] for k in ("data", "train", "recover", "fista"))
    data.observation_picker.set_layer(observation)
    data.psf_picker.set_layer(psf)

    _run_step(report, "preprocess (data widget)", lambda: _click(data.preprocess_button), data.is_running)
    data.observation_picker.set_layer(observation)

    settings.n_layers, settings.epochs, settings.n_crops, settings.batch_size = (2, 1, 4, 2) if quick else (3, 2, 8, 4)
    settings.crop_size = 48
    train.layers_list.set_selected([observation])
    _run_step(report, "train (tiny schedule)", lambda: _click(train.start_button), train.is_running,
              note=lambda: train.progress.text()[:60])

    recover_w.observation_picker.set_layer(series)
    if DEFAULT_MODEL_PATH.is_file():
        recover_w.model_picker.set_source("default")
    settings.all_frames = True
    _run_step(report, f"recover time series ({series.data.shape[0]} frames)", lambda: _click(recover_w.run_button),
              recover_w.is_running, note=lambda: recover_w.progress.text()[:60])

    fista.observation_picker.set_layer(observation)
    fista.psf_picker.set_layer(psf)
    settings.fista_iterations, settings.fista_tol = fista_iterations, 0.0
    settings.compare_spodnet = DEFAULT_MODEL_PATH.is_file()
    if settings.compare_spodnet:
        fista.model_picker.set_source("default")
    _run_step(report, f"FISTA comparison ({fista_iterations} it., {size}²)", lambda: _click(fista.run_button),
              fista.is_running, note=lambda: (fista.result_label.text().splitlines() or [""])[-1][:80])
    result = fista.results.get("fista")
    if result is not None:
        report.fista_gui_ms_per_iteration = float(np.median(np.diff(result.info["fista_times"])) * 1000)
    report.fista_headless_ms_per_iteration = headless_fista_ms(single.observation, single.psf, settings.lam,
                                                               fista_iterations)
    _click(fista.leave_grid_button)
    process(0.2)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data (64², 30 FISTA iterations)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the tests' setting)")
    parser.add_argument("--profile", metavar="PATH", help="cProfile the GUI thread during the walk, save the stats "
                                                          "to PATH and print the 25 slowest calls by cumulative time")
    args = parser.parse_args(argv)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("no display: run under xvfb-run (see the docstring)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    import napari

    viewer = napari.Viewer(title="napari-spodnet walk-through", show=True)
    viewer.window._qt_window.resize(1600, 1000)
    process(1.0)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()  # the GUI thread only: workers run in other threads
        profiler.enable()
    report = walk(viewer, quick=args.quick, size=args.size, fista_iterations=args.iterations)
    if profiler is not None:
        import pstats

        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    load = os.getloadavg()
    print()
    print(report.table())
    print(f"\nload average (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"torch threads {torch.get_num_threads()}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
