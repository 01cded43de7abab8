"""Per-iteration cost of FISTA with the rank-3 FFT operator vs the paper's direct convolution.

Three implementations of one forward + adjoint pass of the SPoD model
(``y_t = sum_k cos^2(pi (t - k) / c) conv_valid(phi, x_k)``, method.md section 3):

* **rank-3 FFT** (:class:`napari_spodnet.core.physics.SPoDOperator`): the mixing has
  rank 3, so a pass needs 3 + 3 = 6 FFT convolutions. Timed inside
  ``fista(op, y, lam, max_iter=N, tol=0)`` (time / N), i.e. a real solver iteration
  (one forward and one adjoint pass plus the elementwise work), and as a bare pass.
* **naive per-channel FFT** (defined here): blur every channel separately with the
  FFT and mix afterwards: ``2c = 36`` FFT convolutions per pass. Shows what the
  rank-3 factorisation buys over a plain FFT implementation.
* **direct** (:func:`~napari_spodnet.core.physics.direct_forward` +
  :func:`~napari_spodnet.core.physics.direct_adjoint`): ``torch.conv2d`` over all
  ``c x c`` channel pairs with an ``a x b`` kernel, the paper's formulation. Slow, so it
  is repeated only a few times.

All three are measured side by side in one run, in float32, on the same data.

Usage::

    python benchmarks/bench_operator.py                  # 256 x 256 x 18 and 512 x 512 x 18, 32 x 32 PSF
    python benchmarks/bench_operator.py --sizes 256 --iterations 50
    python benchmarks/bench_operator.py --device cuda
    python benchmarks/bench_operator.py --quick          # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from napari_spodnet.core.physics import (
    SPoDOperator,
    direct_adjoint,
    direct_forward,
    fft_shape,
    mixing_matrix,
)
from napari_spodnet.core.solvers import fista


class NaivePerChannelFFT:
    """The same operator without the rank-3 trick: one FFT convolution per channel.

    Forward: blur each of the ``c`` channels of ``x`` (``c`` FFT convolutions), then mix
    the blurred channels with ``C``. Adjoint: mix with ``C^T``, then correlate each of the
    ``c`` channels with the PSF (``c`` more). Same FFT sizes as the rank-3 operator.
    """

    def __init__(self, psf: torch.Tensor, n_channels: int):
        self.psf = psf
        self.c = n_channels
        self.a, self.b = psf.shape
        self.mix = torch.as_tensor(mixing_matrix(n_channels), dtype=psf.dtype, device=psf.device)
        self._spectra: dict = {}

    def _spectrum(self, s):
        if s not in self._spectra:
            self._spectra[s] = torch.fft.rfft2(self.psf, s=s)
        return self._spectra[s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = fft_shape((h, w))
        blurred = torch.fft.irfft2(torch.fft.rfft2(x, s=s) * self._spectrum(s), s=s)[..., self.a - 1:h, self.b - 1:w]
        return torch.einsum("tk,...khw->...thw", self.mix, blurred)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        big_h, big_w = y.shape[-2:]
        h, w = big_h + self.a - 1, big_w + self.b - 1
        s = fft_shape((h, w))
        r = torch.einsum("tk,...thw->...khw", self.mix, y)
        padded = torch.nn.functional.pad(r, (self.b - 1, s[1] - w, self.a - 1, s[0] - h))
        return torch.fft.irfft2(torch.fft.rfft2(padded) * self._spectrum(s).conj(), s=s)[..., :h, :w]


def make_psf(size: int) -> np.ndarray:
    """A slightly elliptical, off-centre Gaussian spot (asymmetric on purpose), sum 1."""
    i, j = np.mgrid[0:size, 0:size].astype(np.float64)
    ci, cj = 0.47 * (size - 1), 0.53 * (size - 1)
    si, sj = size / 7.0, size / 5.5
    psf = np.exp(-0.5 * (((i - ci) / si) ** 2 + ((j - cj) / sj) ** 2))
    return psf / psf.sum()


def make_data(op: SPoDOperator, obs_size: int, seed: int = 0):
    """A sparse non-negative image and its noisy observation (float32, on the operator's device)."""
    rng = np.random.default_rng(seed)
    h, w = op.image_shape((obs_size, obs_size))
    x = np.zeros((op.n_channels, h, w), dtype=np.float32)
    mask = rng.random(x.shape) < 0.002
    x[mask] = rng.uniform(1.0, 5.0, int(mask.sum()))
    x_t = torch.as_tensor(x, device=op.device)
    y = op.forward(x_t)
    y = y + 0.01 * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return x_t, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeats: int, device: torch.device) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_size(obs_size: int, psf_size: int, n_channels: int, iterations: int, direct_repeats: int,
               fft_repeats: int, device: torch.device, lam: float = 0.05) -> dict:
    psf_np = make_psf(psf_size)
    op = SPoDOperator(psf_np, n_channels, device=device, dtype=torch.float32)
    naive = NaivePerChannelFFT(op.psf, n_channels)
    x, y = make_data(op, obs_size)

    # Rank-3 FFT operator inside FISTA (warm-up first: spectra cache, allocator, FFT plans).
    fista(op, y, lam, max_iter=2, tol=0)
    _sync(device)
    start = time.perf_counter()
    result = fista(op, y, lam, max_iter=iterations, tol=0)
    _sync(device)
    fista_s = (time.perf_counter() - start) / result.iterations

    # Bare forward + adjoint passes.
    op.adjoint(op.forward(x))
    fft_pass_s = _time(lambda: op.adjoint(op.forward(x)), fft_repeats, device)
    naive.adjoint(naive.forward(x))
    naive_pass_s = _time(lambda: naive.adjoint(naive.forward(x)), fft_repeats, device)

    # Direct spatial convolution over all c x c channel pairs (paper's formulation).
    with torch.no_grad():
        y_direct = direct_forward(x, op.psf, n_channels)  # also the warm-up
        direct_pass_s = _time(lambda: direct_adjoint(direct_forward(x, op.psf, n_channels), op.psf, n_channels),
                              direct_repeats, device)
    y_fft = op.forward(x)
    rel_err = float((y_fft - y_direct).norm() / y_direct.norm())
    h, w = op.image_shape(y.shape)
    return {
        "observation": f"{obs_size}x{obs_size}x{n_channels}",
        "image": f"{h}x{w}x{n_channels}",
        "fft_shape": "x".join(map(str, fft_shape((h, w)))),
        "fista_ms": 1e3 * fista_s,
        "fft_pass_ms": 1e3 * fft_pass_s,
        "naive_pass_ms": 1e3 * naive_pass_s,
        "direct_pass_ms": 1e3 * direct_pass_s,
        "ratio": direct_pass_s / fista_s,
        "naive_ratio": naive_pass_s / fft_pass_s,
        "rel_err": rel_err,
        "iterations": result.iterations,
        "direct_repeats": direct_repeats,
    }


