"""Background jobs of the dock widgets: napari thread workers with progress, cancel and errors.

:class:`Job` runs one function or generator on a napari worker; progress items are queued
by the worker and handed to the GUI thread at most :data:`PROGRESS_UPDATES_PER_SECOND`
times a second (in batches), so a solver reporting every iteration never floods the
event loop. :class:`JobWidget` is the base of the widgets that run one job at a time.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from qtpy.QtCore import QObject, QSize, QTimer
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.recover import RecoveryCancelled
from ..core.training import TrainingError
from ..core.validation import SPoDInputError
from ._controls import VerticalScrollArea
from ._layers import match_marked_psfs
from ._notify import error_message, notify_error, notify_info
from ._settings import SettingsBinder, get_settings

#: dock widget width (px) at which "FISTA comparison (SPoD-Net)" and the forms fit
MIN_WIDTH = 380
#: How often queued progress reaches the GUI thread (status line, bar, live curve). Every
#: repaint of a dock widget makes Qt recomposite napari's OpenGL canvas with the whole window
#: (~50 ms with software GL, e.g. under Xvfb); the widgets update everything on this tick so
#: that Qt paints it in one pass. Measured with scripts/gui_walkthrough.py (docs/benchmarks.md).
PROGRESS_UPDATES_PER_SECOND = 2


class JobControl:
    """Handed to a job's work function (in the worker thread): report progress, poll for cancel."""

    def __init__(self):
        self._cancel = threading.Event()
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.queue: "queue.SimpleQueue" = queue.SimpleQueue()

    def report(self, item) -> None:
        self.queue.put(item)

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when cancel is requested (immediately if it already was)."""
        with self._lock:
            self._hooks.append(hook)
            already = self._cancel.is_set()
        if already:
            hook()

    def cancel(self) -> None:
        with self._lock:
            self._cancel.set()
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:  # a cancel hook must never break the GUI
                traceback.print_exc()


@dataclass
class _Outcome:
    status: str                 # "ok", "cancelled" or "error"
    value: Any = None
    error: Optional[BaseException] = None


def _failure(exc: Exception) -> _Outcome:
    """An error outcome; unexpected errors keep their traceback on stderr. SPoDInputError and TrainingError
    (a divergence, a stop before anything was trained) are messages for the user, shown by the widget."""
    if not isinstance(exc, (SPoDInputError, TrainingError)):
        traceback.print_exc()
    return _Outcome("error", error=exc)


class Job(QObject):
    """One background job on a napari thread worker.

    ``start_function(func, *args)``: ``func(control, *args)`` runs in a FunctionWorker and
    reports progress with ``control.report(item)`` (queued; a timer on the GUI thread hands
    batches of items to ``on_progress``). ``start_generator(gen_func, *args)``: a
    GeneratorWorker whose yields go to ``on_progress``. Cancel (``cancel()``) sets a flag the
    work polls and runs the hooks it registered (e.g. ``Trainer.cancel``);
    :class:`~napari_spodnet.core.recover.RecoveryCancelled` ends a job quietly. Any other
    exception is caught in the worker and shown as a napari error notification; the
    ``on_result`` callback only ever sees successful results.
    """

    def __init__(self, parent: QObject, *, title: str, on_progress: Callable[[list], None] | None = None,
                 on_result: Callable[[Any], None] | None = None, on_cancelled: Callable[[], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_finished: Callable[[], None] | None = None):
        super().__init__(parent)
        self.title = title
        self.control = JobControl()
        self.worker = None
        self.outcome: _Outcome | None = None
        self.running = False
        self._on_progress = on_progress
        self._on_result = on_result
        self._on_cancelled = on_cancelled
        self._on_error = on_error
        self._on_finished = on_finished
        self._timer = QTimer(self)
        self._timer.setInterval(int(1000 / PROGRESS_UPDATES_PER_SECOND))
        self._timer.timeout.connect(self._drain)
        self.started_at = 0.0

    # ---- starting
    def start_function(self, func: Callable, *args) -> "Job":
        control = self.control

        def run():
            try:
                return _Outcome("ok", func(control, *args))
            except RecoveryCancelled:
                return _Outcome("cancelled")
            except Exception as exc:
                return _failure(exc)

        return self._start(run)

    def start_generator(self, gen_func: Callable, *args) -> "Job":
        control = self.control

        def run():
            try:
                value = yield from gen_func(control, *args)
                return _Outcome("ok", value)
            except RecoveryCancelled:
                return _Outcome("cancelled")
            except Exception as exc:
                return _failure(exc)

        return self._start(run)

    def _start(self, run) -> "Job":
        from napari.qt.threading import create_worker

        worker = create_worker(run, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._finish)
        if hasattr(worker, "yielded"):
            worker.yielded.connect(self._on_yielded)
        self.worker = worker
        self.running = True
        self.started_at = time.perf_counter()
        self._timer.start()
        worker.start()
        return self

    # ---- control
    def cancel(self) -> None:
        self.control.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self.control.cancelled()

    # ---- GUI-thread slots
    def _drain(self) -> None:
        items = []
        while True:
            try:
                items.append(self.control.queue.get_nowait())
            except queue.Empty:
                break
        if items and self._on_progress is not None:
            self._safe(self._on_progress, items)

    def _on_yielded(self, item) -> None:
        if self._on_progress is not None:
            self._safe(self._on_progress, [item])

    def _on_returned(self, outcome) -> None:
        self.outcome = outcome if isinstance(outcome, _Outcome) else _Outcome("ok", outcome)

    def _finish(self) -> None:
        self._timer.stop()
        self._drain()
        self.running = False
        outcome = self.outcome or _Outcome("cancelled")  # aborted from napari's activity dock
        if outcome.status == "ok" and self.control.cancelled() and outcome.value is None:
            outcome = _Outcome("cancelled")
        if outcome.status == "ok":
            if self._on_result is not None:
                self._safe(self._on_result, outcome.value)
        elif outcome.status == "cancelled":
            if self._on_cancelled is not None:
                self._safe(self._on_cancelled)
            else:
                notify_info(f"{self.title} cancelled.")
        else:
            if self._on_error is not None:
                self._safe(self._on_error, outcome.error)
            else:
                notify_error(f"{self.title} failed: {error_message(outcome.error)}")
        if self._on_finished is not None:
            self._safe(self._on_finished)

    def _safe(self, fn, *args) -> None:
        """GUI callbacks never crash napari: a failure becomes an error notification."""
        try:
            fn(*args)
        except RuntimeError as exc:
            if "deleted" in str(exc):  # the widget was closed while the job ran
                return
            traceback.print_exc()
            notify_error(f"{self.title}: {error_message(exc)}")
        except Exception as exc:
            traceback.print_exc()
            notify_error(f"{self.title}: {error_message(exc)}")



class StepChain(QObject):
    """Run GUI-thread steps one per event-loop turn (a chain of zero-delay single-shot timers).

    napari work that must happen on the GUI thread (adding a layer: ~150-400 ms each, mostly
    vispy visual construction and layer controls; switching the grid view on) cannot be made
    cheaper from outside napari, but it can be split: between two steps the event loop
    answers the user and repaints. A failing step is reported (napari error notification)
    and ends the chain; ``on_done`` runs after the last step either way.
    """

    def __init__(self, parent: QObject, title: str, steps, on_done: Callable[[], None] | None = None):
        super().__init__(parent)
        self.title = title
        self._steps = list(steps)
        self._on_done = on_done
        self.running = False
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._next)

    def start(self) -> "StepChain":
        self.running = True
        self._timer.start()
        return self

    def run_all(self) -> None:
        """All steps now, in this turn (for callers that need the result immediately)."""
        self._timer.stop()
        self.running = True
        while self.running:
            self._run_one()

    def _next(self) -> None:
        self._run_one()
        if self.running:
            self._timer.start()

    def _run_one(self) -> None:
        if self._steps:
            step = self._steps.pop(0)
            try:
                step()
            except Exception as exc:  # a GUI step must never break napari
                traceback.print_exc()
                notify_error(f"{self.title}: {error_message(exc)}")
                self._steps.clear()
        if not self._steps:
            self._done()

    def _done(self) -> None:
        self.running = False
        if self._on_done is not None:
            try:
                self._on_done()
            except RuntimeError as exc:  # the widget was closed meanwhile
                if "deleted" not in str(exc):
                    raise


class JobWidget(QWidget):
    """A dock widget that runs one background :class:`Job` at a time: one button starts it
    and, while it runs, cancels it; closing the widget cancels it too."""

    #: Names the job in status lines and notifications ("Recovery failed: ...").
    job_title = "Job"
    #: The label of this widget's tab when napari tabifies docks (None: ``job_title``). napari
    #: titles a dock "<display name> (napari-spodnet)", which Qt elides to "FISTA comp..." when
    #: four docks share one tab bar; the dock's own title bar keeps the full name.
    tab_title: str | None = None

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = get_settings()
        self.binder = SettingsBinder(self.settings)
        self._job: Job | None = None
        # PSF files show at the observation's pixel size, whichever widget is open
        napari_viewer.layers.events.inserted.connect(self._match_psfs)
        self._match_psfs()

    def controls_layout(self) -> QVBoxLayout:
        """The layout a widget puts its controls in. They scroll (``self.scroll``, vertically only): in a dock
        shorter than all of them, Qt would otherwise squeeze the wrapped labels (descriptions, checks, result
        lines) to a line or two drawn over each other, or force the window taller than the screen."""
        content = QWidget()
        layout = QVBoxLayout(content)
        self.scroll = VerticalScrollArea(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        return layout

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt)
        # at least MIN_WIDTH: napari's dock title (widget name and plugin) shows in full; wider where the controls
        # need it (a fixed setMinimumWidth would cap the dock at MIN_WIDTH and cut the controls off at the right)
        hint = super().minimumSizeHint()
        return QSize(max(hint.width(), MIN_WIDTH), hint.height())

    def showEvent(self, event):  # noqa: N802 (Qt)
        super().showEvent(event)
        self._shorten_tab_title()

    def _shorten_tab_title(self) -> None:
        """Give the enclosing dock (napari's QtViewerDockWidget) a short window title: Qt labels
        tabified docks with their window titles; the full name stays as the tab's tooltip."""
        from qtpy.QtWidgets import QDockWidget

        dock = self.parent()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parent()
        short = self.tab_title or self.job_title
        if dock is None or dock.windowTitle() == short:
            return
        dock.setToolTip(dock.windowTitle())
        dock.setWindowTitle(short)

    def _match_psfs(self, event=None) -> None:
        try:
            match_marked_psfs(self.viewer)
        except RuntimeError:  # closing
            pass

    def refuse(self, message: str) -> None:
        """Say why a job was not started, in the status line (replacing the last job's) and a notification."""
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.set_fraction(0)
            progress.set_text(f"Not started: {message}")
        notify_error(f"{self.job_title}: {message}")

    def _on_cancelled(self) -> None:
        self.progress.set_fraction(0)
        self.progress.set_text(f"{self.job_title} cancelled.")

    def _on_error(self, exc) -> None:
        self.progress.set_fraction(0)
        self.progress.set_text(f"{self.job_title} failed: {error_message(exc)}")
        notify_error(f"{self.job_title} failed: {error_message(exc)}")

    def is_running(self) -> bool:
        return self._job is not None and self._job.running

    def toggle(self) -> None:
        if self.is_running():
            self.cancel()
        else:
            self.start()

    def start(self):  # pragma: no cover - each widget defines it
        raise NotImplementedError

    def cancel(self) -> None:
        if self.is_running():
            self._job.cancel()
            self.progress.set_text("Cancelling…")

    def closeEvent(self, event):  # noqa: N802 (Qt)
        if self.is_running():
            self._job.cancel()
        super().closeEvent(event)
