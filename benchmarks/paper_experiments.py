"""Regenerate the figures and tables of ``docs/results.md`` (paper sections 5.1 and 5.2, and more).

Subcommands (each with ``--quick`` for a seconds-long smoke run at tiny sizes)::

    fig6a   training curves of the first three layers: SPoD-LST, ISTA-LST, SPoD-NST (lr 1e-3/1e-4/1e-5),
            in this project's parameterisation and in the paper's (absolute step and threshold)
    fig6b   test loss after each added layer, SPoD-LST vs ISTA-LST (9 training / 3 held-out
            observations); model sizes on disk
    fig7    SPoD-Net (10 layers) vs FISTA: objective on held-out 256 x 256 patches against FISTA
            iterations and seconds; recovered images side by side (the paper's Figures 7 and 8)
    speed   SPoD-Net forward (harmonic and full orientation filter), one FISTA iteration, FISTA time
            to reach SPoD-Net's objective, one naive spatial-convolution iteration, peak memory,
            time-lapse throughput; 256^2 and 512^2 x 18, side by side in one run
    truth   PSNR / SSIM / orientation error against the ground truth, at several photon counts
    all     all of the above, sharing trained models (fig6b, fig6a, fig7, truth, speed)

Examples::

    python benchmarks/paper_experiments.py all --figures docs/figures        # CPU schedules (~25 min)
    python benchmarks/paper_experiments.py fig7 --device cuda --schedule paper --figures docs/figures
    python benchmarks/paper_experiments.py truth --quick --out /tmp/x

Everything a run produces goes to ``--out`` (default ``out/benchmarks``, git-ignored): the PNG
figures, ``<name>.json`` (every number), ``<name>.md`` (the tables as pasted into
docs/results.md) and a ``cache/`` of trained networks, so that ``fig6a`` reuses the layer-wise
runs of ``fig6b`` and ``speed``/``truth`` reuse the model of ``fig7``. ``--figures DIR`` also
copies the PNGs there. torch runs single-threaded unless ``--threads`` says otherwise (on a
contended 2-core machine torch's OpenMP pool is far slower than one thread).

All data are synthetic (``napari_spodnet.core.simulate``); every observation is normalised
with ``fit_normalization(obs).apply(obs)`` before the operator, FISTA or a network sees it,
and ``lam = DEFAULT_LAMBDA`` (0.05) on the normalised data unless stated otherwise.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from napari_spodnet.core.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from napari_spodnet.core.network import LISTANet, SPoDNet, build_network, count_parameters  # noqa: E402
from napari_spodnet.core.physics import SPoDOperator, direct_adjoint, direct_forward  # noqa: E402
from napari_spodnet.core.preprocess import fit_normalization  # noqa: E402
from napari_spodnet.core.recover import (  # noqa: E402
    DEFAULT_MODEL_PATH,
    orientation_composite,
    orientation_map,
    recover,
)
from napari_spodnet.core.simulate import default_psf, gaussian_psf, simulate  # noqa: E402
from napari_spodnet.core.solvers import DEFAULT_LAMBDA, fista, ista  # noqa: E402
from napari_spodnet.core.training import (  # noqa: E402
    Trainer,
    TrainingConfig,
    prepare_observations,
    random_crops,
)

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
C = 18  # polarization channels

# ----------------------------------------------------------------------------------------------
# context, logging, output
# ----------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    out: Path
    figures: Path | None
    cache: Path
    device: torch.device
    quick: bool
    schedule: str
    seed: int
    threads: int
    start: float = field(default_factory=time.perf_counter)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {msg}", flush=True)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def machine_description(ctx: Ctx) -> str:
    if ctx.gpu:
        name = torch.cuda.get_device_name(ctx.device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    return f"torch {torch.__version__}, {name}, {torch.get_num_threads()} torch thread(s), float32"


def save_figure(ctx: Ctx, fig, name: str) -> Path:
    path = ctx.out / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    if ctx.figures is not None:
        ctx.figures.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, ctx.figures / path.name)
    ctx.log(f"wrote {path}")
    return path


def write_outputs(ctx: Ctx, name: str, results: dict, markdown: str) -> None:
    (ctx.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=_json_default))
    (ctx.out / f"{name}.md").write_text(markdown + "\n")
    print()
    print(markdown, flush=True)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def md_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def g(v, digits: int = 4) -> str:
    """Compact float formatting for tables."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def experiment_psf(ctx: Ctx) -> np.ndarray:
    """The default 32 x 32 Airy PSF; a 7 x 7 Gaussian in quick mode (tiny sizes)."""
    return gaussian_psf(7, 1.0) if ctx.quick else default_psf()


_SIM_CACHE: dict = {}


def simulated(ctx: Ctx, size: int, seed: int, photons: float = 200.0):
    key = (ctx.quick, size, seed, float(photons))
    if key not in _SIM_CACHE:
        _SIM_CACHE[key] = simulate((size, size), psf=experiment_psf(ctx), seed=seed, photons=photons)
    return _SIM_CACHE[key]


def normalized(obs: np.ndarray) -> np.ndarray:
    return fit_normalization(obs).apply(obs.astype(np.float32)).astype(np.float32)


@dataclass
class FoldData:
    train: list          # SimulatedObservation
    test: list
    psf: np.ndarray
    key: str
    description: str


def fold_data(ctx: Ctx, size: int, fold: int) -> FoldData:
    """12 synthetic observations (seeds 100*seed + 0..11) in 4 groups of 3; group ``fold`` is the test set."""
    base = 100 * ctx.seed
    sims = [simulated(ctx, size, base + i) for i in range(12)]
    test_idx = set(range(3 * fold, 3 * fold + 3))
    train = [s for i, s in enumerate(sims) if i not in test_idx]
    test = [s for i, s in enumerate(sims) if i in test_idx]
    key = f"sim{size}-seeds{base}-fold{fold}-{'quick' if ctx.quick else 'airy32'}"
    desc = (f"12 simulated {size} x {size} x {C} observations (seeds {base}..{base + 11}, 200 photons), "
            f"4 groups of 3, group {fold} held out")
    return FoldData(train, test, sims[0].psf, key, desc)


# ----------------------------------------------------------------------------------------------
# training variants and a cache of trained runs
# ----------------------------------------------------------------------------------------------


