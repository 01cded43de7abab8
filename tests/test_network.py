"""Tests of the unrolled networks (core/network.py): SPoD-Net and LISTA-Net.

The central check (method.md section 6): an untrained network with ``alpha = 0`` computes
exactly ``M`` ISTA iterations, so it must equal :func:`ista` to float64 precision.
"""

import math

import numpy as np
import pytest
import torch


from napari_spodnet.core.network import (  # noqa: E402
    LISTANet,
    SPoDNet,
    build_network,
    count_parameters,
    leaky_soft_threshold,
)
from napari_spodnet.core.physics import SPoDOperator, direct_adjoint  # noqa: E402
from napari_spodnet.core.simulate import gaussian_psf, simulate  # noqa: E402
from napari_spodnet.core.solvers import ista  # noqa: E402
from napari_spodnet.core.validation import SPoDInputError  # noqa: E402

C = 18
LAM = 0.05


def _normalised(obs: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(obs, [25, 99.9])
    return (obs - lo) / (hi - lo)


@pytest.fixture(scope="module")
def psf():
    return gaussian_psf(9, 1.5)


@pytest.fixture(scope="module")
def y64(psf):
    """A normalised 32 x 32 observation (image 40 x 40: an even FFT size), float64."""
    sim = simulate((32, 32), psf=psf, seed=1)
    return torch.as_tensor(_normalised(sim.observation), dtype=torch.float64)


@pytest.fixture(scope="module")
def op64(psf):
    return SPoDOperator(psf, C, dtype=torch.float64)


def _perturb(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every layer its own, different parameters (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m, layer in enumerate(net.layers):
            for p in layer.parameters():
                noise = torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
                p.mul_(1 + scale * (m + 1) * noise)


# -- untrained network == ISTA --------------------------------------------------------------

@pytest.mark.parametrize("orientation", ["harmonic", "full"])
@pytest.mark.parametrize("threshold", ["lst", "nst"])
def test_untrained_spodnet_alpha0_equals_ista(op64, y64, orientation, threshold):
    n_layers = 6
    net = SPoDNet.from_operator(op64, n_layers=n_layers, lam=LAM, alpha=0.0, threshold=threshold,
                                orientation=orientation)
    assert net.psf.dtype == torch.float64
    ref = ista(op64, y64, LAM, max_iter=n_layers, tol=0).x
    with torch.no_grad():
        x = net(y64)
    assert x.shape == ref.shape
    # non-trivial comparison: a sparse but non-empty result
    assert 0.01 < float((ref > 0).double().mean()) < 0.99
    np.testing.assert_allclose(x.numpy(), ref.numpy(), rtol=0, atol=1e-12)
    # each prefix of the network is the same number of ISTA iterations
    for k in (1, 3):
        ref_k = ista(op64, y64, LAM, max_iter=k, tol=0).x
        np.testing.assert_allclose(net(y64, n_layers=k).detach().numpy(), ref_k.numpy(), rtol=0, atol=1e-12)


def test_untrained_listanet_alpha0_equals_ista(op64, y64):
    net = LISTANet.from_operator(op64, n_layers=4, lam=LAM, alpha=0.0)
    ref = ista(op64, y64, LAM, max_iter=4, tol=0).x
    x = net.recover(y64)
    np.testing.assert_allclose(x.numpy(), ref.numpy(), rtol=0, atol=1e-12)


def test_alpha_leak_differs_from_ista_but_output_non_negative(op64, y64):
    net = SPoDNet.from_operator(op64, n_layers=4, lam=LAM, alpha=0.1)
    ref = ista(op64, y64, LAM, max_iter=4, tol=0).x
    x = net.recover(y64)
    assert float((x - ref).abs().max()) > 1e-6
    assert float(x.min()) >= 0.0
    # without the post-threshold the leak shows as negative values
    with torch.no_grad():
        raw = net(y64, post_threshold=False)
    assert float(raw.min()) < 0.0
    np.testing.assert_array_equal(torch.clamp(raw, min=0).numpy(), x.numpy())


def test_nst_ignores_alpha(op64):
    net = SPoDNet.from_operator(op64, n_layers=1, lam=LAM, alpha=0.3, threshold="nst")
    assert net.alpha == 0.0


# -- reference check against the direct (conv2d) operator ------------------------------------

def _first_layer_reference(psf64: torch.Tensor, y: torch.Tensor, lam: float, lipschitz: float,
                           size_ratio: float) -> torch.Tensor:
    """One ISTA step from zero with the direct spatial adjoint (no FFTs)."""
    return torch.clamp(direct_adjoint(y, psf64, C) / lipschitz - lam / lipschitz * size_ratio, min=0)


@pytest.mark.parametrize("arch,obs_size", [
    # obs 32 -> image 40: FFT length 40; obs 34 -> image 42, whose 5-smooth fast length 45 is odd
    ("spodnet-harmonic", 32), ("spodnet-full", 32), ("listanet", 32), ("listanet", 34),
    # regression: fft_shape used to return odd widths, which SeparableSPoDConv re-derived as 2*(n-1)
    ("spodnet-harmonic", 34), ("spodnet-full", 34),
])
def test_first_layer_matches_direct_reference(psf, arch, obs_size):
    op = SPoDOperator(psf, C, dtype=torch.float64)
    y = torch.as_tensor(_normalised(simulate((obs_size, obs_size), psf=psf, seed=2).observation),
                        dtype=torch.float64)
    if arch == "listanet":
        net = LISTANet.from_operator(op, n_layers=1, lam=LAM, alpha=0.0)
    else:
        net = SPoDNet.from_operator(op, n_layers=1, lam=LAM, alpha=0.0, orientation=arch.split("-")[1])
    h = obs_size + psf.shape[0] - 1
    ref = _first_layer_reference(op.psf, y, LAM, op.lipschitz_bound(), obs_size ** 2 / h ** 2)
    np.testing.assert_allclose(net.recover(y).numpy(), ref.numpy(), rtol=0, atol=1e-10)


# -- shapes, batching, size_ratio --------------------------------------------------------------

def test_output_shape_non_square_psf():
    psf = np.outer(gaussian_psf(9, 1.5)[:, 4], gaussian_psf(7, 1.2)[:, 3])  # (9, 7)
    net = SPoDNet(psf, C, n_layers=2)
    y = torch.rand(C, 32, 30)
    assert net.recover(y).shape == (C, 32 + 8, 30 + 6)
    assert net.psf_shape == (9, 7)
    lnet = LISTANet(psf, C, n_layers=1)
    assert lnet.recover(y).shape == (C, 40, 36)


def test_batched_equals_per_item(psf):
    net = SPoDNet(psf, C, n_layers=3, lam=LAM)
    _perturb(net)
    gen = torch.Generator().manual_seed(3)
    y = torch.rand((2, 3, C, 24, 24), generator=gen)
    out = net.recover(y)
    assert out.shape == (2, 3, C, 32, 32)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j].numpy(), net.recover(y[i, j]).numpy(), rtol=1e-5, atol=1e-6)


def test_size_ratio_scales_threshold(op64, y64):
    net = SPoDNet.from_operator(op64, n_layers=1, lam=LAM, alpha=0.0)
    H, W = y64.shape[-2:]
    h, w = H + 8, W + 8
    default_ratio = H * W / (h * w)
    L = op64.lipschitz_bound()
    base = op64.adjoint(y64) / L
    for ratio in (default_ratio, 2.0, 0.25):
        expected = torch.clamp(base - LAM / L * ratio, min=0)
        np.testing.assert_allclose(net.recover(y64, size_ratio=ratio).numpy(), expected.numpy(),
                                   rtol=0, atol=1e-12)
    np.testing.assert_array_equal(net.recover(y64).numpy(), net.recover(y64, size_ratio=default_ratio).numpy())
    # a larger ratio thresholds harder: fewer non-zeros, and it matters for a deep network too
    deep = SPoDNet.from_operator(op64, n_layers=4, lam=LAM)
    a, b = deep.recover(y64), deep.recover(y64, size_ratio=4 * default_ratio)
    assert int((b > 0).sum()) < int((a > 0).sum())


# -- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("psf_shape", [(9, 9), (9, 7)])
def test_parameter_counts(psf_shape):
    a, b = psf_shape
    psf = np.ones(psf_shape, dtype=np.float32)
    M = 3
    assert count_parameters(SPoDNet(psf, C, n_layers=M)) == M * (a * b + 3 + 2)
    assert count_parameters(SPoDNet(psf, C, n_layers=M, n_harmonics=2)) == M * (a * b + 5 + 2)
    assert count_parameters(SPoDNet(psf, C, n_layers=M, orientation="full")) == M * (a * b + C + 2)
    assert count_parameters(LISTANet(psf, C, n_layers=M)) == M * (a * b * C * C + 2)
    assert count_parameters(SPoDNet(psf, C, n_layers=0)) == 0


def test_harmonic_init_is_cos_squared(psf):
    net = SPoDNet(psf, C, n_layers=1)
    full = SPoDNet(psf, C, n_layers=1, orientation="full")
    d = np.arange(C)
    expected = np.cos(np.pi * d / C) ** 2
    np.testing.assert_allclose(net.layers[0].orientation_filter().detach().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(full.layers[0].orientation_filter().detach().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(net.layers[0].g.detach().numpy(), psf, atol=0)


def test_truncated_equals_first_layers(psf):
    net = SPoDNet(psf, C, n_layers=4, lam=LAM, orientation="full")
    _perturb(net, seed=5, scale=0.1)
    net.metadata = {"name": "x"}
    y = torch.rand(C, 24, 24, generator=torch.Generator().manual_seed(1))
    for k in (1, 2, 4):
        t = net.truncated(k)
        assert type(t) is SPoDNet and t.n_layers == k and t.orientation == "full"
        np.testing.assert_array_equal(t.recover(y).numpy(), net(y, n_layers=k).detach().numpy())
        for p, q in zip(t.parameters(), list(net.parameters())[:len(list(t.parameters()))]):
            assert torch.equal(p, q)
        assert t.metadata == {"name": "x"}
    assert net.n_layers == 4
    # the truncated copy is independent of the original
    t = net.truncated(2)
    with torch.no_grad():
        t.layers[0].eta.mul_(2)
    assert float(net.layers[0].eta.detach()) != float(t.layers[0].eta.detach())
    lnet = LISTANet(psf, C, n_layers=3)
    _perturb(lnet, seed=6)
    np.testing.assert_array_equal(lnet.truncated(2).recover(y).numpy(), lnet(y, n_layers=2).detach().numpy())


def test_build_network_round_trip(psf):
    for net in (SPoDNet(psf, C, n_layers=2, lam=0.1, alpha=0.2, orientation="full"),
                SPoDNet(psf, C, n_layers=2, n_harmonics=2, threshold="nst"), LISTANet(psf, C, n_layers=1)):
        clone = build_network(net.config(), net.psf.numpy())
        assert clone.config() == net.config()
        assert type(clone) is type(net)
    with pytest.raises(SPoDInputError):
        build_network({"architecture": "resnet"}, psf)


# -- gradients, caching ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda psf: SPoDNet(psf, C, n_layers=2, lam=LAM),
    lambda psf: SPoDNet(psf, C, n_layers=2, lam=LAM, orientation="full"),
    lambda psf: LISTANet(psf, C, n_layers=2, lam=LAM),
], ids=["harmonic", "full", "listanet"])
def test_gradient_flows_to_all_parameters(psf, make):
    net = make(psf)
    op = SPoDOperator(psf, C)
    y = torch.as_tensor(_normalised(simulate((24, 24), psf=psf, seed=4).observation), dtype=torch.float32)
    loss = op.objective(y, net(y), LAM)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for m in range(2):
        assert float(net.layers[m].eta.grad.abs()) > 0
        assert float(net.layers[m].theta.grad.abs()) > 0
    spatial = [net.layers[m].g if hasattr(net.layers[m], "g") else net.layers[m].weight for m in range(2)]
    assert all(float(g.grad.abs().max()) > 0 for g in spatial)


def test_inplace_parameter_change_invalidates_cache(psf):
    net = SPoDNet(psf, C, n_layers=2)
    y = torch.rand(C, 24, 24, generator=torch.Generator().manual_seed(0))
    before = net.recover(y).clone()
    with torch.no_grad():
        net.layers[0].g.mul_(1.5)
    after = net.recover(y)
    assert not torch.allclose(before, after)
    with torch.enable_grad():
        fresh = net(y).detach()
    np.testing.assert_allclose(after.numpy(), fresh.numpy(), rtol=1e-6, atol=1e-7)


# -- input checks and the threshold ------------------------------------------------------------

def test_wrong_input_raises(psf):
    net = SPoDNet(psf, C, n_layers=1)
    with pytest.raises(SPoDInputError, match="18"):
        net.recover(torch.rand(12, 24, 24))
    with pytest.raises(SPoDInputError):
        net.recover(torch.rand(24, 24))
    with pytest.raises(SPoDInputError):
        net(torch.rand(C, 24, 24), n_layers=0)
    with pytest.raises(SPoDInputError):
        SPoDNet(psf, C, n_layers=0).recover(torch.rand(C, 24, 24))


@pytest.mark.parametrize("kwargs", [dict(threshold="relu"), dict(orientation="diagonal"), dict(n_layers=-1),
                                    dict(alpha=-0.1), dict(n_harmonics=9)])
def test_bad_constructor_arguments(psf, kwargs):
    with pytest.raises(SPoDInputError):
        SPoDNet(psf, C, **kwargs)


def test_bad_psf_rejected():
    with pytest.raises(SPoDInputError):
        SPoDNet(np.zeros((5, 5)), C, n_layers=1)
    with pytest.raises(SPoDInputError):
        SPoDNet(np.ones((2, 5, 5)), C, n_layers=1)


def test_leaky_soft_threshold_formula():
    z = torch.linspace(-2, 2, 41, dtype=torch.float64)
    theta = torch.tensor(0.3, dtype=torch.float64)
    zn, t = z.numpy(), 0.3
    for alpha in (0.1, 0.5):
        expected = np.where(zn - t >= 0, zn - t, alpha * (zn - t))
        np.testing.assert_allclose(leaky_soft_threshold(z, theta, alpha).numpy(), expected, atol=1e-15)
    np.testing.assert_allclose(leaky_soft_threshold(z, theta, 0.0).numpy(), np.maximum(zn - t, 0), atol=1e-15)
    # continuous at theta, slope alpha below it
    out = leaky_soft_threshold(torch.tensor([0.3, 0.2], dtype=torch.float64), theta, 0.1).numpy()
    np.testing.assert_allclose(out, [0.0, -0.01], atol=1e-15)
    # tensor-valued (per-element) thresholds broadcast
    thetas = torch.linspace(0, 1, 41, dtype=torch.float64)
    np.testing.assert_allclose(leaky_soft_threshold(z, thetas, 0.0).numpy(), np.maximum(zn - thetas.numpy(), 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_on_cuda_matches_cpu_and_ista(psf, y64):
    op = SPoDOperator(psf, C, dtype=torch.float64, device="cuda")
    net = SPoDNet.from_operator(op, n_layers=4, lam=LAM, alpha=0.0)
    assert net.psf.device.type == "cuda"
    y = y64.to("cuda")
    x = net.recover(y)
    ref = ista(op, y, LAM, max_iter=4, tol=0).x
    np.testing.assert_allclose(x.cpu().numpy(), ref.cpu().numpy(), rtol=0, atol=1e-12)
    cpu = SPoDNet.from_operator(SPoDOperator(psf, C, dtype=torch.float64), n_layers=4, lam=LAM, alpha=0.0)
    np.testing.assert_allclose(x.cpu().numpy(), cpu.recover(y64).numpy(), rtol=0, atol=1e-10)
    # gradients on the GPU
    net32 = SPoDNet(psf, C, n_layers=2, lam=LAM).to("cuda")
    op32 = SPoDOperator(psf, C, device="cuda")
    y32 = y.float()
    op32.objective(y32, net32(y32), LAM).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net32.parameters())


# -- learned FISTA momentum (an extension beyond the paper) ------------------------------------------

@pytest.mark.parametrize("n_layers", [1, 2, 6])
def test_untrained_momentum_network_equals_fista_without_restart(n_layers):
    from napari_spodnet.core.solvers import fista

    rng = np.random.default_rng(5)
    op = SPoDOperator(rng.random((5, 7)), 18, dtype=torch.float64)
    y = torch.tensor(rng.random((2, 18, 16, 19)))
    net = SPoDNet.from_operator(op, n_layers=n_layers, lam=0.3, alpha=0.0, momentum=True)
    reference = fista(op, y, 0.3, max_iter=n_layers, tol=0, restart=False).x
    assert torch.allclose(net.recover(y), reference, rtol=0, atol=1e-9 * float(reference.abs().max()))
    if n_layers > 2:  # momentum changes the answer: it is not plain ISTA
        plain = SPoDNet.from_operator(op, n_layers=n_layers, lam=0.3, alpha=0.0).recover(y)
        assert not torch.allclose(plain, reference, atol=1e-6)


def test_momentum_survives_a_checkpoint(tmp_path):
    from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint
    from napari_spodnet.core.network import fista_momentum

    net = SPoDNet(np.ones((5, 5)), 18, n_layers=3, momentum=True)
    assert [float(layer.mu) for layer in net.layers] == pytest.approx([fista_momentum(m) for m in range(3)])
    with torch.no_grad():
        net.layers[2].mu.fill_(0.7)
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "m.safetensors"))
    assert loaded.momentum and float(loaded.layers[2].mu) == pytest.approx(0.7)
    y = torch.rand(18, 12, 12)
    assert torch.equal(loaded.recover(y), net.recover(y))


