"""Learned ISTA networks for SPoD (method.md section 6): SPoD-Net and LISTA-Net.

Layer m computes

    x_m = R_m( x_{m-1} - eta_m * sum_t p^m_t (*)^T ( p^m_t (*) x_{m-1} - y_t ) ),   x_0 = 0

and the network returns ``max(x_M, 0)``.

* :class:`SPoDNet`: ``p_t[i, j, k] = g[i, j] * h[(t - k) mod c]``. The orientation filter h
  is either the paper's full length-c vector (``orientation="full"``: a layer needs the FFTs
  of all c channels) or limited to its circular harmonics ``0..K``
  (``orientation="harmonic"``, default K = 1: the physics has exactly those, and a layer
  then costs 2K+1 FFTs each way, like one FISTA iteration).
* :class:`LISTANet`: a full ``(c, c, a, b)`` filter bank per layer (the paper's ISTA-LST).

Every new layer starts as one ISTA step (``g = psf``, ``h = cos^2``, ``eta = 1/||A||^2``,
``theta = lam/||A||^2``), so an untrained network with ``alpha = 0`` is exactly ISTA.

Thresholds are applied *per unit of A/B* (observation over image element count): the
objective ``1/(2A)||r||^2 + lam/B ||x||_1`` weighs sparsity by ``lam * A / B``, which
depends on the image size. Scaling at run time lets a model trained on 96-pixel crops
threshold a 512-pixel image as the objective at that size demands.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .physics import SeparableSPoDConv, SPoDOperator, circulant, fft_shape, harmonic_basis, harmonic_left_factor
from .validation import SPoDInputError, check_psf

THRESHOLDS = ("lst", "nst")
ORIENTATIONS = ("harmonic", "full")
#: How a layer stores its step and threshold multipliers: ``"multiplier"`` (the multiplier itself,
#: the package's original form; Adam moves it by ~lr per step, so it stays near 1) or ``"log"``
#: (its logarithm: Adam moves it by a *factor* ~exp(lr) per step, so schedules can move by factors).
PARAMETERIZATIONS = ("multiplier", "log")
#: Per-layer scalars (the schedule), as opposed to filters: step, threshold, momentum and the
#: preconditioner's regularisation.
SCALAR_NAMES = ("eta", "theta", "mu", "log_delta", "log_shape", "eta_slope", "theta_slope", "mu_slope")
#: Knots of the preconditioner's learned radial correction (spatial frequency 0 .. Nyquist).
PRECONDITIONER_KNOTS = 6
#: Initial regularisation of the preconditioner (relative to the PSF's squared DC gain): the best
#: constant value in a grid over 1e-2 .. 3 on held-out simulate data (docs/results.md).
PRECONDITIONER_DELTA = 0.1
#: Noise-adaptive schedule: the reference noise level (normalised units; about 200 photons in the
#: brightest pixel of ``simulate``) and the range of the noise feature ``log(sigma / reference)``.
NOISE_REFERENCE = 0.025
NOISE_FEATURE_BOUND = 3.0


@torch.no_grad()
def noise_feature(y: torch.Tensor) -> torch.Tensor:
    """``log(sigma / NOISE_REFERENCE)`` per observation, (..., c, H, W) -> (..., 1, 1, 1), clamped to +-3.

    ``sigma`` is the robust (median absolute deviation) noise estimate of horizontal neighbour
    differences, on every second row and column: the background dominates the median, so it measures
    the camera and background noise relative to the normalised signal (about 1 / photons), whatever
    the structure. It is an input feature, not a learned quantity (no gradient).
    """
    d = (y[..., :, 1:] - y[..., :, :-1])[..., ::2, ::2]
    flat = d.abs().reshape(*d.shape[:-3], -1)
    sigma = 1.4826 * flat.median(dim=-1).values / math.sqrt(2.0)
    phi = torch.log(sigma.clamp_min(1e-12) / NOISE_REFERENCE).clamp(-NOISE_FEATURE_BOUND, NOISE_FEATURE_BOUND)
    return phi[..., None, None, None]


def leaky_soft_threshold(z: torch.Tensor, theta: torch.Tensor, alpha: float) -> torch.Tensor:
    """LST (paper eq. 11): ``z - theta`` above theta, ``alpha (z - theta)`` below. alpha = 0 gives NST."""
    shifted = z - theta
    if alpha == 0:
        return torch.relu(shifted)
    return torch.nn.functional.leaky_relu(shifted, alpha)  # one fused pass, unlike torch.where


class _Layer(nn.Module):
    """Step and threshold of one layer, learned as multipliers of their ISTA values
    (so that Adam's learning rate means a relative change whatever the intensity scale).

    With ``parameterization="log"`` the parameters ``eta`` and ``theta`` hold the logarithms
    of the multipliers (0 = the ISTA value)."""

    def __init__(self, parameterization: str = "multiplier"):
        super().__init__()
        self.log_space = parameterization == "log"
        init = 0.0 if self.log_space else 1.0
        self.eta = nn.Parameter(torch.tensor(init))
        self.theta = nn.Parameter(torch.tensor(init))

    def step_multiplier(self) -> torch.Tensor:
        """The step as a multiple of ISTA's step ``1 / ||A||^2``."""
        return self.eta.exp() if self.log_space else self.eta

    def threshold_multiplier(self) -> torch.Tensor:
        """The threshold as a multiple of ISTA's ``lam / ||A||^2``."""
        return self.theta.exp() if self.log_space else self.theta

    def scalar_parameters(self) -> list:
        """Step, threshold and (with momentum) extrapolation weight: the layer's schedule."""
        return [p for name, p in self.named_parameters() if name in SCALAR_NAMES]

    def filter_parameters(self) -> list:
        """Everything else: the layer's filters."""
        return [p for name, p in self.named_parameters() if name not in SCALAR_NAMES]

    def ops(self, image_hw):  # pragma: no cover - abstract
        raise NotImplementedError


def harmonic_gains(n_channels: int, n_harmonics: int) -> torch.Tensor:
    """Relative gain of ``A^T A`` on each orientation harmonic for the physics' cos^2 mixing, (2K+1,).

    ``cos^2`` has harmonic coefficients [1/2, 1/2, 0]: the mean (harmonic 0) passes with gain
    ``(c/2)^2`` and the first harmonic with ``(c/4)^2``, a quarter of it (higher harmonics: 0).
    ISTA's single step is set by the largest gain, so orientation (harmonic 1) converges 4x slower
    than intensity; the preconditioner evens this out.
    """
    gains = torch.zeros(2 * n_harmonics + 1, dtype=torch.float64)
    gains[0] = 1.0
    if n_harmonics >= 1:
        gains[1:3] = 0.25
    return gains


class SPoDLayer(_Layer):
    """One SPoD-Net layer. ``untied``: the gradient step back-projects the residual with its own
    filters ``g_adj``, ``h_adj`` (a learned preconditioner, initialised at the PSF and cos^2) instead
    of the transpose of ``g``, ``h``; the cost (FFTs per layer) is unchanged.

    ``preconditioned`` (harmonic orientation only): the back-projection is followed, in the same
    Fourier-domain product, by the regularised inverse of the data term's curvature on each
    orientation harmonic ``j`` (a Wiener-like step),

        P_j(f) = (1 + delta) / (rho_j |G(f)|^2 / |G(0)|^2 + delta),

    with ``rho_j`` from :func:`harmonic_gains` and ``delta`` learned per layer (in log space;
    ``delta -> inf`` is the plain gradient step). ``P = 1`` at zero frequency of the intensity, so
    ``eta`` keeps its meaning; frequencies the PSF damps get up to ``1 + 1/delta`` times the step.
    The filter is folded into the back-projection spectrum, so a layer costs the same FFTs."""

    def __init__(self, psf: torch.Tensor, n_channels: int, orientation: str, n_harmonics: int,
                 parameterization: str = "multiplier", untied: bool = False, preconditioned: bool = False):
        super().__init__(parameterization)
        self.n_channels = n_channels
        self.orientation = orientation
        self.untied = bool(untied)
        self.preconditioned = bool(preconditioned)
        if self.preconditioned:
            if orientation != "harmonic":
                raise SPoDInputError("the preconditioner needs the harmonic orientation filter")
            # One delta per orientation harmonic: intensity and orientation are damped differently.
            self.log_delta = nn.Parameter(torch.full((2 * n_harmonics + 1,), math.log(PRECONDITIONER_DELTA),
                                                     dtype=psf.dtype))
            self.register_buffer("gains", harmonic_gains(n_channels, n_harmonics).to(psf.dtype)[:, None, None],
                                 persistent=False)
            # A smooth learned correction of P over the radial frequency, per harmonic (0 = none):
            # log P_j(f) += piecewise-linear interpolation of log_shape[j] at |f|.
            self.log_shape = nn.Parameter(torch.zeros(2 * n_harmonics + 1, PRECONDITIONER_KNOTS, dtype=psf.dtype))
        self.g = nn.Parameter(psf.detach().clone())
        c = n_channels
        if orientation == "harmonic":
            coeffs = torch.zeros(2 * n_harmonics + 1, dtype=psf.dtype)
            coeffs[0] = 0.5
            if n_harmonics >= 1:
                coeffs[1] = 0.5  # cos^2(pi d / c) = 1/2 + 1/2 cos(2 pi d / c)
            self.h = nn.Parameter(coeffs)
            # A constant of (c, n_harmonics): rebuilt, not stored in checkpoints.
            self.register_buffer("basis", torch.as_tensor(harmonic_basis(c, n_harmonics), dtype=psf.dtype),
                                 persistent=False)
        else:
            d = torch.arange(c, dtype=torch.float64)
            self.h = nn.Parameter(torch.cos(math.pi * d / c).pow(2).to(psf.dtype))
        if self.untied:
            self.g_adj = nn.Parameter(self.g.detach().clone())
            self.h_adj = nn.Parameter(self.h.detach().clone())

    def orientation_filter(self) -> torch.Tensor:
        """h as a length-c vector ``h[d]``, d = 0..c-1."""
        return self.h @ self.basis if self.orientation == "harmonic" else self.h

    def _factors(self, h: torch.Tensor):
        if self.orientation == "harmonic":
            return harmonic_left_factor(h, self.n_channels), self.basis
        return circulant(h), None

    def _filters(self, image_hw):
        """This layer's spectra and channel factors at an image size: (g_spec, left, right, g_adj_spec,
        left_adj, right_adj, kernel shape); the back-projection spectrum includes the preconditioner."""
        s = fft_shape(tuple(int(v) for v in image_hw))
        g_spec = torch.fft.rfft2(self.g, s=s)
        left, right = self._factors(self.h)
        if self.untied:
            g_adj_spec = torch.fft.rfft2(self.g_adj, s=s)
            left_adj, right_adj = self._factors(self.h_adj)
        else:
            g_adj_spec, left_adj, right_adj = g_spec, left, right
        if self.preconditioned:
            g_adj_spec = g_adj_spec * self.preconditioner(g_spec)
        shape = tuple(self.g.shape)
        return g_spec, left, right, g_adj_spec, left_adj, right_adj, shape

    def ops(self, image_hw):
        g_spec, left, right, g_adj_spec, left_adj, right_adj, shape = self._filters(image_hw)
        return (lambda x: SeparableSPoDConv.forward(x, g_spec, left, right, shape),
                lambda r: SeparableSPoDConv.adjoint(r, g_adj_spec, left_adj, right_adj, shape))

    def fused_ops(self, image_hw):
        """Inference steps in the low-rank form (harmonic orientation; None otherwise), without autograd.

        A layer's residual is only needed after its back-projection mixing ``L_adj^T``:
        ``L_adj^T (L B(V z) - y) = (L_adj^T L) B(V z) - L_adj^T y``, an (r, H, W) image (r = 2K+1 = 3)
        instead of the (c, H, W) = 18-channel one; the step ``z - eta V_adj^T corr - theta`` is one
        batched GEMM over the image. Returns ``(first(y, eta, theta), step(z, y, eta, theta))``, each
        giving the pre-threshold ``v`` (..., c, h, w) as a new tensor (``step(..., in_place=True)``:
        written over ``z``); equal to the plain path to float rounding (tests/test_network.py).
        """
        if self.orientation != "harmonic":
            return None
        from .physics import _blur_projected, _correlate_mixed, _mix_into

        g_spec, left, right, g_adj_spec, left_adj, right_adj, shape = self._filters(image_hw)
        gram = left_adj.T @ left          # (r, r)
        back = right_adj.T.contiguous()   # (c, r)

        def first(y, eta, theta):
            corr = _correlate_mixed(torch.einsum("tr,...thw->...rhw", left_adj, y), g_adj_spec, shape)
            lead, hw = corr.shape[:-3], corr.shape[-2:]
            empty = torch.empty((*lead, back.shape[0], *hw), dtype=corr.dtype, device=corr.device)
            return _mix_into(back, corr, empty, beta=0.0, alpha=eta, shift=theta)

        def step(z, y, eta, theta, in_place=False):
            blurred = _blur_projected(torch.einsum("rk,...khw->...rhw", right, z), g_spec, shape)
            u = torch.einsum("rq,...qhw->...rhw", gram, blurred).sub_(torch.einsum("tr,...thw->...rhw", left_adj, y))
            corr = _correlate_mixed(u, g_adj_spec, shape)
            return _mix_into(back, corr, z.contiguous(), beta=1.0, alpha=-eta, shift=theta, in_place=in_place)

        return first, step


    def preconditioner(self, g_spec: torch.Tensor) -> torch.Tensor:
        """``P_j(f)`` (2K+1, s0, s1//2+1) for the forward filter's spectrum ``g_spec`` (s0, s1//2+1)."""
        power = g_spec.real.pow(2) + g_spec.imag.pow(2)
        power = power / power[0, 0].clamp_min(1e-30)
        delta = self.log_delta.exp()[:, None, None]
        return (1 + delta) / (self.gains * power + delta) * self._radial_correction(power.shape)

    def _radial_correction(self, spectrum_shape) -> torch.Tensor:
        """exp of the learned radial profile, (2K+1, s0, s1//2+1); 1 where ``log_shape`` is 0."""
        s0, s1 = spectrum_shape
        fy = torch.fft.fftfreq(s0, dtype=self.log_shape.dtype, device=self.log_shape.device)
        fx = torch.fft.rfftfreq(2 * (s1 - 1), dtype=self.log_shape.dtype, device=self.log_shape.device)
        radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).clamp(max=0.5) / 0.5  # 0 .. 1 (Nyquist)
        pos = radius * (self.log_shape.shape[-1] - 1)
        lo = pos.floor().long().clamp(max=self.log_shape.shape[-1] - 2)
        frac = pos - lo
        values = self.log_shape[:, lo] * (1 - frac) + self.log_shape[:, lo + 1] * frac
        return values.exp()


