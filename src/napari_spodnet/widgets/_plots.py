"""A small live plot of named curves (training loss, FISTA objective) for the dock widgets.

Cost model (measured with scripts/gui_walkthrough.py under Xvfb, 2 shared cores): a full
matplotlib redraw of this small figure takes 60-270 ms (tick labels and text layout), all
of it on the GUI thread with the GIL held; redrawing only the curves onto a cached
background ("blitting") takes under 1 ms. Every repaint of a dock widget also makes Qt
recomposite the whole window with napari's OpenGL canvas (~50 ms with software GL), so
the plot never repaints on its own timer: it redraws when data arrive (at most
:data:`MAX_REDRAWS_PER_SECOND` times a second), in the same event-loop turn as the
widget's progress bar and status line, and Qt paints all three in one pass.
"""

from __future__ import annotations

import math
import time

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

#: Live redraws per second at most (a trailing redraw shows the last points).
MAX_REDRAWS_PER_SECOND = 2
#: On a log axis, the y range is refitted with this factor of room below and above the data,
#: so that a decreasing objective needs a full redraw only every so often.
LOG_ROOM = 3.0
#: A log axis labels its minor ticks only while its range is at most this ratio (about a decade).
MINOR_LABELS_UP_TO = 15.0
#: On a linear axis: room below and above the data, as a fraction of the data's span.
LINEAR_ROOM = 0.25


