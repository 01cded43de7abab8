"""Train the SPoD-Net that ships with napari-spodnet (reproducible; CPU by default).

The shipped model (session 17) is two runs of this script:

    python scripts/train_default_model.py --dense-epochs 0 --out base.safetensors    # stage 1: 300 epochs
    python scripts/train_default_model.py --init base.safetensors --epochs 60 --lr-scale 0.2 --dense-epochs 0 \
        --data half-clusters --out src/napari_spodnet/models/default.safetensors      # stage 2: fine-tune

Stage 1 is the session-15 shipped model, kept as ``tests/data/default_model_v3.safetensors``
(835 s on one CPU thread); stage 2 took 139 s. ``--device cuda`` runs either on a GPU. (The shipped
file was made before fine-tuning returned the network with the lowest validation loss rather than
the last one; its validation loss fell at every report up to the last epoch.)

Without ``--dense-epochs 0`` the ``standard`` preset ends with its dense stage (session 18: 60 epochs
at 0.2x the rates with half the crops simulated dense clusters, validation likewise), the one-run
equivalent of stage 2: ``python scripts/train_default_model.py --out X`` (888 s). It was not shipped:
median 120 FISTA iterations on the held-out cases against the shipped model's 114, but 13 against
58 on textures at 50 photons (docs/results.md, "Session 18").

Stage 1 recipe: the ``standard`` preset (``core.training.PRESETS``): 10 layers starting as 10 FISTA steps with a
Wiener-like Fourier preconditioner,
per-layer step, threshold, momentum and preconditioner (regularisation, radial profile) learned in log space,
all layers trained together on the objective, fresh crops every epoch. Synthetic training data:
``--observations`` simulated observations (seeds 100, 101, ...) of ``--size`` pixels with the
default (Airy) PSF, at 50, 200 and 1000 photons in turn. Validation: seeds 90-92. The held-out
check (seed 7, 256 x 256, each photon count) is printed at the end; the full comparison on held-out
structure families is ``benchmarks/spodnet_vs_fista.py``.

Variants for experiments (docs/results.md, section 0, "Session 15"): ``--data varied`` draws filament
and punctum densities (1-8 and 4-250 per 128 x 128) and photons (30-2000) per observation;
``--truth-weight W`` mixes the error against the simulated ground truth into the loss;
``--layers``, ``--epochs`` and ``--log-loss`` override the preset. None of them beat the shipped recipe.
Session 16 (docs/results.md, "Session 16"): ``--seed``, ``--objective-power``, ``--intensity-jitter``,
``--noise-adaptive``, ``--deep-supervision`` and ``--data with-clusters`` (every fourth observation from
the clusters family); none beat it either. Session 17 ("Session 17"): ``--init`` and ``--lr-scale``
(fine-tuning a trained network: stage 2 above), ``--teacher-iterations`` (distillation to FISTA's
solution), ``--excursion-bound`` and ``--data half-clusters`` / ``clusters``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint
from napari_spodnet.core.compare import compare_at_equal_objective
from napari_spodnet.core.families import simulate_family
from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.preprocess import fit_normalization
from napari_spodnet.core.simulate import default_psf, simulate
from napari_spodnet.core.solvers import fista
from napari_spodnet.core.training import Trainer, TrainingConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "napari_spodnet" / "models" / "default.safetensors"
PHOTONS = (50.0, 200.0, 1000.0)


def teacher(observation, psf, iterations: int, lam: float) -> np.ndarray:
    """FISTA's solution after ``iterations`` on the whole normalised observation, in camera units (c, h, w)."""
    norm = fit_normalization(observation)
    y = torch.as_tensor(norm.apply(observation.astype(np.float32)))
    return fista(SPoDOperator(psf), y, lam, max_iter=iterations, tol=0).x.numpy() * np.float32(norm.scale)


