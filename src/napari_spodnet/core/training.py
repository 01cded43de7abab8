"""Layer-wise training of SPoD-Net / LISTA-Net (method.md section 7, paper Algorithm 1).

For m = 1..M: add layer m (initialised as one ISTA step); step 1 trains only the new
layer (Adam, ``lr``); step 2 (m >= 2) trains all layers, the new one at ``0.2 lr`` and the
older ones at ``0.02 lr``. "Shrink" with ``gamma``: by default (``shrink="lr-decay"``, as in
Chen et al. 2018 whom the paper follows) an older layer's step-2 rate decays by gamma
for every layer added after it; ``shrink="parameters"`` is the paper's literal pseudo-code,
which multiplies the new layer's parameters by gamma before the next layer is added.

The default loss is the unsupervised objective (eq. 9) on random crops; the supervised
loss (eq. 8) against FISTA solutions of the same crops is an option.

Beyond the paper (``docs/results.md``, "SPoD-Net against FISTA"): step and threshold can be
learned in log space (``parameterization="log"``) with their own learning rate
(``scalar_lr``), all layers can then be trained together on the final objective
(``schedule="end-to-end"`` or ``"layerwise+end-to-end"``, ``e2e_epochs``, cosine-decayed
rate), optionally with per-layer (deep) supervision, on fresh random crops every epoch
(``fresh_crops``), and the layers may back-project with their own, untied filters
(``untied``). A last *dense stage* (``dense_stage_epochs``) continues at a fifth of the rates
with half the crops simulated dense puncta clusters blurred with the training PSF, so that a
schedule learned on sparse data does not fail on dense structure. The presets ``quick`` and
``standard`` use that recipe; ``paper`` and ``quick-layerwise`` keep the paper's layer-wise
Algorithm 1 exactly.

Progress reports "worth N FISTA iterations" (:attr:`TrainingProgress.fista_equivalent`):
per validation crop, the number of FISTA iterations (with restart, same lambda, same normalised
crop) needed to reach the network's objective on that crop; the median over the crops, and the
worst crop (:attr:`TrainingProgress.fista_equivalent_worst`), as the benchmark reports held-out
cases. FISTA's history on those crops is computed once, before training.

Progress comes as typed :class:`TrainingProgress` updates, from a generator
(:meth:`Trainer.run_iter`) or a callback (:func:`train_spodnet`). Cancelling at any point
keeps the best model seen so far (lowest validation loss).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .devices import resolve_device
from .network import LISTANet, SPoDNet, UnrolledISTA
from .physics import SPoDOperator
from .preprocess import NormalizationSettings, fit_normalization, preprocess
from .solvers import DEFAULT_LAMBDA, fista
from .validation import SPoDInputError, check_observation, check_psf


class TrainingError(RuntimeError):
    """Training could not continue (diverged, NaN); the message says what to change."""


@dataclass
class TrainingConfig:
    """All training settings; ``TrainingConfig.preset("quick", lr=...)`` starts from a preset."""

    architecture: str = "spodnet"       # "spodnet" or "listanet"
    n_layers: int = 10
    lam: float = DEFAULT_LAMBDA
    alpha: float = 0.1                   # LST leak; threshold "nst" ignores it
    threshold: str = "lst"
    orientation: str = "harmonic"        # SPoD-Net orientation filter: "harmonic" or "full" (paper)
    n_harmonics: int = 1
    momentum: bool = False               # learned FISTA momentum between layers (not in the paper)
    parameterization: str = "multiplier"  # step/threshold multipliers as such, or "log" (can move by factors)
    untied: bool = False                 # SPoD-Net: own back-projection filters per layer (learned preconditioner)
    preconditioned: bool = False         # SPoD-Net: Wiener-like Fourier preconditioner per layer (learned delta)
    noise_adaptive: bool = False         # schedule (log step, threshold, momentum) linear in the measured noise level
    schedule: str = "layerwise"          # "layerwise" (Algorithm 1), "end-to-end", "layerwise+end-to-end"
    e2e_epochs: int = 0                  # epochs of the end-to-end stage (0 with schedule "end-to-end": ``epochs``)
    scalar_lr: float | None = None       # rate of steps, thresholds, momenta (None: lr)
    filter_lr: float | None = None       # rate of the filters in the end-to-end stage (None: lr); 0 freezes them
    deep_supervision: float = 0.0        # end-to-end: weight decay of earlier layers' objectives (0: last only)
    fresh_crops: bool = False            # new random training crops every epoch
    #: Training crops are scaled by exp(u), u uniform in [-j, j] (0: off), so that the learned schedule does
    #: not depend on the intensity scale the normalisation happens to give the training data.
    intensity_jitter: float = 0.0
    log_loss: bool = False               # unsupervised: mean log objective (weighs crops of any noise level alike)
    #: Unsupervised: mean of objective ** p per crop. A crop's gradient is weighed by its objective ** (p - 1):
    #: p = 1 lets the noisiest crops (largest objective) dominate, p -> 0 is ``log_loss``.
    objective_power: float = 1.0
    #: End-to-end, unsupervised: each intermediate layer's objective above ``bound`` times the zero image's is
    #: added to the loss (0: off). Learned schedules overshoot in layers 2-3 (up to 1.4x the zero image's
    #: objective) and correct later; the correction is what fails on structures unlike the training data.
    excursion_bound: float = 0.0
    #: Unsupervised: each crop's objective is measured against FISTA on that crop (restart, same lam,
    #: ``equivalent_iterations`` iterations, run once per crop): its excess over FISTA's best, relative to
    #: FISTA's excess after :func:`reference_iteration` iterations, to the power ``relative_power``. FISTA's excess
    #: falls like 1/k^2, so a crop worth N FISTA iterations scores about (k_ref / N)^(2 p): every crop counts in
    #: units of FISTA iterations, whatever its photon count or density, and p = 1 weighs the worst crops most.
    #: The mean objective instead lets the noisiest crops dominate. Training then draws its crops from a pool of
    #: ``reference_pool`` x ``n_crops`` crops (FISTA runs on each once) rather than fresh ones every epoch.
    relative_loss: bool = False
    relative_power: float = 1.0
    reference_pool: int = 4
    #: A last stage of this many epochs (0: none) in which ``dense_fraction`` of the training and validation
    #: crops come from simulated dense puncta clusters (``core.families`` "clusters") blurred with the training
    #: PSF, at 0.2x the rates (``FINE_TUNE_RATE``). A schedule learned on sparse data alone can overshoot and
    #: fail on dense structure (worth 2-20 FISTA iterations on dense textures, docs/results.md "Session 17").
    dense_stage_epochs: int = 0
    dense_fraction: float = 0.5
    #: Harmonic SPoD-Net: the network's linear transfer (every pixel active, no threshold;
    #: :meth:`UnrolledISTA.linear_transfer`) may amplify an image mode's error at most this much; each training
    #: step adds ``max(log(max |T|) - log(bound), 0)`` to the loss (0: off). Learned schedules that amplify
    #: some mode tens of times fail on dense structure, where thresholds do not hold that mode back.
    stability_bound: float = 0.0
    equivalent_iterations: int = 300     # FISTA iterations run on the validation crops ("worth N FISTA it.")
    lr: float = 1e-4
    epochs: int = 500                    # per step; an epoch is n_crops / batch_size Adam steps
    batch_size: int = 20
    n_crops: int = 100
    crop_size: int = 96                  # observation crop (H = W), the image crop is larger by the PSF
    n_val_crops: int = 12
    step2_new: float = 0.2
    step2_old: float = 0.02
    gamma: float = 0.3
    shrink: str = "lr-decay"             # or "parameters" (the paper's literal pseudo-code)
    loss: str = "unsupervised"           # or "supervised" (against FISTA solutions)
    supervised_iterations: int = 500
    #: Unsupervised end-to-end training with known ground truth (simulated data, ``Trainer(truths=...)``):
    #: the loss is ``(1 - w) * objective + w * truth error``, each relative to the untrained network's.
    truth_weight: float = 0.0
    flips: bool = True
    preprocess: bool = False
    preprocess_mode: str = "subtract"
    normalization: dict = field(default_factory=lambda: NormalizationSettings().to_dict())
    seed: int = 0
    preset_name: str = "custom"

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainingConfig":
        if name not in PRESETS:
            raise SPoDInputError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return replace(cls(**PRESETS[name]), preset_name=name, **overrides)

    def with_rates_scaled(self, factor: float) -> "TrainingConfig":
        """The same settings with every learning rate (filters, steps/thresholds) times ``factor``.

        Fine-tuning a trained network (``Trainer(initial=...)``) wants ``FINE_TUNE_RATE``: its learned
        schedule sits near the edge of stability, and a few steps at the preset's rates can undo it.
        """
        return replace(self, lr=self.lr * factor,
                       scalar_lr=None if self.scalar_lr is None else self.scalar_lr * factor,
                       filter_lr=None if self.filter_lr is None else self.filter_lr * factor)

    def for_fine_tuning(self, dense_stage_epochs: int = 0) -> "TrainingConfig":
        """These settings for fine-tuning a trained network on the user's data (the CLI and the Train widget):
        ``FINE_TUNE_RATE`` times the rates, no dense stage unless asked, and no stability bound (it would first
        undo the given schedule: the shipped model amplifies some modes 162x and, bounded at 8, fell from
        58 / 114 to 49 / 98 FISTA iterations, docs/results.md "Session 21")."""
        return replace(self.with_rates_scaled(FINE_TUNE_RATE), dense_stage_epochs=dense_stage_epochs,
                       stability_bound=0.0)

    def validate(self) -> None:
        numbers = ("lam", "alpha", "lr", "scalar_lr", "filter_lr", "step2_new", "step2_old", "gamma",
                   "deep_supervision", "truth_weight", "intensity_jitter", "objective_power", "excursion_bound",
                   "dense_fraction", "relative_power", "stability_bound")
        for name in numbers:
            value = getattr(self, name)
            if value is None and name in ("scalar_lr", "filter_lr"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SPoDInputError(f"Invalid training setting: {name} must be a finite number, got {value!r}.")
        integers = ("n_layers", "n_harmonics", "e2e_epochs", "equivalent_iterations", "epochs", "batch_size",
                    "n_crops", "crop_size", "n_val_crops", "supervised_iterations", "seed", "dense_stage_epochs",
                    "reference_pool")
        for name in integers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SPoDInputError(f"Invalid training setting: {name} must be a whole number, got {value!r}.")
        flags = ("momentum", "untied", "preconditioned", "noise_adaptive", "fresh_crops", "log_loss", "flips", "preprocess",
                 "relative_loss")
        for name in flags:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise SPoDInputError(f"Invalid training setting: {name} must be True or False, "
                                     f"got {getattr(self, name)!r}.")
        checks = [
            (self.architecture in ("spodnet", "listanet"), f"architecture {self.architecture!r}"),
            (1 <= self.n_layers <= 1000, "n_layers must be in 1..1000"),
            (0 <= self.alpha <= 1, "alpha must be in [0, 1]"),
            (self.threshold in ("lst", "nst"), f"threshold {self.threshold!r}"),
            (self.orientation in ("harmonic", "full"), f"orientation {self.orientation!r}"),
            (self.n_harmonics >= 0, "n_harmonics must be >= 0"),
            (self.lam >= 0, "lam must be >= 0"),
            (self.lr > 0, "the learning rate must be > 0"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.n_crops >= 1, "epochs, batch and crops must be >= 1"),
            (self.n_val_crops >= 1, "n_val_crops must be >= 1"),
            (self.crop_size >= 8, "crop_size must be >= 8"),
            (self.shrink in ("lr-decay", "parameters"), f"shrink {self.shrink!r}"),
            (self.parameterization in ("multiplier", "log"), f"parameterization {self.parameterization!r}"),
            (self.schedule in SCHEDULES, f"schedule {self.schedule!r} (choose one of {SCHEDULES})"),
            (self.schedule != "layerwise+end-to-end" or self.e2e_epochs >= 1,
             "schedule 'layerwise+end-to-end' needs e2e_epochs >= 1"),
            (self.e2e_epochs >= 0, "e2e_epochs must be >= 0"),
            (self.scalar_lr is None or self.scalar_lr > 0, "scalar_lr must be > 0"),
            (self.filter_lr is None or self.filter_lr >= 0, "filter_lr must be >= 0"),
            (0 <= self.deep_supervision < 1, "deep_supervision must be in [0, 1)"),
            (self.excursion_bound >= 0, "excursion_bound must be >= 0"),
            (self.excursion_bound == 0 or (self.loss == "unsupervised" and self.schedule == "end-to-end"
                                           and self.deep_supervision == 0 and self.truth_weight == 0
                                           and not self.log_loss and self.objective_power == 1),
             "excursion_bound needs the unsupervised end-to-end schedule with the plain mean objective (no deep "
             "supervision, truth_weight, log_loss or objective_power)"),
            (self.dense_stage_epochs >= 0, "dense_stage_epochs must be >= 0"),
            (0 < self.dense_fraction < 1, "dense_fraction must be in (0, 1)"),
            (self.dense_stage_epochs == 0 or (self.schedule != "layerwise" and self.loss == "unsupervised"
                                              and self.truth_weight == 0),
             "the dense stage (dense_stage_epochs) needs an end-to-end schedule and the unsupervised loss without "
             "truth_weight (simulated crops have no targets)"),
            (self.equivalent_iterations >= 0, "equivalent_iterations must be >= 0"),
            (not self.untied or self.architecture == "spodnet", "untied filters need the spodnet architecture"),
            (not self.preconditioned or (self.architecture == "spodnet" and self.orientation == "harmonic"),
             "the preconditioner needs the spodnet architecture with the harmonic orientation filter"),
            (self.loss in ("unsupervised", "supervised"), f"loss {self.loss!r}"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
            (0 <= self.truth_weight < 1, "truth_weight must be in [0, 1)"),
            (0 <= self.intensity_jitter <= 3, "intensity_jitter must be in [0, 3]"),
            (0 < self.objective_power <= 1, "objective_power must be in (0, 1]"),
            (self.objective_power == 1 or not self.log_loss, "choose log_loss or objective_power, not both"),
            (0 < self.relative_power <= 2, "relative_power must be in (0, 2]"),
            (self.reference_pool >= 1, "reference_pool must be >= 1"),
            (self.stability_bound == 0 or (self.stability_bound >= 1 and self.architecture == "spodnet"
                                           and self.orientation == "harmonic"),
             "stability_bound (8 in the quick preset) must be 0 (off) or >= 1, and needs a spodnet with the harmonic "
             "orientation filter; pass stability_bound=0 for other networks"),
            (not self.relative_loss or (self.loss == "unsupervised" and self.schedule == "end-to-end"
                                        and self.truth_weight == 0 and self.deep_supervision == 0
                                        and self.excursion_bound == 0 and not self.log_loss
                                        and self.objective_power == 1 and self.intensity_jitter == 0
                                        and self.equivalent_iterations >= 3),
             "relative_loss (on in the quick preset) needs the unsupervised end-to-end schedule without "
             "truth_weight, deep supervision, excursion_bound, log_loss, objective_power or intensity_jitter, and "
             "equivalent_iterations >= 3 (FISTA's reference on each crop); pass relative_loss=False for those"),
            (self.intensity_jitter == 0 or (self.truth_weight == 0 and self.loss == "unsupervised"),
             "intensity_jitter needs the unsupervised loss without truth_weight"),
            (self.truth_weight == 0 or (self.loss == "unsupervised" and self.schedule == "end-to-end"
                                        and self.deep_supervision == 0 and not self.preprocess),
             "truth_weight needs the unsupervised end-to-end schedule without deep supervision or preprocessing"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SPoDInputError(f"Invalid training setting: {msg}.")


SCHEDULES = ("layerwise", "end-to-end", "layerwise+end-to-end")

#: The recipe of ``quick`` and ``standard`` (docs/results.md, "SPoD-Net against FISTA"): start from
#: 10 FISTA steps (learned momentum) whose gradient step is preconditioned by a Wiener-like Fourier
#: filter (learned regularisation and radial profile per layer); learn the per-layer step, threshold,
#: momentum and preconditioner in log space at their own rate, all layers together on the objective,
#: on fresh crops every epoch. The PSF filters stay fixed (learning them made training fragile).
_END_TO_END = dict(momentum=True, parameterization="log", schedule="end-to-end", scalar_lr=0.06, filter_lr=0.0,
                   fresh_crops=True, preconditioned=True)

#: Training presets (the GUI and CLI list them with :data:`PRESET_DESCRIPTIONS`).
PRESETS = {
    # quick trains on the relative loss (session 20, held-out cases, two seeds per PSF: default PSF worst case 61
    # and 61 FISTA iterations against 23 and 50 with the mean objective, median 98 / 87 against 96 / 95; Gaussian
    # PSF median 123 / 112 against 98 / 85, worst 35 / 7 against 32 / 21; docs/results.md "Session 20"), with a
    # stability bound of 8 (session 21, Gaussian PSF, four training seeds: worst case 57-61 FISTA iterations
    # against 7-59 without, median 103-118 against 108-125; default PSF, two seeds: unchanged, their schedules
    # amplified no mode beyond 2.1; docs/results.md "Session 21")
    "quick": dict(_END_TO_END, lr=2e-3, batch_size=4, n_crops=24, crop_size=64, n_val_crops=4, epochs=50,
                  equivalent_iterations=300, dense_stage_epochs=30, relative_loss=True, relative_power=0.25,
                  stability_bound=8.0),
    "standard": dict(_END_TO_END, lr=2e-3, batch_size=8, n_crops=32, crop_size=64, n_val_crops=8, epochs=300,
                     equivalent_iterations=400, dense_stage_epochs=60),
    # The session-12 recipe: untied back-projection filters at a small rate, no preconditioner.
    "untied": dict(_END_TO_END, preconditioned=False, scalar_lr=0.03, untied=True, filter_lr=3e-6, lr=2e-3,
                   batch_size=8, n_crops=32, crop_size=64, n_val_crops=8, epochs=100, equivalent_iterations=400),
    "quick-layerwise": dict(lr=2e-3, epochs=6, batch_size=4, n_crops=24, crop_size=64, n_val_crops=4),
    "paper": dict(lr=1e-4, epochs=500, batch_size=20, n_crops=100, crop_size=96, n_val_crops=12),
}

#: What each preset does and costs, for people choosing one (times measured on this project's 2 shared
#: CPU cores, docs/results.md).
PRESET_DESCRIPTIONS = {
    "quick": "Preconditioned end-to-end recipe on the relative loss (each crop counted in FISTA iterations; FISTA "
             "first runs once on 96 crops): 300 steps of 4 crops of 64 px, then 30 epochs with half the crops "
             "simulated dense clusters; no image mode amplified over 8x. About 1.5-3 min on one CPU thread; worth a "
             "median 80-118 FISTA iterations on held-out data, as few as 20 on dense parallel filaments.",
    "standard": "The same for 1 200 steps of 8 crops of 64 px, then 60 epochs with dense clusters (the shipped "
                "model's recipe): about 15 min on one CPU thread; worth a median 120 FISTA iterations on held-out "
                "families.",
    "untied": "The previous (session 12) recipe: untied back-projection filters, no preconditioner, 400 steps: "
              "about 4-8 min; worth about 30-60 FISTA iterations.",
    "quick-layerwise": "The paper's layer-wise Algorithm 1 on a short schedule (the package's former quick "
                       "preset): about 3-5 min on 2 CPU cores; stays close to 10 ISTA steps.",
    "paper": "The paper's layer-wise Algorithm 1 and schedule (500 epochs per step): GPU hours.",
}


@dataclass
class TrainingProgress:
    """One progress update: after each epoch of each step (and a final one with ``done``).

    An update with ``epoch == 0`` announces a stage being prepared (the dense stage's simulation):
    its losses are the last epoch's, and it is not kept in ``Trainer.history``.
    """

    layer: int            # 1-based layer being trained
    n_layers: int
    stage: str            # "step1", "step2", "end-to-end", "dense" or "done"
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    elapsed: float        # seconds since the start
    fraction: float       # overall progress in [0, 1]
    message: str = ""
    #: "worth N FISTA iterations": per validation crop, the FISTA iterations (restart, same lam) needed to
    #: reach the network's objective on it, interpolated between iterations; the median over the crops. A
    #: value equal to ``TrainingConfig.equivalent_iterations`` is a lower bound. None when not computed.
    fista_equivalent: float | None = None
    #: The same for the worst validation crop: where a schedule fails (dense structure), it shows here first.
    fista_equivalent_worst: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


#: Rate factor for fine-tuning a trained network (measured on the shipped model, docs/results.md
#: "Session 17": 8 Adam steps at the full rate took it from 101-172 to 22-36 FISTA iterations; at 0.1-0.2
#: it keeps them).
FINE_TUNE_RATE = 0.2
#: The dense stage's simulated observations: photon levels in turn, and the first seed (far from the
#: held-out seeds 7-9 and the training script's 90-199 that benchmarks and scripts use).
DENSE_PHOTONS = (50.0, 200.0, 1000.0)
DENSE_SEED = 50_000
#: Log-space steps and thresholds stay within a factor e^4 (about 55) of their ISTA values.
LOG_MULTIPLIER_BOUND = 4.0
#: Noise-adaptive schedule: a slope of at most 2 per unit of log noise (the feature spans about
#: -1.5 .. 1.2 between 1000 and 50 photons, so a schedule can change by up to e^3 over that range).
NOISE_SLOPE_BOUND = 2.0
#: End-to-end: a validation objective this much (relative) above the best restores the best state.
RESTORE_TOLERANCE = 0.05
#: Learned momenta stay in a range where the extrapolation is still a contraction in practice.
MOMENTUM_BOUNDS = (-0.5, 2.5)
#: The preconditioner's regularisation delta stays in [e^-7, e^5]: from a near-inverse of the blur
#: (amplification up to ~1100x) to the plain gradient step.
LOG_DELTA_BOUNDS = (-7.0, 5.0)
#: The preconditioner's learned radial correction stays within a factor e^3 (about 20).
LOG_SHAPE_BOUND = 3.0


def worth_text(median: float, worst: float | None = None, ran: int | None = None) -> str:
    """"98 FISTA iterations (worst crop 41)": the progress line's figure (">= N" where FISTA, run for
    ``ran`` iterations, never got there)."""
    def number(v):
        return f"{'>= ' if ran is not None and v >= ran else ''}{v:.0f}"
    text = f"{number(median)} FISTA iterations"
    if worst is not None and round(worst) < round(median):
        text += f" (worst crop {number(worst)})"
    return text


def fista_equivalent_iterations(objective: float, fista_history) -> float:
    """FISTA iterations needed to reach ``objective``: (iterations,) history -> float >= 0.

    Linear interpolation between the first iteration at or below ``objective`` and the one
    before (iteration 0 is the zero image's objective, taken as above everything). Returns
    ``len(fista_history)`` if FISTA never got there (a lower bound).
    """
    history = np.asarray(fista_history, dtype=np.float64).reshape(-1)
    reached = np.nonzero(history <= objective)[0]
    if reached.size == 0:
        return float(history.size)
    k = int(reached[0])
    if k == 0:
        return 1.0
    above, below = history[k - 1], history[k]
    fraction = (above - objective) / (above - below) if above > below else 1.0
    return float(k + min(max(fraction, 0.0), 1.0))


def random_crops(observations: Sequence[np.ndarray], n: int, size: int, rng: np.random.Generator,
                 flips: bool, images: Sequence[np.ndarray] | None = None):
    """``n`` random (c, size, size) crops; a flip also mirrors the polarization order.

    Mirroring the image mirrors every dipole angle ``theta -> -theta``, so channel ``t``
    moves to ``-t mod c``; flipping the pixels alone would pair structures with the
    wrong polarization.

    With ``images`` (one (c, h, w) image per observation, ``h = H + a - 1``: the ground truth),
    returns ``(crops, image_crops)``: image crop ``(c, size + a - 1, size + b - 1)`` is the part of
    the image that the observation crop sees, flipped alike (with a mirror-symmetric PSF a flip of
    the observation is a flip of the image).
    """
    crops, image_crops = [], []
    for _ in range(n):
        k = rng.integers(len(observations))
        obs = observations[k]
        H, W = obs.shape[-2:]
        i, j = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
        crop = obs[:, i:i + size, j:j + size]
        image = None
        if images is not None:
            a, b = images[k].shape[-2] - H + 1, images[k].shape[-1] - W + 1
            image = images[k][:, i:i + size + a - 1, j:j + size + b - 1]
        if flips:
            c = crop.shape[0]
            mirror = (-np.arange(c)) % c
            if rng.random() < 0.5:
                crop = crop[mirror][:, :, ::-1]
                image = None if image is None else image[mirror][:, :, ::-1]
            if rng.random() < 0.5:
                crop = crop[mirror][:, ::-1, :]
                image = None if image is None else image[mirror][:, ::-1, :]
        crops.append(np.ascontiguousarray(crop))
        if image is not None:
            image_crops.append(np.ascontiguousarray(image))
    crops = np.stack(crops).astype(np.float32)
    return crops if images is None else (crops, np.stack(image_crops).astype(np.float32))


def _psf_is_mirror_symmetric(psf: np.ndarray, tol: float = 0.05) -> bool:
    return all(np.abs(psf - np.flip(psf, axis)).sum() <= tol * np.abs(psf).sum() for axis in (0, 1))


def prepare_truths(observations, truths, psf_shape, config: TrainingConfig) -> list[np.ndarray]:
    """Ground truths (c, h, w) in the units of the normalised observations: ``truth / scale``.

    The camera counts are ``A truth + background + offset + noise`` (``core.simulate``), and
    normalisation subtracts an offset and divides by ``scale``; the offset is not part of ``x``.
    """
    if isinstance(observations, np.ndarray) and observations.ndim in (3, 4):
        observations, truths = [observations], [truths]
    if truths is None or len(truths) != len(observations):
        raise SPoDInputError("Give one ground truth per training observation.")
    settings = NormalizationSettings.from_dict(config.normalization)
    out = []
    for obs, truth in zip(observations, truths):
        obs, truth = np.asarray(obs), np.asarray(truth, dtype=np.float32)
        if obs.ndim != 3 or truth.ndim != 3 or truth.shape[0] != obs.shape[0] or \
                truth.shape[-2:] != (obs.shape[-2] + psf_shape[0] - 1, obs.shape[-1] + psf_shape[1] - 1):
            raise SPoDInputError(f"A ground truth (c, H + a - 1, W + b - 1) must go with observation {obs.shape} "
                                 f"and PSF {tuple(psf_shape)}; got {truth.shape}.")
        if not np.isfinite(truth).all():
            raise SPoDInputError("A ground truth holds NaN or infinite values.")
        out.append(truth / np.float32(fit_normalization(obs, settings).scale))
    return out


def prepare_observations(observations, psf_shape, n_channels: int, config: TrainingConfig) -> list[np.ndarray]:
    """Validate, optionally preprocess, and normalise each observation (time series are split into frames)."""
    if isinstance(observations, np.ndarray) and observations.ndim in (3, 4):
        observations = [observations]
    if len(observations) == 0:
        raise SPoDInputError("No training observations given.")
    settings = NormalizationSettings.from_dict(config.normalization)
    frames = []
    for obs in observations:
        arr = check_observation(obs, n_channels, psf_shape)
        for frame in (arr if arr.ndim == 4 else [arr]):
            if config.preprocess:
                frame = preprocess(frame, mode=config.preprocess_mode)
            frames.append(fit_normalization(frame, settings).apply(frame.astype(np.float32)))
    small = [f.shape for f in frames if min(f.shape[-2:]) < config.crop_size]
    if small:
        raise SPoDInputError(f"Observation {small[0][-2:]} is smaller than the crop size {config.crop_size}; "
                             f"lower the crop size.")
    return frames


@dataclass
class TruthTarget:
    """Ground-truth image crops (n, c, h, w), normalised units: selects the mixed loss."""

    image: torch.Tensor

    def __getitem__(self, index) -> "TruthTarget":
        return TruthTarget(self.image[index])


def reference_iteration(equivalent_iterations: int) -> int:
    """The FISTA iteration whose excess objective is the relative loss's unit (100, or a third of the run)."""
    return min(100, max(1, equivalent_iterations // 3))


def loss_unit(config: "TrainingConfig") -> str:
    """What the training and validation losses measure, for plots and reports."""
    if config.loss == "supervised":
        return "squared error against FISTA's solution"
    if config.relative_loss:
        return (f"relative: 1 = FISTA's objective after {reference_iteration(config.equivalent_iterations)} "
                "iterations, on each crop")
    if config.truth_weight > 0:
        return "objective and truth error mixed, each relative to the untrained network's"
    if config.log_loss:
        return "mean log objective (validation: objective, eq. 5)"
    if config.objective_power != 1:
        return f"mean objective^{config.objective_power:g} (validation: objective, eq. 5)"
    return "objective (eq. 5)"


#: The relative loss's floor: a crop already at FISTA's best still scores this (and keeps a finite
#: gradient when ``relative_power`` < 1).
RELATIVE_FLOOR = 1e-3
#: What the last progress update (and the CLI, the Train widget) says when fine-tuning hands back the network
#: it was given: minutes of training must not look like a new model.
UNCHANGED_MESSAGE = ("finished: no epoch beat the network it started from on the validation crops, so that network "
                     "is returned unchanged")
#: A crop whose objective FISTA's first iteration brings within this fraction of FISTA's best (a crop of
#: background, nothing to recover) has no FISTA iterations to count: it is left out of "worth N FISTA
#: iterations" and of the relative loss. (Measured, session 21: such crops scored "worth 1" because the
#: network's output kept a trace of noise, and their tiny unit made each weigh ~7x a crop with structure
#: in the relative loss.)
SOLVED_AT_ONCE = 0.01


def solved_at_once(history: np.ndarray) -> np.ndarray:
    """(iterations, n) FISTA objectives -> (n,) bool: FISTA's first iterate is already within
    :data:`SOLVED_AT_ONCE` of its best (relative)."""
    history = np.asarray(history, dtype=np.float64).reshape(len(history), -1)
    best = history.min(axis=0)
    return history[0] - best <= SOLVED_AT_ONCE * np.maximum(np.abs(best), 1e-30)


@dataclass
class ReferenceTarget:
    """FISTA on each crop, for the relative loss: its best objective and its objective after
    :func:`reference_iteration` iterations, (n,) tensors (normalised units)."""

    best: torch.Tensor
    at_reference: torch.Tensor

    @classmethod
    def from_history(cls, history: np.ndarray, reference: int, device) -> "ReferenceTarget":
        """``history``: (iterations, n) objectives of FISTA on n crops."""
        history = np.asarray(history, dtype=np.float64)
        best = history.min(axis=0)
        at_reference = history[min(reference, len(history)) - 1]
        scale = np.maximum(at_reference - best, 1e-6 * np.maximum(np.abs(best), 1e-30))
        # a crop FISTA solves at once (background only) has no excess to speak of: an infinite unit leaves
        # it out (it scores the floor), instead of a tiny unit that made a trace of noise dominate the loss
        scale = np.where(solved_at_once(history), np.inf, scale)
        return cls(torch.as_tensor(best, dtype=torch.float32, device=device),
                   torch.as_tensor(best + scale, dtype=torch.float32, device=device))

    def __getitem__(self, index) -> "ReferenceTarget":
        return ReferenceTarget(self.best[index], self.at_reference[index])

    def __len__(self) -> int:
        return len(self.best)

    @staticmethod
    def cat(targets) -> "ReferenceTarget":
        return ReferenceTarget(torch.cat([t.best for t in targets]), torch.cat([t.at_reference for t in targets]))

    def relative_excess(self, objective: torch.Tensor) -> torch.Tensor:
        """(n,) objectives -> (n,) excess over FISTA's best in units of FISTA's excess at the reference."""
        return (objective - self.best).clamp_min(0) / (self.at_reference - self.best) + RELATIVE_FLOOR


class Trainer:
    """Runs layer-wise training; use :meth:`run_iter` for progress, :meth:`cancel` to stop early."""

    def __init__(self, observations, psf, config: TrainingConfig | None = None, device=None,
                 n_channels: int = 18, validation_observations=None, truths=None, validation_truths=None,
                 initial: UnrolledISTA | None = None):
        self.config = config or TrainingConfig.preset("quick")
        self.config.validate()
        self.device = resolve_device(device)
        self.psf = check_psf(psf, normalize=True).astype(np.float32)
        self.n_channels = n_channels
        self.frames = prepare_observations(observations, self.psf.shape, n_channels, self.config)
        self.val_frames = (prepare_observations(validation_observations, self.psf.shape, n_channels, self.config)
                           if validation_observations is not None else self.frames)
        self.op = SPoDOperator(self.psf, n_channels, device=self.device, normalize_psf=False)
        self.truths = self.val_truths = None
        if self.config.truth_weight > 0:
            self.truths = prepare_truths(observations, truths, self.psf.shape, self.config)
            self.val_truths = (prepare_truths(validation_observations, validation_truths, self.psf.shape, self.config)
                               if validation_observations is not None else self.truths)
        self._loss_scale = None  # (objective, truth error) of the untrained network: the mixed loss's units
        self.flips = self.config.flips and _psf_is_mirror_symmetric(self.psf)
        self.initial = None if initial is None else self._check_initial(initial)
        self._initial_record = None if initial is None else {
            "name": initial.metadata.get("name"), "description": initial.metadata.get("description"),
            "seconds": (initial.metadata.get("training") or {}).get("seconds")}
        self._cancel = False
        self.restores = 0  # end-to-end stage: times the best state was restored after a rise
        self._return_best = False  # set by the dense stage: hand back the validation-best network
        self.dense_stage_failure: str | None = None  # why the dense stage stopped early (divergence), if it did
        self.net: UnrolledISTA | None = None
        self.best_state: tuple[float, UnrolledISTA] | None = None
        self._best_score: float | None = None  # best_state's selection score (:meth:`_selection_score`)
        self._best_is_initial = False  # the network given for fine-tuning is still the best
        self.unchanged = False  # set at the end: fine-tuning handed back the network it was given
        self.history: list[TrainingProgress] = []

    def cancel(self) -> None:
        """Ask the run to stop at the next optimisation step; the best model so far is kept."""
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def best_model(self) -> UnrolledISTA | None:
        return None if self.best_state is None else self.best_state[1]

    #: TrainingConfig fields a network to fine-tune brings with it (its structure): the training adopts them
    _STRUCTURE = ("architecture", "n_layers", "lam", "alpha", "threshold", "momentum", "parameterization",
                  "noise_adaptive", "orientation", "n_harmonics", "untied", "preconditioned")

    def _check_initial(self, initial: UnrolledISTA) -> UnrolledISTA:
        """A private copy of the network to fine-tune (warm start), after checking it fits this training.

        The network's structure (layers, lam, threshold, momentum, parameterisation, filters) replaces
        the preset's in ``self.config``, so that the checkpoint's training record describes the network.
        """
        cfg = self.config
        if cfg.schedule != "end-to-end":
            raise SPoDInputError("Fine-tuning a trained network needs the end-to-end schedule (presets quick, "
                                 "standard, untied).")
        if tuple(initial.psf_shape) != self.psf.shape or initial.n_channels != self.n_channels:
            raise SPoDInputError(f"The network to fine-tune was made for a {tuple(initial.psf_shape)} PSF and "
                                 f"{initial.n_channels} channels; this training has {self.psf.shape} and "
                                 f"{self.n_channels}.")
        if not np.allclose(initial.psf.detach().cpu().numpy(), self.psf, rtol=1e-3, atol=1e-6):
            raise SPoDInputError("The network to fine-tune was trained with another PSF; train a new one for "
                                 "this PSF instead.")
        structure = {name: getattr(initial, name) for name in self._STRUCTURE if hasattr(initial, name)}
        if structure.get("threshold") != "lst":
            structure.pop("alpha", None)  # the network stores 0 for a plain soft threshold
        try:
            adopted = replace(cfg, **structure)
            adopted.validate()
        except (SPoDInputError, TypeError, ValueError) as exc:
            raise SPoDInputError(f"This network cannot be fine-tuned with these settings: {exc}") from exc
        self.config = adopted
        return copy.deepcopy(initial).to(self.device)

    def _new_network(self) -> UnrolledISTA:
        cfg = self.config
        common = dict(n_layers=0, lam=cfg.lam, alpha=cfg.alpha, threshold=cfg.threshold,
                      lipschitz=self.op.lipschitz_bound(), momentum=cfg.momentum,
                      parameterization=cfg.parameterization, noise_adaptive=cfg.noise_adaptive)
        if cfg.architecture == "spodnet":
            net = SPoDNet(self.psf, self.n_channels, orientation=cfg.orientation, n_harmonics=cfg.n_harmonics,
                          untied=cfg.untied, preconditioned=cfg.preconditioned, **common)
        else:
            net = LISTANet(self.psf, self.n_channels, **common)
        return net.to(self.device)

    def _loss(self, net, y, target, n_layers, deep: float = 0.0):
        if deep > 0 and target is None and torch.is_grad_enabled():
            # Per-layer supervision: layer m's objective weighted deep^(M - m), normalised to sum 1.
            outputs = net(y, n_layers=n_layers, intermediate=True)
            weights = [deep ** (len(outputs) - 1 - i) for i in range(len(outputs))]
            def per_layer(x):
                objective = self.op.objective(y, x, self.config.lam)
                return self._reduce(objective)
            total = sum(w * per_layer(x) for w, x in zip(weights, outputs))
            return total / sum(weights)
        if self.config.excursion_bound > 0 and target is None and torch.is_grad_enabled() and n_layers > 1:
            return self._bounded_excursion_loss(net, y, n_layers)
        x = net(y, n_layers=n_layers)
        if isinstance(target, ReferenceTarget):
            relative = target.relative_excess(self.op.objective(y, x, self.config.lam))
            return relative.pow(self.config.relative_power).mean()
        if isinstance(target, TruthTarget):
            return self._mixed_loss(y, x, target.image)
        if target is None:
            objective = self.op.objective(y, x, self.config.lam)
            # validation (no autograd) always reports the plain mean objective
            return self._reduce(objective) if torch.is_grad_enabled() else objective.mean()
        return (x - target).pow(2).sum(dim=(-3, -2, -1)).mean() / x[0].numel()

    def _bounded_excursion_loss(self, net, y, n_layers) -> torch.Tensor:
        """The final objective plus every intermediate layer's objective above ``bound`` x the zero image's."""
        outputs = net(y, n_layers=n_layers, intermediate=True)
        lam = self.config.lam
        zero = self.op.objective(y, torch.zeros_like(outputs[-1]), lam)  # (batch,)
        excess = sum(torch.relu(self.op.objective(y, x.clamp_min(0), lam) - self.config.excursion_bound * zero)
                     for x in outputs[:-1])
        return self._reduce(self.op.objective(y, outputs[-1], lam)) + excess.mean()

    def _reduce(self, objective: torch.Tensor) -> torch.Tensor:
        """The training loss of per-crop objectives (batch,): mean, mean log or mean power."""
        if self.config.log_loss:
            return objective.clamp_min(1e-30).log().mean()
        if self.config.objective_power != 1:
            return objective.clamp_min(1e-30).pow(self.config.objective_power).mean()
        return objective.mean()

    def _truth_error(self, x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        # Relative squared error in the observation's field of view (the grid's margin is unrecoverable).
        a, b = self.psf.shape
        H, W = x.shape[-2] - a + 1, x.shape[-1] - b + 1
        fov = (..., slice((a - 1) // 2, (a - 1) // 2 + H), slice((b - 1) // 2, (b - 1) // 2 + W))
        return (x[fov] - truth[fov]).pow(2).sum() / truth[fov].pow(2).sum().clamp_min(1e-30)

    def _mixed_loss(self, y, x, truth) -> torch.Tensor:
        objective, error = self.op.objective(y, x, self.config.lam).mean(), self._truth_error(x, truth)
        if self._loss_scale is None:
            self._loss_scale = (max(float(objective.detach()), 1e-30), max(float(error.detach()), 1e-30))
        w = self.config.truth_weight
        return (1 - w) * objective / self._loss_scale[0] + w * error / self._loss_scale[1]

    def _targets(self, y: torch.Tensor):
        if self.config.loss != "supervised":
            return None
        return fista(self.op, y, self.config.lam, max_iter=self.config.supervised_iterations, tol=1e-7).x

    def _fista_histories(self, y: torch.Tensor, chunk: int = 4) -> np.ndarray | None:
        """FISTA (restart, same lam, ``equivalent_iterations``) on each crop: (iterations, n) objectives,
        or None when the run is cancelled meanwhile. Runs a few crops at a time (on a CPU, 24 crops at once
        cost more than 6 runs of 4), and a cancel is seen between them."""
        n, parts = self.config.equivalent_iterations, []
        for i in range(0, len(y), chunk):
            if self._cancel:
                return None
            result = fista(self.op, y[i:i + chunk], self.config.lam, max_iter=n, tol=0)
            parts.append(np.asarray(result.history, dtype=np.float64).reshape(n, -1))
        return np.concatenate(parts, axis=1)

    def _reference_target(self, history: np.ndarray) -> "ReferenceTarget":
        return ReferenceTarget.from_history(history, reference_iteration(self.config.equivalent_iterations),
                                            self.device)

    def _fista_reference(self, val: torch.Tensor) -> np.ndarray | None:
        """FISTA's objective on each validation crop after each iteration (restart per crop, same lam):
        (iterations, n_crops), or None when not asked for."""
        n = self.config.equivalent_iterations
        if n < 1:
            return None
        result = fista(self.op, val, self.config.lam, max_iter=n, tol=0)
        history = np.asarray(result.history, dtype=np.float64)
        return history.reshape(history.shape[0], -1)

    def _fista_equivalent(self, net, val, n_layers) -> tuple[float | None, float | None]:
        """(median, worst) over the validation crops of the FISTA iterations each crop's objective is worth;
        (None, None) without FISTA's reference or where every crop is background."""
        if self._fista_history is None:
            return None, None
        with torch.no_grad():
            values = self.op.objective(val, net(val, n_layers=n_layers), self.config.lam).reshape(-1)
        counted = ~solved_at_once(self._fista_history)
        per_crop = [fista_equivalent_iterations(float(v), self._fista_history[:, i])
                    for i, v in enumerate(values) if counted[i]]
        if not per_crop:  # background only: nothing to count
            return None, None
        return float(np.median(per_crop)), float(min(per_crop))

    def _instability(self, net, crop_hw) -> torch.Tensor:
        """The stability term: how far (in log) the worst mode's linear amplification exceeds the bound."""
        a, b = self.psf.shape
        worst = net.linear_transfer((int(crop_hw[0]) + a - 1, int(crop_hw[1]) + b - 1)).max()
        return torch.relu(torch.log(worst.clamp_min(1e-30)) - math.log(self.config.stability_bound))

    def _groups(self, layers, lr_scalar: float, lr_filter: float) -> list[dict]:
        scalars = [p for layer in layers for p in layer.scalar_parameters()]
        filters = [p for layer in layers for p in layer.filter_parameters()]
        groups = [{"params": scalars, "lr": lr_scalar}]
        if lr_filter > 0 and filters:
            groups.append({"params": filters, "lr": lr_filter})
        return groups

    def _clamp(self, net) -> None:
        # Keep the learned schedule where a layer is still a sensible (if aggressive) ISTA step.
        if self.config.parameterization != "log":
            return
        with torch.no_grad():
            for layer in net.layers:
                layer.eta.clamp_(-LOG_MULTIPLIER_BOUND, LOG_MULTIPLIER_BOUND)
                layer.theta.clamp_(-LOG_MULTIPLIER_BOUND, LOG_MULTIPLIER_BOUND)
                if hasattr(layer, "mu"):
                    layer.mu.clamp_(*MOMENTUM_BOUNDS)
                for name in ("eta_slope", "theta_slope", "mu_slope"):
                    if hasattr(layer, name):
                        getattr(layer, name).clamp_(-NOISE_SLOPE_BOUND, NOISE_SLOPE_BOUND)
                if hasattr(layer, "log_delta"):
                    layer.log_delta.clamp_(*LOG_DELTA_BOUNDS)
                    layer.log_shape.clamp_(-LOG_SHAPE_BOUND, LOG_SHAPE_BOUND)

    def run_iter(self) -> Iterator[TrainingProgress]:
        """Generator of progress updates; returns (``StopIteration.value``) the trained network."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        start = self._start = time.perf_counter()

        def crops(frames, truths, n, generator, flips):
            """(crops, targets): targets are truth crops, FISTA solutions (supervised) or None."""
            if truths is None:
                y = torch.as_tensor(random_crops(frames, n, cfg.crop_size, generator, flips), device=self.device)
                return y, self._targets(y)
            y, t = random_crops(frames, n, cfg.crop_size, generator, flips, images=truths)
            return torch.as_tensor(y, device=self.device), TruthTarget(torch.as_tensor(t, device=self.device))

        def new_crops():
            return jittered(*crops(self.frames, self.truths, cfg.n_crops, rng, self.flips))

        def jittered(y, targets):
            if cfg.intensity_jitter > 0:
                gains = np.exp(rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter, size=len(y)))
                y = y * torch.as_tensor(gains, dtype=y.dtype, device=y.device)[:, None, None, None]
            return y, targets

        def pool_of(frames, n):
            """The relative loss's crops: ``n`` crops and FISTA's reference on each (run once); None when
            cancelled meanwhile."""
            y = crops(frames, None, n, rng, self.flips)[0]
            history = self._fista_histories(y)
            return None if history is None else (y, self._reference_target(history))

        def pool_news(n, stage, epochs_of_stage):
            # FISTA on every crop of the pool takes seconds to a minute on a CPU: say so
            last = self.history[-1] if self.history else None
            return TrainingProgress(cfg.n_layers, cfg.n_layers, stage, 0, epochs_of_stage,
                                    last.train_loss if last else float("nan"), last.val_loss if last else float("nan"),
                                    time.perf_counter() - start, state["done"] / total_epochs if last else 0.0,
                                    f"relative loss: FISTA ({cfg.equivalent_iterations} iterations) on each of {n} "
                                    f"training crops, once…")

        def draw(pool, n):
            idx = torch.as_tensor(rng.choice(len(pool[0]), size=n, replace=False), device=self.device)
            return pool[0][idx], pool[1][idx]

        steps_per_epoch = max(1, int(np.ceil(cfg.n_crops / cfg.batch_size)))
        layerwise = cfg.schedule != "end-to-end"
        end_to_end = cfg.schedule != "layerwise"
        # A pure end-to-end schedule counts its epochs in ``epochs`` unless e2e_epochs says otherwise.
        e2e_epochs = (cfg.e2e_epochs or cfg.epochs) if cfg.schedule == "end-to-end" else cfg.e2e_epochs
        total_epochs = ((cfg.epochs * (2 * cfg.n_layers - 1) if layerwise else 0) + (e2e_epochs if end_to_end else 0)
                        + cfg.dense_stage_epochs)
        state = {"done": 0}
        # (validation crops come from a generator of their own: drawing them first changes no training crop)
        val, val_targets = crops(self.val_frames, self.val_truths, cfg.n_val_crops,
                                 np.random.default_rng(cfg.seed + 1), False)
        val_history = None
        if cfg.relative_loss:
            val_history = self._fista_histories(val)  # a few crops: about a second
            if val_history is None:
                return self._finish(start, cancelled=True)
            val_targets = self._reference_target(val_history)
        # FISTA's objective on each validation crop, for "worth N FISTA iterations" (restart is per crop, so
        # the per-crop runs of the relative loss give it without running FISTA again)
        self._fista_history = val_history if val_history is not None else self._fista_reference(val)
        if self.initial is not None:
            # The network as given competes for "best": fine-tuning never hands back a worse one, and a
            # cancel before the first epoch (or during the relative loss's FISTA runs below, Ctrl-C included:
            # ``finish_cancelled``) returns it unchanged.
            with torch.no_grad():
                self._remember(self.initial, float(self._loss(self.initial, val, val_targets, cfg.n_layers)))
        if cfg.relative_loss:
            yield pool_news(cfg.reference_pool * cfg.n_crops, "end-to-end", e2e_epochs)
            own_pool = pool_of(self.frames, cfg.reference_pool * cfg.n_crops)
            if own_pool is None:  # cancelled meanwhile
                return self._finish(start, cancelled=True)
            new_crops = lambda: draw(own_pool, cfg.n_crops)  # noqa: E731 (the stage's crop source)
        train, train_targets = new_crops()
        net = self.net = self._new_network() if self.initial is None else self.initial
        # what a stage trains and validates on (the dense stage swaps them)
        state.update(initial=None, train=train, targets=train_targets, new_crops=new_crops, val=val,
                     val_targets=val_targets)
        scalar_lr = cfg.lr if cfg.scalar_lr is None else cfg.scalar_lr
        filter_lr = cfg.lr if cfg.filter_lr is None else cfg.filter_lr

        def epochs(optimizer, stage, n_epochs, n_layers, scheduler=None, deep=0.0):
            """Runs the epochs of one stage; yields progress, returns "cancelled" when asked to stop."""
            for epoch in range(1, n_epochs + 1):
                if cfg.fresh_crops and state["done"] > 0:
                    state["train"], state["targets"] = state["new_crops"]()
                order = torch.as_tensor(rng.permutation(cfg.n_crops), device=self.device)
                losses = []
                for s in range(steps_per_epoch):
                    if self._cancel:
                        return "cancelled"
                    idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                    target = None if state["targets"] is None else state["targets"][idx]  # TruthTarget too
                    # (subclasses in benchmarks/paper_experiments.py override _loss without ``deep``)
                    loss = (self._loss(net, state["train"][idx], target, n_layers, deep) if deep
                            else self._loss(net, state["train"][idx], target, n_layers))
                    if not torch.isfinite(loss):
                        raise TrainingError(f"Training diverged (loss {loss.item()}) at layer {n_layers}, {stage}; "
                                            f"lower the learning rate (now {cfg.lr:g}).")
                    optimizer.zero_grad(set_to_none=True)
                    (loss + self._instability(net, state["train"].shape[-2:]) if cfg.stability_bound > 0
                     else loss).backward()
                    optimizer.step()
                    self._clamp(net)
                    if scheduler is not None:
                        scheduler.step()
                    losses.append(loss.item())
                train_loss = float(np.mean(losses))
                with torch.no_grad():
                    val_loss = float(self._loss(net, state["val"], state["val_targets"], n_layers))
                if state["initial"] is None:
                    state["initial"] = max(val_loss, 1e-30)
                if not np.isfinite(val_loss) or not np.isfinite(train_loss) or val_loss > 1e3 * state["initial"]:
                    raise TrainingError(f"Training diverged at layer {n_layers} ({stage}: validation loss "
                                        f"{val_loss:.3g}, first {state['initial']:.3g}); lower the learning rate.")
                if (scheduler is not None and self.best_state is not None and self.best_state[1].n_layers == n_layers
                        and self._selection_score(net, val_loss)
                        > self._best_score + RESTORE_TOLERANCE * abs(self._best_score)):
                    # An aggressive schedule can tip into a region where the output dies (all zero); go back
                    # to the best one seen and continue at half the rate.
                    net.load_state_dict(self.best_state[1].state_dict())
                    scheduler.base_lrs = [lr / 2 for lr in scheduler.base_lrs]
                    val_loss = self.best_state[0]
                    self.restores += 1
                self._remember(net, val_loss)
                state["done"] += 1
                message = (f"{stage} epoch {epoch}/{n_epochs}" if stage in ("end-to-end", "dense")
                           else f"layer {n_layers}/{cfg.n_layers} {stage} epoch {epoch}/{n_epochs}")
                equivalent, worst = self._fista_equivalent(net, state["val"], n_layers)
                if equivalent is not None:
                    message += ": worth " + worth_text(equivalent, worst, len(self._fista_history))
                update = TrainingProgress(n_layers, cfg.n_layers, stage, epoch, n_epochs, train_loss, val_loss,
                                          time.perf_counter() - start, state["done"] / total_epochs, message,
                                          fista_equivalent=equivalent, fista_equivalent_worst=worst)
                self.history.append(update)
                yield update
            return None

        if layerwise:
            for m in range(cfg.n_layers):
                layer = net.add_layer()
                stages = [("step1", self._groups([layer], scalar_lr, cfg.lr))]
                if m >= 1:
                    groups = self._groups([layer], cfg.step2_new * scalar_lr, cfg.step2_new * cfg.lr)
                    for j in range(m):
                        decay = cfg.gamma ** (m - 1 - j) if cfg.shrink == "lr-decay" else 1.0
                        groups += self._groups([net.layers[j]], cfg.step2_old * scalar_lr * decay,
                                               cfg.step2_old * cfg.lr * decay)
                    stages.append(("step2", groups))
                for stage, groups in stages:
                    optimizer = torch.optim.Adam(groups)
                    if (yield from epochs(optimizer, stage, cfg.epochs, m + 1)) == "cancelled":
                        return self._finish(start, cancelled=True)
                if cfg.shrink == "parameters" and m != cfg.n_layers - 1:
                    with torch.no_grad():
                        for p in layer.parameters():
                            p.mul_(cfg.gamma)
        elif self.initial is None:
            for _ in range(cfg.n_layers):
                net.add_layer()  # every layer starts as one ISTA (FISTA, with momentum) step
        if end_to_end:
            optimizer = torch.optim.Adam(self._groups(net.layers, scalar_lr, filter_lr))
            total_steps = max(e2e_epochs * steps_per_epoch, 1)
            scheduler = _cosine_decay(optimizer, total_steps)
            if (yield from epochs(optimizer, "end-to-end", e2e_epochs, cfg.n_layers, scheduler,
                                  cfg.deep_supervision)) == "cancelled":
                return self._finish(start, cancelled=True)
        if cfg.dense_stage_epochs > 0:
            if self._cancel:
                return self._finish(start, cancelled=True)
            last = self.history[-1] if self.history else None
            # news for the user while the clusters are simulated and FISTA runs on the new validation crops
            # (seconds); epoch 0 marks it (no new losses), and it is not part of ``history``
            yield TrainingProgress(cfg.n_layers, cfg.n_layers, "dense", 0, cfg.dense_stage_epochs,
                                   last.train_loss if last else float("nan"), last.val_loss if last else float("nan"),
                                   time.perf_counter() - start, state["done"] / total_epochs,
                                   "dense stage: simulating dense clusters with this PSF, FISTA on the new validation "
                                   "crops…")
            if self._cancel:  # asked on that news: stop before the seconds of preparation
                return self._finish(start, cancelled=True)
            if self.initial is not None and self.best_state is not None:
                # fine-tuning: the stage starts from the best network so far (the one given, if nothing beat it)
                net.load_state_dict(self.best_state[1].state_dict())
            dense, dense_val = self._dense_frames()
            n_dense = min(max(1, round(cfg.n_crops * cfg.dense_fraction)), cfg.n_crops - 1) if cfg.n_crops > 1 else 1
            n_own = cfg.n_crops - n_dense

            def mixed_crops():
                own = crops(self.frames, None, n_own, rng, self.flips)[0] if n_own else None
                extra = crops(dense, None, n_dense, rng, self.flips)[0]
                return jittered(extra if own is None else torch.cat([own, extra]), None)

            if cfg.relative_loss:
                yield pool_news(cfg.reference_pool * n_dense, "dense", cfg.dense_stage_epochs)
                dense_pool = pool_of(dense, cfg.reference_pool * n_dense)
                if dense_pool is None:
                    return self._finish(start, cancelled=True)

                def mixed_crops():  # noqa: F811 (the relative loss draws from the pools)
                    parts = ([draw(own_pool, n_own)] if n_own else []) + [draw(dense_pool, n_dense)]
                    return torch.cat([y for y, _ in parts]), ReferenceTarget.cat([t for _, t in parts])

            # validation: the crops so far plus as many dense ones as the fraction asks (at least one)
            n_dense_val = max(1, round(cfg.n_val_crops * cfg.dense_fraction / (1 - cfg.dense_fraction)))
            dense_val_crops = crops(dense_val, None, n_dense_val, np.random.default_rng(cfg.seed + 2), False)[0]
            dense_val_targets = None
            if cfg.relative_loss:
                dense_val_history = self._fista_histories(dense_val_crops)
                if dense_val_history is None:
                    return self._finish(start, cancelled=True)
                dense_val_targets = ReferenceTarget.cat([val_targets, self._reference_target(dense_val_history)])
            state.update(new_crops=mixed_crops, val=torch.cat([val, dense_val_crops]), val_targets=dense_val_targets,
                         initial=None)
            state["train"], state["targets"] = mixed_crops()
            self._fista_history = (np.concatenate([val_history, dense_val_history], axis=1)
                                   if cfg.relative_loss else self._fista_reference(state["val"]))
            # "best" is judged on the new validation crops from here on; the network as the stage finds it
            # competes, so the stage never hands back a network worse on them
            self.best_state = None
            with torch.no_grad():
                self._remember(net, float(self._loss(net, state["val"], state["val_targets"], cfg.n_layers)))
            self._return_best = True
            # a fifth of the rates, unless this is a fine-tuning whose rates the caller already scaled
            factor = 1.0 if self.initial is not None else FINE_TUNE_RATE
            optimizer = torch.optim.Adam(self._groups(net.layers, factor * scalar_lr, factor * filter_lr))
            total_steps = max(cfg.dense_stage_epochs * steps_per_epoch, 1)
            scheduler = _cosine_decay(optimizer, total_steps)
            try:
                outcome = yield from epochs(optimizer, "dense", cfg.dense_stage_epochs, cfg.n_layers, scheduler,
                                            cfg.deep_supervision)
            except TrainingError as exc:
                # the schedule before it is finished: keep the best network rather than lose the whole run
                self.dense_stage_failure = str(exc)
                outcome = None
            if outcome == "cancelled":
                return self._finish(start, cancelled=True)
        return self._finish(start, cancelled=False)

    def _dense_frames(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Simulated dense puncta clusters with the training PSF for the dense stage: (training, validation)
        frames, normalised like the user's. As many training observations as the user gave (3 to 12), each
        twice the crop size across, at 50, 200 and 1000 photons in turn; 3 validation observations."""
        from .families import simulate_family

        cfg = self.config
        size = max(2 * cfg.crop_size, 64)
        n_train = min(12, max(3, len(self.frames)))

        def observations(seed0, n):
            return [simulate_family("clusters", (size, size), n_channels=self.n_channels, psf=self.psf,
                                    seed=seed0 + i, photons=DENSE_PHOTONS[i % len(DENSE_PHOTONS)]).observation
                    for i in range(n)]

        seed0 = DENSE_SEED + 100 * cfg.seed
        return (prepare_observations(observations(seed0, n_train), self.psf.shape, self.n_channels, cfg),
                prepare_observations(observations(seed0 + 50, 3), self.psf.shape, self.n_channels, cfg))

    def run(self, on_progress: Optional[Callable[[TrainingProgress], Optional[bool]]] = None) -> UnrolledISTA:
        """Train to the end and return the network; ``on_progress(update)`` may return True to cancel
        (the best model so far is returned)."""
        gen = self.run_iter()
        while True:
            try:
                update = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None and on_progress(update):
                self.cancel()

    def _selection_score(self, net: UnrolledISTA, val_loss: float) -> float:
        """What "best" means: the validation loss, times ``1 +`` the stability term with a stability bound (so
        that a schedule amplifying some mode beyond the bound, the network given for fine-tuning included, does
        not win by a hair of validation loss; 1x within the bound)."""
        if self.config.stability_bound <= 0:
            return val_loss
        with torch.no_grad():
            excess = float(self._instability(net, (self.config.crop_size, self.config.crop_size)))
        return val_loss * (1.0 + excess)

    def _remember(self, net: UnrolledISTA, val_loss: float) -> None:
        # Only a network with all its layers trained at least once competes for "best".
        score = self._selection_score(net, val_loss)
        if self.best_state is None or score <= self._best_score:
            best = copy.deepcopy(net)
            best._cache = {}
            self.best_state, self._best_score = (val_loss, best), score
            self._best_is_initial = net is self.initial

    def finish_cancelled(self) -> UnrolledISTA:
        """The best model so far, after an interruption outside :meth:`run_iter` (e.g. Ctrl-C)."""
        self._cancel = True
        return self._finish(getattr(self, "_start", time.perf_counter()), cancelled=True)

    def _finish(self, start: float, cancelled: bool) -> UnrolledISTA:
        if cancelled and self.best_state is None:
            raise TrainingError("Training was cancelled before any layer was trained; nothing to keep.")
        # fine-tuning returns the best on the validation crops (the network as given, if nothing beat it)
        net = self.best_state[1] if cancelled or self.initial is not None or self._return_best else self.net
        net = net.eval()
        last = self.history[-1] if self.history else None
        # Only what differs from the defaults (the paper's schedule): checkpoints stay small.
        defaults = asdict(TrainingConfig())
        cfg = {k: v for k, v in asdict(self.config).items() if v != defaults[k]}
        net.metadata = {
            "normalization": self.config.normalization,
            "preprocess": {"median": 5, "minimum": 7, "mode": self.config.preprocess_mode}
            if self.config.preprocess else None,
            "training": {
                "config": cfg,
                "cancelled": cancelled,
                "seconds": round(time.perf_counter() - start, 2),
                "layers_trained": net.n_layers,
                "final_train_loss": last.train_loss if last else None,
                "final_val_loss": last.val_loss if last else None,
                "best_val_loss": self.best_state[0] if self.best_state else None,
                "device": str(self.device),
                "flips": self.flips,
                "restores": self.restores,
            },
        }
        unchanged = self.initial is not None and self._best_is_initial and net is self.best_state[1]
        if self._initial_record is not None:
            net.metadata["training"]["fine_tuned_from"] = self._initial_record
            net.metadata["training"]["unchanged"] = bool(unchanged)
        if self.dense_stage_failure:
            net.metadata["training"]["dense_stage_failure"] = self.dense_stage_failure
        self.history.append(TrainingProgress(net.n_layers, self.config.n_layers, "done", 0, 0,
                                             last.train_loss if last else float("nan"),
                                             self.best_state[0] if self.best_state else float("nan"),
                                             time.perf_counter() - start, 1.0,
                                             "cancelled: kept the best model so far" if cancelled
                                             else UNCHANGED_MESSAGE if unchanged else "finished"))
        self.unchanged = bool(unchanged)
        return net


def _cosine_decay(optimizer, total_steps: int):
    """Cosine decay of every rate to 5 % over ``total_steps`` Adam steps: large steps to move the schedule,
    small ones to settle it."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k / total_steps, 1.0))))


def train_spodnet(observations, psf, lam: float = DEFAULT_LAMBDA, preset: str = "quick",
                  callback: Optional[Callable[[TrainingProgress], Optional[bool]]] = None, device=None,
                  n_channels: int = 18, validation_observations=None, initial: UnrolledISTA | None = None,
                  **overrides):
    """Train a network; returns ``(net, history)``.

    observations : list of (c, H, W) arrays (or (T, c, H, W) series, split into frames).
    psf : (a, b) array. preset : ``"quick"`` or ``"paper"``; ``overrides`` change any
    :class:`TrainingConfig` field. callback(progress) may return True to cancel (the best
    model so far is returned). history : list of :class:`TrainingProgress`.
    initial : a trained network (same PSF) to fine-tune instead of starting from FISTA steps;
    end-to-end schedules only. It is copied, never changed; its structure (layers, lam,
    threshold, momentum, filters) replaces the preset's, and the best network on the validation
    crops is returned (the one given, if training did not beat it). A learned schedule sits near
    the edge of stability, so fine-tune at a fraction of the preset's rates
    (``TrainingConfig.with_rates_scaled(FINE_TUNE_RATE)``; the CLI and the widget do): at the full
    rate a few steps can undo it.
    """
    if initial is not None:
        # fine-tuning adapts a network to these observations: no dense stage and no stability bound unless asked
        # for (the bound would first undo the given schedule: the shipped model amplifies some modes 162x, and
        # bounded at 8 it fell from 58 / 114 to 49 / 98 FISTA iterations, docs/results.md "Session 21")
        overrides.setdefault("dense_stage_epochs", 0)
        overrides.setdefault("stability_bound", 0.0)
    config = TrainingConfig.preset(preset, lam=lam, **overrides)
    trainer = Trainer(observations, psf, config, device=device, n_channels=n_channels,
                      validation_observations=validation_observations, initial=initial)
    return trainer.run(callback), trainer.history