class LISTALayer(_Layer):
    def __init__(self, psf: torch.Tensor, n_channels: int, parameterization: str = "multiplier"):
        super().__init__(parameterization)
        from .physics import mixing_matrix

        mix = torch.as_tensor(mixing_matrix(n_channels), dtype=psf.dtype, device=psf.device)
        self.weight = nn.Parameter(mix[:, :, None, None] * psf.detach()[None, None])  # (c_out, c_in, a, b)

    def ops(self, image_hw):
        a, b = self.weight.shape[-2:]
        h, w = (int(v) for v in image_hw)
        s = fft_shape((h, w))
        spec = torch.fft.rfft2(self.weight, s=s)

        def fwd(x):
            yf = torch.einsum("tkuv,...kuv->...tuv", spec, torch.fft.rfft2(x, s=s))
            return torch.fft.irfft2(yf, s=s)[..., a - 1:h, b - 1:w]

        def adj(r):
            padded = torch.nn.functional.pad(r, (b - 1, s[1] - w, a - 1, s[0] - h))
            xf = torch.einsum("tkuv,...tuv->...kuv", spec.conj(), torch.fft.rfft2(padded))
            return torch.fft.irfft2(xf, s=s)[..., :h, :w]

        return fwd, adj


class UnrolledISTA(nn.Module):
    """Shared skeleton: a growing list of layers, the layer loop, spectra caching, config."""

    architecture = "unrolled"

    def __init__(self, psf, n_channels: int = 18, n_layers: int = 10, lam: float = 0.05, alpha: float = 0.1,
                 threshold: str = "lst", lipschitz: float | None = None, dtype=torch.float32,
                 momentum: bool = False, parameterization: str = "multiplier", noise_adaptive: bool = False):
        super().__init__()
        self.momentum = bool(momentum)
        self.noise_adaptive = bool(noise_adaptive)
        if parameterization not in PARAMETERIZATIONS:
            raise SPoDInputError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        self.parameterization = parameterization
        if threshold not in THRESHOLDS:
            raise SPoDInputError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
        if n_layers < 0:
            raise SPoDInputError(f"n_layers must be >= 0, got {n_layers}")
        if alpha < 0:
            raise SPoDInputError(f"alpha must be >= 0, got {alpha}")
        psf_t = torch.as_tensor(check_psf(psf, normalize=False), dtype=dtype)
        self.register_buffer("psf", psf_t)
        self.n_channels = int(n_channels)
        self.lam = float(lam)
        self.alpha = float(alpha) if threshold == "lst" else 0.0
        self.threshold = threshold
        if lipschitz is None:
            lipschitz = (self.n_channels / 2) ** 2 * float(psf_t.abs().sum()) ** 2
        # Rebuilt from lam and the Lipschitz constant in the config, so not stored as tensors.
        self.register_buffer("eta_scale", torch.tensor(1.0 / float(lipschitz), dtype=dtype), persistent=False)
        self.register_buffer("theta_scale", torch.tensor(self.lam / float(lipschitz), dtype=dtype),
                             persistent=False)
        self.layers = nn.ModuleList()
        self._cache: dict = {}
        self.metadata: dict = {}
        for _ in range(n_layers):
            self.add_layer()

    @property
    def psf_shape(self) -> tuple[int, int]:
        return tuple(self.psf.shape)

    def __getstate__(self):
        # The spectra cache holds closures: drop it so a network pickles (dask ships it to workers).
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def _new_layer(self) -> _Layer:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_layer(self) -> _Layer:
        """Append a layer initialised as one ISTA step (or FISTA step, with momentum); returns it."""
        layer = self._new_layer()
        if self.momentum:
            layer.mu = nn.Parameter(torch.tensor(fista_momentum(len(self.layers)), dtype=torch.float64))
        if self.noise_adaptive:
            # log step and threshold (and momentum) change linearly with the noise feature; 0: no change
            layer.eta_slope = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
            layer.theta_slope = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
            if self.momentum:
                layer.mu_slope = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        layer = layer.to(device=self.psf.device, dtype=self.psf.dtype)
        self.layers.append(layer)
        return layer

    def _fused(self, m: int, image_hw):
        """Cached :meth:`SPoDLayer.fused_ops` of layer m (None for layers without a low-rank form)."""
        layer = self.layers[m]
        if not hasattr(layer, "fused_ops"):
            return None
        params = list(layer.parameters())
        key = ("fused", m, tuple(image_hw), tuple(p._version for p in params), params[0].device, params[0].dtype)
        ops = self._cache.get(key, False)
        if ops is False:
            if len(self._cache) > 4 * max(self.n_layers, 1):
                self._cache.clear()
            ops = self._cache[key] = layer.fused_ops(image_hw)
        return ops

    def _ops(self, m: int, image_hw):
        """Per-layer (forward, adjoint); the filter spectra are cached while the parameters do not change."""
        if torch.is_grad_enabled():
            return self.layers[m].ops(image_hw)
        params = list(self.layers[m].parameters())
        key = (m, tuple(image_hw), tuple(p._version for p in params), params[0].device, params[0].dtype)
        ops = self._cache.get(key)
        if ops is None:
            if len(self._cache) > 4 * max(self.n_layers, 1):
                self._cache.clear()
            ops = self._cache[key] = self.layers[m].ops(image_hw)
        return ops

    def forward(self, y: torch.Tensor, n_layers: int | None = None, post_threshold: bool = True,
                size_ratio: float | None = None, intermediate: bool = False):
        """Recover images: (..., c, H, W) -> (..., c, H+a-1, W+b-1), non-negative unless told otherwise.

        ``size_ratio`` overrides ``A / B`` (used when a tile stands for a larger image).
        ``intermediate`` (with autograd only): return the list of every layer's output
        (post-thresholded as the last), for per-layer (deep) supervision.
        """
        if y.ndim < 3 or y.shape[-3] != self.n_channels:
            raise SPoDInputError(f"expected (..., {self.n_channels}, H, W), got {tuple(y.shape)}")
        n_layers = self.n_layers if n_layers is None else int(n_layers)
        if n_layers < 1:
            raise SPoDInputError("the network has no layers")
        a, b = self.psf_shape
        image_hw = (y.shape[-2] + a - 1, y.shape[-1] + b - 1)
        if size_ratio is None:
            size_ratio = (y.shape[-2] * y.shape[-1]) / (image_hw[0] * image_hw[1])  # A / B
        if not torch.is_grad_enabled() and not intermediate:
            return self._forward_inplace(y, n_layers, image_hw, size_ratio, post_threshold)
        x = x_prev = z = None
        outputs = []
        phi = noise_feature(y) if self.noise_adaptive else None
        for m in range(n_layers):
            layer = self.layers[m]
            fwd, adj = self._ops(m, image_hw)
            eta, theta, mu = self._schedule(layer, phi, size_ratio)
            v = -eta * adj(-y) if z is None else z - eta * adj(fwd(z) - y)
            x = leaky_soft_threshold(v, theta, self.alpha)
            # Learned FISTA momentum: the next layer starts from an extrapolated point.
            z = x if not self.momentum or x_prev is None else x + mu * (x - x_prev)
            x_prev = x
            if intermediate:
                outputs.append(torch.clamp(x, min=0) if post_threshold else x)
        if intermediate:
            return outputs
        return torch.clamp(x, min=0) if post_threshold else x

    def _schedule(self, layer, phi, size_ratio):
        """Layer step, threshold and momentum; with the noise-adaptive schedule, tensors (..., 1, 1, 1)
        for the noise feature ``phi`` (..., 1, 1, 1) of each observation."""
        eta = layer.step_multiplier() * self.eta_scale
        theta = layer.threshold_multiplier() * self.theta_scale * size_ratio
        mu = layer.mu if self.momentum else None
        if phi is not None:
            eta = eta * torch.exp(layer.eta_slope * phi)
            theta = theta * torch.exp(layer.theta_slope * phi)
            if self.momentum:
                mu = mu + layer.mu_slope * phi
        return eta, theta, mu

    def _forward_inplace(self, y, n_layers, image_hw, size_ratio, post_threshold):
        """The same computation without autograd, in place: the elementwise passes over
        full-size arrays are memory-bound and cost as much as the FFTs on a CPU."""
        phi = None
        if self.noise_adaptive:
            if y.ndim > 3 and y[..., 0, 0, 0].numel() > 1:  # one schedule per observation: one at a time
                flat = y.reshape(-1, *y.shape[-3:])
                out = [self._forward_inplace(flat[i], n_layers, image_hw, size_ratio, post_threshold)
                       for i in range(flat.shape[0])]
                return torch.stack(out).reshape(*y.shape[:-3], *out[0].shape)
            phi = noise_feature(y).reshape(())
        x = x_prev = z = None
        for m in range(n_layers):
            layer = self.layers[m]
            eta_t, theta_t, mu_t = self._schedule(layer, phi, size_ratio)
            eta, theta = float(eta_t), float(theta_t)
            fused = self._fused(m, image_hw)
            if fused is not None:
                # z may be overwritten unless it is still needed as x_prev (no momentum yet at the second layer)
                v = fused[0](y, eta, theta) if z is None else fused[1](z, y, eta, theta,
                                                                       in_place=z is not x_prev or not self.momentum)
            else:
                fwd, adj = self._ops(m, image_hw)
                v = adj(y).mul_(eta) if z is None else adj(fwd(z).sub_(y)).mul_(-eta).add_(z)
                v.sub_(theta)
            x = torch.relu_(v) if self.alpha == 0 else torch.nn.functional.leaky_relu_(v, self.alpha)
            if self.momentum and x_prev is not None:
                # x + mu (x - x_prev) in one pass, over x_prev (no longer needed): no fresh array
                z = x_prev.lerp_(x, 1.0 + float(mu_t))
            else:
                z = x
            x_prev = x
        return torch.clamp_(x, min=0) if post_threshold else x

    def linear_transfer(self, image_hw) -> torch.Tensor:
        """How much the network amplifies the error of each image mode when every pixel is active.

        Without thresholds, layer m maps the error ``e = x - x*`` of each orientation harmonic j and
        spatial frequency f (of the physics' operator, ``A^T A`` diagonal there) to ``c_m e`` with
        ``c_m = 1 - eta_m P_mj(f) kappa_j(f)``, ``kappa_j(f) = rho_j |psf^(f)|^2 / |psf^(0)|^2`` (1 = the
        Lipschitz constant), and the momentum mixes two layers' errors. The result ``|T_j(f)| =
        |e_M / e_0|`` (2K+1, s0, s1 // 2 + 1) is differentiable in the schedule and preconditioner.
        ``|T| > 1`` means the network *amplifies* that mode where the support is large: dense
        structure, where thresholds do not hold it back (docs/results.md, "Session 21"). Harmonic
        SPoD-Nets only; the noise-adaptive schedule is taken at its reference noise level.
        """
        if getattr(self, "orientation", None) != "harmonic":
            raise SPoDInputError("the linear transfer needs a harmonic SPoD-Net")
        s = fft_shape(tuple(int(v) for v in image_hw))
        spectrum = torch.fft.rfft2(self.psf, s=s)
        power = spectrum.real.pow(2) + spectrum.imag.pow(2)
        power = power / power[0, 0].clamp_min(1e-30)
        kappa = harmonic_gains(self.n_channels, self.n_harmonics).to(power)[:, None, None] * power
        error = torch.ones_like(kappa)
        start = error
        for m, layer in enumerate(self.layers):
            step = layer.step_multiplier().to(power)
            gain = step * (layer.preconditioner(spectrum) if getattr(layer, "preconditioned", False) else 1.0)
            new = (1 - gain * kappa) * start
            mu = layer.mu.to(power) if self.momentum and m > 0 else 0.0
            start = new + mu * (new - error) if m > 0 else new
            error = new
        return error.abs()

    @torch.no_grad()
    def recover(self, y: torch.Tensor, size_ratio: float | None = None) -> torch.Tensor:
        """Inference without autograd: (..., c, H, W) -> (..., c, h, w)."""
        return self.forward(y, size_ratio=size_ratio)

    def config(self) -> dict:
        """Constructor arguments (without the PSF tensor), stored in checkpoints."""
        return {"architecture": self.architecture, "n_channels": self.n_channels, "n_layers": self.n_layers,
                "lam": self.lam, "alpha": self.alpha, "threshold": self.threshold,
                "lipschitz": float(1.0 / self.eta_scale.item()), "psf_shape": list(self.psf_shape),
                "momentum": self.momentum, "parameterization": self.parameterization,
                # only when used: checkpoints of older versions stay byte-identical
                **({"noise_adaptive": True} if self.noise_adaptive else {})}

    def truncated(self, n_layers: int) -> "UnrolledISTA":
        """A copy with only the first ``n_layers`` layers."""
        cfg = self.config()
        cfg.pop("architecture"), cfg.pop("psf_shape")
        cfg["n_layers"] = n_layers
        clone = type(self)(self.psf.cpu().numpy(), **cfg, dtype=self.psf.dtype).to(device=self.psf.device)
        state = {k: v for k, v in self.state_dict().items()
                 if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers}
        clone.load_state_dict(state)
        clone.metadata = dict(self.metadata)
        return clone


