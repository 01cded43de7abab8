"""ISTA and FISTA for the SPoD recovery problem (method.md section 4-5).

    minimise over x >= 0:  L(Y, x) = 1/(2A) ||Y - A x||^2 + lam/B ||x||_1

Both solvers are batched over leading axes of ``y`` (``(..., c, H, W)``), run on the
operator's device, record the objective after every iteration and can be cancelled
from a callback. Each iteration costs one forward and one adjoint pass: the forward
image of the momentum point is a linear combination of two images already known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .physics import SPoDOperator
from .validation import SPoDInputError, check_lam

#: Default regularisation on intensity-normalised data (see ``recover.normalize_observation``):
#: visibly sparse yet faithful recoveries of the sample data.
DEFAULT_LAMBDA = 0.05

Callback = Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]


@dataclass
class SolverResult:
    """Outcome of :func:`ista` / :func:`fista`.

    x : (..., c, h, w) non-negative tensor.
    history : numpy array (iterations, *batch): objective after each iteration.
    iterations : iterations run. converged : tolerance met. cancelled : the callback asked to stop.
    seconds : wall time. step : step size used on the normalised objective (last one, with backtracking).
    times : numpy array (iterations,): seconds from the start of the call to the end of each iteration,
    so ``times[k - 1]`` is when FISTA had run ``k`` iterations (for equal-quality comparisons).
    """

    x: torch.Tensor
    history: np.ndarray
    iterations: int
    converged: bool
    cancelled: bool
    seconds: float
    step: float
    restarts: int = 0
    info: dict = field(default_factory=dict)
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def objective(self):
        """Final objective (float for one observation, array for a batch)."""
        last = self.history[-1] if len(self.history) else np.nan
        return float(last) if np.ndim(last) == 0 else last


def _initial_step(op: SPoDOperator, y: torch.Tensor, step) -> tuple[float, bool]:
    """Step size on the normalised objective, and whether to backtrack."""
    n_obs, _ = op.sizes(y.shape)
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        if step <= 0:
            raise SPoDInputError(f"step must be positive, got {step}")
        return float(step), False
    if step == "bound":
        return n_obs / op.lipschitz_bound(), False
    if step == "power":
        return n_obs / op.lipschitz(op.image_shape(y.shape)), False
    if step == "backtracking":
        # Start optimistic (4x the safe step) and let the line search shrink it.
        return 4.0 * n_obs / op.lipschitz_bound(), True
    raise SPoDInputError(f"step must be 'bound', 'power', 'backtracking' or a number, got {step!r}")


def _momentum_step(x, x_new, res, res_new, f_prev, f_new, t, restart: bool, rise_tol: float, per_item, batched: bool):
    """FISTA's extrapolation with function-value restart, for an iterate and a residual tracked with it.

    ``res`` is whatever linear image of x the loop carries (the residual ``A x - y`` or its
    low-rank form ``L^T (A x - y)``): the momentum point's one is the same combination.
    Returns ``(x_new, res_new, f_new, z, res_z, t_new, n_restarts)``; where the objective rose
    (O'Donoghue & Candes), the momentum is dropped and the previous iterate kept.
    """
    t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
    beta = (t - 1) / t_new
    n_restarts = 0
    if restart:
        rose = f_new > f_prev + rise_tol * f_prev.abs()
        if bool(rose.any()):
            n_restarts = int(rose.sum())
            keep = per_item(rose)
            x_new = torch.where(keep, x, x_new)
            res_new = torch.where(keep, res, res_new)
            f_new = torch.where(rose, f_prev, f_new)
            t_new = torch.where(rose, torch.ones_like(t_new), t_new)
            beta = torch.where(rose, torch.zeros_like(beta), beta)
    # z = x_new + beta (x_new - x) = lerp(x, x_new, 1 + beta); the same for the residual.
    weight = per_item(1 + beta)
    if not batched:
        weight = float(weight)
    return x_new, res_new, f_new, torch.lerp(x, x_new, weight), torch.lerp(res, res_new, weight), t_new, n_restarts


def _solve(op: SPoDOperator, y, lam: float, *, accelerate: bool, max_iter: int, tol: float, x0, step,
           restart: bool, callback: Callback | None) -> SolverResult:
    lam = check_lam(lam)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise SPoDInputError(f"max_iter must be a whole number >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not np.isfinite(tol) or tol < 0:
        raise SPoDInputError(f"tol must be a finite number >= 0, got {tol!r}")
    start = time.perf_counter()
    y_in = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    if y_in.dtype == torch.bool or y_in.is_complex():
        raise SPoDInputError(f"y must hold real numbers, got dtype {y_in.dtype}")
    y = op._check(y_in, "y")
    if y.numel() == 0:
        raise SPoDInputError(f"y is empty (shape {tuple(y.shape)})")
    if y.shape[-2] < op.psf_shape[0] or y.shape[-1] < op.psf_shape[1]:
        raise SPoDInputError(f"The PSF {tuple(op.psf_shape)} is larger than the image {tuple(y.shape[-2:])}.")
    if not bool(torch.isfinite(y).all()):
        raise SPoDInputError("y contains NaN or infinite values; clean the data first.")
    n_obs, n_img = op.sizes(y.shape)
    batch = y.shape[:-3]
    reduce = (-3, -2, -1)
    s, backtrack = _initial_step(op, y, step)

    x = torch.zeros((*batch, op.n_channels, *op.image_shape(y.shape)), dtype=op.dtype, device=op.device)
    if x0 is not None:
        x0 = op._check(x0, "x0")
        if x0.shape[-3:] != x.shape[-3:]:
            raise SPoDInputError(f"x0 has shape {tuple(x0.shape)}, expected (..., {tuple(x.shape[-3:])})")
        x = torch.clamp(x0.expand_as(x), min=0).clone()
    def sq_norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t, dim=reduce).square()

    def objective(r_, x_):
        return sq_norm(r_) / (2 * n_obs) + lam / n_img * x_.sum(dim=reduce)

    def per_item(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(*batch, 1, 1, 1) if batch else v

    if not backtrack:
        return _solve_fixed_step(op, y, x, lam, s, accelerate=accelerate, max_iter=max_iter, tol=tol,
                                 restart=restart, callback=callback, start=start)

    # With backtracking: residuals r = A x - y are tracked instead of A x: the momentum point's residual is a
    # combination of two known ones, so an iteration needs one forward and one adjoint pass.
    # The elementwise work rides on those passes: subtracting y and the gradient step with
    # the threshold's shift are fused into the passes' final channel mixing
    # (SPoDOperator.residual / gradient_step), the momentum steps are single lerps, and the
    # objective and the stopping test are reductions of tensors already at hand.
    r = op.residual(x, y)
    f_prev = objective(r, x)
    z, rz = x, r
    t = torch.ones(batch, dtype=op.dtype, device=op.device)
    # A rise of a few rounding errors is not a reason to restart.
    rise_tol = 10 * torch.finfo(op.dtype).eps
    history, times, restarts = [], [], 0
    converged = cancelled = False
    it = 0
    diff = None
    for it in range(1, max_iter + 1):
        while True:
            x_new = op.gradient_step(rz, z, -s / n_obs, s * lam / n_img).clamp_(min=0)
            r_new = op.residual(x_new, y)
            if not backtrack:
                break
            # Beck-Teboulle sufficient decrease for the smooth part, summed over the batch.
            g = op.adjoint(rz)  # n_obs x the gradient of the data term at z
            step_d = x_new - z
            lhs = sq_norm(r_new).sum() / (2 * n_obs)
            rhs = sq_norm(rz).sum() / (2 * n_obs) + (g * step_d).sum() / n_obs + sq_norm(step_d).sum() / (2 * s)
            if lhs <= rhs * (1 + 1e-12) + 1e-30:
                break
            s *= 0.5
        f_new = objective(r_new, x_new)
        # Into a buffer kept across iterations: a fresh 18-channel temporary costs page faults
        # (glibc hands large blocks back to the kernel), measured at 5x the subtraction itself.
        diff = torch.sub(x_new, x, out=diff if diff is not None and diff.shape == x.shape else None)
        change = torch.linalg.vector_norm(diff, dim=reduce) / \
            torch.linalg.vector_norm(x_new, dim=reduce).clamp_min(1e-30)

        if accelerate:
            x_new, r_new, f_new, z, rz, t, n_restarts = _momentum_step(
                x, x_new, r, r_new, f_prev, f_new, t, restart, rise_tol, per_item, bool(batch))
            restarts += n_restarts
        else:
            z, rz = x_new, r_new

        x, r, f_prev = x_new, r_new, f_new
        history.append(f_new.detach().cpu().numpy().copy())
        times.append(time.perf_counter() - start)
        if not torch.isfinite(f_new).all():
            raise FloatingPointError("The objective became non-finite; the step size is too large.")
        if callback is not None and callback(it, f_new, x):
            cancelled = True
            break
        # A rejected (restarted) step still measures how far the iterate would move.
        if tol > 0 and bool((change < tol).all()) and it > 1:
            converged = True
            break
    return SolverResult(x=x, history=np.asarray(history), iterations=it, converged=converged,
                        cancelled=cancelled, seconds=time.perf_counter() - start, step=s, restarts=restarts,
                        times=np.asarray(times))


def _solve_fixed_step(op: SPoDOperator, y: torch.Tensor, x: torch.Tensor, lam: float, s: float, *, accelerate: bool,
                      max_iter: int, tol: float, restart: bool, callback: Callback | None,
                      start: float) -> SolverResult:
    """The ISTA / FISTA loop with a fixed step, in the operator's low-rank form.

    ``A = L blur R`` (:class:`SPoDOperator`): instead of the c-channel residual ``A x - y`` the
    loop keeps ``u = L^T (A x - y)`` (3 channels), whose momentum combination is as exact as the
    residual's (an affine image of x). Per iteration, over full-size c-channel arrays, only what
    the update needs is left: the back-projection GEMM onto z, the threshold's clamp, the
    projection R x, and the momentum lerp. The objective comes from 3-channel quantities (the
    L1 norm is channel 0 of ``R x``, the data term a float64 quadratic form); the stopping test
    measures ``||x_k - x_{k-1}||`` (skipped when ``tol`` is 0) and needs ``||x_k||_2`` only when
    the step is already below ``tol * ||x_k||_1`` (an upper bound of it).
    """
    n_obs, n_img = op.sizes(y.shape)
    batch = y.shape[:-3]
    reduce = (-3, -2, -1)
    mixed_y = op.mix_adjoint(y)
    unexplained = op.unexplained_energy(y)

    def per_item(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(*batch, 1, 1, 1) if batch else v

    def evaluate(x_):
        """``u = L^T (A x - y)``, the objective (op.dtype) and ``||x||_1`` (float64), per item, of ``x >= 0``."""
        projected = op.project(x_)
        u_ = op.low_rank_residual(op.blur_projected(projected), mixed_y)
        l1 = projected[..., 0, :, :].sum(dim=(-2, -1), dtype=torch.float64)
        f_ = op.squared_residual(u_, unexplained) / (2 * n_obs) + lam / n_img * l1
        return u_, f_.to(op.dtype), l1

    u, f_prev, _ = evaluate(x)
    z, uz = x, u
    z_is_ours = False  # z made by the momentum step, never seen outside: the step may overwrite it
    t = torch.ones(batch, dtype=op.dtype, device=op.device)
    rise_tol = 10 * torch.finfo(op.dtype).eps  # a rise of a few rounding errors is no reason to restart
    history, times, restarts = [], [], 0
    converged = cancelled = False
    diff = None
    it = 0
    for it in range(1, max_iter + 1):
        x_new = op.back_project_step(uz, z, -s / n_obs, s * lam / n_img, in_place=z_is_ours).clamp_(min=0)
        z_is_ours = False
        u_new, f_new, l1_new = evaluate(x_new)
        x_step, step_norm = x_new, None
        if tol > 0:
            # into a buffer kept across iterations (a fresh 18-channel temporary costs page faults)
            diff = torch.sub(x_new, x, out=diff if diff is not None and diff.shape == x.shape else None)
            step_norm = torch.linalg.vector_norm(diff, dim=reduce)
        if accelerate:
            x_new, u_new, f_new, z, uz, t, n_restarts = _momentum_step(
                x, x_new, u, u_new, f_prev, f_new, t, restart, rise_tol, per_item, bool(batch))
            restarts += n_restarts
            z_is_ours = True
        else:
            z, uz = x_new, u_new
        x, u, f_prev = x_new, u_new, f_new
        history.append(f_new.detach().cpu().numpy().copy())
        times.append(time.perf_counter() - start)
        if not torch.isfinite(f_new).all():
            raise FloatingPointError("The objective became non-finite; the step size is too large.")
        if callback is not None and callback(it, f_new, x):
            cancelled = True
            break
        # ||x_k - x_{k-1}|| / ||x_k|| < tol, measured on the step taken even when it was rejected
        # (restarted). ||x_k||_2 <= ||x_k||_1 (the objective's L1 term), so the L2 norm is only
        # computed once the step is below tol * ||x_k||_1, near convergence.
        if step_norm is not None and it > 1 and bool((step_norm < tol * l1_new.to(step_norm.dtype)).all()):
            change = step_norm / torch.linalg.vector_norm(x_step, dim=reduce).clamp_min(1e-30)
            if bool((change < tol).all()):
                converged = True
                break
    return SolverResult(x=x, history=np.asarray(history), iterations=it, converged=converged,
                        cancelled=cancelled, seconds=time.perf_counter() - start, step=s, restarts=restarts,
                        times=np.asarray(times))


def fista(op: SPoDOperator, y, lam: float, max_iter: int = 2000, tol: float = 1e-6, *, x0=None,
          step="bound", restart: bool = True, callback: Callback | None = None) -> SolverResult:
    """FISTA (Beck & Teboulle 2009) with optional function-value restart.

    Parameters
    ----------
    op : the forward model. y : (..., c, H, W) tensor or array (batched over leading axes).
    lam : regularisation weight of the objective (method.md eq. 5).
    max_iter : iteration cap. tol : stop when ``||x_k - x_{k-1}|| / ||x_k|| < tol`` for every item (0 disables).
    x0 : warm start (..., c, h, w). step : ``"bound"`` (closed-form Lipschitz, default), ``"power"``
    (power iteration), ``"backtracking"`` (line search) or a number (step on the normalised objective).
    restart : adaptive restart, which keeps the objective from rising.
    callback : ``callback(iteration, objective, x)``; return True to cancel (the result has ``cancelled``).
    """
    return _solve(op, y, lam, accelerate=True, max_iter=max_iter, tol=tol, x0=x0, step=step, restart=restart,
                  callback=callback)


def ista(op: SPoDOperator, y, lam: float, max_iter: int = 2000, tol: float = 1e-6, *, x0=None,
         step="bound", callback: Callback | None = None) -> SolverResult:
    """ISTA: ``x <- max(x - s grad - s lam / B, 0)``, the network SPoD-Net unrolls. Same arguments as :func:`fista`."""
    return _solve(op, y, lam, accelerate=False, max_iter=max_iter, tol=tol, x0=x0, step=step, restart=False,
                  callback=callback)