# -- log-space schedules and untied back-projection filters (issue 10) -----------------------------

@pytest.mark.parametrize("untied", [False, True])
def test_untrained_log_parameterised_network_equals_fista_without_restart(untied):
    from napari_spodnet.core.solvers import fista

    rng = np.random.default_rng(6)
    op = SPoDOperator(rng.random((5, 7)), 18, dtype=torch.float64)
    y = torch.tensor(rng.random((18, 16, 19)))
    net = SPoDNet.from_operator(op, n_layers=4, lam=0.3, alpha=0.0, momentum=True, parameterization="log",
                                untied=untied)
    assert all(float(layer.eta) == 0.0 and float(layer.step_multiplier()) == 1.0 for layer in net.layers)
    reference = fista(op, y, 0.3, max_iter=4, tol=0, restart=False).x
    assert torch.allclose(net.recover(y), reference, rtol=0, atol=1e-9 * float(reference.abs().max()))
    with torch.enable_grad():  # the autograd path computes the same thing
        assert torch.allclose(net(y), reference, rtol=0, atol=1e-9 * float(reference.abs().max()))


def test_log_parameters_move_by_factors():
    net = SPoDNet(np.ones((5, 5)), 18, n_layers=2, parameterization="log")
    with torch.no_grad():
        net.layers[1].eta.fill_(math.log(3.0))
        net.layers[1].theta.fill_(math.log(0.5))
    assert float(net.layers[1].step_multiplier()) == pytest.approx(3.0)
    assert float(net.layers[1].threshold_multiplier()) == pytest.approx(0.5)
    # the step and threshold act as multipliers of ISTA's: a prefix with a tripled step differs
    y = torch.rand(18, 12, 12, dtype=torch.float32)
    assert not torch.allclose(net.recover(y), SPoDNet(np.ones((5, 5)), 18, n_layers=2).recover(y))


