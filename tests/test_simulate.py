"""Tests of the synthetic SPoD generator (core/simulate.py)."""

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import torch

from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.simulate import (
    SimulatedObservation,
    SimulatedTimeSeries,
    airy_psf,
    default_psf,
    gaussian_psf,
    orientation_weights,
    psf_fwhm,
    render_filament,
    render_puncta,
    simulate,
    simulate_time_series,
)
from napari_spodnet.core.validation import SPoDInputError


def centroid(img):
    img = np.asarray(img, dtype=np.float64)
    rows, cols = np.indices(img.shape)
    return (rows * img).sum() / img.sum(), (cols * img).sum() / img.sum()


# -- PSFs ---------------------------------------------------------------------------------

PSFS = [
    ("gauss-32", lambda: gaussian_psf()),
    ("gauss-15", lambda: gaussian_psf(15, 1.3)),
    ("airy-32", lambda: airy_psf()),
    ("airy-33", lambda: airy_psf(33)),
    ("airy-24-na14", lambda: airy_psf(24, na=1.4, wavelength_nm=600, pixel_nm=80)),
]


@pytest.mark.parametrize("name,make", PSFS, ids=[p[0] for p in PSFS])
def test_psf_normalised_centred_symmetric(name, make):
    psf = make()
    assert psf.dtype == np.float32 and psf.ndim == 2 and psf.shape[0] == psf.shape[1]
    assert (psf >= 0).all()
    assert psf.sum() == pytest.approx(1.0, abs=1e-5)
    centre = (psf.shape[0] - 1) / 2
    assert centroid(psf) == pytest.approx((centre, centre), abs=1e-4)
    peak = psf.max()
    np.testing.assert_allclose(psf, psf[::-1, :], atol=1e-6 * peak)
    np.testing.assert_allclose(psf, psf[:, ::-1], atol=1e-6 * peak)
    np.testing.assert_allclose(psf, psf.T, atol=1e-6 * peak)
    # The peak is in the middle: the four (even) or one (odd) centre pixels are the largest.
    lo, hi = int(np.floor(centre)), int(np.ceil(centre))
    assert psf[lo:hi + 1, lo:hi + 1].min() == pytest.approx(peak)


def test_default_psf_is_airy_with_documented_width():
    psf = default_psf()
    assert psf.shape == (32, 32) and psf.dtype == np.float32
    np.testing.assert_array_equal(psf, airy_psf())
    fwhm = psf_fwhm(psf)
    # 0.51 lambda/NA = 223 nm = 3.43 px at 65 nm/px; pixel integration broadens it slightly.
    assert 3.0 <= fwhm <= 4.0, fwhm
    assert fwhm == pytest.approx(0.514 * 520 / 1.2 / 65, rel=0.06)
    # Almost all the energy fits the 32 x 32 support: the border rows are tiny.
    assert psf[0].max() < 1e-3 * psf.max() and psf[:, 0].max() < 1e-3 * psf.max()


def test_gaussian_fwhm():
    for sigma in (1.5, 2.0, 3.0):
        fwhm = psf_fwhm(gaussian_psf(41, sigma))
        # Pixel integration adds variance 1/12 px^2.
        expected = 2 * math.sqrt(2 * math.log(2)) * math.sqrt(sigma ** 2 + 1 / 12)
        assert fwhm == pytest.approx(expected, rel=0.02), (sigma, fwhm)


def _first_minimum(profile):
    for i in range(1, len(profile) - 1):
        if profile[i] < profile[i - 1] and profile[i] <= profile[i + 1]:
            return i
    raise AssertionError("no minimum")


def test_airy_first_dark_ring():
    # Finely sampled (10 nm px): the ring at 0.61 lambda / NA = 264 nm is at 26.4 px.
    psf = airy_psf(129, na=1.2, wavelength_nm=520, pixel_nm=10)
    row = psf[64, 64:].astype(np.float64)
    r_min = _first_minimum(row)
    assert abs(r_min - 0.61 * 520 / 1.2 / 10) <= 1.0, r_min
    assert row[r_min] < 1e-3 * row[0]  # really dark
    # Default sampling: 4.07 px; pixels centred at integer radii on an odd grid.
    row = airy_psf(33)[16, 16:].astype(np.float64)
    assert _first_minimum(row) == 4
    # And it scales with lambda / NA.
    row = airy_psf(129, na=1.0, wavelength_nm=650, pixel_nm=10)[64, 64:].astype(np.float64)
    assert abs(_first_minimum(row) - 0.61 * 650 / 1.0 / 10) <= 1.0


