"""One recovery function for the CLI, the Python API and the napari widgets.

``recover(stack, psf, method="spodnet" | "fista", ...)`` takes an observation (c, H, W)
or a time series (T, c, H, W) (numpy array or memory-mapped TIFF) and returns the
orientation-resolved image, the summed intensity and an orientation map.

Pipeline, each step explicit: validate -> (optional paper preprocessing) -> intensity
normalisation (:mod:`.preprocess`; recorded in checkpoints) -> SPoD-Net or FISTA, in
frame batches and, above a tile size, in overlapping tiles -> back to the data's units.

Tiles solve the restriction of the whole-image problem: the sparsity weight of the
objective scales with the image size (``lam * A / B``), so every tile is given the
whole image's ``A / B`` and tiled results match untiled ones.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .devices import resolve_device
from .network import UnrolledISTA
from .physics import SPoDOperator
from .preprocess import Normalization, NormalizationSettings, fit_normalization, preprocess
from .solvers import DEFAULT_LAMBDA, fista
from .validation import DEFAULT_CHANNELS, SPoDInputError, check_lam, check_observation, check_psf

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "default.safetensors"


class RecoveryCancelled(RuntimeError):
    """The progress callback asked to stop; nothing was changed."""


class PSFMismatchWarning(UserWarning):
    """The model was trained with another PSF than the one given."""


@dataclass
class RecoveryProgress:
    """Progress of :func:`recover`: ``done`` of ``total`` units (frame batches x tiles, times
    iterations for FISTA); for FISTA also the current iteration and objective of the tile."""

    done: int
    total: int
    message: str = ""
    iteration: int | None = None
    objective: float | None = None

    @property
    def fraction(self) -> float:
        return self.done / max(self.total, 1)


ProgressCallback = Callable[[RecoveryProgress], Optional[bool]]


@dataclass
class RecoveryResult:
    """What :func:`recover` returns.

    image : (c, h, w) or (T, c, h, w) float32, in the data's intensity units (photons above
        background when the input is in photons); h = H + a - 1, w = W + b - 1.
    intensity : (h, w) or (T, h, w): sum over orientations.
    orientation : (h, w) or (T, h, w): dominant dipole angle in radians, [0, pi).
    seconds : wall time of the recovery. objective : L(Y, x) per frame on normalised data
        (float for one frame). translate : (row, col) offset that registers ``image`` on the
        observation's pixel grid (method.md section 2).
    """

    image: np.ndarray
    intensity: np.ndarray
    orientation: np.ndarray
    seconds: float
    objective: float | np.ndarray | None
    method: str
    lam: float
    normalization: Normalization
    translate: tuple[float, float]
    info: dict = field(default_factory=dict)


def load_default_model(device=None) -> UnrolledISTA:
    """The SPoD-Net shipped with the package (trained on synthetic data with the default PSF)."""
    if not DEFAULT_MODEL_PATH.is_file():
        raise SPoDInputError("The default model is missing from this installation; train one "
                             "(`spodnet train`) or pass a checkpoint.")
    return load_checkpoint(DEFAULT_MODEL_PATH, device=device)


def resolve_model(model, device=None) -> UnrolledISTA:
    """``None`` -> the shipped default; a path -> a checkpoint; a network -> itself (on ``device``)."""
    if model is None:
        return load_default_model(device)
    if isinstance(model, (str, Path)):
        return load_checkpoint(model, device=device)
    if isinstance(model, UnrolledISTA):
        return model.to(device) if device is not None else model
    raise SPoDInputError(f"model must be None, a checkpoint path or a network, got {type(model).__name__}")


def orientation_map(image, n_channels: int | None = None) -> np.ndarray:
    """Dominant dipole angle per pixel, radians in [0, pi): the circular mean of ``pi k / c``
    weighted by channel intensity (doubled angles, since orientation has period pi).
    (..., c, h, w) -> (..., h, w)."""
    image = np.asarray(image)
    c = image.shape[-3] if n_channels is None else n_channels
    angles = 2 * np.pi * np.arange(c) / c
    cos = np.tensordot(np.cos(angles), image, axes=([0], [image.ndim - 3]))
    sin = np.tensordot(np.sin(angles), image, axes=([0], [image.ndim - 3]))
    return (np.mod(np.arctan2(sin, cos), 2 * np.pi) / 2).astype(np.float32)


def orientation_composite(intensity, orientation, saturation_percentile: float = 99.5) -> np.ndarray:
    """RGB image (..., h, w, 3) in [0, 1]: hue = dipole angle, brightness = intensity."""
    intensity = np.asarray(intensity, dtype=np.float32)
    top = np.percentile(intensity, saturation_percentile) if intensity.size else 1.0
    value = np.clip(intensity / (top if top > 0 else 1.0), 0, 1)
    hue = np.mod(np.asarray(orientation, dtype=np.float32) / np.pi, 1.0)
    # HSV -> RGB with full saturation.
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    frac = h6 - np.floor(h6)
    p, q, t = np.zeros_like(value), value * (1 - frac), value * frac
    table = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = np.zeros(value.shape + (3,), dtype=np.float32)
    for s, (r, g, b) in enumerate(table):
        mask = sector == s
        rgb[mask] = np.stack([r[mask], g[mask], b[mask]], axis=-1)
    return rgb


def _tile_starts(length: int, tile: int, margin: int) -> list[int]:
    if tile >= length:
        return [0]
    step = max(1, tile - 2 * margin)
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


def _ownership(starts: list[int], tile: int, extra: int, full: int) -> list[tuple[int, int]]:
    """Image-coordinate range [lo, hi) that each tile writes: split overlaps at their middle."""
    ranges = []
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (starts[i - 1] + tile + extra + s) // 2
        hi = full if i == len(starts) - 1 else (s + tile + extra + starts[i + 1]) // 2
        ranges.append((lo, hi))
    return ranges


def recover(stack, psf=None, method: str = "spodnet", model=None, tile: int | None = None,
            overlap: int | None = None, device=None, normalize: bool = True, lam: float | None = None,
            iterations: int = 1000, tol: float = 1e-6, restart: bool = True, batch_size: int | None = None,
            n_channels: int = DEFAULT_CHANNELS, preprocess_data: bool | None = None,
            compute_objective: bool = True, progress: ProgressCallback | None = None,
            out: np.ndarray | None = None) -> RecoveryResult:
    """Recover an observation or a time series.

    stack : (c, H, W) or (T, c, H, W), any real dtype (memory-mapped is fine: frames are read
        in batches of ``batch_size``: default 1 on a CPU, where larger batches only thrash the
        cache, and 8 on a GPU). psf : (a, b); optional with a model (its own PSF is used).
    method : ``"spodnet"`` (one forward pass of ``model``; default: the shipped model) or
        ``"fista"`` (``iterations``, ``tol``, ``restart``).
    tile : observation tile size in pixels (None: whole frames); ``overlap``: margin discarded at
        inner tile edges (default: the PSF size + 16).
    lam : objective weight (default: the model's, else ``DEFAULT_LAMBDA``).
    normalize : the documented intensity normalisation (see :mod:`.preprocess`).
    preprocess_data : median/minimum filtering (default: as the model was trained, off for FISTA).
    progress : ``progress(RecoveryProgress)``; return True to cancel (:class:`RecoveryCancelled`).
    out : optional preallocated (T, c, h, w) float32 array (e.g. a np.memmap) for long series.
    """
    start = time.perf_counter()
    if lam is not None:
        lam = check_lam(lam)
    if method not in ("spodnet", "fista"):
        raise SPoDInputError(f"method must be 'spodnet' or 'fista', got {method!r}")
    dev = resolve_device(device)
    net = None
    norm_settings = NormalizationSettings(enabled=normalize)
    do_preprocess = bool(preprocess_data)
    info: dict = {"device": str(dev)}
    if method == "spodnet":
        net = resolve_model(model, dev)
        if net.n_channels != n_channels:
            raise SPoDInputError(f"The model expects {net.n_channels} polarization channels, not {n_channels}.")
        model_psf = net.psf.detach().cpu().numpy()
        if psf is None:
            psf_arr = model_psf
        else:
            psf_arr = check_psf(psf, normalize=True)
            if psf_arr.shape != model_psf.shape:
                raise SPoDInputError(f"The model was trained with a {model_psf.shape} PSF, the given PSF is "
                                     f"{psf_arr.shape}; train a model for this PSF (spodnet train).")
            mismatch = float(np.abs(psf_arr - model_psf).sum() / np.abs(model_psf).sum())
            info["psf_mismatch"] = mismatch
            if mismatch > 0.05:
                warnings.warn(f"The model was trained with a different PSF (L1 difference {mismatch:.0%}); "
                              "results may be poor: train a model for this PSF.", PSFMismatchWarning,
                              stacklevel=2)
        lam = net.lam if lam is None else lam
        if normalize:
            norm_settings = NormalizationSettings.from_dict(net.metadata.get("normalization"))
        if preprocess_data is None:
            do_preprocess = bool(net.metadata.get("preprocess"))
        info["model"] = net.metadata.get("name", "custom")
    else:
        if psf is None:
            raise SPoDInputError("FISTA needs a PSF.")
        psf_arr = check_psf(psf, normalize=True)
        lam = DEFAULT_LAMBDA if lam is None else lam

    if np.ndim(stack) not in (3, 4):
        raise SPoDInputError(f"An observation must be (c, H, W) or (T, c, H, W); got shape {np.shape(stack)}.")
    single = np.ndim(stack) == 3
    series = stack[None] if single else stack
    T, c, H, W = series.shape
    if c != n_channels:
        raise SPoDInputError(f"Expected {n_channels} polarization images, got {c} (shape {tuple(np.shape(stack))}).")
    a, b = psf_arr.shape
    if H < a or W < b:
        raise SPoDInputError(f"The PSF ({a} x {b}) is larger than the image ({H} x {W}).")
    h, w = H + a - 1, W + b - 1

    # Normalise the whole series with one fit (on up to 8 frames) so that frames stay comparable.
    # The prepared sample frames are kept for the loop below: validating and preprocessing
    # a frame twice would double the cost of a single-frame recovery's input handling.
    sample_idx = np.unique(np.linspace(0, T - 1, min(T, 8)).astype(int))
    prepared = {int(i): _prepare(series[i], n_channels, (a, b), do_preprocess) for i in sample_idx}
    norm = fit_normalization(np.stack(list(prepared.values())), norm_settings)

    op = SPoDOperator(psf_arr, n_channels, device=dev, normalize_psf=False)
    size_ratio = (H * W) / (h * w)
    if out is None:
        out = np.empty((T, c, h, w), dtype=np.float32)
    elif tuple(out.shape) != (T, c, h, w):
        raise SPoDInputError(f"out has shape {tuple(out.shape)}, expected {(T, c, h, w)}")

    tile_h = tile_w = None
    if tile is not None:
        if tile < max(a, b) + 1:
            raise SPoDInputError(f"The tile size ({tile}) must exceed the PSF size ({a} x {b}).")
        tile_h, tile_w = min(tile, H), min(tile, W)
    # Measured (docs/benchmarks.md): with the PSF size plus 16 px, tiles of the shipped model
    # match the whole-image recovery to ~2e-6 relative.
    margin = max(a, b) + 16 if overlap is None else int(overlap)
    if margin < max(a, b):
        raise SPoDInputError(f"The tile overlap ({margin}) must be at least the PSF size ({max(a, b)}).")
    if tile is not None and min(tile_h, tile_w) < min(H, W) and min(tile_h, tile_w) < 2 * margin + 16:
        raise SPoDInputError(f"The tile size ({tile}) must be at least twice the overlap ({margin}) plus 16 pixels.")
    starts_r = _tile_starts(H, tile_h or H, margin)
    starts_c = _tile_starts(W, tile_w or W, margin)
    own_r = _ownership(starts_r, tile_h or H, a - 1, h)
    own_c = _ownership(starts_c, tile_w or W, b - 1, w)
    n_tiles = len(starts_r) * len(starts_c)
    if batch_size is None:
        batch_size = 1 if dev.type == "cpu" else 8
    batches = [list(range(i, min(i + batch_size, T))) for i in range(0, T, max(1, batch_size))]
    per_unit = iterations if method == "fista" else 1
    total = len(batches) * n_tiles * per_unit
    done = 0
    objectives = np.full(T, np.nan)
    fista_iterations, fista_histories = [], []

    def report(message: str, units: int | None = None, iteration=None, objective=None) -> None:
        update = RecoveryProgress(done if units is None else units, total, message, iteration, objective)
        if progress is not None and progress(update):
            raise RecoveryCancelled(f"Recovery cancelled ({message}).")

    for frames in batches:
        y_np = np.stack([prepared.pop(i) if i in prepared else _prepare(series[i], n_channels, (a, b), do_preprocess)
                         for i in frames])
        y = torch.as_tensor(norm.apply(y_np), dtype=torch.float32, device=dev)
        x_full = torch.empty((len(frames), c, h, w), dtype=torch.float32, device=dev) if n_tiles > 1 else None
        for (r0, (lo_r, hi_r)) in zip(starts_r, own_r):
            for (c0, (lo_c, hi_c)) in zip(starts_c, own_c):
                y_tile = y[..., r0:r0 + (tile_h or H), c0:c0 + (tile_w or W)]
                if method == "spodnet":
                    x_tile = net.recover(y_tile, size_ratio=size_ratio)
                    done += 1
                else:
                    x_tile = _fista_tile(op, y_tile, lam, size_ratio, iterations, tol, restart,
                                         lambda it, f, base=done: report("FISTA", base + it, it, f),
                                         fista_iterations, fista_histories)
                    done += per_unit
                if n_tiles == 1:
                    x_full = x_tile
                else:
                    x_full[..., lo_r:hi_r, lo_c:hi_c] = x_tile[..., lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0]
                report(f"frames {frames[0] + 1}-{frames[-1] + 1} of {T}")
        if compute_objective:
            objectives[frames] = op.objective(y, x_full, lam).detach().cpu().numpy().reshape(-1)
        out[frames] = norm.restore_image(x_full.detach().cpu().numpy())  # identity when not normalising

    image = out[0] if single else out
    intensity = image.sum(axis=-3)
    orientation = orientation_map(image)
    info.update(tiles=n_tiles, frames=T, fista_iterations=fista_iterations or None, preprocess=do_preprocess)
    if fista_histories:
        info["fista_history"] = fista_histories[0] if len(fista_histories) == 1 else fista_histories
    return RecoveryResult(
        image=image, intensity=intensity, orientation=orientation, seconds=time.perf_counter() - start,
        objective=(float(objectives[0]) if single else objectives) if compute_objective else None,
        method=method, lam=float(lam), normalization=norm, translate=(-(a - 1) / 2, -(b - 1) / 2), info=info)


def _prepare(frame, n_channels, psf_shape, do_preprocess) -> np.ndarray:
    arr = check_observation(np.asarray(frame), n_channels, psf_shape)
    return preprocess(arr) if do_preprocess else arr.astype(np.float32, copy=False)


def _fista_tile(op, y_tile, lam, size_ratio, iterations, tol, restart, on_iteration, record, histories):
    """FISTA on a tile, with lambda rescaled so the tile solves the whole image's problem."""
    n_obs, n_img = op.sizes(y_tile.shape)
    lam_tile = lam * size_ratio * n_img / n_obs
    res = fista(op, y_tile, lam_tile, max_iter=iterations, tol=tol, restart=restart,
                callback=lambda it, f, x: on_iteration(it, float(f.reshape(-1)[0])))
    record.append(res.iterations)
    histories.append(res.history)
    return res.x