def test_untied_adjoint_filters_are_used_and_trainable():
    net = SPoDNet(gaussian_psf(7, 1.2), 18, n_layers=2, untied=True, momentum=True, parameterization="log")
    layer = net.layers[0]
    names = {n for n, _ in layer.named_parameters()}
    assert {"g", "h", "g_adj", "h_adj", "eta", "theta", "mu"} == names
    assert {id(p) for p in layer.scalar_parameters()} == {id(layer.eta), id(layer.theta), id(layer.mu)}
    assert len(layer.filter_parameters()) == 4
    y = torch.rand(18, 12, 12)
    before = net.recover(y).clone()
    with torch.no_grad():
        net.layers[1].g_adj.mul_(1.5)
    assert not torch.allclose(net.recover(y), before)  # the cache saw the change
    net(y).sum().backward()
    assert net.layers[1].g_adj.grad is not None and torch.isfinite(net.layers[1].g_adj.grad).all()


def test_new_options_round_trip_through_a_checkpoint(tmp_path):
    from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint

    net = SPoDNet(gaussian_psf(7, 1.2), 18, n_layers=3, untied=True, momentum=True, parameterization="log")
    with torch.no_grad():
        net.layers[2].eta.fill_(1.2)
        net.layers[1].g_adj.mul_(0.9)
    config = net.config()
    assert config["parameterization"] == "log" and config["untied"] is True
    assert all(isinstance(v, (int, float, bool, str, list)) for v in config.values())
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "m.safetensors"))
    y = torch.rand(18, 10, 10)
    assert torch.allclose(loaded.recover(y), net.recover(y), atol=1e-6)