@pytest.mark.parametrize("call", [
    lambda: gaussian_psf(0), lambda: gaussian_psf(32, -1.0), lambda: gaussian_psf(32, float("nan")),
    lambda: airy_psf(na=0), lambda: airy_psf(wavelength_nm=-5), lambda: airy_psf(pixel_nm=0),
    lambda: airy_psf(size=2.5), lambda: airy_psf(supersample=0),
])
def test_psf_rejects_bad_arguments(call):
    with pytest.raises(SPoDInputError):
        call()


# -- rendering and orientation ------------------------------------------------------------

def test_orientation_weights_convention():
    c = 18
    k0, k1, w0, w1 = orientation_weights(np.array([0.0, np.pi / 2, np.pi / 4, np.pi, 3 * np.pi / 4, -np.pi / 36]), c)
    assert (k0[0], w0[0]) == (0, 1.0)
    assert (k0[1], w0[1], w1[1]) == (9, 1.0, 0.0)  # exact: no rounding leak into channel 10
    assert (k0[2], k1[2]) == (4, 5) and w0[2] == pytest.approx(0.5) and w1[2] == pytest.approx(0.5)
    assert (k0[3], w0[3]) == (0, 1.0)  # period pi
    assert (k0[4], k1[4]) == (13, 14) and w1[4] == pytest.approx(0.5)
    assert (k0[5], k1[5]) == (17, 0) and w0[5] == pytest.approx(0.5)  # -5 deg = 175 deg = channel 17.5
    np.testing.assert_allclose(w0 + w1, 1.0)
    # Every channel angle pi k / c maps exactly onto channel k (no 1e-16 leak into k + 1).
    for n in (7, 12, 18):
        k = np.arange(n)
        k0, _, w0, w1 = orientation_weights(np.pi * k / n, n)
        np.testing.assert_array_equal(k0, k)
        assert (w1 == 0).all() and (w0 == 1).all()


