"""Honest speed comparisons: SPoD-Net against FISTA at equal quality.

A speed-up only means something at equal quality. :func:`compare_at_equal_objective`
finds the first FISTA iteration whose objective is at or below the network's, and the
time FISTA had spent by then; the speed-up is that time over the network's time. It
also says how much further FISTA went (its final objective) so that nobody reads
"x times faster" as "as good as 1000 iterations".

Everything here is plain numbers: the GUI, the CLI (``spodnet demo``) and the
benchmarks all format the same :class:`EqualQualityComparison`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EqualQualityComparison", "compare_at_equal_objective", "psnr"]


@dataclass(frozen=True)
class EqualQualityComparison:
    """SPoD-Net vs FISTA on one observation (objective of method.md eq. 5, normalised data).

    network_objective / network_seconds : the network's objective and forward-pass time.
    fista_match_iteration : first FISTA iteration whose objective <= the network's
        (None if FISTA never got there in the iterations it ran).
    fista_match_seconds : FISTA's elapsed time at that iteration (None as above).
    speedup : fista_match_seconds / network_seconds (None as above).
    fista_iterations / fista_seconds / fista_final_objective : the whole FISTA run.
    network_psnr / fista_psnr : intensity PSNR (dB) against a known truth, where there is one.
    """

    network_objective: float
    network_seconds: float
    fista_match_iteration: int | None
    fista_match_seconds: float | None
    speedup: float | None
    fista_iterations: int
    fista_seconds: float
    fista_final_objective: float
    network_psnr: float | None = None
    fista_psnr: float | None = None

    @property
    def final_objective_gap(self) -> float:
        """How much lower FISTA's final objective is, relative to the network's (0.02 = 2 % lower)."""
        if not np.isfinite(self.network_objective) or self.network_objective == 0:
            return float("nan")
        return (self.network_objective - self.fista_final_objective) / abs(self.network_objective)

    def lines(self) -> list[str]:
        """Human-readable sentences, one fact each (used by the widget, the CLI and the docs)."""
        out = [f"SPoD-Net: {_fmt_s(self.network_seconds)}, objective {self.network_objective:.6g}."]
        if self.fista_match_iteration is None:
            out.append(f"FISTA did not reach SPoD-Net's objective in {self.fista_iterations} iterations "
                       f"({_fmt_s(self.fista_seconds)}); no speed-up can be claimed at equal quality.")
        else:
            out.append(f"FISTA reached that objective at iteration {self.fista_match_iteration} after "
                       f"{_fmt_s(self.fista_match_seconds)}: SPoD-Net was {self.speedup:.1f}x faster at equal "
                       "objective.")
        gap = self.final_objective_gap
        if np.isfinite(gap):
            out.append(f"FISTA went on to {self.fista_iterations} iterations ({_fmt_s(self.fista_seconds)}), "
                       f"objective {self.fista_final_objective:.6g} ({100 * abs(gap):.1f} % "
                       f"{'lower' if gap >= 0 else 'higher'} than SPoD-Net's).")
        if self.network_psnr is not None and self.fista_psnr is not None \
                and np.isfinite(self.network_psnr) and np.isfinite(self.fista_psnr):
            out.append(f"Intensity PSNR against the truth: SPoD-Net {self.network_psnr:.2f} dB, "
                       f"FISTA ({self.fista_iterations} it.) {self.fista_psnr:.2f} dB.")
        return out

    def summary(self) -> str:
        return " ".join(self.lines())


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def compare_at_equal_objective(network_objective: float, network_seconds: float, fista_history,
                               fista_times=None, fista_seconds: float | None = None,
                               network_psnr: float | None = None,
                               fista_psnr: float | None = None) -> EqualQualityComparison:
    """Compare at equal objective.

    fista_history : (iterations,) FISTA objective after each iteration (``SolverResult.history``).
    fista_times : (iterations,) elapsed seconds after each iteration (``SolverResult.times``);
        without it the time is interpolated linearly from ``fista_seconds`` (iterations cost the same).
    """
    history = np.asarray(fista_history, dtype=np.float64).reshape(-1)
    n = int(history.size)
    if n == 0:
        raise ValueError("fista_history is empty: run FISTA for at least one iteration")
    if fista_times is not None and np.size(fista_times) == n:
        times = np.asarray(fista_times, dtype=np.float64).reshape(-1)
    else:
        if fista_seconds is None:
            raise ValueError("give fista_times or fista_seconds")
        times = fista_seconds * np.arange(1, n + 1) / n
    total = float(fista_seconds) if fista_seconds is not None else float(times[-1])
    reached = np.nonzero(history <= network_objective)[0]
    if reached.size and np.isfinite(network_objective):
        k = int(reached[0])
        match_it, match_s = k + 1, float(times[k])
        speedup = match_s / network_seconds if network_seconds > 0 else float("inf")
    else:
        match_it = match_s = speedup = None
    return EqualQualityComparison(
        network_objective=float(network_objective), network_seconds=float(network_seconds),
        fista_match_iteration=match_it, fista_match_seconds=match_s, speedup=speedup,
        fista_iterations=n, fista_seconds=total, fista_final_objective=float(history[-1]),
        network_psnr=network_psnr, fista_psnr=fista_psnr)


def psnr(estimate, truth) -> float:
    """PSNR in dB of ``estimate`` against ``truth`` (peak = max of truth), any equal shapes."""
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(f"shapes differ: {estimate.shape} vs {truth.shape}")
    mse = float(np.mean((estimate - truth) ** 2))
    peak = float(truth.max())
    if mse == 0:
        return float("inf")
    return 10 * np.log10(peak * peak / mse)


def intensity_psnr(intensity, truth, psf_shape) -> float:
    """PSNR (dB) of a recovered intensity (h, w) against the truth's (c, h, w) or (h, w), in the field of view.

    The image grid is larger than the observation by the PSF (method.md section 2); its margin is
    seen only through the PSF's tail, so neither FISTA nor a network can recover it, and a bright
    structure there would dominate the peak and the error alike (every method then scores the
    same as an all-zero image). Both are cropped to the observation's footprint (the registered
    overlay: offset ``(a - 1) // 2``), and the estimate is scaled to the truth by least squares
    (the recovery is in normalised units, the truth in photons).
    """
    est = np.asarray(intensity, dtype=np.float64)
    true = np.asarray(truth, dtype=np.float64)
    if true.ndim == 3:
        true = true.sum(axis=0)
    if est.shape != true.shape:
        raise ValueError(f"shapes differ: {est.shape} vs {true.shape}")
    a, b = (int(v) for v in psf_shape)
    h, w = est.shape
    r0, c0 = (a - 1) // 2, (b - 1) // 2
    rows, cols = slice(r0, r0 + h - a + 1), slice(c0, c0 + w - b + 1)
    est, true = est[rows, cols], true[rows, cols]
    if not true.max() > 0:
        return float("nan")  # nothing of the truth lies in the field of view: no PSNR to report
    scale = float((est * true).sum() / max((est * est).sum(), 1e-30))
    return psnr(scale * est, true)