def test_checkpoint_from_before_issue_10_still_loads():
    """The default model shipped before log-space schedules (no 'parameterization'/'untied' in its header)."""
    from pathlib import Path

    from napari_spodnet.core.checkpoint import load_checkpoint, read_checkpoint_metadata

    path = Path(__file__).parent / "data" / "default_model_v0.safetensors"
    config, _ = read_checkpoint_metadata(path)
    assert "parameterization" not in config and "untied" not in config
    net = load_checkpoint(path)
    assert net.parameterization == "multiplier" and not net.untied and net.momentum
    # its multipliers are stored as such (near 1), not as logarithms
    assert all(0.5 < float(layer.step_multiplier()) < 2 for layer in net.layers)
    y = torch.rand(18, 40, 40)
    x = net.recover(y)
    assert x.shape == (18, 71, 71) and torch.isfinite(x).all()


def test_bad_parameterization_rejected():
    with pytest.raises(SPoDInputError, match="parameterization"):
        SPoDNet(np.ones((3, 3)), 18, n_layers=1, parameterization="exp")


# -- the Fourier preconditioner (issue 10) ----------------------------------------------------------

def _held_out(psf_arr, size=48, photons=1000.0, seed=7):
    sim = simulate((size, size), psf=psf_arr, seed=seed, photons=photons)
    return torch.as_tensor(_normalised(sim.observation).astype(np.float32))