def _ratio(value: float) -> str:
    return f"{value:.0f}x" if value >= 10 else f"{value:.2g}x"


def format_table(rows: list[dict], psf_size: int) -> str:
    lines = [
        f"| observation | image (FFT size) | FFT FISTA ms/iter | FFT fwd+adj ms | naive per-channel FFT "
        f"fwd+adj ms (36 conv) | direct conv2d fwd+adj ms (c x c pairs, {psf_size}x{psf_size}) "
        "| FFT FISTA / fwd+adj | direct / FFT FISTA | naive / rank-3 pass | rel. diff FFT vs direct |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['observation']} | {r['image']} ({r['fft_shape']}) | {r['fista_ms']:.1f} | {r['fft_pass_ms']:.1f} "
            f"| {r['naive_pass_ms']:.1f} | {r['direct_pass_ms']:.0f} | {r['fista_ms'] / r['fft_pass_ms']:.2f}x "
            f"| {_ratio(r['ratio'])} | {r['naive_ratio']:.1f}x "
            f"| {r['rel_err']:.1e} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="observation sizes H = W (default 256 512)")
    p.add_argument("--iterations", type=int, default=20, help="FISTA iterations timed per size (default 20)")
    p.add_argument("--psf-size", type=int, default=32, help="PSF is psf-size x psf-size (default 32)")
    p.add_argument("--channels", type=int, default=18, help="polarization steps c (default 18)")
    p.add_argument("--direct-repeats", type=int, default=None,
                   help="timed direct passes (best of); default 3 up to 256 px, 1 above")
    p.add_argument("--fft-repeats", type=int, default=5, help="timed bare FFT passes (best of, default 5)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (a few seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.iterations, args.psf_size = [24, 40], 3, 5
        args.direct_repeats, args.fft_repeats = 1, 1
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device} ({name}), float32, "
          f"c = {args.channels}, PSF {args.psf_size}x{args.psf_size}, FISTA iterations {args.iterations}")
    rows = []
    for size in args.sizes:
        repeats = args.direct_repeats or (3 if size <= 256 else 1)
        t0 = time.perf_counter()
        rows.append(bench_size(size, args.psf_size, args.channels, args.iterations, repeats, args.fft_repeats,
                               device))
        print(f"  {size}x{size}: measured in {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(format_table(rows, args.psf_size))
    return rows


if __name__ == "__main__":
    main()
