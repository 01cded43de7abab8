"""Train the SPoD-Net that ships with napari-spodnet (reproducible; CPU by default).

    python scripts/train_default_model.py [--device cuda] [--out src/napari_spodnet/models/default.safetensors]

Synthetic training data: ``--observations`` simulated observations (seeds 100, 101, ...)
of ``--size`` pixels with the default (Airy) PSF, at the default photon count. The
held-out evaluation uses seed 7 and is printed at the end.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_spodnet.core.checkpoint import save_checkpoint
from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.preprocess import fit_normalization
from napari_spodnet.core.simulate import default_psf, simulate
from napari_spodnet.core.solvers import fista
from napari_spodnet.core.training import Trainer, TrainingConfig

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "napari_spodnet" / "models" / "default.safetensors"

#: The shipped model's schedule: between the quick preset and the paper's (a few CPU minutes).
DEFAULT_MODEL_SETTINGS = dict(n_layers=10, epochs=20, n_crops=32, batch_size=8, crop_size=64, lr=2e-3, n_val_crops=4,
                              momentum=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--observations", type=int, default=6)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    psf = default_psf()
    observations = [simulate((args.size, args.size), psf=psf, seed=100 + i).observation
                    for i in range(args.observations)]
    config = TrainingConfig.preset("quick", **DEFAULT_MODEL_SETTINGS)
    trainer = Trainer(observations, psf, config, device=args.device)

    def report(p) -> None:
        if p.epoch == p.epochs:
            print(f"{p.message}: train {p.train_loss:.6g} val {p.val_loss:.6g} ({p.elapsed:.0f} s)", flush=True)

    net = trainer.run(report)
    net.metadata.update(name="default", description="10-layer SPoD-Net (harmonic h, learned FISTA momentum), "
                        "synthetic filaments and puncta, default Airy PSF (NA 1.2, 520 nm, 65 nm pixels)",
                        script="scripts/train_default_model.py", training_observations=args.observations,
                        training_size=args.size)
    path = save_checkpoint(net.cpu(), args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.1f} kB)")

    # Held-out check: excess objective against 3000 FISTA iterations.
    test = simulate((256, 256), psf=psf, seed=7)
    y = torch.as_tensor(fit_normalization(test.observation).apply(test.observation))
    op = SPoDOperator(psf)
    start = time.perf_counter()
    x = net.cpu().recover(y)
    net_s = time.perf_counter() - start
    ref = fista(op, y, net.lam, max_iter=3000, tol=0)
    l_net = float(op.objective(y, x, net.lam))
    l_zero = float(op.objective(y, torch.zeros_like(x), net.lam))
    excess = (l_net - ref.objective) / (l_zero - ref.objective)
    reach = int(np.argmax(ref.history <= l_net)) + 1 if (ref.history <= l_net).any() else None
    print(f"held-out 256x256: excess objective {excess:.4f}; FISTA needs {reach} iterations "
          f"({(reach or 0) * ref.seconds / 3000:.3f} s) to match SPoD-Net ({net_s:.3f} s)")


if __name__ == "__main__":
    main()