def test_untrained_preconditioner_beats_plain_fista_steps():
    """The Wiener-like step (delta = 0.1) with FISTA momentum must reach a lower objective in 10 layers than
    10 plain FISTA steps: the probe measured about 2x fewer iterations for the same objective."""
    psf_arr = gaussian_psf(15, 2.5)
    op = SPoDOperator(psf_arr, C)
    y = _held_out(psf_arr)
    common = dict(n_layers=10, lam=LAM, alpha=0.0, momentum=True, parameterization="log")
    plain = SPoDNet.from_operator(op, **common)
    precond = SPoDNet.from_operator(op, **common, preconditioned=True)
    f_plain = float(op.objective(y, plain.recover(y), LAM))
    f_precond = float(op.objective(y, precond.recover(y), LAM))
    assert f_precond < f_plain - 0.02 * abs(f_plain), (f_precond, f_plain)


def test_preconditioner_formula_and_limits():
    net = SPoDNet(gaussian_psf(7, 1.2), C, n_layers=1, preconditioned=True, parameterization="log")
    layer = net.layers[0]
    spec = torch.fft.rfft2(layer.g.detach(), s=(32, 32))
    with torch.no_grad():
        p = layer.preconditioner(spec)
        power = spec.abs() ** 2 / spec.abs()[0, 0] ** 2
        delta = math.exp(float(layer.log_delta[0]))
        assert p.shape == (3, 32, 17)
        assert torch.allclose(p[0], (1 + delta) / (power + delta), rtol=1e-5)
        assert torch.allclose(p[1], (1 + delta) / (0.25 * power + delta), rtol=1e-5)
        assert abs(float(p[0, 0, 0]) - 1.0) < 1e-6  # the intensity's DC keeps ISTA's step
        layer.log_delta.fill_(5.0)  # delta -> large: the plain gradient step
        assert float((layer.preconditioner(spec) - 1).abs().max()) < 0.01
        layer.log_shape[:, -1] = 1.0  # the radial correction reaches the highest frequencies only
        q = layer.preconditioner(spec)
        assert abs(float(q[0, 0, 0]) - float(layer.preconditioner(spec)[0, 0, 0])) < 1e-6
        assert float(q[0, 16, 16]) > 2.0


