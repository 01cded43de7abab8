"""The ``spodnet`` command: the same engine as the napari plugin, headless.

    spodnet demo [--headless]                      # sample data -> FISTA and SPoD-Net, side by side
    spodnet simulate -o DIR [--size N] [--frames T]
    spodnet fista OBS.tif --psf PSF.tif -o OUT.tif [--lam L] [--iterations N]
    spodnet train OBS.tif [OBS.tif ...] --psf PSF.tif --preset quick -o MODEL.safetensors
    spodnet recover OBS.tif [--model MODEL] [--psf PSF.tif] -o OUT.tif

Errors reach the user as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

EXIT_ERROR = 2


class _Progress:
    """A one-line text progress bar on stderr (no-op when not a terminal and ``quiet``)."""

    def __init__(self, label: str, quiet: bool = False):
        self.label, self.quiet, self.last = label, quiet, -1.0

    def __call__(self, fraction: float, message: str = "", news: bool = False) -> None:
        # On a terminal redraw one line; in a log write a line per quarter. ``news`` (a stage starting)
        # is shown whatever the fraction, since it would otherwise fall between two throttled updates.
        tty = sys.stderr.isatty()
        if self.quiet or (not news and ((fraction - self.last < (0.01 if tty else 0.25) and fraction < 1.0)
                                        or (fraction >= 1.0 and self.last >= 1.0))):
            return
        if not news:  # news leaves the quarter steps of the log where they were
            self.last = fraction
        if not tty:
            sys.stderr.write(f"{self.label}: {fraction:5.1%} {message}\n")
            return
        bar = "#" * int(30 * fraction)
        end = "\n" if fraction >= 1.0 else ""
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:5.1%} {message[:40]:<40}{end}")
        sys.stderr.flush()


def _recovery_progress(label, quiet):
    bar = _Progress(label, quiet)

    def callback(p):
        bar(p.fraction, p.message)
        return False

    return callback, bar


def _write_result(path, result, extra: dict, axes_single="CYX") -> Path:
    from .io import write_stack

    image = result.image
    axes = axes_single if image.ndim == 3 else "TCYX"
    meta = {"method": result.method, "lambda": result.lam, "seconds": round(result.seconds, 4),
            "objective": result.objective if np.ndim(result.objective) == 0 else list(map(float, result.objective)),
            "translate": list(result.translate), "normalization": {"offset": result.normalization.offset,
                                                                   "scale": result.normalization.scale},
            **result.info, **extra}
    return write_stack(path, image, axes=axes, metadata=meta)


def _same_file(a, b) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _check_output(output, inputs, what="output") -> None:
    """Refuse, before any work, an output that is one of the inputs (same path, hard link or
    symlink) or that cannot be written (a folder, or a path below a file)."""
    from .core.validation import SPoDInputError

    out = os.path.expanduser(os.fspath(output))
    for item in inputs:
        if item is not None and _same_file(out, os.path.expanduser(os.fspath(item))):
            raise SPoDInputError(f"the {what} {out} is the input file {item}; choose another output name "
                                 "(the input would be overwritten).")
    # An OME-Zarr output is a folder by design (the streamed writer replaces it atomically).
    if os.path.isdir(out) and not out.rstrip("/\\").endswith(".zarr"):
        raise SPoDInputError(f"the {what} {out} is a folder; give a file name.")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SPoDInputError(f"cannot write {out}: {parent} is a file, not a folder.")


def _check_values(args) -> None:
    """Finite, in-range numeric options (argparse's float accepts 'nan' and 'inf')."""
    from .core.validation import SPoDInputError

    rules = {"lam": (0, None), "tol": (0, None), "lr": (0, None, True), "alpha": (0, 1), "photons": (0, None, True),
             "iterations": (1, None), "layers": (1, 1000), "epochs": (1, None), "crops": (1, None),
             "crop_size": (8, None), "batch_size": (1, None), "tile": (1, None), "n_channels": (2, 10_000),
             "size": (8, None), "frames": (1, None), "check_iterations": (1, None)}
    for name, rule in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        low, high, strict = rule[0], rule[1], len(rule) > 2
        bad = not np.isfinite(value) or (value <= low if strict else value < low) or (high is not None and value > high)
        if bad:
            bound = f"> {low}" if strict else f">= {low}"
            raise SPoDInputError(f"--{name.replace('_', '-')} must be a finite number {bound}"
                                 f"{f' and <= {high}' if high is not None else ''}, got {value}.")


def _load_observation(path, n_channels, memmap=True, axis=None):
    from .io import read_observation

    return read_observation(path, n_channels=n_channels, memmap=memmap, axis=axis).data


def cmd_simulate(args) -> int:
    from .core.simulate import simulate, simulate_time_series
    from .io import write_stack

    from .core.validation import SPoDInputError

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SPoDInputError(f"{out} is a file; simulate writes a folder of TIFFs, give a folder name.")
    out.mkdir(parents=True, exist_ok=True)
    shape = (args.size, args.size)
    if args.frames > 1:
        sim = simulate_time_series(args.frames, shape, seed=args.seed, photons=args.photons)
        axes = "TCYX"
    else:
        sim = simulate(shape, seed=args.seed, photons=args.photons)
        axes = "CYX"
    meta = {"source": "spodnet simulate", "seed": args.seed, "photons": args.photons}
    write_stack(out / "observation.tif", sim.observation, axes=axes, metadata=meta)
    write_stack(out / "psf.tif", sim.psf, axes="YX", metadata={"kind": "psf"})
    write_stack(out / "truth.tif", sim.truth, axes=axes, metadata={**meta, "kind": "ground truth"})
    print(f"wrote {out / 'observation.tif'} {tuple(sim.observation.shape)}, psf.tif {tuple(sim.psf.shape)}, "
          f"truth.tif {tuple(sim.truth.shape)}")
    return 0


def cmd_fista(args) -> int:
    from .io import read_psf

    _check_output(args.output, [args.observation, args.psf])
    psf = read_psf(args.psf)
    return _stream_recovery(args, "FISTA", dict(psf=psf, method="fista", lam=args.lam, iterations=args.iterations,
                                                tol=args.tol, restart=not args.no_restart,
                                                normalize=not args.no_normalize),
                            {"iterations": args.iterations, "psf_shape": list(psf.shape)})


def cmd_recover(args) -> int:
    from .io import read_psf

    _check_output(args.output, [args.observation, args.psf, args.model])
    psf = read_psf(args.psf) if args.psf else None
    metadata = {"model": str(args.model or "default")}
    if args.check:
        from .core.recover import CHECK_ITERATIONS, check_against_fista

        data = _load_observation(args.observation, args.n_channels, memmap=True, axis=args.axis)
        check = check_against_fista(data, psf, model=args.model,
                                    iterations=args.check_iterations or CHECK_ITERATIONS, device=args.device,
                                    n_channels=args.n_channels)
        print("\n".join(check.lines()), flush=True)
        metadata["check"] = check.as_dict()
    return _stream_recovery(args, "SPoD-Net", dict(psf=psf, method="spodnet", model=args.model), metadata)


def _stream_recovery(args, label: str, settings: dict, extra_metadata: dict) -> int:
    """Shared by ``recover`` and ``fista``: frames are read, recovered and written one batch at a
    time (memory flat in the series length), to a partial output that ``--resume`` continues."""
    from .stream import parse_outputs, partial_path, recover_to_file

    outputs = parse_outputs(args.only)
    bar = _Progress(label, args.quiet)

    def on_progress(p):
        bar(p.fraction, p.line())
        return False

    try:
        summary = recover_to_file(args.observation, args.output, outputs=outputs, resume=args.resume,
                                  scheduler=args.scheduler, batch_size=getattr(args, "batch_size", None),
                                  n_channels=args.n_channels, axis=args.axis, progress=on_progress,
                                  metadata=extra_metadata, device=args.device, tile=args.tile, **settings)
    except KeyboardInterrupt:
        print(f"\nthe frames finished so far are kept in {partial_path(Path(args.output))}: run the same command "
              "with --resume to continue", file=sys.stderr)
        raise
    resumed = f" ({summary.skipped} frames from an earlier run)" if summary.skipped else ""
    fista = summary.info.get("fista_iterations")
    iterations = f", iterations {fista if len(fista) > 1 else fista[0]}" if fista else ""
    objective = summary.objective[0] if summary.frames == 1 else summary.objective
    print(f"{label}: {summary.seconds:.2f} s, {summary.computed} frames{resumed}, objective {_fmt(objective)}"
          f"{iterations}, wrote {', '.join(map(str, summary.paths))}")
    return 0


def cmd_train(args) -> int:
    from .core.checkpoint import save_checkpoint
    from .core.training import UNCHANGED_MESSAGE, Trainer, TrainingConfig, loss_unit
    from .io import read_psf

    sources = [*args.observations, args.psf] + ([args.fine_tune] if args.fine_tune not in (None, "default") else [])
    _check_output(args.output, sources, what="checkpoint")
    observations = [_load_observation(p, args.n_channels, memmap=False, axis=args.axis) for p in args.observations]
    psf = read_psf(args.psf)
    overrides = {k: v for k, v in dict(lam=args.lam, n_layers=args.layers, epochs=args.epochs, lr=args.lr,
                                       crop_size=args.crop_size, n_crops=args.crops, batch_size=args.batch_size,
                                       alpha=args.alpha, seed=args.seed, orientation=args.orientation,
                                       dense_stage_epochs=args.dense_epochs,
                                       architecture=args.architecture, preprocess=args.preprocess or None,
                                       momentum=not args.no_momentum).items()
                 if v is not None}
    config = TrainingConfig.preset(args.preset, **overrides)
    initial = None
    if args.fine_tune:
        from .core.checkpoint import load_checkpoint
        from .core.recover import DEFAULT_MODEL_PATH

        initial = load_checkpoint(DEFAULT_MODEL_PATH if args.fine_tune == "default" else args.fine_tune)
        # fine-tuning adapts the network to the user's own data: no dense stage unless asked for
        config = config.for_fine_tuning(dense_stage_epochs=args.dense_epochs or 0)
    trainer = Trainer(observations, psf, config, device=args.device, n_channels=args.n_channels, initial=initial)
    bar = _Progress("training", args.quiet)
    try:
        # epoch 0 is a stage's news (the dense stage's preparation), not an epoch with a new loss
        net = trainer.run(lambda update: bar(update.fraction, update.message if update.epoch == 0 else
                                             f"{update.message} loss {update.train_loss:.4g}",
                                             news=update.epoch == 0))
    except KeyboardInterrupt:
        net = trainer.finish_cancelled()
        print("\ninterrupted: saving the best model so far", file=sys.stderr)
    net.metadata["name"] = Path(args.output).stem
    net.metadata["psf_source"] = str(args.psf)
    path = save_checkpoint(net, args.output)
    summary = net.metadata["training"]
    print(f"trained {net.n_layers} layers in {summary['seconds']:.1f} s on {summary['device']}: "
          f"validation loss {summary['best_val_loss']:.6g} ({loss_unit(trainer.config)}); wrote {path} "
          f"({path.stat().st_size / 1024:.1f} kB)")
    if trainer.unchanged:
        print(f"note: {UNCHANGED_MESSAGE.split(': ', 1)[1]} (try more epochs, or data the model does not yet "
              "recover well)")
    return 0


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if np.ndim(value) == 0:
        return f"{float(value):.6g}"
    return f"mean {np.nanmean(value):.6g} over {len(value)} frames"


def _has_display() -> bool:
    if sys.platform.startswith(("win", "darwin")):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_demo(args) -> int:
    if not args.headless and _has_display():
        return _demo_gui(args)
    if not args.headless:
        print("No display found: running the headless demo (files instead of a napari window; "
              "use --headless to choose this explicitly).")
    return demo_headless(Path(args.output), size=args.size, seed=args.seed, iterations=args.iterations,
                         device=args.device)


def _demo_gui(args) -> int:
    import napari

    from .widgets import run_demo_in_viewer

    print("Opening napari with the SPoD sample data and the four napari-spodnet widgets ...")
    viewer = napari.Viewer(title="napari-spodnet demo")
    run_demo_in_viewer(viewer)
    if args.no_block:
        return 0
    napari.run()
    return 0


def demo_headless(out: Path, size: int = 256, seed: int = 0, iterations: int = 1000, device=None) -> int:
    """Simulate, recover with FISTA and the shipped SPoD-Net, write TIFFs and a side-by-side PNG."""
    from .core.recover import DEFAULT_MODEL_PATH, recover
    from .core.simulate import simulate

    out.mkdir(parents=True, exist_ok=True)
    sim = simulate((size, size), seed=seed)
    print(f"simulated a {size} x {size} x {sim.observation.shape[0]} SPoD observation (seed {seed}), "
          f"PSF {sim.psf.shape[0]} x {sim.psf.shape[1]}")
    rows = []
    results = {}
    if DEFAULT_MODEL_PATH.is_file():
        net_result = recover(sim.observation, sim.psf, method="spodnet", device=device)
        results["SPoD-Net"] = net_result
        lam = net_result.lam
    else:
        print("no shipped SPoD-Net model in this installation: FISTA only")
        lam = None
    callback, _ = _recovery_progress("FISTA", False)
    fista_result = recover(sim.observation, sim.psf, method="fista", lam=lam, iterations=iterations, tol=1e-6,
                           device=device, progress=callback)
    results = {"FISTA": fista_result, **results}
    for name, res in results.items():
        path = _write_result(out / f"{name.lower().replace('-', '')}.tif", res, {"demo": True})
        rows.append((name, res.seconds, res.objective, path))
    print(f"\n{'method':<10} {'seconds':>9} {'objective':>12}  file")
    for name, sec, obj, path in rows:
        print(f"{name:<10} {sec:9.3f} {obj:12.6g}  {path}")
    if "SPoD-Net" in results:
        from .core.compare import compare_at_equal_objective, intensity_psnr

        net_res = results["SPoD-Net"]
        history = np.asarray(fista_result.info["fista_history"]).reshape(-1)
        times = fista_result.info.get("fista_times")

        comparison = compare_at_equal_objective(
            net_res.objective, net_res.seconds, history,
            fista_times=None if times is None else np.asarray(times).reshape(-1),
            fista_seconds=fista_result.seconds, network_psnr=intensity_psnr(net_res.intensity, sim.truth, sim.psf.shape),
            fista_psnr=intensity_psnr(fista_result.intensity, sim.truth, sim.psf.shape))
        print("\n".join(comparison.lines()))
    png = out / "comparison.png"
    save_comparison_png(png, sim.observation, results, truth=sim.truth)
    print(f"side-by-side picture: {png}")
    return 0


def save_comparison_png(path: Path, observation, results: dict, truth=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .core.recover import orientation_composite, orientation_map

    panels = [("observation (mean of 18)", np.asarray(observation).mean(axis=0), None)]
    for name, res in results.items():
        panels.append((f"{name}: {res.seconds:.2f} s, L = {res.objective:.4g}", res.intensity, None))
    last = list(results.values())[-1]
    panels.append(("orientation (hue) x intensity", None, orientation_composite(last.intensity, last.orientation)))
    if truth is not None:
        t_int = truth.sum(axis=0)
        panels.append(("ground truth (orientation)", None, orientation_composite(t_int, orientation_map(truth))))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, gray, rgb) in zip(axes, panels):
        if rgb is not None:
            ax.imshow(rgb)
        else:
            ax.imshow(gray, cmap="gray", vmin=np.percentile(gray, 1), vmax=np.percentile(gray, 99.7))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spodnet", description="Fast SPoD image recovery: FISTA and SPoD-Net.")
    sub = parser.add_subparsers(dest="command", required=True)

    def streaming_options(p):  # recover and fista write series frame by frame
        p.add_argument("--only", default="image", metavar="OUTPUTS",
                       help="outputs to write, comma-separated from image,intensity,orientation, or 'all' (default: "
                            "image); the first goes to OUTPUT, the others beside it (OUT_intensity.tif) or into OUT.zarr")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from its partial output (OUT.partial.zarr / .tif)")
        p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                       help="recover the frames on a dask.distributed scheduler (pip install napari-spodnet[cluster])")

    def common(p, device=True):
        p.add_argument("--n-channels", type=int, default=18, help="polarization images per observation (18)")
        p.add_argument("--axis", type=int, default=None,
                       help="index of the polarization axis in the file, when it is ambiguous")
        if device:
            p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: a GPU if present)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="simulate, recover with FISTA and SPoD-Net, show or write the result")
    p.add_argument("--headless", action="store_true", help="write files instead of opening napari")
    p.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--output", default="spodnet-demo", help="output folder (headless)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=1000, help="FISTA iterations")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="write a synthetic observation, its PSF and ground truth")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=1, help="time points (T > 1: a time series)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photons", type=float, default=200.0, help="peak photons of the clean signal")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("fista", help="recover with FISTA")
    p.add_argument("observation")
    p.add_argument("--psf", required=True)
    p.add_argument("-o", "--output", required=True, help="OUT.tif (BigTIFF) or OUT.zarr (OME-Zarr)")
    p.add_argument("--lam", type=float, default=None, help="regularisation (default 0.05 on normalised data)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--no-normalize", action="store_true", help="use intensities as given")
    streaming_options(p)
    common(p)
    p.set_defaults(func=cmd_fista)

    p = sub.add_parser("train", help="train SPoD-Net on observations")
    p.add_argument("observations", nargs="+")
    p.add_argument("--psf", required=True)
    p.add_argument("-o", "--output", required=True, help="checkpoint (.safetensors)")
    from .core.training import PRESET_DESCRIPTIONS, PRESETS

    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="; ".join(f"{name}: {PRESET_DESCRIPTIONS[name]}" for name in PRESETS))
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument("--crops", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dense-epochs", type=int, default=None, metavar="N",
                   help="epochs of the last stage, in which half the crops are simulated dense puncta clusters "
                        "blurred with your PSF, at a fifth of the rates (with --fine-tune: at its rates; "
                        "default: the preset's, quick 30, standard 60; 0 with --fine-tune; 0: none)")
    p.add_argument("--orientation", choices=["harmonic", "full"], default=None)
    p.add_argument("--architecture", choices=["spodnet", "listanet"], default=None)
    p.add_argument("--preprocess", action="store_true", help="median 5 / minimum 7 background removal")
    p.add_argument("--no-momentum", action="store_true",
                   help="train the paper's network, without learned FISTA momentum between layers")
    p.add_argument("--fine-tune", default=None, metavar="MODEL",
                   help="start from this checkpoint ('default': the shipped model) instead of FISTA steps; its "
                        "layers, λ, α and momentum are kept, every rate (also --lr) is a fifth of the preset's; "
                        "needs the model's PSF and an end-to-end preset (quick, standard)")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recover", help="recover with SPoD-Net (default: the shipped model)")
    p.add_argument("observation")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--psf", default=None, help="PSF TIFF (default: the model's PSF)")
    p.add_argument("-o", "--output", required=True, help="OUT.tif (BigTIFF) or OUT.zarr (OME-Zarr)")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="frames per batch (default: 1 on CPU, 8 on GPU)")
    p.add_argument("--check", action="store_true",
                   help="first, run FISTA beside the model on (up to 256 x 256 pixels of) the first frame and say "
                        "whether the model is faster at equal objective on these data (a few seconds; the "
                        "figures go into the output's metadata)")
    p.add_argument("--check-iterations", type=int, default=None, metavar="N",
                   help="FISTA iterations of --check (default 400)")
    streaming_options(p)
    common(p)
    p.set_defaults(func=cmd_recover)
    return parser


def main(argv=None) -> int:
    from .core.checkpoint import CheckpointError
    from .core.recover import RecoveryCancelled
    from .core.training import TrainingError
    from .core.validation import SPoDInputError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_values(args)
        return int(args.func(args) or 0)
    except (SPoDInputError, CheckpointError, TrainingError, RecoveryCancelled, OSError, FloatingPointError,
            MemoryError) as exc:
        print(f"\nspodnet {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\nspodnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("SPODNET_DEBUG"):
            raise
        print(f"\nspodnet {args.command}: unexpected error: {type(exc).__name__}: {_one_line(exc)} "
              "(set SPODNET_DEBUG=1 for the traceback and please report it)", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
