"""Tests of the one recovery entry point (core/recover.py)."""

import warnings

import numpy as np
import pytest
import torch


import tifffile  # noqa: E402

from napari_spodnet.core.checkpoint import save_checkpoint  # noqa: E402
from napari_spodnet.core.network import SPoDNet  # noqa: E402
from napari_spodnet.core.physics import SPoDOperator  # noqa: E402
from napari_spodnet.core.preprocess import Normalization  # noqa: E402
from napari_spodnet.core.recover import (  # noqa: E402
    DEFAULT_MODEL_PATH,
    PSFMismatchWarning,
    RecoveryCancelled,
    RecoveryProgress,
    RecoveryResult,
    load_default_model,
    orientation_composite,
    orientation_map,
    recover,
)
from napari_spodnet.core.simulate import default_psf, gaussian_psf, simulate, simulate_time_series  # noqa: E402
from napari_spodnet.core.solvers import DEFAULT_LAMBDA  # noqa: E402
from napari_spodnet.core.validation import SPoDInputError  # noqa: E402

C = 18
CPU = "cpu"


@pytest.fixture(scope="module")
def psf():
    return gaussian_psf(9)


@pytest.fixture(scope="module")
def obs(psf):
    """48 x 48 observation (image 56 x 56), camera counts around an offset of 100."""
    return simulate((48, 48), psf=psf, seed=3).observation


@pytest.fixture(scope="module")
def series(psf):
    return simulate_time_series(3, (48, 48), psf=psf, seed=4).observation


@pytest.fixture(scope="module")
def net(psf):
    """An untrained 3-layer SPoD-Net (3 ISTA steps with a leak)."""
    net = SPoDNet.from_operator(SPoDOperator(psf, C), n_layers=3, lam=DEFAULT_LAMBDA)
    _perturb(net)
    return net


