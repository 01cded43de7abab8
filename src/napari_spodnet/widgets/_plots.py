"""A small live plot of named curves (training loss, FISTA objective) for the dock widgets."""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

#: Redraws per second at most. A matplotlib redraw holds the GIL for ~10-30 ms; more often
#: than this, a live curve measurably slows the solver running in the worker thread.
MAX_REDRAWS_PER_SECOND = 3


class CurvePlot(QWidget):
    """Named curves (x, y) drawn with matplotlib; appending is cheap, drawing is throttled.

    Lines are created once and updated with ``set_data`` (no axes rebuild per redraw);
    a timer redraws at most :data:`MAX_REDRAWS_PER_SECOND` times a second while data arrive.
    """

    def __init__(self, xlabel: str = "", ylabel: str = "", logy: bool = True, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 2.2), dpi=80)
        self.figure.subplots_adjust(left=0.2, right=0.97, bottom=0.2, top=0.95)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.canvas.setMinimumHeight(150)
        self.axes = self.figure.add_subplot(111)
        self.axes.set_xlabel(xlabel, fontsize=8)
        self.axes.set_ylabel(ylabel, fontsize=8)
        self.axes.tick_params(labelsize=7)
        self._logy = logy
        self._series: dict[str, tuple[list, list]] = {}
        self._lines: dict = {}
        self._dirty = False
        self.redraws = 0
        self._timer = QTimer(self)
        self._timer.setInterval(int(1000 / MAX_REDRAWS_PER_SECOND))
        self._timer.timeout.connect(self._redraw)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._redraw(force=True)

    def clear(self) -> None:
        self._series.clear()
        for line in self._lines.values():
            line.remove()
        self._lines.clear()
        legend = self.axes.get_legend()
        if legend is not None:
            legend.remove()
        self._redraw(force=True)

    def append(self, name: str, x: float, y: float) -> None:
        xs, ys = self._series.setdefault(name, ([], []))
        xs.append(float(x))
        ys.append(float(y))
        self._mark_dirty()

    def set_series(self, name: str, xs, ys) -> None:
        self._series[name] = ([float(v) for v in xs], [float(v) for v in ys])
        self._mark_dirty()

    def series(self, name: str) -> tuple[list, list]:
        xs, ys = self._series.get(name, ([], []))
        return list(xs), list(ys)

    def flush(self) -> None:
        self._redraw(force=True)

    def _mark_dirty(self) -> None:
        self._dirty = True
        if not self._timer.isActive():
            self._timer.start()

    def _redraw(self, force: bool = False) -> None:
        if not (self._dirty or force):
            self._timer.stop()
            return
        self._dirty = False
        ax = self.axes
        new_line = False
        for name, (xs, ys) in self._series.items():
            line = self._lines.get(name)
            if line is None:
                (line,) = ax.plot([], [], label=name, linewidth=1.2)
                self._lines[name] = line
                new_line = True
            line.set_data(xs, ys)
            line.set_marker("." if len(xs) < 30 else "")
        if self._lines:
            positive = all(y > 0 for _xs, ys in self._series.values() for y in ys)
            want = "log" if self._logy and positive else "linear"
            if ax.get_yscale() != want:
                ax.set_yscale(want)
            ax.relim()
            ax.autoscale_view()
            if new_line:
                ax.legend(fontsize=7, loc="upper right")
        self.redraws += 1
        self.canvas.draw_idle()