class AbsoluteSPoDNet(SPoDNet):
    """SPoD-Net with the paper's parameterisation: step ``eta_m`` and threshold ``theta_m`` are learned
    as absolute values (this project learns them as multipliers of their ISTA values). The forward
    pass is identical; only what Adam's learning rate means changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._absolute_init = (float(self.eta_scale), float(self.theta_scale))
        for layer in self.layers:
            self._make_absolute(layer)
        self.eta_scale.fill_(1.0)
        self.theta_scale.fill_(1.0)

    def _make_absolute(self, layer):
        with torch.no_grad():
            layer.eta.fill_(self._absolute_init[0])
            layer.theta.fill_(self._absolute_init[1])

    def add_layer(self):
        layer = super().add_layer()
        if hasattr(self, "_absolute_init"):
            self._make_absolute(layer)
        return layer


class VariantTrainer(Trainer):
    """The project's Trainer, optionally with the paper's absolute step/threshold (``absolute``) and
    with the loss evaluated on the relaxed output before the final post-threshold (``relaxed``: the
    reading of the paper's Theorem 1, where LST outputs may be slightly negative during training)."""

    def __init__(self, *args, absolute: bool = False, relaxed: bool = False, **kwargs):
        self.absolute, self.relaxed = absolute, relaxed
        super().__init__(*args, **kwargs)

    def _new_network(self):
        if not self.absolute:
            return super()._new_network()
        cfg = self.config
        net = AbsoluteSPoDNet(self.psf, self.n_channels, n_layers=0, lam=cfg.lam, alpha=cfg.alpha,
                              threshold=cfg.threshold, orientation=cfg.orientation, n_harmonics=cfg.n_harmonics,
                              lipschitz=self.op.lipschitz_bound())
        return net.to(self.device)

    def _loss(self, net, y, target, n_layers):
        if not self.relaxed or target is not None:
            return super()._loss(net, y, target, n_layers)
        x = net(y, n_layers=n_layers, post_threshold=False)
        return self.op.objective(y, x, self.config.lam).mean()


@dataclass
class Run:
    net: object
    history: list          # dicts of TrainingProgress (no "done" entry)
    seconds: float
    config: dict
    cached: bool


_KEY_FIELDS = {"architecture", "lam", "alpha", "threshold", "orientation", "n_harmonics", "lr", "epochs", "batch_size",
               "n_crops", "crop_size", "n_val_crops", "step2_new", "step2_old", "gamma", "shrink", "loss",
               "supervised_iterations", "flips", "preprocess", "preprocess_mode", "normalization", "seed"}


def train_run(ctx: Ctx, name: str, observations, psf, cfg: TrainingConfig, validation, data_key: str,
              absolute: bool = False, relaxed: bool = False) -> Run:
    """Train (or load from the cache) a layer-wise run. Runs that differ only in ``n_layers`` share an
    entry: layer-wise training is sequential, so the first m layers of a longer run are an m-layer run."""
    relaxed = relaxed and cfg.threshold == "lst"  # NST outputs are >= 0: post-threshold is a no-op
    # Fields added to TrainingConfig later enter the key only when they differ from their default,
    # so that cache entries survive new (default-off) options of the package.
    defaults = asdict(TrainingConfig())
    key_src = {k: v for k, v in asdict(cfg).items()
               if k not in ("n_layers", "preset_name") and (k in _KEY_FIELDS or v != defaults.get(k))}
    key_src.update(data=data_key, absolute=absolute, relaxed=relaxed)
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:12]
    stem = ctx.cache / f"{name}-{key}"
    meta_path, net_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if meta_path.is_file() and net_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["n_layers"] >= cfg.n_layers:
            net = load_cached_network(net_path, ctx.device)
            if net.n_layers > cfg.n_layers:
                net = net.truncated(cfg.n_layers)
            hist = [h for h in meta["history"] if h["layer"] <= cfg.n_layers]
            ctx.log(f"{name}: {cfg.n_layers} layers from the cache ({meta_path.name})")
            return Run(net, hist, hist[-1]["elapsed"], meta["config"], True)
    ctx.log(f"{name}: training {cfg.n_layers} layers ({cfg.architecture}, {cfg.threshold}, lr {cfg.lr:g}, "
            f"{'absolute' if absolute else 'relative'} step/threshold{', relaxed loss' if relaxed else ''})")
    trainer = VariantTrainer(observations, psf, copy.deepcopy(cfg), device=ctx.device,
                             validation_observations=validation, absolute=absolute, relaxed=relaxed)

    def report(p) -> None:
        if p.epoch == p.epochs:
            ctx.log(f"  {name}: {p.message}: train {p.train_loss:.5g} val {p.val_loss:.5g} ({p.elapsed:.0f} s)")

    net = trainer.run(report)
    hist = [h.to_dict() for h in trainer.history if h.stage != "done"]
    seconds = hist[-1]["elapsed"]
    ctx.cache.mkdir(parents=True, exist_ok=True)
    save_checkpoint(net, net_path)
    meta_path.write_text(json.dumps({"n_layers": cfg.n_layers, "history": hist, "config": asdict(cfg),
                                     "absolute": absolute, "relaxed": relaxed, "device": str(ctx.device)},
                                    default=_json_default))
    return Run(net, hist, seconds, asdict(cfg), False)


def load_cached_network(path: Path, device):
    """``load_checkpoint``, tolerant of cache entries written by an older version of the package
    (e.g. a buffer that has since become non-persistent): unknown tensors are dropped."""
    try:
        return load_checkpoint(path, device=device)
    except CheckpointError:
        from safetensors.torch import load_file

        config, metadata = read_checkpoint_metadata(path)
        tensors = load_file(str(path), device="cpu")
        net = build_network(config, tensors["psf"].numpy())
        wanted = net.state_dict()
        net.load_state_dict({k: v for k, v in tensors.items() if k in wanted}, strict=True)
        net.metadata = metadata
        return net.eval().to(device)


def layer_end(history: list) -> list[dict]:
    """The last progress entry of each layer (after its step 2, or step 1 for layer 1)."""
    ends = {}
    for h in history:
        ends[h["layer"]] = h
    return [ends[m] for m in sorted(ends)]


def steps_axis(history: list, cfg: dict) -> np.ndarray:
    per_epoch = math.ceil(cfg["n_crops"] / cfg["batch_size"])
    return per_epoch * np.arange(1, len(history) + 1)


def test_crops(observations, psf, cfg: TrainingConfig) -> np.ndarray:
    """Exactly the Trainer's validation crops (same normalisation, seed and crop positions)."""
    frames = prepare_observations([s.observation for s in observations] if hasattr(observations[0], "observation")
                                  else observations, psf.shape, C, cfg)
    return random_crops(frames, cfg.n_val_crops, cfg.crop_size, np.random.default_rng(cfg.seed + 1), False)


def mirror_symmetric(psf: np.ndarray, tol: float = 0.05) -> bool:
    return all(np.abs(psf - np.flip(psf, axis)).sum() <= tol * np.abs(psf).sum() for axis in (0, 1))


def train_crops(observations, psf, cfg: TrainingConfig) -> np.ndarray:
    """Exactly the Trainer's training crops (its first draw from ``default_rng(seed)``)."""
    frames = prepare_observations(observations, psf.shape, C, cfg)
    flips = cfg.flips and mirror_symmetric(psf)
    return random_crops(frames, cfg.n_crops, cfg.crop_size, np.random.default_rng(cfg.seed), flips)


# ----------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------


def fig6_settings(ctx: Ctx, args) -> dict:
    if ctx.quick:
        s = dict(obs_size=40, crop_size=24, n_crops=4, batch_size=2, epochs=2, n_val_crops=2, layers=3,
                 lista_layers=2, fista_ref=30)
    elif ctx.schedule == "paper":
        s = dict(obs_size=512, crop_size=96, n_crops=100, batch_size=20, epochs=500, n_val_crops=12, layers=10,
                 lista_layers=10, fista_ref=10000)
    else:
        s = dict(obs_size=256, crop_size=48, n_crops=20, batch_size=4, epochs=8, n_val_crops=12, layers=10,
                 lista_layers=4, fista_ref=2000)
    for k in ("obs_size", "crop_size", "n_crops", "batch_size", "epochs", "n_val_crops", "layers", "lista_layers"):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    return s


def fig6_config(ctx: Ctx, s: dict, lr: float = 1e-4, lam: float = DEFAULT_LAMBDA, **kw) -> TrainingConfig:
    return TrainingConfig.preset("quick-layerwise", lr=lr, epochs=s["epochs"], batch_size=s["batch_size"],
                                 n_crops=s["n_crops"], crop_size=s["crop_size"], n_val_crops=s["n_val_crops"],
                                 lam=lam, seed=ctx.seed, **kw)


def schedule_text(s: dict, cfg: TrainingConfig) -> str:
    steps = math.ceil(cfg.n_crops / cfg.batch_size) * cfg.epochs
    return (f"{cfg.n_crops} random {cfg.crop_size} x {cfg.crop_size} training crops (flips), batch {cfg.batch_size}, "
            f"{cfg.epochs} epochs = {steps} Adam steps per step 1 / step 2 of each layer (paper: 100 crops of 96, "
            f"batch 20, 500 epochs = 2500 steps); test loss on {cfg.n_val_crops} crops of the held-out observations; "
            f"shrink = {cfg.shrink}, gamma {cfg.gamma}, lam {cfg.lam}")


def fig7_settings(ctx: Ctx, args) -> dict:
    if ctx.quick:
        s = dict(obs_size=80, crop_size=24, n_crops=4, batch_size=2, epochs=1, n_val_crops=2, layers=2, lr=2e-3,
                 fista_iterations=40, folds=1, test_observations=1)
    elif ctx.schedule == "paper":
        s = dict(obs_size=512, crop_size=256, n_crops=100, batch_size=20, epochs=500, n_val_crops=12, layers=10,
                 lr=1e-4, fista_iterations=10000, folds=4, test_observations=3)
    else:
        s = dict(obs_size=512, crop_size=64, n_crops=32, batch_size=8, epochs=6, n_val_crops=4, layers=10, lr=2e-3,
                 fista_iterations=1000, folds=1, test_observations=1)
    for k in ("obs_size", "crop_size", "n_crops", "batch_size", "epochs", "n_val_crops", "layers", "lr",
              "fista_iterations", "folds", "test_observations"):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    s["momentum"] = bool(getattr(args, "momentum", False))
    return s