@pytest.mark.parametrize("c", [18, 12])
def test_horizontal_filament_in_channel_0_vertical_in_channel_half(c):
    shape = (40, 60)
    horiz = render_filament([(20.0, 5.0), (20.0, 50.0)], shape, c, intensity=2.0)
    assert horiz.shape == (c, *shape)
    assert horiz.sum() == pytest.approx(2.0 * 45.0)
    assert horiz[0].sum() == pytest.approx(horiz.sum())
    assert np.count_nonzero(horiz[1:]) == 0

    vert = render_filament([(35.0, 30.0), (3.0, 30.0)], shape, c, intensity=1.0)
    assert vert[c // 2].sum() == pytest.approx(32.0)
    assert np.count_nonzero(np.delete(vert, c // 2, axis=0)) == 0
    # A filament with no head or tail: the opposite direction gives the same image.
    np.testing.assert_allclose(render_filament([(3.0, 30.0), (35.0, 30.0)], shape, c), vert, atol=1e-12)


def test_diagonal_filament_follows_angle_convention():
    c = 18
    shape = (50, 50)
    # Up-right as displayed (row decreasing, column increasing): phi = 45 deg = channel 4.5.
    up_right = render_filament([(40.0, 5.0), (10.0, 35.0)], shape, c)
    sums = up_right.sum(axis=(1, 2))
    assert sums[4] == pytest.approx(sums[5]) and sums[4] + sums[5] == pytest.approx(sums.sum())
    # Down-right: phi = 135 deg = channel 13.5.
    sums = render_filament([(10.0, 5.0), (40.0, 35.0)], shape, c).sum(axis=(1, 2))
    assert sums[13] == pytest.approx(sums[14]) and sums[13] + sums[14] == pytest.approx(sums.sum())
    # 30 deg = channel 3 exactly.
    ang = math.radians(30)
    sums = render_filament([(40.0, 5.0), (40.0 - 30 * math.sin(ang), 5.0 + 30 * math.cos(ang))], shape, c).sum(
        axis=(1, 2))
    assert sums[3] == pytest.approx(sums.sum(), rel=1e-9)


def test_filament_is_thin_and_subpixel():
    img = render_filament([(20.3, 5.0), (20.3, 50.0)], (40, 60), 18).sum(0)
    rows_hit = np.nonzero(img.sum(1))[0]
    assert list(rows_hit) == [20, 21]
    assert centroid(img)[0] == pytest.approx(20.3, abs=1e-9)
    # Varying intensity along the filament is interpolated along the arc length.
    ramp = render_filament([(10.0, 0.0), (10.0, 40.0)], (20, 50), 18, intensity=[0.0, 2.0]).sum(0)[10]
    assert ramp[30] > ramp[10] > 0 and ramp.sum() == pytest.approx(40.0, rel=1e-3)
    with pytest.raises(SPoDInputError):
        render_filament([(1.0, 2.0)], (10, 10), 18)


def test_render_puncta_bilinear_and_oriented():
    img = render_puncta([(5.25, 7.5), (20.0, 20.0)], [np.pi / 2, np.pi / 6], [4.0, 1.0], (30, 30), 18)
    assert img.sum() == pytest.approx(5.0)
    assert img[9].sum() == pytest.approx(4.0) and img[3].sum() == pytest.approx(1.0)
    assert centroid(img[9]) == pytest.approx((5.25, 7.5))
    assert img[3, 20, 20] == pytest.approx(1.0)
    with pytest.raises(SPoDInputError, match="intensities"):
        render_puncta([(1.0, 2.0), (3.0, 4.0)], 0.0, [1.0, 2.0, 3.0], (10, 10), 18)
    with pytest.raises(SPoDInputError, match="n_channels"):
        render_puncta([(1.0, 2.0)], 0.0, 1.0, (10, 10), 2)


# -- simulate --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    return simulate((96, 80), seed=3)


def test_simulate_shapes_and_dtypes(sim):
    assert isinstance(sim, SimulatedObservation)
    a, b = sim.psf.shape
    assert (a, b) == (32, 32)
    assert sim.observation.shape == (18, 96, 80) and sim.clean.shape == (18, 96, 80)
    assert sim.truth.shape == (18, 96 + a - 1, 80 + b - 1)
    for arr in (sim.observation, sim.psf, sim.truth, sim.clean):
        assert arr.dtype == np.float32
    assert sim.psf.sum() == pytest.approx(1.0, abs=1e-5)
    for key in ("seed", "shape", "n_channels", "n_filaments", "n_puncta", "photons", "background", "offset",
                "read_noise", "noise", "psf_shape"):
        assert key in sim.params
    assert sim.params["seed"] == 3


def test_simulate_custom_psf_and_channels():
    psf = gaussian_psf(15, 1.5)
    out = simulate((40, 50), n_channels=12, psf=psf, seed=1, n_filaments=3, n_puncta=5)
    assert out.truth.shape == (12, 54, 64) and out.observation.shape == (12, 40, 50)
    np.testing.assert_array_equal(out.psf, psf)
    assert out.params["n_filaments"] == 3 and out.params["n_puncta"] == 5


def test_default_counts_scale_with_area():
    p = simulate((256, 256), noise=False).params
    assert (p["n_filaments"], p["n_puncta"]) == (8, 30)
    p = simulate((128, 128), noise=False).params
    assert (p["n_filaments"], p["n_puncta"]) == (2, 8)


def test_deterministic_per_seed_and_different_across_seeds():
    a = simulate((64, 64), seed=11)
    b = simulate((64, 64), seed=11)
    for name in ("observation", "truth", "clean", "psf"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params
    c = simulate((64, 64), seed=12)
    assert not np.array_equal(a.truth, c.truth)
    assert not np.array_equal(a.observation, c.observation)


def test_truth_nonnegative_sparse_and_scaled(sim):
    assert (sim.truth >= 0).all()
    assert (sim.truth > 0).mean() < 0.1
    assert 0 < (sim.truth.sum(0) > 0).mean() < 0.2  # pixels with any structure
    assert sim.clean.max() == pytest.approx(sim.params["photons"], rel=1e-5)
    # Both kinds of structure are present: more than a few orientation channels are used.
    assert (sim.truth.sum(axis=(1, 2)) > 0).sum() >= 6


def test_clean_is_forward_model_of_truth(sim):
    op = SPoDOperator(sim.psf, 18, dtype=torch.float64)
    expected = op.forward(torch.from_numpy(sim.truth)).numpy()
    np.testing.assert_allclose(sim.clean, expected, rtol=1e-5, atol=1e-5 * sim.clean.max())


def test_clean_matches_independent_reference():
    """method.md section 3 with scipy: y_t = sum_k cos^2(pi (t-k)/c) convolve2d(x_k, phi, 'valid')."""
    c = 6
    psf = airy_psf(9, pixel_nm=100)
    out = simulate((30, 24), n_channels=c, psf=psf, seed=5, n_filaments=2, n_puncta=4)
    blurred = np.stack([scipy.signal.convolve2d(out.truth[k].astype(np.float64), psf.astype(np.float64), "valid")
                        for k in range(c)])
    t = np.arange(c)
    mix = np.cos(np.pi * (t[:, None] - t[None, :]) / c) ** 2
    ref = np.einsum("tk,khw->thw", mix, blurred)
    np.testing.assert_allclose(out.clean, ref, rtol=1e-4, atol=1e-4 * ref.max())


def test_noise_free_is_exact_expectation():
    out = simulate((48, 48), seed=2, background=3.5, offset=90.0, noise=False)
    np.testing.assert_array_equal(out.observation, (out.clean.astype(np.float64) + 3.5 + 90.0).astype(np.float32))


def test_noise_statistics_poisson_plus_read_noise():
    bg, off, rn = 50.0, 100.0, 3.0
    out = simulate((128, 128), seed=4, photons=5000.0, background=bg, offset=off, read_noise=rn)
    expected = out.clean.astype(np.float64) + bg
    signal = out.observation.astype(np.float64) - off
    # Means: over all pixels and relative to the expectation.
    assert signal.mean() == pytest.approx(expected.mean(), rel=0.005)
    resid = signal - expected
    assert abs(resid.mean()) < 0.05 * math.sqrt(expected.mean() + rn ** 2)
    # Variance = Poisson (the expectation) + read noise^2, both in flat background and bright pixels.
    z = resid / np.sqrt(expected + rn ** 2)
    assert z.var() == pytest.approx(1.0, rel=0.03)
    bright = expected > 500
    assert bright.sum() > 1500
    assert z[bright].var() == pytest.approx(1.0, rel=0.1)
    assert z[expected < bg + 1].var() == pytest.approx(1.0, rel=0.03)
    # Poisson, not constant-variance noise: bright pixels are noisier in counts.
    assert resid[bright].var() > 5 * resid[expected < bg + 1].var()


def test_read_noise_alone():
    out = simulate((64, 64), seed=6, photons=0.0, background=0.0, offset=100.0, read_noise=4.0)
    assert (out.truth == 0).all() and (out.clean == 0).all()
    assert out.observation.mean() == pytest.approx(100.0, abs=0.1)
    assert out.observation.std() == pytest.approx(4.0, rel=0.03)


def test_filament_dipoles_follow_local_direction():
    """End to end: the orientation channels agree with the image structure's direction."""
    out = simulate((160, 160), seed=8, n_puncta=0, noise=False)
    c = out.truth.shape[0]
    x = out.truth.astype(np.float64)
    total = x.sum(0)
    theta = np.pi * np.arange(c) / c
    z_truth = np.einsum("k,khw->hw", np.exp(2j * theta), x)
    # Structure tensor: the gradient of a line with angle phi points along (cos phi, sin phi)
    # in (row, col), so (g_r^2 - g_c^2) + 2i g_r g_c has phase 2 phi.
    blurred = scipy.ndimage.gaussian_filter(total, 1.5)
    gr = scipy.ndimage.sobel(blurred, axis=0)
    gc = scipy.ndimage.sobel(blurred, axis=1)
    z_grad = scipy.ndimage.gaussian_filter(gr ** 2 - gc ** 2, 2.0) + 2j * scipy.ndimage.gaussian_filter(gr * gc, 2.0)
    mask = total > np.percentile(total[total > 0], 50)
    diff = np.angle(z_truth[mask] * np.conj(z_grad[mask])) / 2  # wrapped to (-pi/2, pi/2]
    assert mask.sum() > 200
    assert np.median(np.abs(diff)) < math.radians(8)


@pytest.mark.parametrize("kwargs,match", [
    ({"shape": (20, 64)}, "smaller than the PSF"),
    ({"shape": (64,)}, "shape"),
    ({"shape": (64, 0)}, "shape"),
    ({"n_channels": 2}, "n_channels"),
    ({"photons": -1.0}, "photons"),
    ({"background": -0.1}, "background"),
    ({"read_noise": -2.0}, "read_noise"),
    ({"offset": float("inf")}, "offset"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"n_filaments": -3}, "n_filaments"),
    ({"n_puncta": 2.5}, "n_puncta"),
    ({"psf": -np.ones((5, 5))}, "negative"),
])
def test_simulate_rejects_bad_arguments(kwargs, match):
    args = {"shape": (64, 64), **kwargs}
    with pytest.raises(SPoDInputError, match=match):
        simulate(**args)


def test_seed_none_is_recorded_and_reproducible():
    out = simulate((40, 40), seed=None, noise=False)
    again = simulate((40, 40), seed=out.params["seed"], noise=False)
    assert np.array_equal(out.truth, again.truth)


# -- time series -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def series():
    return simulate_time_series(n_frames=8, shape=(64, 72), seed=2, speed=1.0, n_filaments=4, n_puncta=10)


def test_time_series_shapes(series):
    assert isinstance(series, SimulatedTimeSeries)
    assert len(series) == 8
    assert series.observation.shape == (8, 18, 64, 72)
    assert series.clean.shape == (8, 18, 64, 72)
    assert series.truth.shape == (8, 18, 64 + 31, 72 + 31)
    assert all(a.dtype == np.float32 for a in (series.observation, series.truth, series.clean, series.psf))
    assert series.params["n_frames"] == 8 and series.params["seed"] == 2
    frame = series.frame(3)
    assert isinstance(frame, SimulatedObservation) and np.array_equal(frame.truth, series.truth[3])
    op = SPoDOperator(series.psf, 18, dtype=torch.float64)
    np.testing.assert_allclose(series.clean, op.forward(torch.from_numpy(series.truth)).numpy(),
                               rtol=1e-5, atol=1e-5 * series.clean.max())
    assert series.clean.max() == pytest.approx(series.params["photons"], rel=1e-5)


def test_time_series_frames_move_smoothly(series):
    clean = series.clean.reshape(len(series), -1).astype(np.float64)
    corr = np.corrcoef(clean)
    for t in range(len(series) - 1):
        assert not np.array_equal(series.truth[t], series.truth[t + 1])
        assert corr[t, t + 1] > 0.5
    assert corr[0, 1] > corr[0, 4] > corr[0, 7]
    # Every frame shows structures (the field of view does not empty out as they drift).
    assert (series.truth.sum(axis=(1, 2, 3)) > 0.5 * series.truth[0].sum()).all()


def test_time_series_static_when_speed_zero_and_noise_independent():
    ts = simulate_time_series(n_frames=3, shape=(48, 48), seed=1, speed=0.0)
    np.testing.assert_array_equal(ts.truth[0], ts.truth[2])
    np.testing.assert_array_equal(ts.clean[0], ts.clean[1])
    r0 = (ts.observation[0] - ts.clean[0]).ravel()
    r1 = (ts.observation[1] - ts.clean[1]).ravel()
    assert not np.array_equal(r0, r1)
    assert abs(np.corrcoef(r0, r1)[0, 1]) < 0.03


def test_time_series_deterministic_and_validated():
    a = simulate_time_series(n_frames=3, shape=(40, 40), seed=5)
    b = simulate_time_series(n_frames=3, shape=(40, 40), seed=5)
    assert np.array_equal(a.observation, b.observation) and np.array_equal(a.truth, b.truth)
    c = simulate_time_series(n_frames=3, shape=(40, 40), seed=6)
    assert not np.array_equal(a.truth, c.truth)
    with pytest.raises(SPoDInputError, match="n_frames"):
        simulate_time_series(n_frames=0)
    with pytest.raises(SPoDInputError, match="speed"):
        simulate_time_series(n_frames=2, speed=-1.0)
    with pytest.raises(SPoDInputError, match="Unknown"):
        simulate_time_series(n_frames=2, shape=(40, 40), photon=3)
