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

import copy
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .compare import EqualQualityComparison, compare_at_equal_objective
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


def orientation_composite(intensity, orientation, saturation_percentile: float = 99.5,
                          top: float | None = None) -> np.ndarray:
    """RGB image (..., h, w, 3) in [0, 1]: hue = dipole angle, brightness = intensity.

    Brightness saturates at ``top`` (default: the intensity's ``saturation_percentile``); a
    lazily shown series passes one ``top`` for all frames."""
    intensity = np.asarray(intensity, dtype=np.float32)
    if top is None:
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

    The whole result is returned in memory; for series that do not fit, stream them to disk with
    :func:`napari_spodnet.stream.recover_to_file` (the same :class:`FrameRecoverer` frame by frame).
    """
    start = time.perf_counter()
    if lam is not None:
        lam = check_lam(lam)
    if method not in ("spodnet", "fista"):
        raise SPoDInputError(f"method must be 'spodnet' or 'fista', got {method!r}")
    engine = FrameRecoverer.create(psf, method=method, model=model, tile=tile, overlap=overlap, device=device,
                                   normalize=normalize, lam=lam, iterations=iterations, tol=tol, restart=restart,
                                   n_channels=n_channels, preprocess_data=preprocess_data,
                                   compute_objective=compute_objective)
    if np.ndim(stack) not in (3, 4):
        raise SPoDInputError(f"An observation must be (c, H, W) or (T, c, H, W); got shape {np.shape(stack)}.")
    single = np.ndim(stack) == 3
    series = stack[None] if single else stack
    T, c, H, W = series.shape
    engine.check_frame_shape((c, H, W))
    c, h, w = engine.image_shape((H, W))

    # Normalise the whole series with one fit (on up to 8 frames) so that frames stay comparable.
    # The prepared sample frames are kept for the loop below: validating and preprocessing
    # a frame twice would double the cost of a single-frame recovery's input handling.
    prepared = engine.fit(series)
    if out is None:
        out = np.empty((T, c, h, w), dtype=np.float32)
    elif tuple(out.shape) != (T, c, h, w):
        raise SPoDInputError(f"out has shape {tuple(out.shape)}, expected {(T, c, h, w)}")

    if batch_size is None:
        batch_size = engine.default_batch_size
    batches = [list(range(i, min(i + batch_size, T))) for i in range(0, T, max(1, batch_size))]
    total = len(batches) * engine.units_per_batch((H, W))
    objectives = np.full(T, np.nan)
    fista_iterations, fista_histories = [], []
    done = 0
    for frames in batches:
        y_np = np.stack([prepared.pop(i) if i in prepared else engine.prepare(series[i]) for i in frames])
        batch = engine.recover_prepared(y_np, progress=progress, done=done, total=total,
                                        label=f"frames {frames[0] + 1}-{frames[-1] + 1} of {T}")
        done += engine.units_per_batch((H, W))
        out[frames] = batch.image
        objectives[frames] = batch.objective
        fista_iterations += batch.fista_iterations
        fista_histories += batch.fista_histories

    image = out[0] if single else out
    intensity = image.sum(axis=-3)
    orientation = orientation_map(image)
    info = dict(engine.info)
    info.update(tiles=engine.n_tiles((H, W)), frames=T, fista_iterations=fista_iterations or None,
                preprocess=engine.do_preprocess)
    if fista_histories:
        info["fista_history"] = fista_histories[0] if len(fista_histories) == 1 else fista_histories
    return RecoveryResult(
        image=image, intensity=intensity, orientation=orientation, seconds=time.perf_counter() - start,
        objective=(float(objectives[0]) if single else objectives) if compute_objective else None,
        method=method, lam=float(engine.lam), normalization=engine.normalization, translate=engine.translate,
        info=info)


#: FISTA iterations of :func:`check_against_fista` by default: past every model measured so far
#: (docs/results.md: 19-330 FISTA-equivalent iterations), a few seconds at 256 x 256 on one thread.
CHECK_ITERATIONS = 400
#: Largest observation crop (pixels per side) the check runs on, to bound its time on big frames.
CHECK_CROP = 256


def check_against_fista(stack, psf=None, model=None, iterations: int = CHECK_ITERATIONS, crop: int = CHECK_CROP,
                        device=None, n_channels: int = DEFAULT_CHANNELS) -> "ModelCheck":
    """SPoD-Net against FISTA on the user's own data: is this model faster at equal quality here?

    stack : an observation (c, H, W) or a series (T, c, H, W). The intensity normalisation is fitted
    exactly as :func:`recover` fits it (up to 8 whole frames, the model's settings); the check then
    runs on the first frame, on its central ``crop`` x ``crop`` pixels when it is larger. Both
    methods get the same validated, preprocessed and normalised data and the same lambda; the
    network's forward pass (best of 2, after a warm-up) is timed against FISTA with restart for
    ``iterations`` iterations on the same device. Returns a :class:`ModelCheck`. A model's speed
    varies between structures (docs/results.md, "Benchmark"); this measures it where it matters.
    """
    if int(iterations) < 1:
        raise SPoDInputError(f"iterations must be >= 1, got {iterations}")
    if len(getattr(stack, "shape", np.shape(stack))) not in (3, 4):
        raise SPoDInputError(f"The check takes an observation (c, H, W) or a series (T, c, H, W); got shape "
                             f"{tuple(np.shape(stack))}.")
    series = stack[None] if len(stack.shape) == 3 else stack
    engine = FrameRecoverer.create(psf, method="spodnet", model=model, device=device, n_channels=n_channels)
    engine.check_frame_shape(tuple(series.shape[1:]))
    prepared = engine.fit(series)  # the recovery's own normalisation
    frame = prepared.pop(0) if 0 in prepared else engine.prepare(series[0])
    _, H, W = frame.shape
    r0, c0 = max(0, (H - crop) // 2), max(0, (W - crop) // 2)
    region = ((r0, min(H, r0 + crop)), (c0, min(W, c0 + crop)))
    part = np.ascontiguousarray(frame[:, region[0][0]:region[0][1], region[1][0]:region[1][1]])
    y = torch.as_tensor(engine.normalization.apply(part), device=engine.device)
    net = engine.net
    with torch.no_grad():
        x = net.recover(y)  # warm-up: the filter spectra for this size
        seconds = float("inf")
        for _ in range(2):
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            start = time.perf_counter()
            x = net.recover(y)
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            seconds = min(seconds, time.perf_counter() - start)
        objective = float(engine.op.objective(y, x, engine.lam))
    reference = fista(engine.op, y, engine.lam, max_iter=int(iterations), tol=0, restart=True)
    comparison = compare_at_equal_objective(objective, seconds, np.asarray(reference.history).reshape(-1),
                                            fista_times=np.asarray(reference.times).reshape(-1),
                                            fista_seconds=float(reference.seconds))
    return ModelCheck(comparison, region)


#: Below this speed-up at equal objective the check advises against the model (the ``quick``
#: preset's own target on held-out data, docs/results.md section 0).
CHECK_GOOD_SPEEDUP = 3.0


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_against_fista` measured.

    comparison : :class:`core.compare.EqualQualityComparison` on the checked region.
    region : ((row0, row1), (col0, col1)), the observation pixels the check ran on.
    """

    comparison: EqualQualityComparison
    region: tuple

    @property
    def speedup_at_least(self) -> float | None:
        """The speed-up at equal objective, or, when FISTA never reached the model's objective, the
        lower bound FISTA's whole run / the model's time (None without a network time)."""
        c = self.comparison
        if c.speedup is not None:
            return c.speedup
        return c.fista_seconds / c.network_seconds if c.network_seconds > 0 else None

    @property
    def suits(self) -> bool:
        """True when the model is at least :data:`CHECK_GOOD_SPEEDUP` x faster than FISTA at equal objective
        (when FISTA never reached its objective: when FISTA's whole run took that many times the model's)."""
        bound = self.speedup_at_least
        return bound is not None and bound >= CHECK_GOOD_SPEEDUP

    def verdict(self) -> str:
        c = self.comparison
        advice = ("fine-tune it on these data (spodnet train OBS --psf PSF --fine-tune default -o MODEL), "
                  "or recover them with FISTA (spodnet fista)")
        if c.fista_match_iteration is None:
            if self.suits:
                return (f"The model suits these data: FISTA did not reach its objective in {c.fista_iterations} "
                        f"iterations, which took {self.speedup_at_least:.1f}x the model's time.")
            return (f"Undecided: FISTA's {c.fista_iterations} iterations took only {self.speedup_at_least:.1f}x "
                    "the model's time and did not reach its objective; check with more FISTA iterations "
                    "(--check-iterations).")
        worth = f"worth {c.fista_match_iteration} FISTA iterations, {c.speedup:.1f}x faster at equal objective"
        if self.suits:
            return f"The model suits these data ({worth})."
        if c.speedup < 1:
            return f"FISTA is faster than this model on these data ({worth}): {advice}."
        return f"The model is only a little faster than FISTA on these data ({worth}): {advice}."

    def lines(self) -> list[str]:
        (r0, r1), (c0, c1) = self.region
        return [f"Check against FISTA on {r1 - r0} x {c1 - c0} pixels (rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1}):",
                *self.comparison.lines(), self.verdict()]

    def as_dict(self) -> dict:
        """Plain numbers, for the output file's metadata."""
        c = self.comparison
        return dict(region=[list(self.region[0]), list(self.region[1])], network_seconds=c.network_seconds,
                    network_objective=c.network_objective, fista_match_iteration=c.fista_match_iteration,
                    fista_match_seconds=c.fista_match_seconds, speedup=c.speedup,
                    fista_iterations=c.fista_iterations, fista_seconds=c.fista_seconds,
                    fista_final_objective=c.fista_final_objective, suits=self.suits)


@dataclass
class BatchResult:
    """One frame batch recovered by :meth:`FrameRecoverer.recover_prepared`.

    image : (B, c, h, w) float32 in the data's units; objective : (B,) on normalised data
    (NaN when not computed); FISTA iterations and histories per tile. ``outputs``: where a
    dask worker already derived the outputs asked for (``{"intensity": (h, w), ...}`` per
    frame), so only those travel back; ``image`` is None then.
    """

    image: np.ndarray | None
    objective: np.ndarray
    fista_iterations: list = field(default_factory=list)
    fista_histories: list = field(default_factory=list)
    outputs: list | None = None


class FrameRecoverer:
    """The per-frame part of :func:`recover`: resolved model, PSF, lambda, normalisation and tiling.

    Built once (:meth:`create`), fitted once per series (:meth:`fit`), then applied to frame
    batches independently (:meth:`recover_frames`): :func:`recover`, the streamed writer, the
    lazy napari series and the dask cluster all run frames through this one object, so their
    results agree. It pickles (the network travels as its tensors) for dask workers;
    :meth:`to` moves it to another device. :meth:`token` identifies everything that changes a
    result (model weights, PSF, lambda, solver settings, normalisation).
    """

    def __init__(self, *, method, net, psf_arr, lam, iterations, tol, restart, n_channels, do_preprocess,
                 norm_settings, tile, overlap, device, compute_objective, info):
        self.method, self.net, self.psf = method, net, psf_arr
        self.lam, self.iterations, self.tol, self.restart = float(lam), int(iterations), float(tol), bool(restart)
        self.n_channels, self.do_preprocess, self.norm_settings = int(n_channels), bool(do_preprocess), norm_settings
        self.tile, self.overlap, self.device = tile, overlap, device
        self.compute_objective = bool(compute_objective)
        self.info = info
        self.normalization: Normalization | None = None
        self.op = SPoDOperator(psf_arr, self.n_channels, device=device, normalize_psf=False)
        self._token_cache: str | None = None

    @classmethod
    def create(cls, psf=None, method: str = "spodnet", model=None, tile: int | None = None,
               overlap: int | None = None, device=None, normalize: bool = True, lam: float | None = None,
               iterations: int = 1000, tol: float = 1e-6, restart: bool = True,
               n_channels: int = DEFAULT_CHANNELS, preprocess_data: bool | None = None,
               compute_objective: bool = True) -> "FrameRecoverer":
        """Resolve the model / PSF / lambda exactly as :func:`recover` documents its arguments."""
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
                                  stacklevel=3)
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
        a, b = psf_arr.shape
        if tile is not None and tile < max(a, b) + 1:
            raise SPoDInputError(f"The tile size ({tile}) must exceed the PSF size ({a} x {b}).")
        # Measured (docs/benchmarks.md): with the PSF size plus 16 px, tiles of the shipped model
        # match the whole-image recovery to ~2e-6 relative.
        margin = max(a, b) + 16 if overlap is None else int(overlap)
        if margin < max(a, b):
            raise SPoDInputError(f"The tile overlap ({margin}) must be at least the PSF size ({max(a, b)}).")
        return cls(method=method, net=net, psf_arr=psf_arr, lam=lam, iterations=iterations, tol=tol,
                   restart=restart, n_channels=n_channels, do_preprocess=do_preprocess,
                   norm_settings=norm_settings, tile=tile, overlap=margin, device=dev,
                   compute_objective=compute_objective, info=info)

    # -- shapes and planning ------------------------------------------------------------
    @property
    def default_batch_size(self) -> int:
        return 1 if self.device.type == "cpu" else 8

    @property
    def translate(self) -> tuple[float, float]:
        a, b = self.psf.shape
        return (-(a - 1) / 2, -(b - 1) / 2)

    def image_shape(self, obs_hw) -> tuple[int, int, int]:
        """(H, W) of an observation -> (c, h, w) of its recovery."""
        a, b = self.psf.shape
        return self.n_channels, int(obs_hw[0]) + a - 1, int(obs_hw[1]) + b - 1

    def check_frame_shape(self, frame_shape) -> None:
        c, H, W = (int(v) for v in frame_shape)
        if c != self.n_channels:
            raise SPoDInputError(f"Expected {self.n_channels} polarization images, got {c} "
                                 f"(frame shape {(c, H, W)}).")
        a, b = self.psf.shape
        if H < a or W < b:
            raise SPoDInputError(f"The PSF ({a} x {b}) is larger than the image ({H} x {W}).")
        self._tiling((H, W))  # tile-size checks

    def _tiling(self, obs_hw):
        H, W = obs_hw
        a, b = self.psf.shape
        h, w = H + a - 1, W + b - 1
        tile_h = tile_w = None
        if self.tile is not None:
            tile_h, tile_w = min(self.tile, H), min(self.tile, W)
            if min(tile_h, tile_w) < min(H, W) and min(tile_h, tile_w) < 2 * self.overlap + 16:
                raise SPoDInputError(f"The tile size ({self.tile}) must be at least twice the overlap "
                                     f"({self.overlap}) plus 16 pixels.")
        starts_r = _tile_starts(H, tile_h or H, self.overlap)
        starts_c = _tile_starts(W, tile_w or W, self.overlap)
        own_r = _ownership(starts_r, tile_h or H, a - 1, h)
        own_c = _ownership(starts_c, tile_w or W, b - 1, w)
        return (tile_h or H, tile_w or W), list(zip(starts_r, own_r)), list(zip(starts_c, own_c))

    def n_tiles(self, obs_hw) -> int:
        _, rows, cols = self._tiling(obs_hw)
        return len(rows) * len(cols)

    def units_per_batch(self, obs_hw) -> int:
        """Progress units of one batch (tiles, times iterations for FISTA)."""
        return self.n_tiles(obs_hw) * (self.iterations if self.method == "fista" else 1)

    # -- normalisation -----------------------------------------------------------------
    def prepare(self, frame) -> np.ndarray:
        """Validate (and, if the model asks, preprocess) one raw frame (c, H, W) -> float32."""
        return _prepare(frame, self.n_channels, self.psf.shape, self.do_preprocess)

    @staticmethod
    def sample_indices(n_frames: int) -> list[int]:
        """The (up to 8) frames the normalisation is fitted on, spread over the series."""
        return [int(i) for i in np.unique(np.linspace(0, n_frames - 1, min(n_frames, 8)).astype(int))]

    def fit(self, series) -> dict[int, np.ndarray]:
        """Fit the normalisation on up to 8 frames of ``series`` (T, c, H, W) (anything indexable
        by frame); returns those prepared frames so a caller need not prepare them again."""
        prepared = {i: self.prepare(series[i]) for i in self.sample_indices(len(series))}
        self.normalization = fit_normalization(np.stack(list(prepared.values())), self.norm_settings)
        self._token_cache = None
        return prepared

    def token(self) -> str:
        """Hex digest of everything that changes a recovered frame (model weights, PSF, lambda,
        solver, tiling, preprocessing, fitted normalisation)."""
        if self._token_cache is None:
            digest = hashlib.sha256()
            norm = self.normalization
            settings = dict(method=self.method, lam=self.lam, iterations=self.iterations, tol=self.tol,
                            restart=self.restart, n_channels=self.n_channels, preprocess=self.do_preprocess,
                            normalization_settings=self.norm_settings.to_dict(), tile=self.tile,
                            overlap=self.overlap,
                            normalization=None if norm is None else [norm.offset, norm.scale])
            digest.update(json.dumps(settings, sort_keys=True).encode())
            digest.update(np.ascontiguousarray(self.psf, dtype=np.float64).tobytes())
            if self.net is not None:
                for name, value in sorted(self.net.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(value.detach().cpu().contiguous().numpy().tobytes())
                digest.update(json.dumps(self.net.metadata, sort_keys=True, default=str).encode())
            self._token_cache = digest.hexdigest()
        return self._token_cache

    def to(self, device) -> "FrameRecoverer":
        """This recoverer on another device (itself when already there)."""
        dev = resolve_device(device)
        if dev == self.device:
            return self
        clone = copy.copy(self)
        clone.device = dev
        clone.net = None if self.net is None else self.net.to(dev)
        clone.op = self.op.to(device=dev)
        clone.info = {**self.info, "device": str(dev)}
        return clone

    def __getstate__(self):
        state = dict(self.__dict__)
        state["device"] = str(self.device)
        state["op"] = None  # rebuilt from the PSF (its FFT cache need not travel)
        if self.net is not None:
            net = copy.copy(self.net)  # shares the parameters
            if hasattr(net, "_cache"):
                net._cache = {}  # per-size filter spectra (closures, which do not pickle)
            if self.device.type != "cpu":
                net = copy.deepcopy(net).to("cpu")
                state["device"] = "cpu"
            state["net"] = net
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.device = torch.device(state["device"])
        self.op = SPoDOperator(self.psf, self.n_channels, device=self.device, normalize_psf=False)

    # -- recovery ----------------------------------------------------------------------
    def recover_frames(self, frames, progress: ProgressCallback | None = None) -> BatchResult:
        """Recover raw frames (B, c, H, W) (after :meth:`fit`); see :meth:`recover_prepared`."""
        return self.recover_prepared(np.stack([self.prepare(f) for f in frames]), progress=progress)

    def recover_prepared(self, y_np: np.ndarray, progress: ProgressCallback | None = None, done: int = 0,
                         total: int | None = None, label: str = "") -> BatchResult:
        """Recover prepared frames (B, c, H, W) float32 -> :class:`BatchResult` (data units)."""
        if self.normalization is None:
            raise SPoDInputError("FrameRecoverer.fit(series) must be called before recovering frames.")
        op, dev, lam = self.op, self.device, self.lam
        B, c, H, W = y_np.shape
        a, b = self.psf.shape
        h, w = H + a - 1, W + b - 1
        (tile_h, tile_w), rows, cols = self._tiling((H, W))
        n_tiles = len(rows) * len(cols)
        per_unit = self.iterations if self.method == "fista" else 1
        total = n_tiles * per_unit if total is None else total
        size_ratio = (H * W) / (h * w)
        fista_iterations, fista_histories = [], []

        def report(message: str, units: int, iteration=None, objective=None) -> None:
            update = RecoveryProgress(units, total, message, iteration, objective)
            if progress is not None and progress(update):
                raise RecoveryCancelled(f"Recovery cancelled ({message}).")

        y = torch.as_tensor(self.normalization.apply(y_np), dtype=torch.float32, device=dev)
        x_full = torch.empty((B, c, h, w), dtype=torch.float32, device=dev) if n_tiles > 1 else None
        for (r0, (lo_r, hi_r)) in rows:
            for (c0, (lo_c, hi_c)) in cols:
                y_tile = y[..., r0:r0 + tile_h, c0:c0 + tile_w]
                if self.method == "spodnet":
                    x_tile = self.net.recover(y_tile, size_ratio=size_ratio)
                    done += 1
                else:
                    x_tile = _fista_tile(op, y_tile, lam, size_ratio, self.iterations, self.tol, self.restart,
                                         lambda it, f, base=done: report("FISTA", base + it, it, f),
                                         fista_iterations, fista_histories)
                    done += per_unit
                if n_tiles == 1:
                    x_full = x_tile
                else:
                    x_full[..., lo_r:hi_r, lo_c:hi_c] = x_tile[..., lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0]
                report(label, done)
        objective = np.full(B, np.nan)
        if self.compute_objective:
            objective = op.objective(y, x_full, lam).detach().cpu().numpy().reshape(-1).astype(np.float64)
        image = self.normalization.restore_image(x_full.detach().cpu().numpy())  # identity when not normalising
        return BatchResult(np.asarray(image, dtype=np.float32), objective, fista_iterations, fista_histories)


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