def fig7_config(ctx: Ctx, s: dict) -> TrainingConfig:
    extra = {"momentum": True} if s.get("momentum") else {}  # learned FISTA momentum (not in the paper)
    return TrainingConfig.preset("quick-layerwise", lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"],
                                 n_crops=s["n_crops"], crop_size=s["crop_size"], n_val_crops=s["n_val_crops"],
                                 n_layers=s["layers"], lam=DEFAULT_LAMBDA, seed=ctx.seed, **extra)


def get_model(ctx: Ctx, args, fold: int = 0):
    """``--model`` if given, else the fig7 SPoD-LST of ``fold`` (trained, or from the cache)."""
    if getattr(args, "model", None):
        net = load_checkpoint(args.model, device=ctx.device)
        return net, {"source": str(args.model), "layers": net.n_layers}
    s = fig7_settings(ctx, args)
    data = fold_data(ctx, s["obs_size"], fold)
    cfg = fig7_config(ctx, s)
    name = "fig7-spodnet-lst" + ("-momentum" if s["momentum"] else "")
    run = train_run(ctx, name, [d.observation for d in data.train], data.psf, cfg,
                    [d.observation for d in data.test], data.key)
    source = "fig7 SPoD-LST (this script" + (", learned FISTA momentum)" if s["momentum"] else ")")
    info = {"source": source, "layers": run.net.n_layers, "training_seconds": run.seconds,
            "schedule": schedule_text(s, cfg), "data": data.description, "cached": run.cached}
    return run.net.eval(), info


# ----------------------------------------------------------------------------------------------
# Figure 6b: generalisation, SPoD-LST vs ISTA-LST; model sizes
# ----------------------------------------------------------------------------------------------


def model_sizes(ctx: Ctx) -> list[dict]:
    psf = default_psf()  # always the 32 x 32 PSF of the paper's size claim
    rows = []
    nets = [("SPoD-LST, harmonic h (this project's default)", SPoDNet(psf, n_layers=10)),
            ("SPoD-LST, full length-c h (paper's form)", SPoDNet(psf, n_layers=10, orientation="full")),
            ("ISTA-LST (LISTA-Net, full c x c x a x b filters)", LISTANet(psf, n_layers=10))]
    folder = ctx.out / "model_sizes"
    for label, net in nets:
        path = save_checkpoint(net, folder / f"{net.architecture}-{getattr(net, 'orientation', 'full')}.safetensors")
        rows.append({"model": label, "parameters": count_parameters(net), "bytes": path.stat().st_size})
    return rows


def run_fig6b(ctx: Ctx, args) -> dict:
    s = fig6_settings(ctx, args)
    data = fold_data(ctx, s["obs_size"], args.fold)
    train_obs, test_obs = [d.observation for d in data.train], [d.observation for d in data.test]
    runs = {}
    for label, arch, layers in (("SPoD-LST", "spodnet", s["layers"]), ("ISTA-LST", "listanet", s["lista_layers"])):
        cfg = fig6_config(ctx, s, architecture=arch, threshold="lst", n_layers=layers)
        runs[label] = (cfg, train_run(ctx, f"fig6-{arch}-lst-relative", train_obs, data.psf, cfg, test_obs,
                                      data.key))
    cfg0 = runs["SPoD-LST"][0]
    op = SPoDOperator(data.psf, device=ctx.device)
    val = torch.as_tensor(test_crops(test_obs, data.psf, cfg0), device=ctx.device)
    trn = torch.as_tensor(train_crops(train_obs, data.psf, cfg0), device=ctx.device)
    n_max = max(s["layers"], s["lista_layers"])
    ista_test = ista(op, val, DEFAULT_LAMBDA, max_iter=n_max, tol=0).history.mean(axis=1)
    ista_train = ista(op, trn, DEFAULT_LAMBDA, max_iter=n_max, tol=0).history.mean(axis=1)
    fista_test = float(np.mean(fista(op, val, DEFAULT_LAMBDA, max_iter=s["fista_ref"], tol=0).objective))

    results = {"settings": s, "schedule": schedule_text(s, cfg0), "data": data.description,
               "machine": machine_description(ctx), "ista_test": ista_test.tolist(),
               "ista_train": ista_train.tolist(), "fista_test": fista_test, "runs": {}}
    for label, (cfg, run) in runs.items():
        ends = layer_end(run.history)
        results["runs"][label] = {"layers": [e["layer"] for e in ends], "train": [e["train_loss"] for e in ends],
                                  "test": [e["val_loss"] for e in ends], "seconds": run.seconds,
                                  "parameters": count_parameters(run.net), "cached": run.cached}
    results["model_sizes"] = model_sizes(ctx)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"SPoD-LST": "C0", "ISTA-LST": "C3"}
    for label, r in results["runs"].items():
        ax[0].plot(r["layers"], r["test"], "o-", color=colors[label], label=f"{label} test")
        ax[0].plot(r["layers"], r["train"], "s--", color=colors[label], alpha=0.6, label=f"{label} train")
        gap = np.array(r["test"]) / ista_test[: len(r["test"])]
        ax[1].plot(r["layers"], gap, "o-", color=colors[label], label=f"{label} test")
        gap_tr = np.array(r["train"]) / ista_train[: len(r["train"])]
        ax[1].plot(r["layers"], gap_tr, "s--", color=colors[label], alpha=0.6, label=f"{label} train")
    ax[0].plot(np.arange(1, n_max + 1), ista_test, ":", color="gray", label="ISTA, m iterations (test)")
    ax[0].axhline(fista_test, color="k", lw=0.8, ls="-.", label=f"FISTA {s['fista_ref']} it. (test)")
    ax[0].set(xlabel="layers trained (m)", ylabel="loss L (eq. 9)", yscale="log",
              title="(b) test loss after each added layer")
    ax[1].axhline(1.0, color="gray", ls=":")
    ax[1].set(xlabel="layers trained (m)", ylabel="loss / loss of m ISTA iterations",
              title="relative to the untrained network (m ISTA steps)")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    save_figure(ctx, fig, "fig6b")

    rows = []
    for label, r in results["runs"].items():
        for m, tr, te in zip(r["layers"], r["train"], r["test"]):
            rows.append([label, m, g(tr), g(tr / ista_train[m - 1], 3), g(te), g(te / ista_test[m - 1], 3),
                         g(ista_test[m - 1])])
    md = [f"Data: {data.description}. Schedule: {schedule_text(s, cfg0)}. lr 1e-4 (Opt1) for both networks. "
          f"Machine: {results['machine']}. Training time: "
          + ", ".join(f"{k} {v['seconds']:.0f} s ({v['layers'][-1]} layers)" for k, v in results["runs"].items())
          + f". FISTA ({s['fista_ref']} iterations) on the same test crops: {g(fista_test)}.", "",
          md_table(["network", "layers", "train loss", "train / ISTA(m)", "test loss", "test / ISTA(m)",
                            "ISTA(m) test"], rows), "",
          "Model sizes (10 layers, 32 x 32 PSF, `save_checkpoint`, safetensors with JSON header):", "",
          md_table(["model", "parameters", "file size"],
                   [[r["model"], f"{r['parameters']:,}", _size(r["bytes"])] for r in results["model_sizes"]])]
    write_outputs(ctx, "fig6b", results, "\n".join(md))
    return results


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


# ----------------------------------------------------------------------------------------------
# Figure 6a: training curves, LST vs NST, in two parameterisations
# ----------------------------------------------------------------------------------------------

