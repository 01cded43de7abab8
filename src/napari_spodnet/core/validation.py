"""Input checks shared by the core, the CLI and the napari widgets.

Every public entry point funnels user arrays through these functions so that bad
input fails early with one clear message (:class:`SPoDInputError`) instead of
producing a silently wrong recovery.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_CHANNELS = 18


class SPoDInputError(ValueError):
    """Raised for input the recovery cannot use; the message is meant for the user."""


def _as_float_array(array, what: str) -> np.ndarray:
    """Convert to a float32 numpy array; integers (camera counts) are converted, not rejected."""
    try:
        import torch

        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    arr = np.asarray(array)
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise SPoDInputError(f"{what} must hold real numbers, got dtype {arr.dtype}.")
    if arr.size == 0:
        raise SPoDInputError(f"{what} is empty (shape {arr.shape}).")
    arr = arr.astype(np.float32, copy=False) if arr.dtype != np.float64 else arr
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise SPoDInputError(f"{what} contains {n_bad} NaN or infinite values; clean the data first.")
    return arr


def check_psf(psf, normalize: bool = True) -> np.ndarray:
    """Validate a PSF and return it as an (a, b) float array.

    A PSF must be 2-D, finite, non-negative (tiny negative values from background
    subtraction, below 1e-3 of the peak, are clipped to 0) and have a positive sum.
    With ``normalize`` it is scaled to sum 1, so that intensities keep their units.
    """
    arr = _as_float_array(psf, "The PSF")
    while arr.ndim > 2 and arr.shape[0] == 1:  # a (1, a, b) stack is one PSF; a (1, b) PSF stays 2-D
        arr = arr[0]
    if arr.ndim != 2:
        raise SPoDInputError(f"The PSF must be a 2-D image, got shape {np.shape(psf)}.")
    peak = float(np.abs(arr).max())
    if peak == 0.0:
        raise SPoDInputError("The PSF is all zeros.")
    if arr.min() < -1e-3 * peak:
        raise SPoDInputError(
            f"The PSF has negative values (min {arr.min():.3g}, peak {peak:.3g}); "
            "subtract the background so that it is non-negative."
        )
    arr = np.clip(arr, 0.0, None)
    total = float(arr.sum())
    if total <= 0.0:
        raise SPoDInputError("The PSF sums to 0.")
    if normalize:
        arr = arr / total
    return arr


def check_observation(observation, n_channels: int = DEFAULT_CHANNELS, psf_shape=None) -> np.ndarray:
    """Validate an observation stack (c, H, W) or time series (T, c, H, W).

    Integer data (uint16 camera frames) are converted to float32. The channel axis
    must already be in place (see :mod:`napari_spodnet.io` for finding it in files).
    With ``psf_shape`` the frame must be at least as large as the PSF.
    """
    arr = np.asarray(observation) if not hasattr(observation, "detach") else observation
    shape = tuple(arr.shape)
    if len(shape) not in (3, 4):
        raise SPoDInputError(
            f"An observation must be (c, H, W) or (T, c, H, W) with c = {n_channels} polarization "
            f"images; got shape {shape}."
        )
    if shape[-3] != n_channels:
        raise SPoDInputError(
            f"Expected {n_channels} polarization images on axis {len(shape) - 3}, got {shape[-3]} "
            f"(shape {shape})."
        )
    arr = _as_float_array(arr, "The observation")
    if psf_shape is not None:
        a, b = psf_shape
        if shape[-2] < a or shape[-1] < b:
            raise SPoDInputError(
                f"The PSF ({a} x {b}) is larger than the image ({shape[-2]} x {shape[-1]})."
            )
    return arr


#: Larger weights overflow float32 in the solvers; already far beyond "everything is zero".
MAX_LAMBDA = 1e30


def check_lam(lam, what: str = "lambda") -> float:
    """A regularisation weight: a finite real number in [0, MAX_LAMBDA]."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(lam)) or not 0 <= lam <= MAX_LAMBDA:
        raise SPoDInputError(f"{what} must be a finite number >= 0 (at most {MAX_LAMBDA:g}), got {lam!r}.")
    return float(lam)