def training_observation(kind: str, size: int, psf, index: int):
    """Training observation ``index`` (seed 100 + index): a SimulatedObservation, (18, size, size) counts."""
    if kind == "simulate" or (kind == "with-clusters" and index % 4 != 3):
        return simulate((size, size), psf=psf, seed=100 + index, photons=PHOTONS[index % 3])
    if kind == "half-clusters" and index % 2 == 0:
        return simulate((size, size), psf=psf, seed=100 + index, photons=PHOTONS[index % 3])
    if kind in ("clusters", "half-clusters"):  # every (or every second) observation from the clusters family
        return simulate_family("clusters", (size, size), psf=psf, seed=100 + index, photons=PHOTONS[index % 3])
    if kind == "with-clusters":  # every fourth observation: dense puncta clusters (core.families)
        return simulate_family("clusters", (size, size), psf=psf, seed=100 + index, photons=PHOTONS[index % 3])
    # "varied": densities and photons log-uniform, drawn from their own seed so observation i is reproducible
    rng = np.random.default_rng(5000 + index)
    area = size * size / (128 * 128)
    n_filaments = max(1, int(round(np.exp(rng.uniform(np.log(1), np.log(8))) * area)))
    n_puncta = max(1, int(round(np.exp(rng.uniform(np.log(4), np.log(250))) * area)))
    photons = float(np.exp(rng.uniform(np.log(30), np.log(2000))))
    return simulate((size, size), psf=psf, seed=100 + index, n_filaments=n_filaments, n_puncta=n_puncta,
                    photons=photons)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--observations", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the preset's)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the preset's)")
    parser.add_argument("--data", default="simulate",
                        choices=("simulate", "varied", "with-clusters", "half-clusters", "clusters"),
                        help="training data: simulate's defaults, densities and photons drawn per observation, or "
                             "simulate with every fourth (half-clusters: second) observation from the clusters "
                             "family, or clusters only "
                             "(validation then on clusters too)")
    parser.add_argument("--log-loss", action="store_true",
                        help="train on the mean log objective (weighs bright and dim crops alike)")
    parser.add_argument("--truth-weight", type=float, default=0.0,
                        help="weight of the ground-truth error in the loss (0: the objective alone)")
    parser.add_argument("--teacher-iterations", type=int, default=0,
                        help="with --truth-weight: the target is FISTA's solution after this many iterations "
                             "(distillation, no ground truth needed) instead of the simulated truth")
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune this checkpoint (warm start) instead of starting from 10 FISTA steps")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply the preset's learning rates (fine-tuning with --init wants a small one)")
    parser.add_argument("--excursion-bound", type=float, default=0.0,
                        help="penalise intermediate layers' objectives above this fraction of the zero image's")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="epochs of the dense stage (TrainingConfig.dense_stage_epochs; default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (crops, order; default: the preset's)")
    parser.add_argument("--noise-adaptive", action="store_true",
                        help="schedule linear in the measured noise level (TrainingConfig.noise_adaptive)")
    parser.add_argument("--deep-supervision", type=float, default=0.0,
                        help="weight decay of earlier layers' objectives (TrainingConfig.deep_supervision; 0: off)")
    parser.add_argument("--objective-power", type=float, default=1.0,
                        help="train on the mean objective ** p (TrainingConfig.objective_power; 1: the mean)")
    parser.add_argument("--intensity-jitter", type=float, default=0.0,
                        help="scale training crops by exp(U(-j, j)) (TrainingConfig.intensity_jitter)")
    parser.add_argument("--relative-loss", type=float, default=None, metavar="P",
                        help="train on each crop's excess objective over FISTA's, in units of FISTA's excess after "
                             "100 iterations, to the power P (TrainingConfig.relative_loss, relative_power); 0: the "
                             "mean objective (default: the preset's)")
    parser.add_argument("--stability-bound", type=float, default=None, metavar="B",
                        help="penalise a schedule whose linear transfer amplifies an image mode more than B times "
                             "(TrainingConfig.stability_bound; 0: off; default: the preset's)")
    args = parser.parse_args(argv)
    if args.teacher_iterations and not args.truth_weight:
        parser.error("--teacher-iterations needs --truth-weight (the weight of the distillation term)")
    if args.init and args.init.resolve() == args.out.resolve():
        parser.error("--out may not be the checkpoint given to --init (it would be overwritten)")
    torch.set_num_threads(args.threads)

    psf = default_psf()
    sims = [training_observation(args.data, args.size, psf, i) for i in range(args.observations)]
    validation = [simulate_family("clusters", (args.size, args.size), psf=psf, seed=90 + i, photons=p)
                  if args.data == "clusters" else simulate((args.size, args.size), psf=psf, seed=90 + i, photons=p)
                  for i, p in enumerate(PHOTONS)]
    overrides = {k: v for k, v in (("n_layers", args.layers), ("epochs", args.epochs),
                                   ("dense_stage_epochs", args.dense_epochs)) if v is not None}
    if args.log_loss:
        overrides["log_loss"] = True
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.noise_adaptive:
        overrides["noise_adaptive"] = True
    if args.deep_supervision:
        overrides["deep_supervision"] = args.deep_supervision
    if args.objective_power != 1:
        overrides["objective_power"] = args.objective_power
    if args.intensity_jitter:
        overrides["intensity_jitter"] = args.intensity_jitter
    if args.excursion_bound:
        overrides["excursion_bound"] = args.excursion_bound
    if args.relative_loss == 0:
        overrides["relative_loss"] = False
    elif args.relative_loss is not None:
        overrides.update(relative_loss=True, relative_power=args.relative_loss)
    if args.stability_bound is not None:
        overrides["stability_bound"] = args.stability_bound
    if args.truth_weight:
        overrides["truth_weight"] = args.truth_weight
        overrides.setdefault("dense_stage_epochs", 0)  # simulated dense crops have no truth
    config = TrainingConfig.preset(args.preset, **overrides)
    if args.lr_scale != 1:
        config = config.with_rates_scaled(args.lr_scale)
    truths = val_truths = None
    if args.truth_weight:
        truths, val_truths = [s.truth for s in sims], [s.truth for s in validation]
        if args.teacher_iterations:
            truths, val_truths = ([teacher(s.observation, psf, args.teacher_iterations, config.lam) for s in group]
                                  for group in (sims, validation))
    initial = load_checkpoint(args.init) if args.init else None
    trainer = Trainer([s.observation for s in sims], psf, config, device=args.device,
                      validation_observations=[s.observation for s in validation],
                      truths=truths, validation_truths=val_truths, initial=initial)

    def report(p) -> None:
        if p.epoch == 0:  # a stage's news (its preparation), no losses yet
            print(p.message, flush=True)
        elif p.epoch % 10 == 0 or p.stage == "done":
            print(f"{p.message}: train {p.train_loss:.6g} val {p.val_loss:.6g} ({p.elapsed:.0f} s)", flush=True)

    net = trainer.run(report)
    data = {"simulate": "filaments and puncta at 50/200/1000 photons",
            "varied": "filaments and puncta of varied density at 30-2000 photons",
            "with-clusters": "filaments and puncta, every fourth observation dense puncta clusters, at 50/200/1000 "
                             "photons",
            "half-clusters": "filaments and puncta, every second observation dense puncta clusters, at 50/200/1000 "
                             "photons",
            "clusters": "dense puncta clusters at 50/200/1000 photons"}[args.data]
    net.metadata.update(name="default", description=f"{net.n_layers}-layer SPoD-Net (harmonic h, Wiener-like "
                        "preconditioned step, learned log-space step/threshold/"
                        "momentum/preconditioner schedule), trained end to end on synthetic "
                        f"{data}, default Airy PSF (NA 1.2, 520 nm, 65 nm pixels)"
                        + (f"; then {config.dense_stage_epochs} epochs with half the crops from simulated dense "
                           "puncta clusters" if trainer.config.dense_stage_epochs else ""),
                        script="scripts/train_default_model.py", preset=args.preset,
                        training_observations=args.observations, training_size=args.size,
                        training_data=args.data, log_loss=args.log_loss,
                        relative_power=config.relative_power if config.relative_loss else None,
                        truth_weight=args.truth_weight, teacher_iterations=args.teacher_iterations)
    if initial is not None:  # the stage before: what this run fine-tuned, and what that cost
        before = initial.metadata.get("training", {})
        net.metadata.update(fine_tuned_from={
            "file": args.init.name, "description": initial.metadata.get("description"),
            "training_data": initial.metadata.get("training_data"), "seconds": before.get("seconds"),
            "preset": initial.metadata.get("preset")}, lr_scale=args.lr_scale,
            description=f"{initial.metadata.get('description') or 'a trained SPoD-Net'}; then fine-tuned end to end "
                        f"at {args.lr_scale:g}x "
                        f"the rates on synthetic {data}")
    path = save_checkpoint(net.cpu(), args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} kB) after {trainer.history[-1].elapsed:.0f} s")

    op = SPoDOperator(psf)
    for photons in PHOTONS:
        test = simulate((256, 256), psf=psf, seed=7, photons=photons)
        y = torch.as_tensor(fit_normalization(test.observation).apply(test.observation))
        net.recover(y)  # warm-up (filter spectra)
        start = time.perf_counter()
        x = net.recover(y)
        net_s = time.perf_counter() - start
        ref = fista(op, y, net.lam, max_iter=600, tol=0)
        cmp = compare_at_equal_objective(float(op.objective(y, x, net.lam)), net_s, ref.history, ref.times)
        print(f"held-out 256x256, {photons:g} photons: " + cmp.summary())


if __name__ == "__main__":
    main()