FIG6A_VARIANTS = {
    # name: (title, absolute, relaxed, runs [(label, architecture, threshold, lr)])
    "ours": ("(a) this project: step/threshold as multipliers of ISTA's, loss after post-threshold",
             False, False,
             [("SPoD-LST", "spodnet", "lst", 1e-4), ("ISTA-LST", "listanet", "lst", 1e-4),
              ("SPoD-LST", "spodnet", "lst", 1e-3), ("SPoD-NST", "spodnet", "nst", 1e-3),
              ("SPoD-NST", "spodnet", "nst", 1e-4), ("SPoD-NST", "spodnet", "nst", 1e-5)]),
    "paper": ("(b) paper's reading: absolute step/threshold, loss before post-threshold, data x {scale:g}",
              True, True,
              [("SPoD-LST", "spodnet", "lst", 1e-4), ("SPoD-LST", "spodnet", "lst", 1e-3),
               ("SPoD-NST", "spodnet", "nst", 1e-3), ("SPoD-NST", "spodnet", "nst", 1e-4),
               ("SPoD-NST", "spodnet", "nst", 1e-5)]),
    "paper-post": ("(c) as (b), but the loss after the post-threshold (as this project trains)",
                   True, False,
                   [("SPoD-LST", "spodnet", "lst", 1e-4), ("SPoD-LST", "spodnet", "lst", 1e-3),
                    ("SPoD-NST", "spodnet", "nst", 1e-4)]),
}


def run_fig6a(ctx: Ctx, args) -> dict:
    s = fig6_settings(ctx, args)
    s["layers"] = 3
    scale = args.scale
    data = fold_data(ctx, s["obs_size"], args.fold)
    train_raw, test_raw = [d.observation for d in data.train], [d.observation for d in data.test]
    # The paper-reading variants see the normalised data times ``scale`` (normalisation switched off,
    # lam scaled with it so that the optimisation problem is the same up to a factor scale^2).
    train_scaled = [scale * normalized(o) for o in train_raw]
    test_scaled = [scale * normalized(o) for o in test_raw]
    off = {"enabled": False, "low": 25.0, "high": 99.9}
    variants = [v for v in FIG6A_VARIANTS if v in args.variants]
    results = {"settings": s, "scale": scale, "data": data.description, "machine": machine_description(ctx),
               "variants": {}}
    for vname in variants:
        title, absolute, relaxed, runs = FIG6A_VARIANTS[vname]
        out = results["variants"][vname] = {"title": title.format(scale=scale), "runs": []}
        for label, arch, thr, lr in runs:
            if arch == "listanet" and args.no_lista:
                continue
            if absolute:
                cfg = fig6_config(ctx, s, architecture=arch, threshold=thr, lr=lr, n_layers=3,
                                  lam=DEFAULT_LAMBDA * scale, normalization=off)
                tr, te, unit = train_scaled, test_scaled, scale ** 2
                key = data.key + f"-scaled{scale:g}"
                name = f"fig6-{arch}-{thr}-absolute"
            else:
                cfg = fig6_config(ctx, s, architecture=arch, threshold=thr, lr=lr, n_layers=3)
                tr, te, unit = train_raw, test_raw, 1.0
                key, name = data.key, f"fig6-{arch}-{thr}-relative"
            run = train_run(ctx, name, tr, data.psf, cfg, te, key, absolute=absolute, relaxed=relaxed)
            # Diagnostics on the held-out crops, always with the post-threshold (a feasible output).
            val = torch.as_tensor(test_crops(te, data.psf, cfg), device=ctx.device)
            op = SPoDOperator(data.psf, device=ctx.device)
            with torch.no_grad():
                x = run.net.recover(val)
                test_loss = float(op.objective(val, x, cfg.lam).mean()) / unit
                nonzero = float((x > 0).float().mean())
                zero_loss = float(op.objective(val, torch.zeros_like(x), cfg.lam).mean()) / unit
            trn = torch.as_tensor(train_crops(tr, data.psf, cfg), device=ctx.device)
            with torch.no_grad():
                zero_train = float(op.objective(trn, torch.zeros(trn.shape[0], C, *op.image_shape(trn.shape),
                                                                 device=ctx.device), cfg.lam).mean()) / unit
            ends = layer_end(run.history)
            train_curve = [h["train_loss"] / unit for h in run.history]
            final = train_curve[-1]
            stalled = nonzero == 0.0 or abs(final - zero_train) <= 1e-3 * zero_train
            out["runs"].append({
                "label": f"{label} ({lr:g})", "architecture": arch, "threshold": thr, "lr": lr,
                "steps": steps_axis(run.history, run.config).tolist(), "train_curve": train_curve,
                "stage": [f"{h['layer']}{h['stage']}" for h in run.history],
                "layer_end_train": [e["train_loss"] / unit for e in ends], "test_loss": test_loss,
                "zero_image_train_loss": zero_train, "zero_image_test_loss": zero_loss,
                "nonzero_fraction": nonzero, "stalled": bool(stalled), "seconds": run.seconds,
                "cached": run.cached})

    fig, axes = plt.subplots(1, len(variants), figsize=(6.2 * len(variants), 4.4), squeeze=False)
    styles = {"SPoD-LST": "-", "ISTA-LST": "-", "SPoD-NST": "--"}
    colors = {("SPoD-LST", 1e-4): "C0", ("SPoD-LST", 1e-3): "C9", ("ISTA-LST", 1e-4): "C3",
              ("SPoD-NST", 1e-3): "C1", ("SPoD-NST", 1e-4): "C2", ("SPoD-NST", 1e-5): "C4"}
    for ax, vname in zip(axes[0], variants):
        v = results["variants"][vname]
        bounds = None
        for r in v["runs"]:
            name = r["label"].split(" (")[0]
            ax.plot(r["steps"], r["train_curve"], styles[name], color=colors.get((name, r["lr"]), "k"),
                    label=r["label"] + (" stalled" if r["stalled"] else ""), lw=1.3)
            if bounds is None:
                st = r["stage"]
                bounds = [(r["steps"][i - 1], st[i]) for i in range(1, len(st)) if st[i] != st[i - 1]]
        if v["runs"]:
            ax.axhline(v["runs"][0]["zero_image_train_loss"], color="k", lw=0.8, ls=":", label="loss of x = 0")
        for b, st in bounds or []:
            ax.axvline(b, color="gray", lw=0.5, alpha=0.6)
        ax.set(xlabel="Adam steps (layers 1-3; grey lines: next stage)", ylabel="training loss (eq. 9, / scale^2)",
               yscale="log", title=v["title"])
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save_figure(ctx, fig, "fig6a")

    md = [f"Data: {data.description}. Schedule: {schedule_text(s, fig6_config(ctx, s))}. Three layers "
          f"(step 1 of layer 1; steps 1 and 2 of layers 2 and 3). Paper-reading variants: data scaled by "
          f"{scale:g} after normalisation, lam = {DEFAULT_LAMBDA * scale:g}; losses divided by scale^2. "
          f"Machine: {results['machine']}.", ""]
    for vname in variants:
        v = results["variants"][vname]
        md += [f"**{v['title']}**", "",
               md_table(["network (lr)", "train loss after layer 1", "layer 2", "layer 3", "test loss (3 layers)",
                         "non-zero outputs", "stalled"],
                        [[r["label"], *[g(x) for x in r["layer_end_train"]], g(r["test_loss"]),
                          f"{100 * r['nonzero_fraction']:.2f} %", "yes" if r["stalled"] else "no"]
                         for r in v["runs"]]), ""]
        if v["runs"]:
            md[-2] += f"\n\nLoss of the zero image: train {g(v['runs'][0]['zero_image_train_loss'])}, " \
                      f"test {g(v['runs'][0]['zero_image_test_loss'])}."
    write_outputs(ctx, "fig6a", results, "\n".join(md))
    return results


# ----------------------------------------------------------------------------------------------
# Figure 7 (and 8): SPoD-Net vs FISTA on held-out patches
# ----------------------------------------------------------------------------------------------


