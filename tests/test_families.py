"""The held-out structure families (core.families): what every family must give a benchmark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_spodnet.core.families import FAMILIES, simulate_family
from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.simulate import gaussian_psf
from napari_spodnet.core.validation import SPoDInputError

PSF = gaussian_psf(9, 1.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_a_physical_observation(family):
    sim = simulate_family(family, (64, 64), psf=PSF, seed=3, photons=300, noise=False)
    c, h, w = sim.truth.shape
    assert sim.observation.shape == (18, 64, 64) and (c, h, w) == (18, 64 + 8, 64 + 8)
    assert sim.truth.min() >= 0 and sim.truth.sum() > 0
    assert sim.params["family"] == family
    # the observation is the blurred truth (the same camera model as simulate): A truth = clean
    blurred = SPoDOperator(PSF, 18, dtype=torch.float64).forward(torch.as_tensor(sim.truth, dtype=torch.float64))
    np.testing.assert_allclose(blurred.numpy(), sim.clean, rtol=1e-4, atol=1e-6 * sim.clean.max())
    assert sim.clean.max() == pytest.approx(300, rel=1e-3)
    # structure fills a real part of the field of view, not a stub at the border
    inside = sim.truth.sum(0)[4:-4, 4:-4]
    assert (inside > 0).mean() > 0.01


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_seeded(family):
    a = simulate_family(family, (48, 48), psf=PSF, seed=5)
    b = simulate_family(family, (48, 48), psf=PSF, seed=5)
    c = simulate_family(family, (48, 48), psf=PSF, seed=6)
    np.testing.assert_array_equal(a.observation, b.observation)
    assert not np.array_equal(a.truth, c.truth)


def test_textures_are_oriented_patches():
    """The fibres of a patch share one orientation: over a patch the dipole angles add up coherently."""
    from scipy import ndimage

    sim = simulate_family("textures", (96, 96), psf=PSF, seed=1, noise=False)
    t = np.arange(18) * np.pi / 18
    total = sim.truth.sum(0)
    harmonic = np.tensordot(np.exp(2j * t), sim.truth, axes=1)  # |.| / total is 1 for a single orientation
    patches, n = ndimage.label(ndimage.binary_dilation(total > 0, iterations=3))
    coherence = [abs(harmonic[patches == k].sum()) / total[patches == k].sum()
                 for k in range(1, n + 1) if (patches == k).sum() > 100]
    assert len(coherence) >= 2
    assert np.median(coherence) > 0.4  # random fibre angles would give about 1 / sqrt(number of fibres)


def _coherence(truth):
    """Per connected structure, |sum of the dipoles' second harmonic| / total: 1 for a single orientation."""
    from scipy import ndimage

    t = np.arange(18) * np.pi / 18
    total = truth.sum(0)
    harmonic = np.tensordot(np.exp(2j * t), truth, axes=1)
    parts, n = ndimage.label(ndimage.binary_dilation(total > 0, iterations=3))
    return [abs(harmonic[parts == k].sum()) / total[parts == k].sum() for k in range(1, n + 1) if (parts == k).sum() > 100]


def test_bundles_are_aligned_and_mesh_is_not():
    """A bundle's filaments run side by side (one orientation per bundle); a mesh crosses every orientation."""
    bundles = _coherence(simulate_family("bundles", (128, 128), psf=PSF, seed=4, noise=False).truth)
    mesh = _coherence(simulate_family("mesh", (128, 128), psf=PSF, seed=4, noise=False).truth)
    assert bundles and mesh
    assert np.median(bundles) > 0.6 and np.median(mesh) < 0.3


def test_unknown_family():
    with pytest.raises(SPoDInputError, match="Unknown structure family"):
        simulate_family("spirals", (32, 32), psf=PSF)
