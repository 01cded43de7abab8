"""Time-lapse at scale: memory flat in T, observations per second, cluster scaling, lazy latency.

Every figure comes from one run of this script and is printed as a Markdown table
(docs/benchmarks.md, section "Time-lapse"):

* peak memory of ``spodnet recover``'s streamed path (:func:`napari_spodnet.stream.recover_to_file`)
  for T = 20 and T = 100 frames of 512 x 512 x 18, each in a fresh subprocess: peak RSS
  (``VmHWM``) and peak anonymous RSS (``RssAnon`` sampled every 20 ms), both from /proc;
* observations per second for SPoD-Net and FISTA (100 iterations) at 1 and 2 torch threads;
* one FISTA iteration against a bare forward + adjoint pass at the same size;
* scaling from 1 to 2 dask workers (``LocalCluster`` on loopback, one thread each);
* the lazy napari series: latency of the first (recovered) and second (cached) access to a frame.

    python benchmarks/bench_timelapse.py                # the full run (CPU; minutes)
    python benchmarks/bench_timelapse.py --device cuda  # the same on a GPU
    python benchmarks/bench_timelapse.py --quick        # tiny sizes, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon of this process in a thread (the kernel keeps no anonymous high-water mark)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_kb, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _proc_status_kb("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _proc_status_kb("RssAnon"))


def make_series(path: Path, frames: int, size: int, seed: int = 0) -> Path:
    """A (T, 18, size, size) uint16 TIFF written frame by frame: a few simulated frames, shifted
    and re-noised, so writing 100 frames needs no 100-frame array in memory."""
    import tifffile

    from napari_spodnet.core.simulate import simulate_time_series

    base = simulate_time_series(min(frames, 3), (size, size), seed=seed)
    rng = np.random.default_rng(seed)
    clean = np.asarray(base.observation, dtype=np.float32)

    def frames_iter():
        for t in range(frames):
            frame = np.roll(clean[t % len(clean)], shift=(t // len(clean)) % 7, axis=-1)
            yield rng.poisson(np.clip(frame, 0, None)).astype(np.uint16)

    tifffile.imwrite(path, frames_iter(), shape=(frames, *clean.shape[1:]), dtype=np.uint16,
                     metadata={"axes": "TCYX"}, photometric="minisblack")
    return path


# ---------------------------------------------------------------------------- child runs


def child(args) -> None:
    """One streamed recovery in this (fresh) process; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from napari_spodnet.stream import recover_to_file

    kwargs = dict(method=args.method, device=args.device, outputs=args.only)
    if args.method == "fista":
        from napari_spodnet.io import read_psf

        kwargs.update(psf=read_psf(args.psf), iterations=args.iterations, tol=0)
    baseline_kb = _proc_status_kb("VmRSS")
    with AnonPeak() as anon:
        start = time.perf_counter()
        summary = recover_to_file(args.input, args.output, **kwargs)
        seconds = time.perf_counter() - start
    result = {"frames": summary.frames, "seconds": seconds, "obs_per_s": summary.frames / seconds,
              "vmhwm_mb": _proc_status_kb("VmHWM") / 1024, "anon_peak_mb": anon.peak_kb / 1024,
              "rss_after_imports_mb": baseline_kb / 1024, "threads": args.threads, "method": args.method}
    if args.device and args.device.startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def run_child(input_path, output, method="spodnet", threads=1, device="cpu", only="all", psf=None,
              iterations=100, timeout=3600) -> dict:
    cmd = [sys.executable, __file__, "_child", "--input", str(input_path), "--output", str(output),
           "--method", method, "--threads", str(threads), "--device", device, "--only", only,
           "--iterations", str(iterations)]
    if psf is not None:
        cmd += ["--psf", str(psf)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------- in-process parts


def fista_vs_pass(size: int, iterations: int, device: str, rounds: int = 3) -> dict:
    """Milliseconds of a bare forward + adjoint pass, of one FISTA iteration (``tol=0`` and the
    default ``tol=1e-6``, whose stopping test adds a difference and a norm) and of one SPoD-Net
    layer (the shipped model at this size: (10 layers - 1 layer) / 9, the first layer having no
    forward pass), at ``size`` (18 channels), in alternating rounds (medians), first with glibc's
    default allocator (as in a GUI process), then with the streamed path's
    :func:`keep_large_blocks`."""
    import torch

    from napari_spodnet.core.physics import SPoDOperator
    from napari_spodnet.core.recover import load_default_model
    from napari_spodnet.core.simulate import simulate
    from napari_spodnet.core.solvers import fista
    from napari_spodnet.stream import keep_large_blocks

    sim = simulate((size, size), seed=1)
    op = SPoDOperator(sim.psf, 18, device=device)
    y = torch.as_tensor(sim.observation / sim.observation.max(), dtype=torch.float32, device=device)
    x = op.adjoint(y)
    net = load_default_model().to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def net_seconds(n_layers: int) -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            net.forward(y, n_layers=n_layers)
        sync()
        return time.perf_counter() - start

    def measure():
        passes, iters, iters_tol, layers = [], [], [], []
        op.adjoint(op.forward(x))
        fista(op, y, 0.05, max_iter=2, tol=0)
        net_seconds(net.n_layers)
        for _ in range(rounds):
            sync()
            start = time.perf_counter()
            for _ in range(5):
                op.adjoint(op.forward(x))
            sync()
            passes.append((time.perf_counter() - start) / 5)
            result = fista(op, y, 0.05, max_iter=iterations, tol=0)
            sync()
            iters.append(result.seconds / result.iterations)
            result = fista(op, y, 0.05, max_iter=iterations, tol=1e-6)
            sync()
            iters_tol.append(result.seconds / result.iterations)
            layers.append((net_seconds(net.n_layers) - net_seconds(1)) / (net.n_layers - 1))
        return [float(np.median(v)) for v in (passes, iters, iters_tol, layers)]

    out = {"size": size}
    for label, setup in (("", None), ("tuned_", keep_large_blocks)):
        if setup is not None:
            setup()
        pass_s, iter_s, iter_tol_s, layer_s = measure()
        out.update({f"{label}pass_ms": pass_s * 1e3, f"{label}iteration_ms": iter_s * 1e3,
                    f"{label}ratio": iter_s / pass_s, f"{label}iteration_tol_ms": iter_tol_s * 1e3,
                    f"{label}ratio_tol": iter_tol_s / pass_s, f"{label}layer_ms": layer_s * 1e3,
                    f"{label}layer_ratio": layer_s / pass_s})
    return out


def cluster_scaling(input_path: Path, out_dir: Path, device: str) -> list[dict]:
    """Seconds for the same series on 1 and 2 dask workers (processes, one thread each, loopback)."""
    import distributed

    from napari_spodnet.stream import recover_to_file

    rows = []
    for n in (1, 2):
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None, worker_dashboard_address=None,
                                      env={"OMP_NUM_THREADS": "1"}) as cluster, \
                distributed.Client(cluster, set_as_default=False) as client:
            client.run(lambda: __import__("torch").set_num_threads(1))
            # warm the workers (imports, model) on a one-frame run first
            recover_to_file(input_path, out_dir / f"warm{n}.zarr", scheduler=client, outputs="intensity",
                            device=device)
            start = time.perf_counter()
            summary = recover_to_file(input_path, out_dir / f"cluster{n}.zarr", scheduler=client,
                                      outputs="intensity", device=device)
            seconds = time.perf_counter() - start
        rows.append({"workers": n, "frames": summary.frames, "seconds": seconds,
                     "obs_per_s": summary.frames / seconds})
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    return rows