def run_fig7(ctx: Ctx, args) -> dict:
    s = fig7_settings(ctx, args)
    psf = experiment_psf(ctx)
    op = SPoDOperator(psf, device=ctx.device)
    lam = DEFAULT_LAMBDA
    patches, models = [], []
    for fold in range(s["folds"]):
        net, info = get_model(ctx, args, fold)
        models.append(info)
        data = fold_data(ctx, s["obs_size"], fold)
        half = s["obs_size"] // 2
        a, b = psf.shape
        for k, sim in enumerate(data.test[: s["test_observations"]]):
            y_full = normalized(sim.observation)  # normalise the whole observation, then cut 4 patches
            for r0 in (0, half):
                for c0 in (0, half):
                    patches.append({"fold": fold, "observation": k, "origin": (r0, c0), "net": net,
                                    "y": y_full[:, r0:r0 + half, c0:c0 + half],
                                    "truth": sim.truth[:, r0:r0 + half + a - 1, c0:c0 + half + b - 1]})
    ctx.log(f"fig7: {len(patches)} patches of {half} x {half}; FISTA {s['fista_iterations']} iterations each")
    untrained = SPoDNet.from_operator(op, n_layers=models[0]["layers"], alpha=0.0, threshold="nst")
    rows = []
    for i, p in enumerate(patches):
        y = torch.as_tensor(p["y"], device=ctx.device)
        net = p["net"]
        net.recover(y)  # warm-up (spectra, allocator)
        holder = {}
        net_s = best_time(lambda: holder.__setitem__("x", net.recover(y)), 3, ctx.device)
        x_net = holder["x"]
        l_net = float(op.objective(y, x_net, lam))
        l_ista = float(op.objective(y, untrained.recover(y), lam))
        l_zero = float(op.objective(y, torch.zeros_like(x_net), lam))
        stamps = []
        sync(ctx.device)
        t0 = time.perf_counter()
        res = fista(op, y, lam, max_iter=s["fista_iterations"], tol=0, step=args.fista_step,
                    callback=lambda it, f, x: stamps.append(time.perf_counter()))
        hist = np.asarray(res.history, dtype=np.float64).reshape(-1)
        secs = np.asarray(stamps) - t0
        hit = np.nonzero(hist <= l_net)[0]
        reach_it = int(hit[0]) + 1 if hit.size else None
        reach_s = float(secs[hit[0]]) if hit.size else None
        rows.append({"patch": i, "fold": p["fold"], "observation": p["observation"], "origin": p["origin"],
                     "net_objective": l_net, "net_seconds": net_s, "net_layers": net.n_layers, "ista_objective": l_ista,
                     "zero_objective": l_zero, "fista_history": hist.tolist(), "fista_seconds": secs.tolist(),
                     "fista_final": float(hist[-1]), "fista_iterations": int(hist.size),
                     "reach_iterations": reach_it, "reach_seconds": reach_s,
                     "speedup": (reach_s / net_s) if reach_s else None})
        ctx.log(f"  patch {i}: SPoD-Net L={l_net:.6g} ({net_s:.3f} s); FISTA final {hist[-1]:.6g} "
                f"({secs[-1]:.1f} s); reaches SPoD-Net after {reach_it} it. ({reach_s} s)")
        if i == 0:
            images = {"y": p["y"], "truth": p["truth"], "net": x_net.cpu().numpy(), "fista": res.x.cpu().numpy()}

    results = {"settings": s, "models": models, "machine": machine_description(ctx), "lam": lam,
               "fista_step": args.fista_step, "patches": rows}
    _plot_fig7(ctx, rows, s)
    _plot_fig8(ctx, images)

    def q(v):
        return [r[v] for r in rows]

    reach = [r["reach_iterations"] for r in rows]
    checkpoints = [c for c in (10, 100, 1000) if c < s["fista_iterations"]]
    table = []
    for r in rows:
        h = r["fista_history"]
        table.append([r["patch"], g(r["zero_objective"]), g(r["ista_objective"]), g(r["net_objective"]),
                      *[g(h[c - 1]) for c in checkpoints], g(r["fista_final"]),
                      g(100 * (r["net_objective"] / r["fista_final"] - 1), 3),
                      r["reach_iterations"] or f"> {r['fista_iterations']}",
                      g(r["reach_seconds"], 3), g(r["net_seconds"], 3), g(r["speedup"], 3)])
    fista_it_s = float(np.mean([r["fista_seconds"][-1] / r["fista_iterations"] for r in rows]))
    summary = {
        "mean_net_objective": float(np.mean(q("net_objective"))),
        "mean_fista_final": float(np.mean(q("fista_final"))),
        "mean_excess_percent": float(np.mean([100 * (r["net_objective"] / r["fista_final"] - 1) for r in rows])),
        "median_reach_iterations": float(np.median([v for v in reach if v])) if any(reach) else None,
        "all_reached": all(reach),
        "mean_net_seconds": float(np.mean(q("net_seconds"))),
        "fista_seconds_per_iteration": fista_it_s,
        "fista_seconds_for_1000_iterations": 1000 * fista_it_s,
    }
    results["summary"] = summary
    m0 = models[0]
    md = [f"Model: {m0['source']}, {m0['layers']} layers" + (f"; {m0.get('schedule')}" if m0.get("schedule") else "")
          + (f"; trained in {m0['training_seconds']:.0f} s" if m0.get("training_seconds") else "") + ". "
          f"Test: {len(rows)} patches of {s['obs_size'] // 2} x {s['obs_size'] // 2} x {C} ({s['folds']} fold(s), "
          f"{s['test_observations']} held-out {s['obs_size']} x {s['obs_size']} observation(s) per fold, each "
          f"normalised, then cut into 4 patches); the paper: 48 patches (4 folds x 3 observations x 4). FISTA "
          f"(step = '{args.fista_step}', adaptive restart) {s['fista_iterations']} iterations per patch"
          f"{'' if s['fista_iterations'] >= 10000 else ' (paper: 10 000; fewer on CPU)'}; lam {lam}. "
          f"Machine: {results['machine']}.", "",
          md_table(["patch", "L(0)", "L ISTA, 10 it. (untrained net)", "L SPoD-Net",
                    *[f"L FISTA {c} it." for c in checkpoints], f"L FISTA {s['fista_iterations']} it.",
                    "SPoD-Net excess %", "FISTA it. to reach SPoD-Net", "FISTA s to reach", "SPoD-Net s",
                    "speed-up"], table), "",
          f"Mean SPoD-Net objective {g(summary['mean_net_objective'])} vs FISTA {s['fista_iterations']} it. "
          f"{g(summary['mean_fista_final'])} (excess {summary['mean_excess_percent']:.3g} %); median FISTA "
          f"iterations to reach SPoD-Net {summary['median_reach_iterations']}; SPoD-Net "
          f"{summary['mean_net_seconds']:.3g} s per patch, FISTA {1000 * fista_it_s:.3g} s per 1000 iterations."]
    write_outputs(ctx, "fig7", results, "\n".join(md))
    return results


def _plot_fig7(ctx: Ctx, rows: list, s: dict) -> None:
    n = min(len(r["fista_history"]) for r in rows)
    its = np.arange(1, n + 1)
    hist = np.array([r["fista_history"][:n] for r in rows])
    secs = np.array([r["fista_seconds"][:n] for r in rows])
    net_l = np.array([r["net_objective"] for r in rows])
    ista_l = np.array([r["ista_objective"] for r in rows])
    net_s = np.array([r["net_seconds"] for r in rows])
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.3))
    ax[0].plot(its, hist.mean(0), color="C1", label=f"FISTA (mean of {len(rows)} patches)")
    ax[0].axhline(net_l.mean(), color="C0", ls="--", label=f"SPoD-Net, {rows[0]['net_layers']} layers")
    ax[0].axhline(ista_l.mean(), color="gray", ls=":", label="untrained network (= ISTA, same depth)")
    ax[0].set(xscale="log", yscale="log", xlabel="FISTA iterations", ylabel="test loss L (eq. 9)",
              title="(a) objective vs FISTA iterations")
    ax[1].plot(secs.mean(0), hist.mean(0), color="C1", label="FISTA")
    ax[1].plot([net_s.mean()], [net_l.mean()], "*", ms=14, color="C0", label="SPoD-Net (one forward pass)")
    ax[1].axhline(net_l.mean(), color="C0", ls="--", lw=0.8)
    ax[1].set(xscale="log", yscale="log", xlabel=f"seconds ({'GPU' if ctx.gpu else 'CPU, 1 thread'})",
              ylabel="test loss L", title="(b) objective vs wall time")
    best = np.minimum(hist.min(1), net_l)
    for k, r in enumerate(rows):
        color = f"C{k % 10}"
        ax[2].plot(its, (hist[k] - best[k]) / best[k] + 1e-12, color=color, lw=0.8)
        ax[2].axhline((net_l[k] - best[k]) / best[k] + 1e-12, color=color, ls="--", lw=0.8)
    ax[2].set(xscale="log", yscale="log", xlabel="FISTA iterations",
              ylabel="(L - L_best) / L_best", title="(c) per patch: FISTA (solid) vs SPoD-Net (dashed)")
    for a in ax:
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7) if a is not ax[2] else None
    save_figure(ctx, fig, "fig7")


