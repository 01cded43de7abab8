"""The SPoD forward model (method.md section 3) against independent references.

References: ``scipy.signal.convolve2d(x_k, psf, mode="valid")`` mixed with the
polarization matrix (forward), ``scipy.signal.correlate2d(., psf, mode="full")`` of the
mixed observation (adjoint), a dense matrix for tiny problems, and torch autograd.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch

from napari_spodnet.core.physics import (
    SPoDOperator,
    direct_adjoint,
    direct_forward,
    fft_shape,
    harmonic_basis,
    harmonic_left_factor,
    mixing_matrix,
)
from napari_spodnet.core.validation import SPoDInputError

ROOT = Path(__file__).resolve().parents[1]



def random_psf(rng, shape, normalize=True):
    psf = rng.random(shape) + 0.05
    return psf / psf.sum() if normalize else psf


def reference_forward(x: np.ndarray, psf: np.ndarray, c: int) -> np.ndarray:
    """sum_k C[t, k] convolve2d(x_k, psf, valid) for x of shape (..., c, h, w)."""
    mix = mixing_matrix(c)
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    out = []
    for item in flat:
        blurred = np.stack([scipy.signal.convolve2d(item[k], psf, mode="valid") for k in range(c)])
        out.append(np.einsum("tk,khw->thw", mix, blurred))
    out = np.stack(out)
    return out.reshape(*lead, *out.shape[-3:])


def reference_adjoint(y: np.ndarray, psf: np.ndarray, c: int) -> np.ndarray:
    """Transpose of :func:`reference_forward`: mix with C^T, then full correlation with psf."""
    mix = mixing_matrix(c)
    lead = y.shape[:-3]
    flat = y.reshape(-1, *y.shape[-3:])
    out = []
    for item in flat:
        mixed = np.einsum("tk,thw->khw", mix, item)
        out.append(np.stack([scipy.signal.correlate2d(mixed[k], psf, mode="full") for k in range(c)]))
    out = np.stack(out)
    return out.reshape(*lead, *out.shape[-3:])


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Image sizes (h, w): exact power of two / fast length, padded to a larger even fast
# length, and padded (or exact) with an *odd* fast length along the last axis.
IMAGE_SHAPES = [
    pytest.param((20, 24), id="fast-even"),
    pytest.param((23, 29), id="padded-even"),  # FFT 24 x 30
    pytest.param((21, 26), id="padded-odd-width"),  # FFT 24 x 27
    pytest.param((15, 15), id="fast-odd"),  # FFT 15 x 15
]


# -- forward model against scipy ------------------------------------------------------

@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("c", [18, 12])
def test_forward_matches_scipy_convolve2d(c, image_shape):
    rng = np.random.default_rng(c + image_shape[1])
    psf = random_psf(rng, (5, 7))  # asymmetric, non-square: catches flips and transposes
    x = rng.random((2, c, *image_shape))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    ref = reference_forward(x, psf, c)
    got = op.forward(torch.as_tensor(x))
    assert got.dtype == torch.float64
    assert tuple(got.shape) == (2, c, image_shape[0] - 4, image_shape[1] - 6)
    assert rel(got, ref) < 1e-10


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES)
@pytest.mark.parametrize("c", [18, 12])
def test_adjoint_matches_scipy_correlate2d(c, image_shape):
    rng = np.random.default_rng(100 + c + image_shape[0])
    psf = random_psf(rng, (5, 7))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    y = rng.random((2, c, image_shape[0] - 4, image_shape[1] - 6))
    got = op.adjoint(torch.as_tensor(y))
    assert tuple(got.shape) == (2, c, *image_shape)
    assert rel(got, reference_adjoint(y, psf, c)) < 1e-10


@pytest.mark.parametrize("c", [18, 12])
def test_direct_reference_matches_scipy(c):
    rng = np.random.default_rng(7)
    psf = random_psf(rng, (5, 7))
    x = rng.random((2, c, 17, 19))
    y = rng.random((2, c, 13, 13))
    psf_t = torch.as_tensor(psf)
    assert rel(direct_forward(torch.as_tensor(x), psf_t, c), reference_forward(x, psf, c)) < 1e-10
    assert rel(direct_adjoint(torch.as_tensor(y), psf_t, c), reference_adjoint(y, psf, c)) < 1e-10
    # and the FFT operator agrees with the direct reference on the same data
    op = SPoDOperator(psf, c, dtype=torch.float64)
    assert rel(op.forward(torch.as_tensor(x)), direct_forward(torch.as_tensor(x), psf_t, c)) < 1e-10
    assert rel(op.adjoint(torch.as_tensor(y)), direct_adjoint(torch.as_tensor(y), psf_t, c)) < 1e-10


def test_unbatched_and_multi_batch_shapes():
    rng = np.random.default_rng(3)
    psf = random_psf(rng, (3, 4))
    c = 6
    op = SPoDOperator(psf, c, dtype=torch.float64)
    x = torch.as_tensor(rng.random((2, 3, c, 10, 12)))
    y = op.forward(x)
    assert tuple(y.shape) == (2, 3, c, 8, 9)
    assert rel(op.forward(x[1, 2]), y[1, 2]) < 1e-13
    assert tuple(op.adjoint(y).shape) == (2, 3, c, 10, 12)
    assert op.image_shape(y.shape) == (10, 12)
    assert op.observation_shape(x.shape) == (8, 9)
    assert op.sizes(y.shape) == (c * 8 * 9, c * 10 * 12)


# -- adjoint identity ------------------------------------------------------------------

@pytest.mark.parametrize(
    "image_shape",
    [(16, 16), (17, 19), (18, 14), (13, 22), (31, 33), (40, 44)],
    ids=lambda s: f"{s[0]}x{s[1]}-fft{fft_shape(s)[0]}x{fft_shape(s)[1]}",
)
@pytest.mark.parametrize("psf_shape", [(5, 7), (4, 4), (2, 3)])
def test_adjoint_identity(image_shape, psf_shape):
    """<A x, y> = <x, A^T y>, including odd/even sizes and sizes where the FFT is padded."""
    c = 18
    rng = np.random.default_rng(sum(image_shape) * 10 + sum(psf_shape))
    op = SPoDOperator(random_psf(rng, psf_shape), c, dtype=torch.float64)
    x = torch.as_tensor(rng.standard_normal((2, c, *image_shape)))
    y = torch.as_tensor(rng.standard_normal((2, c, *op.observation_shape(image_shape))))
    lhs = float((op.forward(x) * y).sum())
    rhs = float((x * op.adjoint(y)).sum())
    scale = float(op.forward(x).norm() * y.norm())
    assert abs(lhs - rhs) <= 1e-12 * scale


def test_dense_operator_adjoint_is_transpose():
    c, (h, w) = 6, (8, 10)
    rng = np.random.default_rng(11)
    psf = random_psf(rng, (3, 4))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    n = c * h * w
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c, h, w)
    dense = op.forward(basis).reshape(n, -1).T  # (m, n)
    m = dense.shape[0]
    dense_adj = op.adjoint(torch.eye(m, dtype=torch.float64).reshape(m, c, *op.observation_shape((h, w))))
    # row j of A^T e_j stacked over j is A itself
    assert torch.allclose(dense_adj.reshape(m, n), dense, atol=1e-14, rtol=0)


# -- conventions -------------------------------------------------------------------------

@pytest.mark.parametrize("image_shape", [(20, 24), (21, 26)], ids=["fft-even", "fft-odd-width"])
def test_single_pixel_gives_unflipped_weighted_psf(image_shape):
    """A bright pixel in channel k at (i0, j0) images to cos^2(pi (t - k) / c) * psf, not flipped,
    with the PSF's top-left corner at (i0 - a + 1, j0 - b + 1) in observation coordinates."""
    c, k = 18, 5
    rng = np.random.default_rng(5)
    psf = random_psf(rng, (5, 7))
    a, b = psf.shape
    op = SPoDOperator(psf, c, dtype=torch.float64)
    i0, j0 = 9, 11
    x = torch.zeros((c, *image_shape), dtype=torch.float64)
    x[k, i0, j0] = 1.0
    y = op.forward(x).numpy()
    top, left = i0 - a + 1, j0 - b + 1
    for t in range(c):
        weight = math.cos(math.pi * (t - k) / c) ** 2
        expected = np.zeros(y.shape[-2:])
        expected[top:top + a, left:left + b] = weight * psf
        np.testing.assert_allclose(y[t], expected, rtol=0, atol=1e-13)
    # the direct reference follows the same convention
    yd = direct_forward(x, torch.as_tensor(psf), c).numpy()
    np.testing.assert_allclose(yd, y, rtol=0, atol=1e-13)