def test_preconditioner_parameters_are_scalars_and_trainable():
    psf_arr = gaussian_psf(7, 1.2)
    net = SPoDNet(psf_arr, C, n_layers=3, preconditioned=True, momentum=True, parameterization="log")
    layer = net.layers[1]
    names = {id(p) for p in layer.scalar_parameters()}
    assert id(layer.log_delta) in names and id(layer.log_shape) in names
    assert id(layer.g) not in names
    y = torch.rand(2, C, 16, 16)
    net(y).sum().backward()
    assert layer.log_delta.grad is not None and float(layer.log_delta.grad.abs().sum()) > 0
    assert layer.log_shape.grad is not None and float(layer.log_shape.grad.abs().sum()) > 0


def test_preconditioned_network_round_trips_and_rejects_full_orientation(tmp_path):
    from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint

    net = SPoDNet(gaussian_psf(7, 1.2), C, n_layers=3, preconditioned=True, momentum=True, parameterization="log")
    with torch.no_grad():
        net.layers[1].log_delta.fill_(-2.0)
        net.layers[2].log_shape[0, 3] = 0.7
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "p.safetensors"))
    assert loaded.preconditioned and loaded.config()["preconditioned"] is True
    y = torch.rand(C, 12, 12)
    assert torch.allclose(loaded.recover(y), net.recover(y), atol=1e-6)
    assert "preconditioned" not in SPoDNet(gaussian_psf(7, 1.2), C, n_layers=1).config()  # old headers unchanged
    with pytest.raises(SPoDInputError, match="harmonic"):
        SPoDNet(gaussian_psf(7, 1.2), C, n_layers=1, orientation="full", preconditioned=True)


def test_build_network_refuses_settings_it_does_not_know_by_name(psf):
    config = SPoDNet(psf, C, n_layers=2).config()
    config["from_the_future"] = 3
    with pytest.raises(SPoDInputError, match="from_the_future.*newer version"):
        build_network(config, psf)