class CurvePlot(QWidget):
    """Named curves (x, y) drawn with matplotlib; appending is cheap, drawing is bounded.

    Lines are created once and updated with ``set_data``. While the data stay inside the
    axis limits, only the lines are redrawn (blitted onto the cached axes); a full redraw
    (new limits, ticks, legend) happens when a point falls outside them or a curve is
    added, and on :meth:`flush`, which fits the limits tightly. :meth:`set_x_range` tells
    the plot the x extent to expect (e.g. the number of iterations) so that x never forces
    a full redraw. ``redraws`` counts all redraws, ``full_redraws`` the full ones.
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
        self._styles: dict[str, dict] = {}
        self._x_range: tuple[float, float] | None = None
        self._background = None
        self._dirty = False
        self._last_redraw = -math.inf
        self.redraws = 0
        self.full_redraws = 0
        # the background (axes, ticks, legend; the lines are "animated", i.e. left out) is cached
        # after every full draw, including the ones Qt asks for on resize
        self.canvas.mpl_connect("draw_event", self._on_draw)
        self._trailing = QTimer(self)
        self._trailing.setSingleShot(True)
        self._trailing.timeout.connect(self._redraw)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._redraw(full=True)

    # ------------------------------------------------------------------ data
    def clear(self) -> None:
        self._series.clear()
        self._x_range = None
        for line in self._lines.values():
            line.remove()
        self._lines.clear()
        legend = self.axes.get_legend()
        if legend is not None:
            legend.remove()
        self._redraw(full=True)

    def set_x_range(self, lo: float, hi: float) -> None:
        """The x extent the data will cover (e.g. 0 to the number of iterations)."""
        self._x_range = (float(lo), float(hi)) if hi > lo else None

    def append(self, name: str, x: float, y: float) -> None:
        xs, ys = self._series.setdefault(name, ([], []))
        xs.append(float(x))
        ys.append(float(y))
        self._data_changed()

    def set_style(self, name: str, **style) -> None:
        """Line style of the curve ``name`` (matplotlib keywords: color, linestyle, ...), used when the
        curve is first drawn; call before its first point."""
        self._styles[name] = style

    def set_series(self, name: str, xs, ys) -> None:
        self._series[name] = ([float(v) for v in xs], [float(v) for v in ys])
        self._data_changed()

    def series(self, name: str) -> tuple[list, list]:
        xs, ys = self._series.get(name, ([], []))
        return list(xs), list(ys)

    def flush(self) -> None:
        """Draw everything now, limits fitted to the data (the end of a run)."""
        self._redraw(full=True, tight=True)

    # ------------------------------------------------------------------ drawing
    def _data_changed(self) -> None:
        """Redraw now when the last redraw is old enough (same event-loop turn as the caller's other
        updates), else when no data came for 1.5 intervals."""
        self._dirty = True
        interval = 1.0 / MAX_REDRAWS_PER_SECOND
        wait = self._last_redraw + interval - time.perf_counter()
        # 20 % early is close enough: callers arrive on their own timer of about the same period,
        # and drawing on their turn keeps the plot's paint in the same pass as theirs
        if wait <= 0.2 * interval:
            self._redraw()
        else:
            # restarted by every point: it fires only once data stop coming (the last points of a
            # run), never as a paint of its own between two batches of the caller
            self._trailing.start(int(1500 * interval))

    def _finite_points(self):
        for xs, ys in self._series.values():
            for x, y in zip(xs, ys):
                if math.isfinite(x) and math.isfinite(y):
                    yield x, y

    def _want_log(self) -> bool:
        # an empty plot stays linear: matplotlib's default log range (1 to 10) would label all its minor ticks
        ys = [y for _x, y in self._finite_points()]
        return self._logy and bool(ys) and all(y > 0 for y in ys)

    def _limits(self, tight: bool):
        """(x limits, y limits) around the data, with room unless ``tight``; None where there are no data."""
        points = list(self._finite_points())
        if not points:
            return None
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x_lo, x_hi = min(xs), max(xs)
        if self._x_range is not None and not tight:
            x_lo, x_hi = min(x_lo, self._x_range[0]), max(x_hi, self._x_range[1])
        elif not tight:
            x_hi = x_lo + 1.5 * (x_hi - x_lo)
        if x_hi <= x_lo:
            x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
        y_lo, y_hi = min(ys), max(ys)
        if self._want_log():
            room = 1.15 if tight else LOG_ROOM
            y_lo, y_hi = y_lo / room, y_hi * room
        else:
            span = (y_hi - y_lo) or abs(y_hi) or 1.0
            room = 0.05 if tight else LINEAR_ROOM
            y_lo, y_hi = y_lo - room * span, y_hi + room * span
        return (x_lo, x_hi), (y_lo, y_hi)

    def _inside_limits(self) -> bool:
        (x_lo, x_hi), (y_lo, y_hi) = self.axes.get_xlim(), self.axes.get_ylim()
        return all(x_lo <= x <= x_hi and y_lo <= y <= y_hi for x, y in self._finite_points())

    def _minor_label(self, value: float, _pos) -> str:
        """Minor tick labels of a log axis: two digits within about a decade (the ticks between 2e-04 and
        3e-04 then differ), none over a wider range, where they would crowd the decade labels."""
        lo, hi = self.axes.get_ylim()
        if lo <= 0 or hi / lo > MINOR_LABELS_UP_TO:
            return ""
        return f"{value:.1e}"

    def _on_draw(self, _event) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        for line in self._lines.values():
            self.axes.draw_artist(line)

    def _redraw(self, full: bool = False, tight: bool = False) -> None:
        self._trailing.stop()
        if not (self._dirty or full):
            return
        self._dirty = False
        self._last_redraw = time.perf_counter()
        ax = self.axes
        new_line = False
        for name, (xs, ys) in self._series.items():
            line = self._lines.get(name)
            if line is None:
                (line,) = ax.plot([], [], label=name, **{"linewidth": 1.2, **self._styles.get(name, {})},
                                  animated=True)
                self._lines[name] = line
                new_line = True
            line.set_data(xs, ys)
            line.set_marker("." if len(xs) < 30 else "")
        want = "log" if self._want_log() else "linear"
        full = (full or new_line or self._background is None or ax.get_yscale() != want
                or not self._inside_limits())
        self.redraws += 1
        if not full:
            # only the curves: restore the cached axes and draw the lines onto them; the widget
            # is repainted with the rest of the dock in the next paint pass
            self.canvas.restore_region(self._background)
            for line in self._lines.values():
                ax.draw_artist(line)
            self.canvas.update()
            return
        self.full_redraws += 1
        if ax.get_yscale() != want:
            ax.set_yscale(want)
            if want == "log":
                # plain "1e-03" labels: matplotlib's default 10^x labels go through mathtext, whose
                # first use costs ~0.3 s and every redraw several ms per label
                from matplotlib.ticker import FuncFormatter, LogFormatter

                ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=True))
                ax.yaxis.set_minor_formatter(FuncFormatter(self._minor_label))
        limits = self._limits(tight)
        if limits is not None:
            ax.set_xlim(*limits[0])
            ax.set_ylim(*limits[1])
        if new_line:
            # "best": with a later stage's curves on the right, a fixed corner would hide them
            ax.legend(handles=list(self._lines.values()), fontsize=6, loc="best", framealpha=0.6)
        self.canvas.draw()  # renders now (the draw_event caches the background); Qt paints it later
