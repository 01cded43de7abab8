"""The solver's fused operator steps equal their unfused definitions (float64, batched or not)."""

import numpy as np
import pytest
import torch

from napari_spodnet.core.physics import SPoDOperator


@pytest.mark.parametrize("batch", [(), (3,)])
def test_residual_and_gradient_step_match_definitions(batch):
    rng = np.random.default_rng(0)
    psf = rng.random((5, 4))
    op = SPoDOperator(psf, 18, dtype=torch.float64)
    x = torch.as_tensor(rng.random((*batch, 18, 30, 27)))
    y = torch.as_tensor(rng.random((*batch, 18, 26, 24)))
    torch.testing.assert_close(op.residual(x, y), op.forward(x) - y, rtol=1e-12, atol=1e-12)
    r = op.residual(x, y)
    z = torch.as_tensor(rng.random(x.shape))
    expected = z - 0.3 * op.adjoint(r) - 0.01
    torch.testing.assert_close(op.gradient_step(r, z, -0.3, 0.01), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.gradient_step(r, z, -0.3), z - 0.3 * op.adjoint(r), rtol=1e-12, atol=1e-12)


def test_residual_broadcasts_one_observation_over_a_batch():
    rng = np.random.default_rng(1)
    op = SPoDOperator(rng.random((3, 3)), 18, dtype=torch.float64)
    x = torch.as_tensor(rng.random((2, 18, 12, 12)))
    y = torch.as_tensor(rng.random((18, 10, 10)))
    torch.testing.assert_close(op.residual(x, y), op.forward(x) - y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch", [(), (2,)])
def test_low_rank_steps_match_definitions(batch):
    """The solver's 3-channel form: u = L^T (A x - y), ||A x - y||^2 from u, and the step from u."""
    rng = np.random.default_rng(2)
    op = SPoDOperator(rng.random((5, 4)), 18, dtype=torch.float64)
    x = torch.as_tensor(rng.random((*batch, 18, 30, 27)))
    y = torch.as_tensor(rng.random((*batch, 18, 26, 24)))
    r = op.forward(x) - y
    u = op.low_rank_residual(op.blur_projected(op.project(x)), op.mix_adjoint(y))
    torch.testing.assert_close(u, op.mix_adjoint(r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.squared_residual(u, op.unexplained_energy(y)), r.square().sum(dim=(-3, -2, -1)),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.project(x)[..., 0, :, :].sum(dim=(-2, -1)), x.sum(dim=(-3, -2, -1)))
    z = torch.as_tensor(rng.random(x.shape))
    expected = z - 0.3 * op.adjoint(r) - 0.01
    torch.testing.assert_close(op.back_project_step(u, z, -0.3, 0.01), expected, rtol=1e-12, atol=1e-12)
    in_place = z.clone()
    out = op.back_project_step(u, in_place, -0.3, 0.01, in_place=True)
    assert out.data_ptr() == in_place.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _textbook_fista(op, y, lam, iterations):
    """FISTA with function-value restart written from its definition (c-channel residuals,
    objective from op.objective): what the fused low-rank loop must reproduce."""
    n_obs, n_img = op.sizes(y.shape)
    s = n_obs / op.lipschitz_bound()
    x = torch.zeros((18, *op.image_shape(y.shape)), dtype=y.dtype)
    z, t, f_prev, history = x, 1.0, float(op.objective(y, x, lam)), []
    for _ in range(iterations):
        x_new = torch.clamp(z - s * op.gradient(y, z) - s * lam / n_img, min=0)
        f_new = float(op.objective(y, x_new, lam))
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        beta = (t - 1) / t_new
        if f_new > f_prev + 10 * np.finfo(np.float64).eps * abs(f_prev):
            x_new, f_new, t_new, beta = x, f_prev, 1.0, 0.0
        z = x_new + beta * (x_new - x)
        x, t, f_prev = x_new, t_new, f_new
        history.append(f_new)
    return x, np.asarray(history)


def test_fused_fista_equals_the_textbook_loop():
    from napari_spodnet.core.simulate import simulate
    from napari_spodnet.core.solvers import fista

    sim = simulate((40, 40), seed=4)
    op = SPoDOperator(sim.psf, 18, dtype=torch.float64)
    y = torch.as_tensor(sim.observation / sim.observation.max(), dtype=torch.float64)
    x_ref, history_ref = _textbook_fista(op, y, 0.05, 60)
    result = fista(op, y, 0.05, max_iter=60, tol=0)
    np.testing.assert_allclose(result.history, history_ref, rtol=1e-10)
    torch.testing.assert_close(result.x, x_ref, rtol=1e-8, atol=1e-10)
    # float32 (the working precision): the same trajectory to float32 rounding
    result32 = fista(op.to(dtype=torch.float32), y.float(), 0.05, max_iter=60, tol=0)
    np.testing.assert_allclose(result32.history, history_ref, rtol=2e-6)
    assert float((result32.x.double() - x_ref).norm() / x_ref.norm()) < 1e-5


def test_stopping_test_still_stops_at_the_same_iteration():
    """The L1 bound only skips computing ||x||_2 while the step is too large to stop anyway:
    FISTA stops at the first iteration whose relative change is below tol, as before."""
    from napari_spodnet.core.simulate import simulate
    from napari_spodnet.core.solvers import fista

    sim = simulate((32, 32), seed=5)
    op = SPoDOperator(sim.psf, 18, dtype=torch.float64)
    y = torch.as_tensor(sim.observation / sim.observation.max(), dtype=torch.float64)
    tol = 5e-3  # reached after some dozens of iterations on this problem
    iterates = []
    fista(op, y, 0.05, max_iter=400, tol=0, callback=lambda it, f, x: iterates.append(x.clone()) and False)
    changes = [float((b - a).norm() / b.norm()) for a, b in zip(iterates, iterates[1:])]
    expected = next(k + 2 for k, change in enumerate(changes) if change < tol)  # iterations are 1-based
    result = fista(op, y, 0.05, max_iter=400, tol=tol)
    assert result.converged and result.iterations == expected and expected > 2