def test_network_pickles_after_inference(psf):
    import pickle

    net = SPoDNet(psf, C, n_layers=2, preconditioned=True)
    y = torch.rand(C, 12, 12)
    x = net.recover(y)  # fills the spectra cache (closures)
    assert torch.equal(pickle.loads(pickle.dumps(net)).recover(y), x)


def test_shipped_model_of_session_12_still_loads():
    """The default model shipped before the preconditioner (untied filters, log schedule)."""
    from pathlib import Path

    from napari_spodnet.core.checkpoint import load_checkpoint

    net = load_checkpoint(Path(__file__).parent / "data" / "default_model_v1.safetensors")
    assert net.untied and not net.preconditioned and net.parameterization == "log"
    x = net.recover(torch.rand(C, 40, 40))
    assert x.shape == (C, 71, 71) and torch.isfinite(x).all()


def test_shipped_models_of_sessions_13_and_15_still_load():
    """The default models shipped before (150 and 300 epochs of the standard recipe) load and recover; the
    shipped one is the session-15 model fine-tuned, and says so."""
    from pathlib import Path

    from napari_spodnet.core.checkpoint import load_checkpoint
    from napari_spodnet.core.recover import DEFAULT_MODEL_PATH

    v2 = load_checkpoint(Path(__file__).parent / "data" / "default_model_v2.safetensors")
    v3 = load_checkpoint(Path(__file__).parent / "data" / "default_model_v3.safetensors")
    new = load_checkpoint(DEFAULT_MODEL_PATH)
    assert v2.preconditioned and v2.metadata["training"]["config"]["epochs"] == 150
    assert v3.preconditioned and v3.metadata["training"]["config"]["epochs"] == 300
    assert new.metadata["fine_tuned_from"]["seconds"] == v3.metadata["training"]["seconds"]
    assert new.metadata["training_data"] == "half-clusters"
    y = torch.rand(C, 40, 40, generator=torch.Generator().manual_seed(0))
    outputs = [net.recover(y) for net in (v2, v3, new)]
    assert all(x.shape == (C, 71, 71) and torch.isfinite(x).all() for x in outputs)
    assert not torch.equal(outputs[0], outputs[2]) and not torch.equal(outputs[1], outputs[2])


@pytest.mark.parametrize("options", [dict(), dict(untied=True), dict(preconditioned=True), dict(n_harmonics=2)],
                         ids=["tied", "untied", "preconditioned", "two-harmonics"])