@pytest.mark.parametrize("c", [6, 12, 18])
def test_mixing_matrix_rank_three(c):
    mix = mixing_matrix(c)
    t = np.arange(c)
    assert mix.shape == (c, c)
    np.testing.assert_allclose(mix[2, 5], math.cos(math.pi * (2 - 5) / c) ** 2)
    np.testing.assert_allclose(mix, mix.T, atol=1e-15)
    # circulant: C[t, k] depends only on (t - k) mod c
    np.testing.assert_allclose(mix, mix[0][(t[None, :] - t[:, None]) % c], atol=1e-15)
    assert np.linalg.matrix_rank(mix, tol=1e-9) == 3
    eig = np.sort(np.linalg.eigvalsh(mix))[::-1]
    np.testing.assert_allclose(eig[:3], [c / 2, c / 4, c / 4], rtol=1e-12)
    np.testing.assert_allclose(eig[3:], 0.0, atol=1e-12)
    # the factorisation the operator uses: C = U V with V the first-harmonic basis
    left = harmonic_left_factor(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64), c).numpy()
    np.testing.assert_allclose(left @ harmonic_basis(c, 1), mix, atol=1e-13)


def test_higher_orientation_harmonics_are_invisible():
    """A x only sees orientation harmonics 0 and 1: a second-harmonic pattern images to zero
    (and sums to zero over the channels, so the minimiser of section 4 need not be unique in x)."""
    c = 18
    rng = np.random.default_rng(15)
    op = SPoDOperator(random_psf(rng, (5, 7)), c, dtype=torch.float64)
    k = np.arange(c)
    spatial = rng.random((20, 24))
    for j in (2, 3, c // 2):
        pattern = np.cos(2 * np.pi * j * k / c + 0.3)[:, None, None] * spatial
        assert abs(pattern.sum()) < 1e-10 * np.abs(pattern).sum()
        y = op.forward(torch.as_tensor(pattern))
        assert float(y.abs().max()) < 1e-12 * np.abs(pattern).max()
    first = np.cos(2 * np.pi * k / c)[:, None, None] * spatial
    assert float(op.forward(torch.as_tensor(first)).abs().max()) > 0.1 * spatial.mean()


def test_psf_normalisation_and_raw_psf():
    rng = np.random.default_rng(2)
    psf = random_psf(rng, (3, 5), normalize=False) * 7.0
    c = 6
    x = rng.random((c, 9, 11))
    op_norm = SPoDOperator(psf, c, dtype=torch.float64)
    op_raw = SPoDOperator(psf, c, dtype=torch.float64, normalize_psf=False)
    np.testing.assert_allclose(float(op_norm.psf.sum()), 1.0, rtol=1e-12)
    assert rel(op_raw.forward(torch.as_tensor(x)), reference_forward(x, psf, c)) < 1e-10
    assert rel(op_norm.forward(torch.as_tensor(x)), reference_forward(x, psf / psf.sum(), c)) < 1e-10


# -- Lipschitz constant -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_iteration_below_bound(dtype):
    rng = np.random.default_rng(4)
    op = SPoDOperator(random_psf(rng, (5, 7)), 18, dtype=dtype)
    bound = op.lipschitz_bound()
    np.testing.assert_allclose(bound, (18 / 2) ** 2 * 1.0, rtol=1e-6)  # PSF sums to 1
    assert op.lipschitz() == bound  # no shape: the closed form
    value = op.lipschitz((24, 30), n_iter=30)
    assert 0 < value <= bound * (1 + 1e-6)


def test_power_iteration_near_bound_for_large_image():
    """For a non-negative PSF the bound is attained at zero frequency: within a few % on 64 x 64."""
    rng = np.random.default_rng(6)
    raw = random_psf(rng, (5, 5), normalize=False) * 3.0
    op = SPoDOperator(raw, 18, dtype=torch.float64, normalize_psf=False)
    bound = op.lipschitz_bound()
    np.testing.assert_allclose(bound, 81.0 * raw.sum() ** 2, rtol=1e-12)
    value = op.lipschitz((68, 68), n_iter=50)
    assert 0.95 * bound < value <= bound * (1 + 1e-9)


def test_power_iteration_matches_dense_eigenvalue():
    c, (h, w) = 6, (8, 8)
    rng = np.random.default_rng(8)
    op = SPoDOperator(random_psf(rng, (3, 3)), c, dtype=torch.float64)
    n = c * h * w
    dense = op.forward(torch.eye(n, dtype=torch.float64).reshape(n, c, h, w)).reshape(n, -1).T.numpy()
    largest = np.linalg.eigvalsh(dense.T @ dense)[-1]
    value = op.lipschitz((h, w), n_iter=300)
    assert abs(value - largest) <= 1e-6 * largest
    assert value <= op.lipschitz_bound()


# -- objective and gradient --------------------------------------------------------------------

def test_objective_matches_formula():
    """method.md section 4, computed by hand: one value per batch item."""
    c, lam = 12, 0.37
    rng = np.random.default_rng(9)
    psf = random_psf(rng, (4, 5))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    big_h, big_w = 11, 13
    h, w = big_h + 3, big_w + 4
    x = rng.random((2, c, h, w)) * (rng.random((2, c, h, w)) < 0.3)
    y = rng.random((2, c, big_h, big_w))
    n_obs, n_img = big_h * big_w * c, h * w * c
    expected = [
        ((y[n] - reference_forward(x[n], psf, c)) ** 2).sum() / (2 * n_obs) + lam / n_img * np.abs(x[n]).sum()
        for n in range(2)
    ]
    got = op.objective(torch.as_tensor(y), torch.as_tensor(x), lam)
    assert tuple(got.shape) == (2,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    single = op.objective(torch.as_tensor(y[1]), torch.as_tensor(x[1]), lam)
    assert single.ndim == 0
    np.testing.assert_allclose(float(single), expected[1], rtol=1e-12)


def test_gradient_matches_autograd():
    c = 18
    rng = np.random.default_rng(10)
    psf = random_psf(rng, (5, 7))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    x = torch.as_tensor(rng.random((2, c, 20, 24)))
    y = torch.as_tensor(rng.random((2, c, 16, 18)))
    n_obs = c * 16 * 18
    grad = op.gradient(y, x)

    xa = x.clone().requires_grad_(True)
    ((op.forward(xa) - y).pow(2).sum() / (2 * n_obs)).backward()
    assert rel(grad, xa.grad) < 1e-10

    # independent path: autograd through the direct spatial convolution
    xd = x.clone().requires_grad_(True)
    ((direct_forward(xd, op.psf, c) - y).pow(2).sum() / (2 * n_obs)).backward()
    assert rel(grad, xd.grad) < 1e-10


# -- input validation, dtypes and devices -----------------------------------------------------------

@pytest.mark.parametrize(
    "psf",
    [
        pytest.param(np.array([[0.2, 0.3], [-0.5, 1.0]]), id="negative"),
        pytest.param(np.zeros((3, 3)), id="zeros"),
        pytest.param(np.array([[0.2, np.nan], [0.5, 1.0]]), id="nan"),
        pytest.param(np.array([[0.2, np.inf], [0.5, 1.0]]), id="inf"),
        pytest.param(np.ones((2, 3, 3)), id="3d"),
        pytest.param(np.ones((0, 3)), id="empty"),
        pytest.param(np.array([["a", "b"]]), id="strings"),
    ],
)
def test_bad_psf_rejected(psf):
    with pytest.raises(SPoDInputError):
        SPoDOperator(psf, 18)


def test_tiny_negative_psf_values_are_clipped():
    psf = np.array([[0.2, -1e-5], [0.5, 1.0]])
    op = SPoDOperator(psf, 6, dtype=torch.float64, normalize_psf=False)
    assert float(op.psf.min()) == 0.0


def test_single_row_psf_accepted():
    """A 1 x b PSF (a line blur) is a valid 2-D PSF, and 1 x 1 is the identity blur."""
    c = 6
    rng = np.random.default_rng(14)
    psf = random_psf(rng, (1, 3))
    x = rng.random((c, 8, 10))
    op = SPoDOperator(psf, c, dtype=torch.float64)
    assert op.psf_shape == (1, 3)
    assert rel(op.forward(torch.as_tensor(x)), reference_forward(x, psf, c)) < 1e-10
    ident = SPoDOperator(np.ones((1, 1)), c, dtype=torch.float64)
    assert rel(ident.forward(torch.as_tensor(x)), np.einsum("tk,khw->thw", mixing_matrix(c), x)) < 1e-12


def test_psf_larger_than_image_rejected():
    op = SPoDOperator(np.ones((7, 5)), 6)
    with pytest.raises(SPoDInputError):
        op.forward(torch.ones((6, 6, 10)))
    with pytest.raises(SPoDInputError):
        op.forward(torch.ones((6, 10, 4)))


def test_wrong_channel_count_rejected():
    op = SPoDOperator(np.ones((3, 3)), 18)
    with pytest.raises(SPoDInputError):
        op.forward(torch.ones((17, 10, 10)))
    with pytest.raises(SPoDInputError):
        op.adjoint(torch.ones((2, 12, 8, 8)))
    with pytest.raises(SPoDInputError):
        op.forward(torch.ones((10, 10)))
    with pytest.raises(SPoDInputError):
        op.objective(torch.ones((18, 8, 8)), torch.ones((6, 10, 10)), 0.1)


def test_unsupported_dtype_rejected():
    with pytest.raises(SPoDInputError):
        SPoDOperator(np.ones((3, 3)), 6, dtype=torch.float16)


def test_float32_and_float64_agree():
    c = 18
    rng = np.random.default_rng(12)
    psf = random_psf(rng, (5, 7))
    x = rng.random((c, 20, 24))
    op32 = SPoDOperator(psf, c)  # float32 is the default
    op64 = SPoDOperator(psf, c, dtype=torch.float64)
    assert op32.dtype == torch.float32 and op32.psf.dtype == torch.float32
    y32 = op32.forward(x)  # numpy input is accepted and converted
    y64 = op64.forward(torch.as_tensor(x))
    assert y32.dtype == torch.float32 and y64.dtype == torch.float64
    assert rel(y32, y64) < 1e-5
    assert rel(op32.adjoint(y64), op64.adjoint(y64)) < 1e-5
    # a float32 tensor given to a float64 operator is promoted, and vice versa
    assert op64.forward(torch.as_tensor(x, dtype=torch.float32)).dtype == torch.float64
    # dtype and device follow a PSF tensor unless given
    op_t = SPoDOperator(torch.as_tensor(psf), c)
    assert op_t.dtype == torch.float64
    assert op32.to(dtype=torch.float64).dtype == torch.float64
    assert rel(op32.to(dtype=torch.float64).forward(torch.as_tensor(x)), y64) < 1e-6


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_argument_accepted(device):
    op = SPoDOperator(np.ones((3, 3)), 6, device=device)
    assert op.device.type == "cpu" and op.psf.device.type == "cpu"
    y = op.forward(torch.ones((6, 8, 8)))
    assert y.device.type == "cpu"
    assert op.to(device="cpu").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    c = 18
    rng = np.random.default_rng(13)
    psf = random_psf(rng, (5, 7))
    x = torch.as_tensor(rng.random((2, c, 30, 36)))
    y = torch.as_tensor(rng.random((2, c, 26, 30)))
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        cpu = SPoDOperator(psf, c, dtype=dtype)
        gpu = SPoDOperator(psf, c, dtype=dtype, device="cuda")
        fx = gpu.forward(x.cuda())
        assert fx.device.type == "cuda"
        assert rel(fx.cpu(), cpu.forward(x)) < tol
        assert rel(gpu.adjoint(y.cuda()).cpu(), cpu.adjoint(y)) < tol
        assert abs(gpu.lipschitz((30, 36)) - cpu.lipschitz((30, 36))) < tol * cpu.lipschitz_bound() * 10
        np.testing.assert_allclose(gpu.objective(y, x, 0.1).cpu().numpy(), cpu.objective(y, x, 0.1).numpy(),
                                   rtol=tol)
    psf_t = torch.as_tensor(psf)
    xd = x.cuda()
    assert rel(direct_forward(xd, psf_t.cuda(), c).cpu(), direct_forward(x, psf_t, c)) < 1e-10


# -- the benchmark script must keep working -------------------------------------------------------------

def test_benchmark_quick_runs(capsys):
    path = ROOT / "benchmarks" / "bench_operator.py"
    spec = importlib.util.spec_from_file_location("bench_operator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--quick"])
    out = capsys.readouterr().out
    assert len(rows) == 2
    for row in rows:
        for key in ("fista_ms", "fft_pass_ms", "naive_pass_ms", "direct_pass_ms"):
            assert np.isfinite(row[key]) and row[key] > 0
    assert "| observation |" in out and "torch" in out
