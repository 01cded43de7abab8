"""Seeded fuzz of the file surfaces: TIFF readers, the napari reader and the checkpoint loader.

    python scripts/fuzz.py --cases 10000 --seed 0 [--log fuzz.log]

Every case mutates a base file (byte flips, truncation, truncation + zero padding, edits of
ImageJ / OME / safetensors header fields to NaN, inf, 2**31, 2**63, negative, wrong types)
and runs one target in a forked child under a 10 s limit. Outcomes:
ok / refused (project error) / foreign (any other exception) / hang (> 10 s) /
memory (> 1 GB peak growth) / insane (ok with a zero-length axis or wrong layout) /
nan (ok but non-finite output where the project computes it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

OUTCOMES = ("ok", "refused", "foreign", "hang", "memory", "insane", "nan")
EDIT_VALUES = ["NaN", "Infinity", "-Infinity", str(2**31), str(2**63), "-1", "0", "1e308", '"x"', "null", "[]",
               "1300000", "0.5"]


def make_bases(folder: Path) -> dict[str, Path]:
    """Small good files: observations in several layouts, PSFs and checkpoints."""
    import tifffile
    import torch

    from napari_spodnet.core.checkpoint import save_checkpoint
    from napari_spodnet.core.network import LISTANet, SPoDNet
    from napari_spodnet.io import write_stack

    rng = np.random.default_rng(0)
    obs = (rng.random((18, 12, 12)) * 1000).astype(np.uint16)
    bases = {}

    def add(name, writer):
        path = folder / name
        writer(path)
        bases[name] = path

    add("plain.tif", lambda p: tifffile.imwrite(p, obs))
    add("series.tif", lambda p: tifffile.imwrite(p, rng.random((2, 18, 10, 10)).astype(np.float32)))
    add("ij.tif", lambda p: tifffile.imwrite(p, obs, imagej=True, metadata={"axes": "CYX"}))
    add("ijt.tif", lambda p: tifffile.imwrite(p, np.stack([obs, obs]), imagej=True, metadata={"axes": "TCYX"}))
    add("ome.ome.tif", lambda p: tifffile.imwrite(p, obs, ome=True, metadata={"axes": "CYX"}))
    add("zlib.tif", lambda p: tifffile.imwrite(p, obs, compression="zlib"))
    add("last.tif", lambda p: tifffile.imwrite(p, np.moveaxis(obs, 0, -1), photometric="minisblack"))
    add("ours.tif", lambda p: write_stack(p, obs.astype(np.float32), "CYX", metadata={"kind": "recovered"}))
    yy, xx = np.mgrid[:7, :7] - 3
    psf = np.exp(-(yy**2 + xx**2) / 4).astype(np.float32)
    add("psf.tif", lambda p: tifffile.imwrite(p, psf))
    add("psf3.tif", lambda p: tifffile.imwrite(p, np.stack([psf, psf])))
    torch.manual_seed(0)
    add("spod.safetensors", lambda p: save_checkpoint(SPoDNet(psf, 18, n_layers=2, momentum=True), p))
    add("lista.safetensors", lambda p: save_checkpoint(LISTANet(psf[2:5, 2:5], 18, n_layers=1), p))
    return bases


def _edit_text(data: bytes, rng: random.Random) -> bytes:
    """Replace a number in a header field (ImageJ key=value, OME Size*, JSON) by a hostile value."""
    import re

    keys = [rb"(images|channels|slices|frames)=(\d+)", rb'(Size[CZTXY])="(\d+)"',
            rb'"(n_layers|n_channels|lam|alpha|lipschitz|n_harmonics)\\?":\s*([-0-9.eE]+)',
            rb'"(psf_shape|shape)":\s*\[(\d+)', rb'"(data_offsets)":\s*\[(\d+)', rb'"(dtype)":"(F32)"']
    matches = [m for k in keys for m in re.finditer(k, data)]
    if not matches:
        return data
    m = rng.choice(matches)
    value = rng.choice(EDIT_VALUES + ["I64", "BOOL", "F16"]).encode()
    return data[:m.start(2)] + value + data[m.end(2):]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "flip_header", "truncate", "zero_pad", "edit", "edit", "header_len", "append"])
    b = bytearray(data)
    if kind == "flip" or kind == "flip_header":
        span = len(b) if kind == "flip" else min(len(b), 1024)
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(span)] = rng.randrange(256)
        return bytes(b), kind
    if kind == "truncate":
        return bytes(b[:rng.randrange(len(b))]), kind
    if kind == "zero_pad":
        cut = rng.randrange(len(b))
        return bytes(b[:cut]) + b"\0" * (len(b) - cut), kind
    if kind == "header_len":
        n = rng.choice([0, 1, 7, 2**31, 2**63, len(b), len(b) - 8, rng.randrange(2**64)])
        return n.to_bytes(8, "little") + bytes(b[8:]), kind
    if kind == "append":
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), kind
    return _edit_text(bytes(b), rng), kind


def run_target(target: str, path: Path) -> str:
    """One target on one file, classified (in the child)."""
    import torch

    from napari_spodnet import io
    from napari_spodnet._reader import napari_get_reader
    from napari_spodnet.core.checkpoint import load_checkpoint
    from napari_spodnet.core.validation import SPoDInputError, check_observation

    try:
        if target == "read_observation":
            obs = io.read_observation(path, memmap=bool(hash(path.name) % 2))
            shape = obs.data.shape
            if obs.data.ndim not in (3, 4) or min(shape) < 1 or shape[-3] != 18:
                return "insane"
            try:
                check_observation(np.asarray(obs.data))
            except SPoDInputError:
                return "refused"  # NaN pixels as stored: refused before any computation
            return "ok"
        if target == "read_psf":
            psf = io.read_psf(path)
            if psf.ndim != 2 or min(psf.shape) < 1:
                return "insane"
            return "ok" if np.isfinite(psf).all() else "nan"
        if target == "napari_reader":
            reader = napari_get_reader(str(path))
            if reader is None:
                return "refused"
            for data, kwargs, _ in reader(str(path)):
                if min(np.shape(data)) < 1:
                    return "insane"
                limits = kwargs.get("contrast_limits")
                if limits is not None and not np.isfinite(np.asarray(limits, dtype=float)).all():
                    return "nan"
            return "ok"
        if target == "load_checkpoint":
            net = load_checkpoint(path)
            if net.n_channels != 18:
                return "ok"
            y = torch.rand((18, 20, 20), generator=torch.Generator().manual_seed(1))
            return "ok" if bool(torch.isfinite(net.recover(y)).all()) else "nan"
    except SPoDInputError:
        return "refused"
    except MemoryError:
        return "memory"
    except Exception as exc:  # noqa: BLE001 - classifying is the point
        return f"foreign:{type(exc).__name__}:{str(exc)[:120]}"
    raise ValueError(target)


def run_case(target: str, path: Path, timeout: float = 10.0, mem_limit: int = 2**30) -> str:
    """Fork, run, classify hangs and memory growth from outside."""
    read_fd, write_fd = os.pipe()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            result = run_target(target, path)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if peak - base_rss > mem_limit:
                result = "memory"
        except BaseException as exc:  # noqa: BLE001
            result = f"foreign:{type(exc).__name__}"
        os.write(write_fd, result.encode()[:4000])
        os._exit(0)
    os.close(write_fd)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return "hang"
        time.sleep(0.002)
    out = os.read(read_fd, 4096).decode(errors="replace")
    os.close(read_fd)
    if not out:
        return f"foreign:crash(status {status})"
    return out


TIFF_TARGETS = ("read_observation", "read_psf", "napari_reader")


def fuzz(n_cases: int, seed: int = 0, log=None, timeout: float = 10.0, report_every: int = 0) -> Counter:
    import torch

    torch.set_num_threads(1)
    rng = random.Random(seed)
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bases = make_bases(folder / "bases" if (folder / "bases").mkdir() is None else folder)
        names = sorted(bases)
        blobs = {n: bases[n].read_bytes() for n in names}
        for i in range(n_cases):
            name = rng.choice(names)
            data, kind = mutate(blobs[name], rng)
            suffix = ".safetensors" if name.endswith(".safetensors") else ".tif"
            path = folder / f"case{i % 4}{suffix}"
            path.write_bytes(data)
            target = "load_checkpoint" if suffix == ".safetensors" else rng.choice(TIFF_TARGETS)
            outcome = run_case(target, path, timeout)
            counts[(target, outcome.split(":")[0])] += 1
            if log is not None and outcome.split(":")[0] not in ("ok", "refused"):
                print(json.dumps({"case": i, "base": name, "mutation": kind, "target": target,
                                  "outcome": outcome}), file=log, flush=True)
            if report_every and (i + 1) % report_every == 0:
                print(f"after {i + 1} cases:\n{table(counts)}", flush=True)
    return counts


def table(counts: Counter) -> str:
    targets = sorted({t for t, _ in counts})
    lines = ["| target | " + " | ".join(OUTCOMES) + " | total |", "|---" * (len(OUTCOMES) + 2) + "|"]
    for t in targets:
        row = [counts.get((t, o), 0) for o in OUTCOMES]
        lines.append(f"| {t} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    total = [sum(counts.get((t, o), 0) for t in targets) for o in OUTCOMES]
    lines.append("| **all** | " + " | ".join(map(str, total)) + f" | {sum(total)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--report-every", type=int, default=0, help="print the table every N cases")
    parser.add_argument("--log", default=None, help="JSON lines of every non-ok, non-refused case")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with open(args.log, "w") if args.log else open(os.devnull, "w") as log:
        counts = fuzz(args.cases, args.seed, log, args.timeout, args.report_every)
    print(table(counts))
    print(f"{args.cases} cases, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    bad = sum(v for (t, o), v in counts.items() if o not in ("ok", "refused"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