def test_low_rank_inference_equals_the_autograd_path(options):
    """recover() runs the fused low-rank layer (fused_ops); it must compute what forward() with autograd does."""
    net = SPoDNet(gaussian_psf(9, 1.5), C, n_layers=4, momentum=True, parameterization="log", **options)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net.layers:  # move every parameter off its initial value
            for p in layer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype) * (p.abs().mean() + 0.1))
    y = torch.rand(2, C, 20, 24, generator=gen)
    fused = net.recover(y)
    assert net._fused(1, (28, 32)) is not None
    with torch.enable_grad():
        reference = net(y).detach()
    assert torch.allclose(fused, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


# -- noise-adaptive schedule -------------------------------------------------------------------------

def test_noise_feature_measures_the_noise_not_the_structure():
    from napari_spodnet.core.families import simulate_family
    from napari_spodnet.core.network import NOISE_FEATURE_BOUND, noise_feature
    from napari_spodnet.core.preprocess import fit_normalization

    psf = gaussian_psf(9, 1.5)
    def phi(sim):
        y = torch.as_tensor(fit_normalization(sim.observation).apply(sim.observation))
        return float(noise_feature(y))
    for photons in (50.0, 1000.0):
        a = phi(simulate((64, 64), psf=psf, seed=2, photons=photons))
        b = phi(simulate_family("membranes", (64, 64), psf=psf, seed=2, photons=photons))
        assert abs(a - b) < 0.5  # the structure changes it little ...
    # ... the photon count a lot (noise ~ 1 / photons in normalised units)
    assert phi(simulate((64, 64), psf=psf, seed=2, photons=50.0)) - phi(
        simulate((64, 64), psf=psf, seed=2, photons=1000.0)) > 2.0
    assert noise_feature(torch.rand(2, C, 16, 16)).shape == (2, 1, 1, 1)
    assert float(noise_feature(torch.zeros(C, 16, 16))) == -NOISE_FEATURE_BOUND  # clamped, finite


def test_noise_adaptive_schedule_per_observation():
    net = SPoDNet(gaussian_psf(9, 1.5), C, n_layers=4, momentum=True, parameterization="log", preconditioned=True,
                  noise_adaptive=True)
    plain = SPoDNet(gaussian_psf(9, 1.5), C, n_layers=4, momentum=True, parameterization="log", preconditioned=True)
    gen = torch.Generator().manual_seed(0)
    y = torch.stack([torch.rand(C, 20, 24, generator=gen), 0.2 * torch.rand(C, 20, 24, generator=gen)])
    assert torch.equal(net.recover(y), plain.recover(y))  # slopes start at 0: the plain schedule
    with torch.no_grad():
        for layer in net.layers:
            layer.eta_slope.fill_(0.3), layer.theta_slope.fill_(-0.6), layer.mu_slope.fill_(0.2)
    batched = net.recover(y)
    assert not torch.allclose(batched, plain.recover(y))
    one_by_one = torch.stack([net.recover(v) for v in y])
    assert torch.allclose(batched, one_by_one, atol=1e-6)  # each observation its own schedule
    with torch.enable_grad():
        reference = net(y)
        reference.sum().backward()
    assert torch.allclose(batched, reference.detach(), rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
    assert all(float(layer.theta_slope.grad.abs()) > 0 for layer in net.layers[1:])


def test_noise_adaptive_network_round_trips_through_a_checkpoint(tmp_path):
    from napari_spodnet.core.checkpoint import load_checkpoint, save_checkpoint

    net = SPoDNet(gaussian_psf(7, 1.2), C, n_layers=3, momentum=True, parameterization="log", noise_adaptive=True)
    with torch.no_grad():
        net.layers[1].theta_slope.fill_(0.7)
    assert net.config()["noise_adaptive"] is True
    assert "noise_adaptive" not in SPoDNet(gaussian_psf(7, 1.2), C, n_layers=1).config()  # older headers unchanged
    loaded = load_checkpoint(save_checkpoint(net, tmp_path / "m.safetensors"))
    y = torch.rand(C, 10, 10)
    assert loaded.noise_adaptive and torch.allclose(loaded.recover(y), net.recover(y), atol=1e-6)


def test_linear_transfer_of_ista_and_fista_steps():
    """Without thresholds, M ISTA steps map a mode of curvature kappa (1 = Lipschitz) by (1 - kappa)^M, and M
    FISTA steps by FISTA's own recurrence on the scalar quadratic kappa / 2 e^2."""
    from napari_spodnet.core.network import fista_momentum, harmonic_gains
    from napari_spodnet.core.physics import fft_shape

    psf_arr = gaussian_psf(9, 1.5)
    hw = (40, 40)
    spectrum = torch.fft.rfft2(torch.as_tensor(psf_arr / psf_arr.sum(), dtype=torch.float32), s=fft_shape(hw))
    power = spectrum.abs().pow(2) / spectrum.abs().pow(2)[0, 0]
    kappa = harmonic_gains(C, 1).float()[:, None, None] * power
    ista_net = SPoDNet(psf_arr, C, n_layers=6, parameterization="log")
    assert torch.allclose(ista_net.linear_transfer(hw), (1 - kappa).abs().pow(6), atol=1e-5)
    fista_net = SPoDNet(psf_arr, C, n_layers=6, parameterization="log", momentum=True)
    e_prev, z = torch.ones_like(kappa), torch.ones_like(kappa)
    for m in range(6):
        e = (1 - kappa) * z
        z = e + fista_momentum(m) * (e - e_prev) if m > 0 else e
        e_prev = e
    assert torch.allclose(fista_net.linear_transfer(hw), e.abs(), atol=1e-5)
    assert float(fista_net.linear_transfer(hw).max()) <= 1 + 1e-5  # FISTA never amplifies a mode


def test_linear_transfer_flags_an_overshooting_schedule_and_is_differentiable():
    net = SPoDNet(gaussian_psf(9, 1.5), C, n_layers=4, parameterization="log", momentum=True, preconditioned=True)
    with torch.no_grad():
        for layer in net.layers:
            layer.eta.fill_(math.log(3.0))  # 3x ISTA's step: the stiffest modes flip sign and grow
    transfer = net.linear_transfer((40, 40))
    assert float(transfer.max()) > 4
    transfer.max().backward()
    assert float(net.layers[2].eta.grad) > 0  # a smaller step would amplify less
    with pytest.raises(SPoDInputError, match="harmonic"):
        SPoDNet(gaussian_psf(9, 1.5), C, n_layers=1, orientation="full").linear_transfer((40, 40))
