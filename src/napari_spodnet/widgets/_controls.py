"""Small Qt controls shared by the dock widgets: spin boxes, a progress row and a vertical scroll area."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QSize, Qt, QTimer
from qtpy.QtWidgets import (QDoubleSpinBox, QFrame, QLabel, QProgressBar, QScrollArea, QSpinBox, QStyle,
                            QVBoxLayout, QWidget)


class VerticalScrollArea(QScrollArea):
    """Scrolls ``widget`` vertically and never horizontally, and asks for the width the widget needs (napari
    sizes a dock from its widget's minimum size). Without it, a dock shorter than its controls squeezes
    their word-wrapped labels to a line or two, drawn over each other."""

    def __init__(self, widget: QWidget):
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(widget)
        widget.installEventFilter(self)
        self._following = False
        self.verticalScrollBar().rangeChanged.connect(self._follow_end)

    def scroll_to_end(self) -> None:
        """Scroll to the bottom (a result line below the fold of a short dock). The result's text takes its
        height over a few layout passes, each of which can extend the scroll range: follow them briefly."""
        self._following = True
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())
        QTimer.singleShot(300, self._stop_following)

    def _stop_following(self) -> None:
        self._following = False

    def _follow_end(self, _minimum: int, maximum: int) -> None:
        if self._following:
            self.verticalScrollBar().setValue(maximum)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt)
        inner = self.widget().minimumSizeHint()
        bar = max(self.verticalScrollBar().sizeHint().width(),
                  self.style().pixelMetric(QStyle.PixelMetric.PM_ScrollBarExtent))
        return QSize(inner.width() + bar + 4, super().minimumSizeHint().height())  # + the styles' few pixels

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt)
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()  # the controls' minimum width may have changed (a longer item, a label)
        return super().eventFilter(watched, event)


def make_spin(minimum: float, maximum: float, value: float, *, decimals: int | None = None, step: float | None = None,
              tooltip: str = "", suffix: str = "") -> QSpinBox | QDoubleSpinBox:
    if decimals is None:
        spin = QSpinBox()
        spin.setRange(int(minimum), int(maximum))
        spin.setValue(int(value))
        if step:
            spin.setSingleStep(int(step))
    else:
        spin = QDoubleSpinBox()
        spin.setDecimals(decimals)
        spin.setRange(minimum, maximum)
        spin.setValue(value)
        if step:
            spin.setSingleStep(step)
    if suffix:
        spin.setSuffix(suffix)
    if tooltip:
        spin.setToolTip(tooltip)
    spin.setKeyboardTracking(False)
    return spin


class ProgressRow(QWidget):
    """A progress bar with a status line and a time readout."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setValue(0)
        self.bar.setTextVisible(True)
        self.label = QLabel("")
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # a fixed height: a status text that changes 10 times a second must not re-lay-out the
        # main window (each relayout resizes and redraws napari's canvas, which cost FISTA ~5x
        # its headless speed in the GUI)
        self._base_height = 3 * self.label.fontMetrics().lineSpacing() + 4
        # never shown (not in the layout): styled like the status line, it measures the height a text needs
        self._three_lines: int | None = None
        self._measure = QLabel(self)
        self._measure.setWordWrap(True)
        self._measure.setTextInteractionFlags(self.label.textInteractionFlags())  # (selectable text lays out apart)
        self.label.setFixedHeight(self._base_height)
        self.label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self._measure.setAlignment(self.label.alignment())
        self._measure.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.bar)
        layout.addWidget(self.label)

    def set_fraction(self, fraction: float) -> None:
        value = int(round(1000 * min(max(fraction, 0.0), 1.0)))
        if self.bar.maximum() == 1000 and self.bar.value() == value:
            return
        # QProgressBar.setValue repaints synchronously (QWidget::repaint), and each synchronous
        # repaint recomposites the whole window with napari's OpenGL canvas (~50 ms with software
        # GL); with updates held, the bar is painted in the next paint pass with the status line
        self.bar.setUpdatesEnabled(False)
        try:
            self.bar.setRange(0, 1000)
            self.bar.setValue(value)
        finally:
            self.bar.setUpdatesEnabled(True)
        self.bar.update()

    def set_busy(self) -> None:
        self.bar.setRange(0, 0)

    def set_text(self, text: str) -> None:
        self.label.setText(text)
        if self.label.isVisible():
            # three lines, unless a (final, rare) text needs more: "Done …: new layer '<a long name>'" was cut;
            # the height changes only when the need does, so progress at 10 Hz still lays nothing out
            # (measured on an unconstrained twin: the label's own heightForWidth never answers below its fixed
            # height, and changing its constraints to ask would lay the window out)
            width = max(self.label.width(), 1)
            self._measure.ensurePolished()  # napari's stylesheet: the font and padding of the status line
            if self._three_lines is None:  # what three lines take as laid out (known once styled and shown)
                self._measure.setText("M\nM\nM")
                self._three_lines = max(self._base_height, self._measure.heightForWidth(width))
            self._measure.setText(text)
            needed = max(self._three_lines, self._measure.heightForWidth(width))
            if needed != self.label.maximumHeight():
                self.label.setFixedHeight(needed)

    def text(self) -> str:
        return self.label.text()

    def fraction(self) -> float:
        """The bar's value in [0, 1] (0 while busy)."""
        maximum = self.bar.maximum()
        return self.bar.value() / maximum if maximum > 0 else 0.0