def _plot_fig8(ctx: Ctx, images: dict) -> None:
    y, truth, xn, xf = images["y"], images["truth"], images["net"], images["fista"]
    fig, ax = plt.subplots(2, 4, figsize=(15, 7.6))

    def show(a, img, title):
        a.imshow(img, cmap="gray", vmin=0, vmax=max(np.percentile(img, 99.8), 1e-12))
        a.set_title(title, fontsize=9)
        a.axis("off")

    show(ax[0, 0], y[0], "observation, polarization image t = 0")
    show(ax[0, 1], xf[0], "FISTA, orientation channel 0")
    show(ax[0, 2], xn[0], "SPoD-Net, orientation channel 0")
    show(ax[0, 3], truth[0], "ground truth, channel 0")
    ax[1, 0].imshow(np.clip(y.sum(0) / np.percentile(y.sum(0), 99.8), 0, 1), cmap="gray")
    ax[1, 0].set_title("observation, sum of 18 images", fontsize=9)
    ax[1, 0].axis("off")
    for a, img, title in ((ax[1, 1], xf, "FISTA"), (ax[1, 2], xn, "SPoD-Net"), (ax[1, 3], truth, "ground truth")):
        a.imshow(orientation_composite(img.sum(0), orientation_map(img)))
        a.set_title(f"{title}: intensity, hue = dipole angle", fontsize=9)
        a.axis("off")
    save_figure(ctx, fig, "fig8")


# ----------------------------------------------------------------------------------------------
# speed and memory
# ----------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _workload(what: str, op: SPoDOperator, y: torch.Tensor, layers: int, model_path: str | None, device):
    """A callable for one measurement: SPoD-Net forward (harmonic / full h), FISTA iteration, direct iteration."""
    if what in ("net_harmonic", "net_full"):
        if what == "net_harmonic" and model_path:
            net = load_checkpoint(model_path, device=device)
        else:
            net = SPoDNet.from_operator(op, n_layers=layers,
                                        orientation="harmonic" if what == "net_harmonic" else "full")
        return lambda: net.recover(y)
    if what == "fista_iteration":
        return lambda: fista(op, y, DEFAULT_LAMBDA, max_iter=3, tol=0)
    if what == "direct_iteration":
        x = torch.zeros((*y.shape[:-2], *op.image_shape(y.shape)), device=device)

        def run():
            with torch.no_grad():
                direct_adjoint(direct_forward(x, op.psf, C) - y, op.psf, C)
        return run
    raise ValueError(what)


