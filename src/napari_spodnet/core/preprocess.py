"""Intensity normalisation and the paper's optional preprocessing.

Recovery, training, the CLI and the GUI all apply the *same* explicit step (recorded in
checkpoints): ``y_norm = (y - offset) / scale`` with

* ``offset`` = the ``low`` percentile of the observation (default 25 %: SPoD images are
  sparse, so this sits at the camera offset plus background, a little below its mean);
* ``scale`` = the ``high`` percentile (default 99.9 %) minus the offset: bright
  structures come out near 1 whatever the camera gain or exposure.

The recovered image is returned in the data's own units again (multiplied by ``scale``),
so it can be compared across frames and with the raw data. With ``normalize=False`` every
function works on the arrays as given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .validation import SPoDInputError


@dataclass(frozen=True)
class NormalizationSettings:
    """How normalisation is computed (this is what a checkpoint records)."""

    low: float = 25.0
    high: float = 99.9
    enabled: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 100:
                raise SPoDInputError(f"normalization {name} must be a percentile in [0, 100], got {value!r}")
        if not self.low < self.high:
            raise SPoDInputError(f"normalization low ({self.low}) must be below high ({self.high})")
        if not isinstance(self.enabled, bool):
            raise SPoDInputError(f"normalization enabled must be true or false, got {self.enabled!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "NormalizationSettings":
        if not d:
            return cls()
        if not isinstance(d, dict) or not set(d) <= {"low", "high", "enabled"}:
            raise SPoDInputError(f"normalization settings must have keys low, high, enabled; got {d!r}")
        return cls(**d)


@dataclass(frozen=True)
class Normalization:
    """A fitted normalisation: ``(y - offset) / scale``."""

    offset: float = 0.0
    scale: float = 1.0

    def apply(self, y):
        return (y - self.offset) / self.scale

    def restore_image(self, x):
        """Recovered image back into the data's intensity units."""
        return x * self.scale


def fit_normalization(y, settings: NormalizationSettings = NormalizationSettings(),
                      max_samples: int = 2_000_000) -> Normalization:
    """Fit offset and scale on an observation (any shape); a subsample keeps it fast on time series."""
    if not settings.enabled:
        return Normalization()
    flat = np.asarray(y).reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: flat.size // max_samples + 1]
    lo, hi = np.percentile(flat.astype(np.float64), [settings.low, settings.high])
    scale = hi - lo
    if not np.isfinite(scale) or scale <= 1e-12 * max(1.0, abs(hi)):
        raise SPoDInputError("The observation is flat (no contrast between the background and the "
                             "brightest pixels); there is nothing to recover.")
    return Normalization(float(lo), float(scale))


def preprocess(y: np.ndarray, median: int = 5, minimum: int = 7, mode: str = "subtract") -> np.ndarray:
    """The paper's preprocessing, applied per polarization image (last two axes).

    A median filter (size ``median``) removes isolated noisy dots. A minimum filter
    (size ``minimum``) of the result estimates the local background; ``mode="subtract"``
    (default) removes that background from the median-filtered data, ``mode="replace"``
    returns the minimum-filtered image itself (the other reading of the paper). A size of
    0 or 1 skips that filter. Shape and dtype (float32) are kept: (..., H, W) -> (..., H, W).
    """
    if mode not in ("subtract", "replace"):
        raise SPoDInputError(f"mode must be 'subtract' or 'replace', got {mode!r}")
    y = np.asarray(y, dtype=np.float32)
    size_prefix = (1,) * (y.ndim - 2)
    out = ndimage.median_filter(y, size=size_prefix + (median, median)) if median > 1 else y
    if minimum > 1:
        background = ndimage.minimum_filter(out, size=size_prefix + (minimum, minimum))
        out = out - background if mode == "subtract" else background
    return out.astype(np.float32, copy=False)