def lazy_latency(input_path: Path, device: str, frames=(0, 5, 9)) -> dict:
    from napari_spodnet.lazy import FrameCache, lazy_series

    series = lazy_series(input_path, cache=FrameCache(), device=device)
    first, second = [], []
    for t in frames:
        t = min(t, series.shape[0] - 1)
        start = time.perf_counter()
        np.asarray(series.intensity[t])
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        np.asarray(series.intensity[t])
        second.append(time.perf_counter() - start)
    return {"first_ms": 1e3 * float(np.median(first)), "cached_ms": 1e3 * float(np.median(second)),
            "frames": len(first)}


# ---------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, nargs=2, default=[20, 100], metavar=("SHORT", "LONG"))
    p.add_argument("--fista-frames", type=int, default=2, help="frames timed for FISTA-100 obs/s")
    p.add_argument("--net-frames", type=int, default=10, help="frames timed for SPoD-Net obs/s at 1/2 threads")
    p.add_argument("--cluster-frames", type=int, default=8)
    p.add_argument("--iterations", type=int, default=100, help="FISTA iterations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--no-cluster", action="store_true")
    p.add_argument("--out", default=None, help="write timelapse.json / timelapse.md here")
    p.add_argument("--ratios-only", action="store_true",
                   help="only the FISTA iteration / SPoD-Net layer against a forward + adjoint pass (1 thread)")
    args = p.parse_args(argv)
    if args.ratios_only:
        import torch

        torch.set_num_threads(1)
        f = fista_vs_pass(48 if args.quick else args.size, 5 if args.quick else 20, args.device)
        md = render_ratios(f, args)
        print(md)
        return {"fista_pass": f}
    if args.quick:
        args.size, args.frames, args.fista_frames, args.net_frames = 48, [3, 6], 1, 2
        args.cluster_frames, args.iterations = 2, 5

    tables = {}
    with tempfile.TemporaryDirectory(prefix="bench_timelapse_") as tmp:
        tmp = Path(tmp)
        from napari_spodnet.core.simulate import simulate
        from napari_spodnet.io import write_stack

        psf_path = write_stack(tmp / "psf.tif", simulate((64, 64), seed=0).psf, axes="YX")
        series = {T: make_series(tmp / f"obs{T}.tif", T, args.size) for T in
                  sorted({*args.frames, args.fista_frames, args.net_frames, args.cluster_frames})}

        memory = []
        for T in args.frames:
            r = run_child(series[T], tmp / f"mem{T}.zarr", device=args.device, only="all")
            memory.append(r)
            print(f"memory T={T}: {json.dumps(r)}", flush=True)
        tables["memory"] = memory

        speed = []
        for method, T in (("spodnet", args.net_frames), ("fista", args.fista_frames)):
            for threads in (1, 2):
                r = run_child(series[T], tmp / f"speed-{method}-{threads}.tif", method=method, threads=threads,
                              device=args.device, only="intensity", psf=psf_path, iterations=args.iterations)
                speed.append(r)
                print(f"speed {method} threads={threads}: {json.dumps(r)}", flush=True)
        tables["speed"] = speed

        import torch

        torch.set_num_threads(1)
        tables["fista_pass"] = fista_vs_pass(args.size, 10 if args.quick else 20, args.device)
        print(f"fista vs pass: {json.dumps(tables['fista_pass'])}", flush=True)
        tables["lazy"] = lazy_latency(series[args.net_frames], args.device)
        print(f"lazy: {json.dumps(tables['lazy'])}", flush=True)
        if not args.no_cluster:
            tables["cluster"] = cluster_scaling(series[args.cluster_frames], tmp, args.device)
            print(f"cluster: {json.dumps(tables['cluster'])}", flush=True)

    md = render(tables, args)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timelapse.json").write_text(json.dumps(tables, indent=1))
        (out / "timelapse.md").write_text(md)
    return tables