def memprobe(spec: dict) -> dict:
    """Peak memory of one workload, in a fresh process (ru_maxrss high-water mark delta), or on the GPU."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    psf = gaussian_psf(7, 1.0) if spec["quick_psf"] else default_psf()
    op = SPoDOperator(psf, device=device)
    gen = torch.Generator().manual_seed(0)
    y = torch.rand((C, spec["size"], spec["size"]), generator=gen).to(device)
    fn = _workload(spec["what"], op, y, spec["layers"], spec.get("model"), device)
    if device.type == "cuda":
        fn()  # one warm-up, then measure the steady-state peak
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, "kind": "cuda allocator"}
    import gc

    gc.collect()
    if _reset_peak_rss() and _proc_status_mb("VmHWM") is not None:
        # Peak RSS since a reset just before the workload, minus the RSS at that moment.
        before = _proc_status_mb("VmRSS")
        fn()
        return {"peak_mb": _proc_status_mb("VmHWM") - before, "baseline_mb": before,
                "kind": "peak RSS (VmHWM after a reset) minus RSS before, fresh process"}
    before = _maxrss_mb()
    fn()
    return {"peak_mb": _maxrss_mb() - before, "baseline_mb": before, "kind": "ru_maxrss delta, fresh process"}


def measure_memory(ctx: Ctx, what: str, size: int, layers: int, model_path: str | None) -> dict:
    spec = {"what": what, "size": size, "layers": layers, "threads": ctx.threads, "device": str(ctx.device),
            "quick_psf": ctx.quick, "model": model_path}
    if ctx.gpu:
        return memprobe(spec)
    # A fixed mmap threshold: large buffers are mapped and unmapped, not recycled from memory freed
    # during start-up, so the resident-set growth measures the workload.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, str(SCRIPT), "_memprobe", json.dumps(spec)], capture_output=True,
                          text=True, timeout=900, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed_settings(ctx: Ctx, args) -> dict:
    if ctx.quick:
        s = dict(sizes=[40, 64], repeats=1, fista_timed=3, reach_max=300, direct_repeats=1, frames=2,
                 batch=2, memory="some")
    else:
        s = dict(sizes=[256, 512], repeats=3, fista_timed=10, reach_max=5000, direct_repeats=1,
                 frames=100 if ctx.gpu else 8, batch=8 if ctx.gpu else 4, memory="all")
    for k in ("sizes", "repeats", "frames", "memory"):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    return s


def run_speed(ctx: Ctx, args) -> dict:
    s = speed_settings(ctx, args)
    net, model_info = get_model(ctx, args)
    model_path = ctx.out / "speed_model.safetensors"
    save_checkpoint(net, model_path)
    layers = net.n_layers
    psf = net.psf.cpu().numpy()
    op = SPoDOperator(psf, device=ctx.device)
    full = SPoDNet.from_operator(op, n_layers=layers, orientation="full")
    lam = net.lam
    rows = []
    for size in s["sizes"]:
        sim = simulated(ctx, size, 500 + size)
        y = torch.as_tensor(normalized(sim.observation), device=ctx.device)
        net.recover(y)
        full.recover(y)
        holder = {}
        t_net = best_time(lambda: holder.__setitem__("x", net.recover(y)), s["repeats"], ctx.device)
        t_full = best_time(lambda: full.recover(y), s["repeats"], ctx.device)
        l_net = float(op.objective(y, holder["x"], lam))
        fista(op, y, lam, max_iter=2, tol=0)  # warm-up
        sync(ctx.device)
        res = fista(op, y, lam, max_iter=s["fista_timed"], tol=0)
        sync(ctx.device)
        t_iter = res.seconds / res.iterations
        reach = fista(op, y, lam, max_iter=s["reach_max"], tol=0,
                      callback=lambda it, f, x: bool(float(f) <= l_net))
        reached = bool(reach.cancelled)
        with torch.no_grad():
            y_direct = direct_forward(holder["x"], op.psf, C)
            rel = float((y_direct - op.forward(holder["x"])).norm() / y_direct.norm())
        direct_fn = _workload("direct_iteration", op, y, layers, None, ctx.device)
        t_direct = best_time(direct_fn, s["direct_repeats"], ctx.device)
        row = {"size": size, "net_seconds": t_net, "net_full_seconds": t_full, "fista_iteration_seconds": t_iter,
               "net_objective": l_net, "reach_iterations": reach.iterations if reached else None,
               "reach_seconds": reach.seconds if reached else None, "reach_cap": s["reach_max"],
               "direct_iteration_seconds": t_direct, "direct_vs_fft_rel_diff": rel}
        ctx.log(f"speed {size}: net {t_net:.3f} s, full-h {t_full:.3f} s, FISTA it {t_iter * 1e3:.1f} ms, "
                f"reach {row['reach_iterations']} it ({row['reach_seconds']} s), direct it {t_direct:.2f} s")
        mem = {}
        probes = ["net_harmonic", "net_full", "fista_iteration", "direct_iteration"]
        if s["memory"] == "some":
            probes = probes[:1] if size == s["sizes"][0] else []
        elif s["memory"] == "none":
            probes = []
        for what in probes:
            mem[what] = measure_memory(ctx, what, size, layers, str(model_path) if what == "net_harmonic" else None)
            ctx.log(f"  memory {what} {size}: {mem[what]['peak_mb']:.1f} MB")
        row["memory"] = mem
        rows.append(row)

    # Time-lapse throughput at the largest size.
    size = s["sizes"][-1]
    raw = simulated(ctx, size, 500 + size).observation
    series = np.stack([raw] * s["frames"])
    recover(series[: min(2, s["frames"])], method="spodnet", model=net, device=ctx.device, batch_size=s["batch"],
            compute_objective=False)  # warm-up
    res = recover(series, method="spodnet", model=net, device=ctx.device, batch_size=s["batch"],
                  compute_objective=False)
    throughput = {"frames": s["frames"], "size": size, "seconds": res.seconds, "fps": s["frames"] / res.seconds,
                  "batch_size": s["batch"]}
    fista_fps = {r["size"]: (1.0 / r["reach_seconds"] if r["reach_seconds"] else None) for r in rows}
    ctx.log(f"throughput: {throughput['fps']:.3g} observations/s ({s['frames']} frames of {size}^2)")

    results = {"settings": s, "model": model_info, "machine": machine_description(ctx), "rows": rows,
               "throughput": throughput, "fista_fps_at_net_quality": fista_fps}
    _plot_speed(ctx, rows)
    t_rows = []
    for r in rows:
        ratio = (r["reach_seconds"] / r["net_seconds"]) if r["reach_seconds"] else None
        t_rows.append([f"{r['size']}² x {C}", g(r["net_seconds"], 3), g(r["net_full_seconds"], 3),
                       g(r["net_full_seconds"] / r["net_seconds"], 3), g(1e3 * r["fista_iteration_seconds"], 3),
                       g(r["net_seconds"] / r["fista_iteration_seconds"], 3),
                       r["reach_iterations"] or f"> {r['reach_cap']}", g(r["reach_seconds"], 3), g(ratio, 3),
                       g(r["direct_iteration_seconds"], 3),
                       g(r["direct_iteration_seconds"] / r["fista_iteration_seconds"], 3)])
    m_rows = []
    for r in rows:
        if r["memory"]:
            m = r["memory"]
            m_rows.append([f"{r['size']}² x {C}"] + [g(m[k]["peak_mb"], 3) if k in m else "n/a"
                                                      for k in ("net_harmonic", "net_full", "fista_iteration",
                                                                "direct_iteration")])
    kind = rows[0]["memory"] and next(iter(rows[0]["memory"].values()))["kind"]
    md = [f"Model: {model_info['source']} ({layers} layers). Machine: {results['machine']}. Times are the best of "
          f"{s['repeats']} runs (FISTA: mean over {s['fista_timed']} iterations after a warm-up; the direct "
          f"iteration: {s['direct_repeats']} run). lam {lam}. The direct formulation agrees with the FFT operator "
          f"to {max(r['direct_vs_fft_rel_diff'] for r in rows):.1e} (relative).", "",
          md_table(["observation", "SPoD-Net s (harmonic h)", "SPoD-Net s (full h)", "full / harmonic",
                    "FISTA ms / iteration", "SPoD-Net in FISTA iterations", "FISTA it. to reach SPoD-Net",
                    "FISTA s to reach", "speed-up", "direct conv. s / iteration", "direct / FFT iteration"], t_rows)]
    if m_rows:
        md += ["", f"Peak memory above the inputs, MB ({kind}):", "",
               md_table(["observation", "SPoD-Net (harmonic h)", "SPoD-Net (full h)", "FISTA", "direct iteration"],
                        m_rows)]
    md += ["", f"Time-lapse: {throughput['frames']} frames of {size}² x {C} through `core.recover.recover` "
               f"(batch {throughput['batch_size']}, normalisation and transfer included): "
               f"{throughput['seconds']:.3g} s, **{throughput['fps']:.3g} observations/s**"
               + (f"; FISTA to the same objective: {fista_fps[size]:.3g} observations/s." if fista_fps.get(size)
                  else ".")]
    write_outputs(ctx, "speed", results, "\n".join(md))
    return results


def _plot_speed(ctx: Ctx, rows: list) -> None:
    labels = ["SPoD-Net\n(harmonic h)", "SPoD-Net\n(full h)", "1 FISTA\niteration", "FISTA to\nSPoD-Net's L",
              "1 direct\niteration"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        vals = [r["net_seconds"], r["net_full_seconds"], r["fista_iteration_seconds"], r["reach_seconds"] or np.nan,
                r["direct_iteration_seconds"]]
        ax.bar(np.arange(len(vals)) + k * width, vals, width, label=f"{r['size']}² x {C}")
    ax.set_xticks(np.arange(len(labels)) + width * (len(rows) - 1) / 2, labels, fontsize=8)
    ax.set(yscale="log", ylabel=f"seconds ({'GPU' if ctx.gpu else 'CPU, 1 thread'})", title="Recovery cost")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    save_figure(ctx, fig, "speed")


# ----------------------------------------------------------------------------------------------
# against the ground truth
# ----------------------------------------------------------------------------------------------


def truth_metrics(x: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR/SSIM of the intensity (sum over channels) and per channel, after a least-squares scale factor
    fitted on the intensity (recovered images are in normalised units); orientation error where the truth
    has signal, weighted by the truth intensity."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    t_int, x_int = truth.sum(0), x.sum(0)
    denom = float((x_int * x_int).sum())
    scale = float((x_int * t_int).sum()) / denom if denom > 0 else 0.0
    xs = scale * x
    rng_int = float(t_int.max())
    rng_ch = float(truth.max())
    out = {"scale": scale,
           "psnr_intensity": float(peak_signal_noise_ratio(t_int, xs.sum(0), data_range=rng_int)),
           "ssim_intensity": float(structural_similarity(t_int, xs.sum(0), data_range=rng_int)),
           "psnr_channels": float(np.mean([peak_signal_noise_ratio(truth[k], xs[k], data_range=rng_ch)
                                           for k in range(truth.shape[0])])),
           "ssim_channels": float(np.mean([structural_similarity(truth[k], xs[k], data_range=rng_ch)
                                           for k in range(truth.shape[0])]))}
    signal = t_int > 0.01 * np.percentile(t_int[t_int > 0], 99.9) if (t_int > 0).any() else t_int > 0
    diff = np.abs(orientation_map(x) - orientation_map(truth))
    diff = np.minimum(diff, np.pi - diff)
    w = t_int[signal]
    out["orientation_error_deg"] = float(np.degrees((diff[signal] * w).sum() / w.sum()))
    out["signal_fraction"] = float(signal.mean())
    return out


def truth_settings(ctx: Ctx, args) -> dict:
    if ctx.quick:
        s = dict(size=40, photons=[50, 1000], fista_iterations=20)
    else:
        s = dict(size=256, photons=[50, 200, 1000], fista_iterations=500)
    for k in ("photons", "fista_iterations"):
        v = getattr(args, k, None)
        if v is not None:
            s[k] = v
    if getattr(args, "truth_size", None):
        s["size"] = args.truth_size
    return s


def run_truth(ctx: Ctx, args) -> dict:
    s = truth_settings(ctx, args)
    net, model_info = get_model(ctx, args)
    psf = net.psf.cpu().numpy()
    op = SPoDOperator(psf, device=ctx.device)
    lam = net.lam
    untrained = SPoDNet.from_operator(op, n_layers=net.n_layers, alpha=0.0, threshold="nst")
    methods = [f"FISTA {s['fista_iterations']} it.", f"FISTA {net.n_layers} it.", f"ISTA {net.n_layers} it.",
               "SPoD-Net"]
    shipped = None
    if not getattr(args, "model", None) and DEFAULT_MODEL_PATH.is_file():
        shipped = load_checkpoint(DEFAULT_MODEL_PATH, device=ctx.device)
        if shipped.psf_shape != psf.shape or not np.allclose(shipped.psf.cpu().numpy(), psf, atol=1e-6):
            shipped = None  # quick mode (other PSF)
        else:
            methods.append("SPoD-Net (shipped default model)")
            model_info["shipped"] = {"path": str(DEFAULT_MODEL_PATH.relative_to(REPO)),
                                     "training": shipped.metadata.get("training", {}).get("config")}
    results = {"settings": s, "model": model_info, "machine": machine_description(ctx), "rows": []}
    gallery = None
    for photons in s["photons"]:
        sim = simulated(ctx, s["size"], 1000 + s["size"], photons)  # held out: training used seeds < 1000
        y = torch.as_tensor(normalized(sim.observation), device=ctx.device)
        xs = {methods[0]: fista(op, y, lam, max_iter=s["fista_iterations"], tol=0).x,
              methods[1]: fista(op, y, lam, max_iter=net.n_layers, tol=0).x,
              methods[2]: untrained.recover(y),
              methods[3]: net.recover(y)}
        if shipped is not None:
            xs[methods[4]] = shipped.recover(y)
        for name, x in xs.items():
            row = {"photons": photons, "method": name, "objective": float(op.objective(y, x, lam)),
                   **truth_metrics(x.cpu().numpy(), sim.truth)}
            results["rows"].append(row)
        ctx.log(f"truth: {photons} photons done")
        if gallery is None or photons == 200:
            gallery = (photons, sim.truth, {k: v.cpu().numpy() for k, v in xs.items()})
    _plot_truth(ctx, results["rows"], methods, s)
    _plot_truth_images(ctx, gallery, methods)
    rows = [[r["photons"], r["method"], g(r["objective"]), g(r["psnr_intensity"], 3), g(r["ssim_intensity"], 3),
             g(r["psnr_channels"], 3), g(r["ssim_channels"], 3), g(r["orientation_error_deg"], 3)]
            for r in results["rows"]]
    md = [f"Held-out {s['size']} x {s['size']} x {C} observations (seed {1000 + s['size']}, same structures at "
          f"every photon count, background 2 photons, read noise 2), normalised; model: {model_info['source']} "
          f"(trained at 200 photons, used unchanged at every photon count)"
          + ("; also the shipped default model (`src/napari_spodnet/models/default.safetensors`, trained by "
             "`scripts/train_default_model.py`: 6 observations of 192 x 192, 20 epochs of 32 crops of 64, lr 2e-3)"
             if shipped is not None else "") + ". Recovered images are compared after "
          f"a least-squares scale factor fitted on the intensity (sum over channels) of each recovery; PSNR "
          f"with the truth's peak as data range; per-channel values are means over the {C} orientation "
          f"channels; orientation error: |angle difference| (mod 180 deg) of `orientation_map`, weighted by the "
          f"true intensity over pixels with true intensity > 1 % of its 99.9th percentile. "
          f"Machine: {results['machine']}.", "",
          md_table(["photons", "method", "objective L", "PSNR intensity dB", "SSIM intensity",
                    "PSNR per channel dB", "SSIM per channel", "orientation error deg"], rows, align="llrrrrrr")]
    write_outputs(ctx, "truth", results, "\n".join(md))
    return results


def _plot_truth(ctx: Ctx, rows: list, methods: list, s: dict) -> None:
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.8))
    keys = [("psnr_intensity", "PSNR intensity (dB)"), ("ssim_intensity", "SSIM intensity"),
            ("ssim_channels", "SSIM per orientation channel"), ("orientation_error_deg", "orientation error (deg)")]
    for a, (k, label) in zip(ax, keys):
        for i, m in enumerate(methods):
            pts = [(r["photons"], r[k]) for r in rows if r["method"] == m]
            a.plot(*zip(*pts), "o-", color=f"C{i}", label=m)
        a.set(xscale="log", xlabel="photons in the brightest pixel", ylabel=label)
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    save_figure(ctx, fig, "truth")


def _plot_truth_images(ctx: Ctx, gallery, methods: list) -> None:
    photons, truth, xs = gallery
    h, w = truth.shape[-2:]
    sl = (slice(h // 4, h // 4 + h // 2), slice(w // 4, w // 4 + w // 2))
    panels = [("ground truth", truth)] + [(m, xs[m]) for m in methods]
    fig, ax = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8))
    for a, (title, img) in zip(ax, panels):
        img = img[(slice(None),) + sl]
        a.imshow(orientation_composite(img.sum(0), orientation_map(img)))
        a.set_title(f"{title} ({photons} photons)", fontsize=8)
        a.axis("off")
    save_figure(ctx, fig, "truth_images")


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

COMMANDS = {"fig6a": run_fig6a, "fig6b": run_fig6b, "fig7": run_fig7, "speed": run_speed, "truth": run_truth}
ALL_ORDER = ["fig6b", "fig6a", "fig7", "truth", "speed"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=REPO / "out" / "benchmarks",
                        help="folder for figures, JSON, tables and the cache (default out/benchmarks)")
    common.add_argument("--figures", type=Path, default=None, help="also copy the PNGs here (e.g. docs/figures)")
    common.add_argument("--cache", type=Path, default=None, help="trained-run cache (default OUT/cache)")
    common.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    common.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    common.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    common.add_argument("--schedule", choices=("cpu", "paper"), default="cpu",
                        help="'cpu': reduced sizes (default); 'paper': the paper's schedule (GPU hours)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--fold", type=int, default=0, help="held-out group 0-3 for fig6a/fig6b")
    common.add_argument("--model", type=Path, default=None,
                        help="checkpoint for fig7/speed/truth (default: the fig7 model, trained or cached)")
    # training schedules (override the chosen schedule)
    for name, typ in (("obs-size", int), ("crop-size", int), ("n-crops", int), ("batch-size", int),
                      ("epochs", int), ("n-val-crops", int), ("layers", int), ("lista-layers", int),
                      ("lr", float)):
        common.add_argument(f"--{name}", type=typ, default=None)
    # fig6a
    common.add_argument("--scale", type=float, default=1e-3,
                        help="fig6a: intensity scale of the data in the paper-reading variants (default 1e-3)")
    common.add_argument("--variants", nargs="+", default=list(FIG6A_VARIANTS), choices=list(FIG6A_VARIANTS))
    common.add_argument("--no-lista", action="store_true", help="fig6a: skip ISTA-LST")
    # fig7
    common.add_argument("--fista-iterations", type=int, default=None)
    common.add_argument("--fista-step", default="bound", choices=("bound", "power", "backtracking"))
    common.add_argument("--momentum", action="store_true",
                        help="fig7/speed/truth: train the model with learned FISTA momentum (not in the paper)")
    common.add_argument("--folds", type=int, default=None)
    common.add_argument("--test-observations", type=int, default=None)
    # speed
    common.add_argument("--sizes", type=int, nargs="+", default=None)
    common.add_argument("--repeats", type=int, default=None)
    common.add_argument("--frames", type=int, default=None, help="speed: time-lapse length T")
    common.add_argument("--memory", choices=("all", "some", "none"), default=None)
    # truth
    common.add_argument("--photons", type=float, nargs="+", default=None)
    common.add_argument("--truth-size", type=int, default=None)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in [*COMMANDS, "all"]:
        sub.add_parser(name, parents=[common])
    return parser


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_memprobe":  # internal: one memory measurement in a fresh process
        print(json.dumps(memprobe(json.loads(argv[1]))))
        return {}
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA GPU is available")
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(out=args.out, figures=args.figures, cache=args.cache or args.out / "cache", device=device,
              quick=args.quick, schedule=args.schedule, seed=args.seed, threads=max(1, args.threads))
    ctx.log(f"{args.command}: {machine_description(ctx)}; out {ctx.out}")
    names = ALL_ORDER if args.command == "all" else [args.command]
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = COMMANDS[name](ctx, args)
        results[name]["wall_seconds"] = time.perf_counter() - t0
        ctx.log(f"{name} finished in {results[name]['wall_seconds']:.0f} s")
    return results if args.command == "all" else results[args.command]


if __name__ == "__main__":
    main()
