import numpy as np
import pytest
import torch

from napari_spodnet import SPoDOperator, fista, simulate
from napari_spodnet.core.compare import compare_at_equal_objective, psnr


def test_match_is_first_iteration_at_or_below_network():
    history = np.array([10.0, 5.0, 3.0, 2.0, 1.5])
    times = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    c = compare_at_equal_objective(3.0, 0.05, history, times)
    assert c.fista_match_iteration == 3
    assert c.fista_match_seconds == pytest.approx(0.3)
    assert c.speedup == pytest.approx(6.0)
    assert c.fista_final_objective == 1.5
    assert c.final_objective_gap == pytest.approx(0.5)
    assert "iteration 3" in c.summary() and "6.0x" in c.summary()


def test_never_reached_claims_nothing():
    c = compare_at_equal_objective(0.5, 0.05, [3.0, 2.0, 1.0], fista_seconds=0.3)
    assert c.fista_match_iteration is None and c.speedup is None
    assert "did not reach" in c.summary()
    assert "faster" not in c.summary()


def test_linear_time_fallback_and_errors():
    c = compare_at_equal_objective(2.0, 0.1, [3.0, 2.0, 1.0, 0.5], fista_seconds=0.4)
    assert c.fista_match_seconds == pytest.approx(0.2)
    with pytest.raises(ValueError):
        compare_at_equal_objective(1.0, 0.1, [])
    with pytest.raises(ValueError):
        compare_at_equal_objective(1.0, 0.1, [2.0])


def test_solver_times_are_monotone_and_match_history():
    sim = simulate((48, 48), seed=1)
    op = SPoDOperator(sim.psf)
    res = fista(op, sim.observation / sim.observation.max(), lam=0.05, max_iter=15, tol=0)
    assert res.times.shape == res.history.shape == (15,)
    assert np.all(np.diff(res.times) >= 0) and res.times[-1] <= res.seconds
    c = compare_at_equal_objective(float(res.history[7]), 1e-3, res.history, res.times, res.seconds)
    assert c.fista_match_iteration <= 8


def test_psnr():
    truth = np.ones((4, 4))
    assert psnr(truth, truth) == float("inf")
    assert psnr(truth * 0.9, truth) == pytest.approx(20.0)


def test_intensity_psnr_ignores_the_unrecoverable_margin():
    from napari_spodnet.core.compare import intensity_psnr

    rng = np.random.default_rng(0)
    truth = np.zeros((3, 20, 20))
    truth[:, 6:14, 6:14] = rng.random((3, 8, 8))  # inside the 11 x 11 field of view of a 10 x 10 PSF
    good = truth.sum(axis=0) * 0.01  # right up to the scale (normalised units)
    margin = good.copy()
    margin[0, 0] = 1e6  # a wild value where the observation sees nothing
    assert intensity_psnr(good, truth, (10, 10)) > 250  # exact up to rounding
    assert intensity_psnr(margin, truth, (10, 10)) > 250  # the margin does not count
    noisy = good + 0.001 * rng.standard_normal(good.shape)
    assert 10 < intensity_psnr(noisy, truth, (10, 10)) < 200
    empty = np.zeros_like(truth)
    empty[:, 0, 0] = 5.0  # truth only in the margin: nothing to score
    assert np.isnan(intensity_psnr(good, empty, (10, 10)))


# -- check_against_fista: the model against FISTA on the user's own data --------------------------

from napari_spodnet.core.compare import EqualQualityComparison  # noqa: E402
from napari_spodnet.core.recover import ModelCheck, check_against_fista, recover  # noqa: E402
from napari_spodnet.core.validation import SPoDInputError  # noqa: E402


@pytest.fixture(scope="module")
def observation_80():
    return simulate((80, 80), seed=11, photons=200.0)


def test_check_runs_both_methods_on_the_same_problem(observation_80):
    sim = observation_80
    check = check_against_fista(sim.observation, sim.psf, iterations=60)
    c = check.comparison
    assert c.fista_iterations == 60 and check.region == ((0, 80), (0, 80))
    # the network's objective is the one recover() reports on the same data: same normalisation and lambda
    assert c.network_objective == pytest.approx(recover(sim.observation, sim.psf).objective, rel=1e-4)
    # and FISTA's history is that of the same problem: its own recover() run ends at the same objective
    fista_alone = recover(sim.observation, sim.psf, method="fista", iterations=60, tol=0, lam=0.05)
    assert c.fista_final_objective == pytest.approx(fista_alone.objective, rel=1e-4)
    assert c.network_seconds > 0 and c.fista_seconds > 0
    text = "\n".join(check.lines())
    assert "80 x 80 pixels" in text and check.verdict() in text
    record = check.as_dict()
    assert record["fista_iterations"] == 60 and record["suits"] == check.suits
    assert record["region"] == [[0, 80], [0, 80]]


