"""The orientation colour legend: which hue of the orientation composite means which dipole angle."""

from __future__ import annotations

import numpy as np

from ..core.recover import orientation_composite


def orientation_wheel(size: int = 96, inner: float = 0.45) -> np.ndarray:
    """(size, size, 4) uint8 RGBA ring coloured as :func:`core.recover.orientation_composite` colours angles.

    A pixel at angle ``theta`` from the centre (counter-clockwise from the x axis as displayed,
    row 0 at the top: method.md's convention) has the colour of dipoles at ``theta mod pi``, so
    opposite sides of the ring share a colour, as a line's two ends do.
    """
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = cols - centre, centre - rows
    radius = np.hypot(dx, dy) / centre
    theta = np.mod(np.arctan2(dy, dx), np.pi).astype(np.float32)
    ring = (radius <= 1.0) & (radius >= inner)
    rgb = orientation_composite(ring.astype(np.float32), theta, saturation_percentile=100)
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = np.round(255 * rgb).astype(np.uint8)
    rgba[..., 3] = np.where(ring, 255, 0)
    return rgba


def wheel_pixmap(size: int = 96):
    """The wheel as a QPixmap for a QLabel."""
    from qtpy.QtGui import QImage, QPixmap

    rgba = np.ascontiguousarray(orientation_wheel(size))
    image = QImage(rgba.data, size, size, 4 * size, QImage.Format.Format_RGBA8888)
    return QPixmap.fromImage(image.copy())
