"""Train the SPoD-Net that ships with napari-spodnet (reproducible; CPU by default).

    python scripts/train_default_model.py [--device cuda] [--out src/napari_spodnet/models/default.safetensors]

Recipe: the ``standard`` preset (``core.training.PRESETS``): 10 layers starting as 10 FISTA steps with a
Wiener-like Fourier preconditioner,
per-layer step, threshold, momentum and preconditioner (regularisation, radial profile) learned in log space,
all layers trained together on the objective, fresh crops every epoch. Synthetic training data:
``--observations`` simulated observations (seeds 100, 101, ...) of ``--size`` pixels with the
default (Airy) PSF, at 50, 200 and 1000 photons in turn. Validation: seeds 90-92. The held-out
check (seed 7, 256 x 256, each photon count) is printed at the end; the full comparison on held-out
structure families is ``benchmarks/spodnet_vs_fista.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_spodnet.core.checkpoint import save_checkpoint
from napari_spodnet.core.compare import compare_at_equal_objective
from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.preprocess import fit_normalization
from napari_spodnet.core.simulate import default_psf, simulate
from napari_spodnet.core.solvers import fista
from napari_spodnet.core.training import Trainer, TrainingConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "napari_spodnet" / "models" / "default.safetensors"
PHOTONS = (50.0, 200.0, 1000.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--observations", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    psf = default_psf()
    observations = [simulate((args.size, args.size), psf=psf, seed=100 + i, photons=PHOTONS[i % 3]).observation
                    for i in range(args.observations)]
    validation = [simulate((args.size, args.size), psf=psf, seed=90 + i, photons=p).observation
                  for i, p in enumerate(PHOTONS)]
    config = TrainingConfig.preset(args.preset)
    trainer = Trainer(observations, psf, config, device=args.device, validation_observations=validation)

    def report(p) -> None:
        if p.epoch % 10 == 0 or p.stage == "done":
            print(f"{p.message}: train {p.train_loss:.6g} val {p.val_loss:.6g} ({p.elapsed:.0f} s)", flush=True)

    net = trainer.run(report)
    net.metadata.update(name="default", description="10-layer SPoD-Net (harmonic h, Wiener-like preconditioned step, "
                        "learned log-space step/threshold/"
                        "momentum/preconditioner schedule), trained end to end on synthetic "
                        "filaments and puncta at 50/200/1000 photons, default Airy PSF (NA 1.2, 520 nm, 65 nm pixels)",
                        script="scripts/train_default_model.py", preset=args.preset,
                        training_observations=args.observations, training_size=args.size)
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