def _network_objective(normalization, part, psf):
    """The shipped model's objective on ``part`` normalised with ``normalization`` (what the check must use)."""
    from napari_spodnet.core.recover import load_default_model

    net = load_default_model()
    y = torch.as_tensor(normalization.apply(np.asarray(part, dtype=np.float32)))
    return float(SPoDOperator(psf).objective(y, net.recover(y), net.lam))


def test_check_crops_the_centre_with_the_recoverys_normalisation(observation_80):
    sim = observation_80
    check = check_against_fista(sim.observation, sim.psf, iterations=5, crop=48)
    assert check.region == ((16, 64), (16, 64))
    # normalised as the whole frame's recovery normalises it, not refitted on the crop
    whole = recover(sim.observation, sim.psf)
    expected = _network_objective(whole.normalization, sim.observation[:, 16:64, 16:64], sim.psf)
    assert check.comparison.network_objective == pytest.approx(expected, rel=1e-4)
    refitted = recover(sim.observation[:, 16:64, 16:64], sim.psf).objective
    assert abs(refitted - expected) > 1e-3 * expected  # (so the assertion above can tell them apart)


def test_check_on_a_series_uses_the_first_frame_and_the_series_normalisation(observation_80):
    sim = observation_80
    series = np.stack([sim.observation, 3 * sim.observation])  # a brighter second frame moves the fit
    check = check_against_fista(series, sim.psf, iterations=5)
    expected = _network_objective(recover(series, sim.psf).normalization, sim.observation, sim.psf)
    assert check.comparison.network_objective == pytest.approx(expected, rel=1e-4)
    alone = check_against_fista(sim.observation, sim.psf, iterations=5).comparison.network_objective
    assert abs(alone - expected) > 1e-3 * expected


def test_check_refuses_what_it_cannot_run(observation_80):
    sim = observation_80
    with pytest.raises(SPoDInputError, match="an observation"):
        check_against_fista(sim.observation[None, None], sim.psf)
    with pytest.raises(SPoDInputError, match="iterations"):
        check_against_fista(sim.observation, sim.psf, iterations=0)
    with pytest.raises(SPoDInputError, match="PSF"):
        check_against_fista(sim.observation, np.ones((9, 9)) / 81)


def _check_with(speedup, match=10):
    comparison = EqualQualityComparison(
        network_objective=1.0, network_seconds=0.1, fista_match_iteration=match,
        fista_match_seconds=None if match is None else 0.1 * speedup, speedup=None if match is None else speedup,
        fista_iterations=400, fista_seconds=4.0, fista_final_objective=0.9)
    return ModelCheck(comparison, ((0, 10), (0, 10)))


def test_check_verdict_advises_when_the_model_is_not_faster():
    assert _check_with(12.0).suits and "suits" in _check_with(12.0).verdict()
    # FISTA never reached the model's objective: decided by FISTA's whole run against the model's time
    unreached = _check_with(None, match=None)  # 4.0 s of FISTA against 0.1 s: at least 40x
    assert unreached.suits and unreached.speedup_at_least == pytest.approx(40.0)
    assert "did not reach" in unreached.verdict()
    short = ModelCheck(EqualQualityComparison(
        network_objective=1.0, network_seconds=0.5, fista_match_iteration=None, fista_match_seconds=None,
        speedup=None, fista_iterations=30, fista_seconds=0.6, fista_final_objective=1.1), ((0, 10), (0, 10)))
    assert not short.suits and short.verdict().startswith("Undecided") and "--check-iterations" in short.verdict()
    slow = _check_with(0.6)
    assert not slow.suits and slow.verdict().startswith("FISTA is faster") and "--fine-tune" in slow.verdict()
    modest = _check_with(2.0)
    assert not modest.suits and "only a little faster" in modest.verdict() and "spodnet fista" in modest.verdict()