class SPoDNet(UnrolledISTA):
    """SPoD-Net: depthwise-separable filters ``g_m (a x b)`` and an orientation filter ``h_m``.

    Parameters per layer: ``a*b`` (g) + ``2K+1`` (harmonic h) or ``c`` (full h) + eta + theta.
    """

    architecture = "spodnet"

    def __init__(self, psf, n_channels: int = 18, n_layers: int = 10, lam: float = 0.05, alpha: float = 0.1,
                 threshold: str = "lst", orientation: str = "harmonic", n_harmonics: int = 1,
                 lipschitz: float | None = None, dtype=torch.float32, momentum: bool = False,
                 parameterization: str = "multiplier", untied: bool = False, preconditioned: bool = False,
                 noise_adaptive: bool = False):
        if orientation not in ORIENTATIONS:
            raise SPoDInputError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if orientation == "harmonic" and not 0 <= n_harmonics <= (n_channels - 1) // 2:
            raise SPoDInputError(f"n_harmonics must be in 0..{(n_channels - 1) // 2}, got {n_harmonics}")
        self.orientation = orientation
        self.n_harmonics = int(n_harmonics)
        self.untied = bool(untied)
        if preconditioned and orientation != "harmonic":
            raise SPoDInputError("the preconditioner needs orientation='harmonic'")
        self.preconditioned = bool(preconditioned)
        super().__init__(psf, n_channels, n_layers, lam, alpha, threshold, lipschitz, dtype, momentum,
                         parameterization, noise_adaptive)

    def _new_layer(self):
        return SPoDLayer(self.psf, self.n_channels, self.orientation, self.n_harmonics, self.parameterization,
                         self.untied, self.preconditioned)

    @classmethod
    def from_operator(cls, op: SPoDOperator, n_layers: int = 10, lam: float = 0.05, alpha: float = 0.1,
                      threshold: str = "lst", orientation: str = "harmonic", n_harmonics: int = 1,
                      momentum: bool = False, parameterization: str = "multiplier",
                      untied: bool = False, preconditioned: bool = False,
                      noise_adaptive: bool = False) -> "SPoDNet":
        """Untrained network = ``n_layers`` ISTA iterations with ista's default step (exact for alpha = 0);
        with ``momentum``, ``n_layers`` FISTA iterations without restart (whatever the parameterization)."""
        net = cls(op.psf.detach().cpu().numpy(), op.n_channels, n_layers, lam, alpha, threshold, orientation,
                  n_harmonics, lipschitz=op.lipschitz_bound(), dtype=op.dtype, momentum=momentum,
                  parameterization=parameterization, untied=untied, preconditioned=preconditioned,
                  noise_adaptive=noise_adaptive)
        return net.to(device=op.device, dtype=op.dtype)

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(orientation=self.orientation, n_harmonics=self.n_harmonics, untied=self.untied)
        if self.preconditioned:  # only when used: checkpoints of older versions stay byte-identical
            cfg["preconditioned"] = True
        return cfg


