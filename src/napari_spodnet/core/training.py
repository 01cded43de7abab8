"""Layer-wise training of SPoD-Net / LISTA-Net (method.md section 7, paper Algorithm 1).

For m = 1..M: add layer m (initialised as one ISTA step); step 1 trains only the new
layer (Adam, ``lr``); step 2 (m >= 2) trains all layers, the new one at ``0.2 lr`` and the
older ones at ``0.02 lr``. "Shrink" with ``gamma``: by default (``shrink="lr-decay"``, as in
Chen et al. 2018 whom the paper follows) an older layer's step-2 rate decays by gamma
for every layer added after it; ``shrink="parameters"`` is the paper's literal pseudo-code,
which multiplies the new layer's parameters by gamma before the next layer is added.

The default loss is the unsupervised objective (eq. 9) on random crops; the supervised
loss (eq. 8) against FISTA solutions of the same crops is an option.

Progress comes as typed :class:`TrainingProgress` updates, from a generator
(:meth:`Trainer.run_iter`) or a callback (:func:`train_spodnet`). Cancelling at any point
keeps the best model seen so far (lowest validation loss).
"""

from __future__ import annotations

import copy
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

    def validate(self) -> None:
        checks = [
            (self.architecture in ("spodnet", "listanet"), f"architecture {self.architecture!r}"),
            (self.n_layers >= 1, "n_layers must be >= 1"),
            (self.lam >= 0, "lam must be >= 0"),
            (self.lr > 0, "the learning rate must be > 0"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.n_crops >= 1, "epochs, batch and crops must be >= 1"),
            (self.n_val_crops >= 1, "n_val_crops must be >= 1"),
            (self.crop_size >= 8, "crop_size must be >= 8"),
            (self.shrink in ("lr-decay", "parameters"), f"shrink {self.shrink!r}"),
            (self.loss in ("unsupervised", "supervised"), f"loss {self.loss!r}"),
            (0 < self.gamma <= 1, "gamma must be in (0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SPoDInputError(f"Invalid training setting: {msg}.")


#: ``paper``: the paper's schedule (GPU hours); ``quick``: a few minutes on 2 CPU cores.
PRESETS = {
    "paper": dict(lr=1e-4, epochs=500, batch_size=20, n_crops=100, crop_size=96, n_val_crops=12),
    "quick": dict(lr=2e-3, epochs=6, batch_size=4, n_crops=24, crop_size=64, n_val_crops=4),
}


@dataclass
class TrainingProgress:
    """One progress update: after each epoch of each step (and a final one with ``done``)."""

    layer: int            # 1-based layer being trained
    n_layers: int
    stage: str            # "step1", "step2" or "done"
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    elapsed: float        # seconds since the start
    fraction: float       # overall progress in [0, 1]
    message: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def random_crops(observations: Sequence[np.ndarray], n: int, size: int, rng: np.random.Generator,
                 flips: bool) -> np.ndarray:
    """``n`` random (c, size, size) crops; a flip also mirrors the polarization order.

    Mirroring the image mirrors every dipole angle ``theta -> -theta``, so channel ``t``
    moves to ``-t mod c``; flipping the pixels alone would pair structures with the
    wrong polarization.
    """
    crops = []
    for _ in range(n):
        obs = observations[rng.integers(len(observations))]
        H, W = obs.shape[-2:]
        i, j = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
        crop = obs[:, i:i + size, j:j + size]
        if flips:
            c = crop.shape[0]
            mirror = (-np.arange(c)) % c
            if rng.random() < 0.5:
                crop = crop[mirror][:, :, ::-1]
            if rng.random() < 0.5:
                crop = crop[mirror][:, ::-1, :]
        crops.append(np.ascontiguousarray(crop))
    return np.stack(crops).astype(np.float32)


def _psf_is_mirror_symmetric(psf: np.ndarray, tol: float = 0.05) -> bool:
    return all(np.abs(psf - np.flip(psf, axis)).sum() <= tol * np.abs(psf).sum() for axis in (0, 1))


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


class Trainer:
    """Runs layer-wise training; use :meth:`run_iter` for progress, :meth:`cancel` to stop early."""

    def __init__(self, observations, psf, config: TrainingConfig | None = None, device=None,
                 n_channels: int = 18, validation_observations=None):
        self.config = config or TrainingConfig.preset("quick")
        self.config.validate()
        self.device = resolve_device(device)
        self.psf = check_psf(psf, normalize=True).astype(np.float32)
        self.n_channels = n_channels
        self.frames = prepare_observations(observations, self.psf.shape, n_channels, self.config)
        self.val_frames = (prepare_observations(validation_observations, self.psf.shape, n_channels, self.config)
                           if validation_observations is not None else self.frames)
        self.op = SPoDOperator(self.psf, n_channels, device=self.device, normalize_psf=False)
        self.flips = self.config.flips and _psf_is_mirror_symmetric(self.psf)
        self._cancel = False
        self.net: UnrolledISTA | None = None
        self.best_state: tuple[float, UnrolledISTA] | None = None
        self.history: list[TrainingProgress] = []

    def cancel(self) -> None:
        """Ask the run to stop at the next optimisation step; the best model so far is kept."""
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def best_model(self) -> UnrolledISTA | None:
        return None if self.best_state is None else self.best_state[1]

    def _new_network(self) -> UnrolledISTA:
        cfg = self.config
        common = dict(n_layers=0, lam=cfg.lam, alpha=cfg.alpha, threshold=cfg.threshold,
                      lipschitz=self.op.lipschitz_bound(), momentum=cfg.momentum)
        if cfg.architecture == "spodnet":
            net = SPoDNet(self.psf, self.n_channels, orientation=cfg.orientation, n_harmonics=cfg.n_harmonics,
                          **common)
        else:
            net = LISTANet(self.psf, self.n_channels, **common)
        return net.to(self.device)

    def _loss(self, net, y, target, n_layers):
        x = net(y, n_layers=n_layers)
        if target is None:
            return self.op.objective(y, x, self.config.lam).mean()
        return (x - target).pow(2).sum(dim=(-3, -2, -1)).mean() / x[0].numel()

    def _targets(self, y: torch.Tensor):
        if self.config.loss != "supervised":
            return None
        return fista(self.op, y, self.config.lam, max_iter=self.config.supervised_iterations, tol=1e-7).x

    def run_iter(self) -> Iterator[TrainingProgress]:
        """Generator of progress updates; returns (``StopIteration.value``) the trained network."""
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        start = self._start = time.perf_counter()
        train = torch.as_tensor(random_crops(self.frames, cfg.n_crops, cfg.crop_size, rng, self.flips),
                                device=self.device)
        val = torch.as_tensor(random_crops(self.val_frames, cfg.n_val_crops, cfg.crop_size,
                                           np.random.default_rng(cfg.seed + 1), False), device=self.device)
        train_targets, val_targets = self._targets(train), self._targets(val)
        net = self.net = self._new_network()
        steps_per_epoch = max(1, int(np.ceil(cfg.n_crops / cfg.batch_size)))
        total_epochs = cfg.epochs * (2 * cfg.n_layers - 1)
        done_epochs = 0
        initial_loss = None

        for m in range(cfg.n_layers):
            layer = net.add_layer()
            stages = [("step1", [{"params": list(layer.parameters()), "lr": cfg.lr}])]
            if m >= 1:
                groups = [{"params": list(layer.parameters()), "lr": cfg.step2_new * cfg.lr}]
                for j in range(m):
                    decay = cfg.gamma ** (m - 1 - j) if cfg.shrink == "lr-decay" else 1.0
                    groups.append({"params": list(net.layers[j].parameters()), "lr": cfg.step2_old * cfg.lr * decay})
                stages.append(("step2", groups))
            for stage, groups in stages:
                optimizer = torch.optim.Adam(groups)
                for epoch in range(1, cfg.epochs + 1):
                    order = torch.as_tensor(rng.permutation(cfg.n_crops), device=self.device)
                    losses = []
                    for s in range(steps_per_epoch):
                        if self._cancel:
                            return self._finish(start, cancelled=True)
                        idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                        target = None if train_targets is None else train_targets[idx]
                        loss = self._loss(net, train[idx], target, m + 1)
                        if not torch.isfinite(loss):
                            raise TrainingError(f"Training diverged (loss {loss.item()}) at layer {m + 1}, {stage}; "
                                                f"lower the learning rate (now {cfg.lr:g}).")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        losses.append(loss.item())
                    train_loss = float(np.mean(losses))
                    with torch.no_grad():
                        val_loss = float(self._loss(net, val, val_targets, m + 1))
                    if initial_loss is None:
                        initial_loss = max(train_loss, 1e-30)
                    if not np.isfinite(val_loss) or train_loss > 1e3 * initial_loss:
                        raise TrainingError(f"Training diverged at layer {m + 1} ({stage}: loss {train_loss:.3g}, "
                                            f"first {initial_loss:.3g}); lower the learning rate.")
                    self._remember(net, val_loss)
                    done_epochs += 1
                    update = TrainingProgress(m + 1, cfg.n_layers, stage, epoch, cfg.epochs, train_loss, val_loss,
                                              time.perf_counter() - start, done_epochs / total_epochs,
                                              f"layer {m + 1}/{cfg.n_layers} {stage} epoch {epoch}/{cfg.epochs}")
                    self.history.append(update)
                    yield update
            if cfg.shrink == "parameters" and m != cfg.n_layers - 1:
                with torch.no_grad():
                    for p in layer.parameters():
                        p.mul_(cfg.gamma)
        return self._finish(start, cancelled=False)

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

    def _remember(self, net: UnrolledISTA, val_loss: float) -> None:
        # Only a network with all its layers trained at least once competes for "best".
        if self.best_state is None or val_loss <= self.best_state[0]:
            best = copy.deepcopy(net)
            best._cache = {}
            self.best_state = (val_loss, best)

    def finish_cancelled(self) -> UnrolledISTA:
        """The best model so far, after an interruption outside :meth:`run_iter` (e.g. Ctrl-C)."""
        self._cancel = True
        return self._finish(getattr(self, "_start", time.perf_counter()), cancelled=True)

    def _finish(self, start: float, cancelled: bool) -> UnrolledISTA:
        if cancelled and self.best_state is None:
            raise TrainingError("Training was cancelled before any layer was trained; nothing to keep.")
        net = self.best_state[1] if cancelled else self.net
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
            },
        }
        self.history.append(TrainingProgress(net.n_layers, self.config.n_layers, "done", 0, 0,
                                             last.train_loss if last else float("nan"),
                                             self.best_state[0] if self.best_state else float("nan"),
                                             time.perf_counter() - start, 1.0,
                                             "cancelled: kept the best model so far" if cancelled else "finished"))
        return net


def train_spodnet(observations, psf, lam: float = DEFAULT_LAMBDA, preset: str = "quick",
                  callback: Optional[Callable[[TrainingProgress], Optional[bool]]] = None, device=None,
                  n_channels: int = 18, validation_observations=None, **overrides):
    """Train a network; returns ``(net, history)``.

    observations : list of (c, H, W) arrays (or (T, c, H, W) series, split into frames).
    psf : (a, b) array. preset : ``"quick"`` or ``"paper"``; ``overrides`` change any
    :class:`TrainingConfig` field. callback(progress) may return True to cancel (the best
    model so far is returned). history : list of :class:`TrainingProgress`.
    """
    config = TrainingConfig.preset(preset, lam=lam, **overrides)
    trainer = Trainer(observations, psf, config, device=device, n_channels=n_channels,
                      validation_observations=validation_observations)
    return trainer.run(callback), trainer.history
