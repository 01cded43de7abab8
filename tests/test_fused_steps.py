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