class LISTANet(UnrolledISTA):
    """LISTA-Net (the paper's ISTA-LST): a full ``(c, c, a, b)`` filter bank per layer."""

    architecture = "listanet"

    def _new_layer(self):
        return LISTALayer(self.psf, self.n_channels, self.parameterization)

    @classmethod
    def from_operator(cls, op: SPoDOperator, n_layers: int = 10, lam: float = 0.05, alpha: float = 0.1,
                      threshold: str = "lst", momentum: bool = False,
                      parameterization: str = "multiplier") -> "LISTANet":
        net = cls(op.psf.detach().cpu().numpy(), op.n_channels, n_layers, lam, alpha, threshold,
                  lipschitz=op.lipschitz_bound(), dtype=op.dtype, momentum=momentum,
                  parameterization=parameterization)
        return net.to(device=op.device, dtype=op.dtype)


ARCHITECTURES = {"spodnet": SPoDNet, "listanet": LISTANet}


def fista_momentum(m: int) -> float:
    """FISTA's extrapolation weight ``(t_m - 1) / t_{m+1}`` after iteration m + 1 (0-based m)."""
    t = 1.0
    beta = 0.0
    for _ in range(m + 1):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        beta, t = (t - 1) / t_next, t_next
    return beta


def build_network(config: dict, psf) -> UnrolledISTA:
    """Rebuild an (untrained) network from :meth:`UnrolledISTA.config` and its PSF."""
    cfg = dict(config)
    arch = cfg.pop("architecture")
    cfg.pop("psf_shape", None)
    if arch not in ARCHITECTURES:
        raise SPoDInputError(f"unknown architecture {arch!r}")
    cls = ARCHITECTURES[arch]
    # A setting this version does not know may change what the network computes (and need not add
    # weights that would give it away): refuse it by name rather than load a different network.
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "psf", "dtype"}
    unknown = sorted(set(cfg) - accepted)
    if unknown:
        raise SPoDInputError(f"the model uses settings this version of napari-spodnet does not know "
                             f"({', '.join(unknown)}); it was made by a newer version: update napari-spodnet.")
    return cls(psf, **cfg)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