def ratio_lines(f: dict) -> list[str]:
    """The FISTA-iteration / SPoD-Net-layer against forward + adjoint table (:func:`fista_vs_pass`)."""
    lines = ["| allocator | forward + adjoint pass | FISTA iteration (tol 0) | ratio | FISTA iteration "
             "(tol 1e-6) | ratio | SPoD-Net layer | ratio |", "|---|---|---|---|---|---|---|---|"]
    for name, k in (("glibc default", ""), ("keep_large_blocks", "tuned_")):
        lines.append(f"| {name} | {f[k + 'pass_ms']:.1f} ms | {f[k + 'iteration_ms']:.1f} ms | {f[k + 'ratio']:.2f}x "
                     f"| {f[k + 'iteration_tol_ms']:.1f} ms | {f[k + 'ratio_tol']:.2f}x | {f[k + 'layer_ms']:.1f} ms "
                     f"| {f[k + 'layer_ratio']:.2f}x |")
    return lines


def render_ratios(f: dict, args) -> str:
    return "\n".join([f"Size {f['size']} x {f['size']} x 18, device {args.device}, 1 thread.", ""] + ratio_lines(f)) + "\n"


def render(t: dict, args) -> str:
    s = args.size
    lines = [f"Size {s} x {s} x 18, device {args.device}.", "",
             "| frames T | peak RSS (VmHWM) | peak anonymous RSS | seconds | obs/s |", "|---|---|---|---|---|"]
    for r in t["memory"]:
        lines.append(f"| {r['frames']} | {r['vmhwm_mb']:.0f} MB | {r['anon_peak_mb']:.0f} MB | {r['seconds']:.1f} "
                     f"| {r['obs_per_s']:.2f} |")
    if len(t["memory"]) == 2:
        a, b = t["memory"]
        lines.append(f"| T={b['frames']} minus T={a['frames']} | {b['vmhwm_mb'] - a['vmhwm_mb']:+.0f} MB "
                     f"| {b['anon_peak_mb'] - a['anon_peak_mb']:+.0f} MB | | |")
    lines += ["", "| method | threads | frames | seconds | observations/s |", "|---|---|---|---|---|"]
    for r in t["speed"]:
        name = "SPoD-Net" if r["method"] == "spodnet" else f"FISTA-{args.iterations}"
        lines.append(f"| {name} | {r['threads']} | {r['frames']} | {r['seconds']:.1f} | {r['obs_per_s']:.3f} |")
    lines += [""] + ratio_lines(t["fista_pass"])
    lz = t["lazy"]
    lines += ["", "| lazy layer: first access of a frame | cached access |", "|---|---|",
              f"| {lz['first_ms']:.0f} ms | {lz['cached_ms']:.1f} ms |"]
    if "cluster" in t:
        lines += ["", "| dask workers | frames | seconds | obs/s | speed-up |", "|---|---|---|---|---|"]
        for r in t["cluster"]:
            lines.append(f"| {r['workers']} | {r['frames']} | {r['seconds']:.1f} | {r['obs_per_s']:.2f} "
                         f"| {r.get('speedup', 1.0):.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        cp = argparse.ArgumentParser()
        cp.add_argument("_child")
        for name in ("--input", "--output", "--method", "--device", "--only", "--psf"):
            cp.add_argument(name, default=None)
        cp.add_argument("--threads", type=int, default=1)
        cp.add_argument("--iterations", type=int, default=100)
        child(cp.parse_args())
    else:
        main()