def _perturb(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m, layer in enumerate(net.layers):
            for p in layer.parameters():
                p.mul_(1 + 0.05 * (m + 1) * torch.rand(p.shape, generator=gen))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# -- shapes ------------------------------------------------------------------------------------

def test_single_observation_shapes(obs, net):
    res = recover(obs, model=net, device=CPU)
    assert isinstance(res, RecoveryResult)
    assert res.image.shape == (C, 56, 56) and res.image.dtype == np.float32
    assert res.intensity.shape == (56, 56) and res.orientation.shape == (56, 56)
    assert isinstance(res.objective, float) and np.isfinite(res.objective)
    assert res.method == "spodnet" and res.lam == pytest.approx(DEFAULT_LAMBDA)
    assert res.info["tiles"] == 1 and res.info["frames"] == 1 and res.info["device"] == "cpu"
    assert res.seconds > 0
    assert res.image.min() >= 0 and res.image.max() > 0
    np.testing.assert_allclose(res.intensity, res.image.sum(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(res.orientation, orientation_map(res.image))
    assert np.all((res.orientation >= 0) & (res.orientation < np.pi))


def test_series_shapes_and_frames_independent(series, net):
    res = recover(series, model=net, device=CPU, batch_size=2)
    assert res.image.shape == (3, C, 56, 56)
    assert res.intensity.shape == (3, 56, 56) and res.orientation.shape == (3, 56, 56)
    assert isinstance(res.objective, np.ndarray) and res.objective.shape == (3,)
    assert np.all(np.isfinite(res.objective))
    assert res.info["frames"] == 3
    # one normalisation for the whole series: without it each frame is recovered on its own
    raw = recover(series, model=net, device=CPU, normalize=False, batch_size=2)
    for t in range(3):
        single = recover(series[t], model=net, device=CPU, normalize=False)
        np.testing.assert_allclose(raw.image[t], single.image, rtol=1e-5, atol=1e-5)
        assert raw.objective[t] == pytest.approx(single.objective, rel=1e-5)
    # batch size does not change results
    res1 = recover(series, model=net, device=CPU, batch_size=1)
    np.testing.assert_allclose(res1.image, res.image, rtol=1e-5, atol=1e-6 * res.image.max())


def test_translate_registers_image_on_observation():
    psf = np.outer(gaussian_psf(9, 1.5)[:, 4], gaussian_psf(7, 1.2)[:, 3])  # (9, 7)
    y = simulate((48, 48), psf=psf, seed=1).observation
    res = recover(y, psf=psf, method="fista", iterations=5, device=CPU)
    assert res.image.shape == (C, 56, 54)
    assert res.translate == (-4.0, -3.0)
    model = SPoDNet(psf / psf.sum(), C, n_layers=1)
    res = recover(y, model=model, device=CPU)
    assert res.translate == (-(9 - 1) / 2, -(7 - 1) / 2)


def test_translate_places_a_bead_on_its_recovery():
    """A single bright image pixel blurs into the observation; the translate maps it back."""
    psf = gaussian_psf(9, 1.2)
    op = SPoDOperator(psf, C, dtype=torch.float64)
    x = np.zeros((C, 48, 48))
    x[5, 20, 30] = 100.0
    y = op.forward(torch.as_tensor(x)).numpy() + 1.0
    res = recover(y, psf=psf, method="fista", iterations=200, device=CPU)
    r, c = np.unravel_index(np.argmax(res.intensity), res.intensity.shape)
    assert (r, c) == (20, 30)
    obs_peak = np.unravel_index(np.argmax(y.sum(0)), y.shape[1:])
    # observation pixel (i, j) sees image pixel (i, j) + (a-1)/2: the translate undoes that
    assert (r + res.translate[0], c + res.translate[1]) == obs_peak


# -- tiles -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def obs80(psf):
    return simulate((80, 80), psf=psf, seed=5).observation


def test_tiled_equals_untiled(obs80, psf, net):
    whole = recover(obs80, model=net, device=CPU)
    # overlap >= PSF size, wide enough for the 3-layer receptive field
    tiled = recover(obs80, model=net, device=CPU, tile=64, overlap=24)
    assert tiled.info["tiles"] == 4
    assert _rel(tiled.image, whole.image) < 1e-4
    assert tiled.objective == pytest.approx(whole.objective, rel=1e-4)
    # a one-layer network with the smallest overlap allowed (the PSF size), nine tiles
    one = SPoDNet.from_operator(SPoDOperator(psf, C), n_layers=1, lam=DEFAULT_LAMBDA)
    whole1 = recover(obs80, model=one, device=CPU)
    tiled1 = recover(obs80, model=one, device=CPU, tile=40, overlap=9)
    assert tiled1.info["tiles"] == 9
    assert _rel(tiled1.image, whole1.image) < 1e-4


def test_tiled_fista_solves_the_whole_image_problem(obs80, psf):
    """Each tile gets the whole image's sparsity weight (lam rescaled by A/B), so tiles agree with
    the untiled run (FISTA's answer depends on the whole image only weakly beyond the overlap)."""
    whole = recover(obs80, psf=psf, method="fista", iterations=30, tol=0, device=CPU)
    tiled = recover(obs80, psf=psf, method="fista", iterations=30, tol=0, device=CPU, tile=64, overlap=24)
    assert tiled.info["tiles"] == 4 and tiled.info["fista_iterations"] == [30] * 4
    assert _rel(tiled.image, whole.image) < 1.5e-3
    assert tiled.objective == pytest.approx(whole.objective, rel=5e-5)


def test_tiled_equals_untiled_smallest_tile(obs80, psf):
    """Regression: a 34-px tile sees a 42-px image whose fast FFT length used to be odd (45), and
    the convolution then ran at 44: ~2% off even for a single layer."""
    one = SPoDNet.from_operator(SPoDOperator(psf, C), n_layers=1, lam=DEFAULT_LAMBDA)
    whole = recover(obs80, model=one, device=CPU)
    tiled = recover(obs80, model=one, device=CPU, tile=34, overlap=9)  # the smallest tile for this PSF
    assert tiled.info["tiles"] > 1
    assert _rel(tiled.image, whole.image) < 1e-4


def test_tiled_equals_untiled_default_overlap_multilayer(obs80, net):
    whole = recover(obs80, model=net, device=CPU)
    tiled = recover(obs80, model=net, device=CPU, tile=66)  # the smallest tile with the default overlap (25)
    assert tiled.info["tiles"] > 1
    assert _rel(tiled.image, whole.image) < 1e-4


def test_tile_arguments_checked(obs80, net):
    with pytest.raises(SPoDInputError, match="overlap"):
        recover(obs80, model=net, device=CPU, tile=64, overlap=4)
    with pytest.raises(SPoDInputError, match="tile"):
        recover(obs80, model=net, device=CPU, tile=8)
    with pytest.raises(SPoDInputError, match="twice the overlap"):
        recover(obs80, model=net, device=CPU, tile=30)


# -- FISTA --------------------------------------------------------------------------------------------

def test_fista_method(obs, psf):
    res = recover(obs, psf=psf, method="fista", iterations=60, device=CPU)
    assert res.method == "fista" and res.image.shape == (C, 56, 56)
    assert res.lam == DEFAULT_LAMBDA
    y_norm = res.normalization.apply(obs.astype(np.float64))
    zero_objective = 0.5 * np.mean(y_norm ** 2)  # L(Y, 0) = ||y||^2 / (2A)
    assert res.objective < 0.5 * zero_objective
    # the reported objective is L on normalised data of the returned image (in data units)
    op = SPoDOperator(psf, C, dtype=torch.float64)
    x_norm = torch.as_tensor(res.image.astype(np.float64) / res.normalization.scale)
    again = float(op.objective(torch.as_tensor(y_norm), x_norm, DEFAULT_LAMBDA))
    assert res.objective == pytest.approx(again, rel=1e-4)
    assert res.info["fista_iterations"] == [60]
    # more iterations: no worse
    res10 = recover(obs, psf=psf, method="fista", iterations=10, device=CPU)
    assert res.objective <= res10.objective


def test_fista_needs_psf(obs):
    with pytest.raises(SPoDInputError, match="PSF"):
        recover(obs, method="fista", device=CPU)
    with pytest.raises(SPoDInputError, match="method"):
        recover(obs, method="admm", device=CPU)


# -- progress and cancel ---------------------------------------------------------------------------------

def test_progress_increasing_and_cancel(series, net, psf):
    calls = []
    recover(series, model=net, device=CPU, batch_size=1, progress=lambda p: calls.append(p))
    assert all(isinstance(p, RecoveryProgress) for p in calls)
    assert [p.done for p in calls] == [1, 2, 3] and all(p.total == 3 for p in calls)
    assert calls[-1].fraction == 1.0
    fista_calls = []
    recover(series[0], psf=psf, method="fista", iterations=15, tol=0, device=CPU,
            progress=lambda p: fista_calls.append((p.done, p.total)))
    done = [d for d, _ in fista_calls]
    assert len(done) >= 15 and all(b >= a for a, b in zip(done, done[1:])) and done[-1] == 15
    assert done[0] < done[-1]

    def stop(p):
        return p.done >= 2

    with pytest.raises(RecoveryCancelled):
        recover(series, model=net, device=CPU, batch_size=1, progress=stop)
    seen = []

    def stop_fista(p):
        seen.append(p.done)
        return p.done >= 5

    with pytest.raises(RecoveryCancelled):
        recover(series, psf=psf, method="fista", iterations=50, device=CPU, progress=stop_fista)
    assert max(seen) == 5


# -- PSFs and models -------------------------------------------------------------------------------

def test_psf_mismatch_warning(obs, net, psf):
    with pytest.warns(PSFMismatchWarning):
        res = recover(obs, psf=gaussian_psf(9, 1.0), model=net, device=CPU)
    assert res.info["psf_mismatch"] > 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = recover(obs, psf=psf * 7.0, model=net, device=CPU)  # same PSF, other scale: no warning
    assert res.info["psf_mismatch"] < 1e-5
    with pytest.raises(SPoDInputError, match="PSF"):
        recover(obs, psf=gaussian_psf(11), model=net, device=CPU)


def test_model_from_checkpoint_path(obs, net, tmp_path):
    path = save_checkpoint(net, tmp_path / "m.safetensors")
    a = recover(obs, model=path, device=CPU)
    b = recover(obs, model=str(path), device=CPU)
    c = recover(obs, model=net, device=CPU)
    np.testing.assert_array_equal(a.image, c.image)
    np.testing.assert_array_equal(b.image, c.image)
    with pytest.raises(SPoDInputError):
        recover(obs, model=42, device=CPU)


@pytest.mark.skipif(not DEFAULT_MODEL_PATH.exists(), reason="the default model is not shipped yet")
def test_default_model():
    model = load_default_model(device=CPU)
    assert model.n_channels == C and model.n_layers >= 1
    assert model.psf_shape == default_psf().shape
    y = simulate((64, 64), seed=2).observation
    res = recover(y, device=CPU)
    assert res.image.shape == (C, 64 + model.psf_shape[0] - 1, 64 + model.psf_shape[1] - 1)
    assert np.isfinite(res.image).all() and res.image.max() > 0


@pytest.mark.skipif(DEFAULT_MODEL_PATH.exists(), reason="the default model is shipped")
def test_missing_default_model_is_a_clear_error(obs):
    with pytest.raises(SPoDInputError, match="default model"):
        load_default_model()
    with pytest.raises(SPoDInputError, match="default model"):
        recover(obs, device=CPU)


# -- input checks -----------------------------------------------------------------------------------

def test_bad_inputs(obs, net, psf):
    with pytest.raises(SPoDInputError, match="18"):
        recover(obs[:12], model=net, device=CPU)
    with pytest.raises(SPoDInputError):
        recover(obs[:12], psf=psf, method="fista", device=CPU)
    bad = obs.copy()
    bad[3, 10, 10] = np.nan
    with pytest.raises(SPoDInputError, match="NaN"):
        recover(bad, model=net, device=CPU)
    with pytest.raises(SPoDInputError, match="larger than the image"):
        recover(obs[:, :8, :8], model=net, device=CPU)
    with pytest.raises(SPoDInputError, match="larger than the image"):
        recover(obs[:, :8, :30], psf=psf, method="fista", device=CPU)
    with pytest.raises(SPoDInputError):
        recover(obs[0], model=net, device=CPU)  # 2-D
    with pytest.raises(SPoDInputError):
        recover(np.zeros((C, 48, 48)), model=net, device=CPU)  # flat: nothing to recover
    with pytest.raises(SPoDInputError):
        recover(obs, model=net, device=CPU, n_channels=12)


# -- dtypes and normalisation ------------------------------------------------------------------------

def test_uint16_equals_float(obs, net):
    counts = np.clip(np.round(obs * 50), 0, 65535).astype(np.uint16)
    a = recover(counts, model=net, device=CPU)
    b = recover(counts.astype(np.float32), model=net, device=CPU)
    c = recover(counts.astype(np.float64), model=net, device=CPU)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_allclose(c.image, b.image, rtol=1e-5, atol=1e-6 * b.image.max())
    assert a.objective == b.objective


def test_normalisation_makes_results_scale_linearly(obs, net):
    base = recover(obs, model=net, device=CPU)
    for k in (0.01, 37.0):
        scaled = recover(k * obs, model=net, device=CPU)
        assert _rel(scaled.image, k * base.image) < 1e-4
        assert scaled.objective == pytest.approx(base.objective, rel=1e-4)
        assert scaled.normalization.scale == pytest.approx(k * base.normalization.scale, rel=1e-6)


def test_normalize_false_uses_data_as_given(obs, net):
    base = recover(obs, model=net, device=CPU)
    norm = base.normalization
    assert norm.offset > 0 and norm.scale > 0
    y_norm = norm.apply(obs).astype(np.float32)
    raw = recover(y_norm, model=net, device=CPU, normalize=False)
    assert raw.normalization == Normalization()
    # exactly the network applied to the array
    np.testing.assert_array_equal(raw.image, net.recover(torch.as_tensor(y_norm)).numpy())
    # the same numbers as the normalised recovery, in normalised units
    np.testing.assert_allclose(raw.image, base.image / norm.scale, rtol=1e-4, atol=1e-5 * raw.image.max())
    # ... and not scale-invariant: thresholds act on the values as given
    small = recover(0.05 * y_norm, model=net, device=CPU, normalize=False)
    assert _rel(small.image, 0.05 * raw.image) > 0.05


def test_model_metadata_sets_normalisation_and_preprocessing(obs, net):
    model = net.truncated(net.n_layers)
    model.metadata = {"normalization": {"low": 5.0, "high": 99.0, "enabled": True}}
    res = recover(obs, model=model, device=CPU)
    lo, hi = np.percentile(obs.astype(np.float64), [5.0, 99.0])
    assert res.normalization.offset == pytest.approx(lo, rel=1e-6)
    assert res.normalization.scale == pytest.approx(hi - lo, rel=1e-6)
    assert res.info["preprocess"] is False
    default = recover(obs, model=net, device=CPU)
    lo25 = np.percentile(obs.astype(np.float64), 25.0)
    assert default.normalization.offset == pytest.approx(lo25, rel=1e-6)
    # a model trained on preprocessed data preprocesses by default; the caller can switch it off
    model.metadata["preprocess"] = {"median": 5, "minimum": 7, "mode": "subtract"}
    pre = recover(obs, model=model, device=CPU)
    assert pre.info["preprocess"] is True
    assert _rel(pre.image, res.image) > 1e-2
    off = recover(obs, model=model, device=CPU, preprocess_data=False)
    assert off.info["preprocess"] is False
    np.testing.assert_array_equal(off.image, res.image)


# -- orientation helpers ----------------------------------------------------------------------------------

def test_orientation_map_single_channel():
    for k in range(C):
        img = np.zeros((C, 4, 5), dtype=np.float32)
        img[k, 1:3, 2:4] = 3.0
        ang = orientation_map(img)
        assert ang.shape == (4, 5) and ang.dtype == np.float32
        np.testing.assert_allclose(ang[1:3, 2:4], np.pi * k / C, atol=1e-5)
    # the circular mean of two neighbours lies between them, also across the wrap at pi
    img = np.zeros((C, 1, 2), dtype=np.float32)
    img[3, 0, 0] = img[5, 0, 0] = 1.0
    img[C - 1, 0, 1] = img[1, 0, 1] = 1.0
    ang = orientation_map(img)
    assert ang[0, 0] == pytest.approx(np.pi * 4 / C, abs=1e-5)
    assert min(ang[0, 1], np.pi - ang[0, 1]) < 1e-5
    # batched (T, c, h, w)
    stack = np.zeros((2, C, 3, 3), dtype=np.float32)
    stack[0, 6], stack[1, 12] = 1.0, 1.0
    ang = orientation_map(stack)
    assert ang.shape == (2, 3, 3)
    np.testing.assert_allclose(ang[0], np.pi / 3, atol=1e-5)
    np.testing.assert_allclose(ang[1], 2 * np.pi / 3, atol=1e-5)


def test_orientation_composite(obs, net):
    res = recover(obs, model=net, device=CPU)
    rgb = orientation_composite(res.intensity, res.orientation)
    assert rgb.shape == (56, 56, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1 and rgb.max() == pytest.approx(1.0)
    # black where there is no intensity, hue follows the angle
    intensity = np.array([[0.0, 1.0, 1.0, 1.0]])
    orientation = np.array([[0.3, 0.0, np.pi / 3, 2 * np.pi / 3]])
    rgb = orientation_composite(intensity, orientation, saturation_percentile=100)
    np.testing.assert_allclose(rgb[0, 0], 0)
    np.testing.assert_allclose(rgb[0, 1], [1, 0, 0], atol=1e-6)  # hue 0: red
    np.testing.assert_allclose(rgb[0, 2], [0, 1, 0], atol=1e-6)  # hue 1/3: green
    np.testing.assert_allclose(rgb[0, 3], [0, 0, 1], atol=1e-6)  # hue 2/3: blue
    series_rgb = orientation_composite(np.ones((2, 3, 4)), np.zeros((2, 3, 4)))
    assert series_rgb.shape == (2, 3, 4, 3)


# -- out= and memory-mapped input ----------------------------------------------------------------------

def test_out_preallocated(series, obs, net, tmp_path):
    expected = recover(series, model=net, device=CPU)
    out = np.full((3, C, 56, 56), -1.0, dtype=np.float32)
    res = recover(series, model=net, device=CPU, out=out)
    assert res.image is out
    np.testing.assert_array_equal(out, expected.image)
    single_out = np.zeros((1, C, 56, 56), dtype=np.float32)
    res = recover(obs, model=net, device=CPU, out=single_out)
    assert np.shares_memory(res.image, single_out)
    np.testing.assert_array_equal(single_out[0], recover(obs, model=net, device=CPU).image)
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(3, C, 56, 56))
    recover(series, model=net, device=CPU, out=mm)
    mm.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected.image)
    with pytest.raises(SPoDInputError, match="out"):
        recover(series, model=net, device=CPU, out=np.zeros((2, C, 56, 56), dtype=np.float32))


def test_memmap_input(series, net, tmp_path):
    expected = recover(series, model=net, device=CPU, batch_size=2)
    raw = np.memmap(tmp_path / "series.raw", dtype=np.float32, mode="w+", shape=series.shape)
    raw[:] = series
    raw.flush()
    ro = np.memmap(tmp_path / "series.raw", dtype=np.float32, mode="r", shape=series.shape)
    res = recover(ro, model=net, device=CPU, batch_size=2)
    np.testing.assert_array_equal(res.image, expected.image)
    tif = tmp_path / "series.tif"
    tifffile.imwrite(tif, series.astype(np.uint16))
    mapped = tifffile.memmap(tif)
    assert isinstance(mapped, np.memmap) and mapped.shape == series.shape
    res = recover(mapped, model=net, device=CPU, batch_size=2)
    ref = recover(series.astype(np.uint16), model=net, device=CPU, batch_size=2)
    np.testing.assert_array_equal(res.image, ref.image)


# -- GPU ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_and_recover_on_cuda_match_cpu(obs, series, psf, net):
    y = torch.as_tensor(obs)
    cpu = net.recover(y)
    gpu_net = SPoDNet.from_operator(SPoDOperator(psf, C), n_layers=3, lam=DEFAULT_LAMBDA)
    gpu_net.load_state_dict(net.state_dict())
    gpu_net = gpu_net.to("cuda")
    gpu = gpu_net.recover(y.to("cuda"))
    assert gpu.device.type == "cuda"
    assert _rel(gpu.cpu().numpy(), cpu.numpy()) < 1e-4
    a = recover(series, model=net, device=CPU)
    b = recover(series, model=gpu_net, device="cuda")
    assert b.info["device"].startswith("cuda")
    assert _rel(b.image, a.image) < 1e-4
    np.testing.assert_allclose(b.objective, a.objective, rtol=1e-4)
    f_cpu = recover(obs, psf=psf, method="fista", iterations=50, device=CPU)
    f_gpu = recover(obs, psf=psf, method="fista", iterations=50, device="cuda")
    # float32 round-off can flip FISTA's restart decisions: compare loosely
    assert _rel(f_gpu.image, f_cpu.image) < 2e-2
    assert f_gpu.objective == pytest.approx(f_cpu.objective, rel=1e-3)


def test_frame_recoverer_pickles_and_matches_recover(series, net, psf):
    """The per-frame engine behind streaming, lazy series and the cluster gives recover()'s frames,
    also after a round trip through pickle (as dask sends it to workers)."""
    import pickle

    from napari_spodnet.core.recover import FrameRecoverer

    reference = recover(series, psf, model=net)
    engine = FrameRecoverer.create(psf, model=net)
    engine.fit(series)
    clone = pickle.loads(pickle.dumps(engine))
    assert clone.token() == engine.token()
    for t in (0, len(series) - 1):
        np.testing.assert_array_equal(engine.recover_frames(series[t:t + 1]).image[0], reference.image[t])
        np.testing.assert_array_equal(clone.recover_frames(series[t:t + 1]).image[0], reference.image[t])
    other = FrameRecoverer.create(psf, model=net, lam=engine.lam * 2)
    other.fit(series)
    assert other.token() != engine.token()
    with pytest.raises(SPoDInputError, match="fit"):
        FrameRecoverer.create(psf, model=net).recover_frames(series[:1])
