"""The SPoD forward model (method.md section 3) and its objective (section 4).

Shapes: an image ``x`` is ``(..., c, h, w)``, an observation ``y`` is
``(..., c, H, W)`` with ``H = h - a + 1`` and ``W = w - b + 1`` for an ``(a, b)`` PSF.

Two facts make the operator fast (both are checked in the tests):

* The polarization mixing ``C[t, k] = cos^2(pi (t - k) / c)`` equals
  ``1/2 + 1/2 cos(2 pi (t - k) / c)``: a circulant matrix of rank 3. Any circulant
  mixing with only the orientation harmonics ``0..K`` factorises as ``U @ V`` with
  ``V`` the ``(2K + 1, c)`` harmonic basis, so a pass needs ``2K + 1`` FFTs
  instead of ``c``. :class:`SeparableSPoDConv` implements this once; the physics
  operator (K = 1, fixed PSF) and the learned SPoD-Net layers both use it.
* A valid convolution is a crop of a circular one: no padding to ``h + a - 1``,
  and the FFT size is rounded up to a fast length only.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.fft
import torch

from .validation import DEFAULT_CHANNELS, SPoDInputError, check_psf


def mixing_matrix(n_channels: int = DEFAULT_CHANNELS, dtype=np.float64) -> np.ndarray:
    """The polarization mixing ``C[t, k] = cos^2(pi (t - k) / c)``, shape (c, c)."""
    t = np.arange(n_channels)
    return (np.cos(np.pi * (t[:, None] - t[None, :]) / n_channels) ** 2).astype(dtype)


def harmonic_basis(n_channels: int, n_harmonics: int) -> np.ndarray:
    """Rows ``[1, cos(2 pi k/c), sin(2 pi k/c), cos(4 pi k/c), ...]``, shape (2K+1, c)."""
    k = np.arange(n_channels)
    rows = [np.ones(n_channels)]
    for j in range(1, n_harmonics + 1):
        rows += [np.cos(2 * np.pi * j * k / n_channels), np.sin(2 * np.pi * j * k / n_channels)]
    return np.stack(rows)


def harmonic_left_factor(coefficients: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Left factor ``U`` (c, 2K+1) of a circulant mixing given by its harmonics.

    ``coefficients`` is ``[a0, a1, b1, a2, b2, ...]`` (length 2K+1) describing the
    orientation filter ``h_d = a0 + sum_j a_j cos(2 pi j d/c) + b_j sin(2 pi j d/c)``.
    Then ``sum_k h[(t - k) mod c] x_k = (U @ V @ x)_t`` with ``V`` from :func:`harmonic_basis`.
    Differentiable in ``coefficients``.
    """
    n_harmonics = (coefficients.shape[-1] - 1) // 2
    t = torch.arange(n_channels, dtype=coefficients.dtype, device=coefficients.device)
    cols = [coefficients[0].expand(n_channels)]
    for j in range(1, n_harmonics + 1):
        a, b = coefficients[2 * j - 1], coefficients[2 * j]
        cos_t, sin_t = torch.cos(2 * math.pi * j * t / n_channels), torch.sin(2 * math.pi * j * t / n_channels)
        cols += [a * cos_t + b * sin_t, a * sin_t - b * cos_t]
    return torch.stack(cols, dim=-1)


def circulant(h: torch.Tensor) -> torch.Tensor:
    """Circulant matrix ``M[t, k] = h[(t - k) mod c]`` of an orientation filter h (c,)."""
    c = h.shape[-1]
    idx = (torch.arange(c)[:, None] - torch.arange(c)[None, :]) % c
    return h[idx.to(h.device)]


@lru_cache(maxsize=256)
def fft_shape(image_shape: tuple[int, int]) -> tuple[int, int]:
    """Fast FFT lengths at least as large as the image (valid = crop of circular)."""
    rows = scipy.fft.next_fast_len(int(image_shape[0]), real=True)
    # The last axis must be even: its length is recovered from the rFFT spectrum as 2 (n - 1).
    cols = scipy.fft.next_fast_len(int(image_shape[1]), real=True)
    while cols % 2:
        cols = scipy.fft.next_fast_len(cols + 1, real=True)
    return rows, cols


def kernel_spectrum(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """rFFT of a (…, a, b) kernel zero-padded to ``shape``; differentiable."""
    return torch.fft.rfft2(kernel, s=shape)


class SeparableSPoDConv:
    """Valid convolution with the separable SPoD filter ``p_t[i,j,k] = g[i,j] h[(t-k) mod c]``.

    The channel mixing is given in factored form ``M = U @ V`` (U: (c, r), V: (r, c));
    r = 3 for the physics (harmonics 0 and 1), r = c for a general orientation filter
    (V = identity). All functions are plain torch and differentiable, so the same
    code serves the fixed physics operator and the trained network layers.
    """

    @staticmethod
    def forward(x: torch.Tensor, g_spectrum: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None,
                kernel_shape: tuple[int, int]) -> torch.Tensor:
        """(..., c, h, w) -> (..., c, h-a+1, w-b+1)."""
        return torch.einsum("tr,...rhw->...thw", left, _blur_valid(x, g_spectrum, right, kernel_shape))

    @staticmethod
    def adjoint(y: torch.Tensor, g_spectrum: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None,
                kernel_shape: tuple[int, int]) -> torch.Tensor:
        """(..., c, H, W) -> (..., c, H+a-1, W+b-1); the exact transpose of :meth:`forward`."""
        corr = _correlate_full(y, g_spectrum, left, kernel_shape)
        return corr if right is None else torch.einsum("rk,...rhw->...khw", right, corr)


def _blur_valid(x: torch.Tensor, g_spectrum: torch.Tensor, right: torch.Tensor | None, kernel_shape) -> torch.Tensor:
    """Harmonic projection (none when ``right`` is None) and valid blur of ``x`` (..., c, h, w) ->
    (..., r, H, W): the forward pass before its channel mixing."""
    z = x if right is None else torch.einsum("rk,...khw->...rhw", right, x)
    return _blur_projected(z, g_spectrum, kernel_shape)


def _blur_projected(z: torch.Tensor, g_spectrum: torch.Tensor, kernel_shape) -> torch.Tensor:
    """Valid blur of an already projected image ``z`` (..., r, h, w) -> (..., r, H, W)."""
    a, b = kernel_shape
    h, w = z.shape[-2:]
    s = _spatial_fft_shape(g_spectrum, h, w)
    return torch.fft.irfft2(torch.fft.rfft2(z, s=s) * g_spectrum, s=s)[..., a - 1:h, b - 1:w]


def _correlate_full(y: torch.Tensor, g_spectrum: torch.Tensor, left: torch.Tensor, kernel_shape) -> torch.Tensor:
    """The adjoint pass before its channel mixing: (..., c, H, W) -> (..., r, h, w)."""
    return _correlate_mixed(torch.einsum("tr,...thw->...rhw", left, y), g_spectrum, kernel_shape)


def _correlate_mixed(r: torch.Tensor, g_spectrum: torch.Tensor, kernel_shape) -> torch.Tensor:
    """Full correlation of an already mixed residual ``r`` (..., r, H, W) -> (..., r, h, w)."""
    a, b = kernel_shape
    big_h, big_w = r.shape[-2:]
    h, w = big_h + a - 1, big_w + b - 1
    s = _spatial_fft_shape(g_spectrum, h, w)
    padded = torch.nn.functional.pad(r, (b - 1, s[1] - w, a - 1, s[0] - h))
    return torch.fft.irfft2(torch.fft.rfft2(padded) * g_spectrum.conj(), s=s)[..., :h, :w]


def _mix_into(mix: torch.Tensor, low_rank: torch.Tensor, base: torch.Tensor, beta: float, alpha: float,
              shift: float = 0.0, in_place: bool = False) -> torch.Tensor:
    """``beta * base + alpha * (mix @ low_rank) - shift`` in one batched GEMM (a new tensor, or
    ``base`` overwritten with ``in_place``: a fresh c-channel array costs page faults, since glibc
    hands blocks this large back to the kernel on free, which is slower than the GEMM's write).

    mix (c, r); low_rank (..., r, H, W); base (..., c, H, W). The solver's elementwise updates
    (subtracting y, the gradient step, the soft threshold's shift) ride on the channel mixing
    that ends every pass, instead of costing passes over the 18-channel image of their own.
    The shift enters as an extra rank-one term (a row of ones), which is 1/c of an image.
    """
    lead = base.shape[:-3]
    c, H, W = base.shape[-3:]
    r = mix.shape[-1]
    n = int(np.prod(lead)) if lead else 1
    low = low_rank.reshape(n, r, H * W)
    if shift:
        low = torch.cat([low, torch.ones((n, 1, H * W), dtype=low.dtype, device=low.device)], dim=1)
        mix = torch.cat([mix, torch.full((c, 1), -shift / alpha, dtype=mix.dtype, device=mix.device)], dim=1)
    if in_place and base.is_contiguous():
        base.view(n, c, H * W).baddbmm_(mix.expand(n, *mix.shape), low, beta=beta, alpha=alpha)
        return base
    out = torch.baddbmm(base.reshape(n, c, H * W), mix.expand(n, *mix.shape), low, beta=beta, alpha=alpha)
    return out.reshape(*lead, c, H, W)


def _spatial_fft_shape(g_spectrum: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    s = (g_spectrum.shape[-2], 2 * (g_spectrum.shape[-1] - 1))
    if s[0] < h or s[1] < w:
        raise ValueError(f"kernel spectrum of size {s} is too small for images of size {(h, w)}")
    return s


class SPoDOperator:
    """Linear SPoD forward model ``A``: ``y_t = sum_k C[t,k] conv_valid(phi, x_k)``.

    Parameters
    ----------
    psf : (a, b) array or tensor
        Point spread function, validated (non-negative, positive sum). It is used as
        given; :func:`~napari_spodnet.core.validation.check_psf` normalises it to sum 1
        only when ``normalize_psf`` is true (the default).
    n_channels : int
        Polarization steps ``c`` (18 in the paper).
    device, dtype : torch device and floating dtype (float32 by default; float64 for tests).
    """

    n_harmonics = 1

    def __init__(self, psf, n_channels: int = DEFAULT_CHANNELS, *, device=None, dtype=None,
                 normalize_psf: bool = True):
        if isinstance(psf, torch.Tensor):
            device = psf.device if device is None else device
            dtype = psf.dtype if dtype is None else dtype
        self.device = torch.device(device or "cpu")
        self.dtype = dtype or torch.float32
        if self.dtype not in (torch.float32, torch.float64):
            raise SPoDInputError(f"dtype must be float32 or float64, got {self.dtype}")
        psf_np = check_psf(psf, normalize=normalize_psf)
        self.n_channels = int(n_channels)
        self.psf = torch.as_tensor(psf_np, dtype=self.dtype, device=self.device)
        self.psf_shape = tuple(self.psf.shape)
        basis = torch.as_tensor(harmonic_basis(self.n_channels, 1), dtype=self.dtype, device=self.device)
        # cos^2(pi d / c) = 1/2 + 1/2 cos(2 pi d / c): harmonic coefficients [1/2, 1/2, 0].
        coeffs = torch.tensor([0.5, 0.5, 0.0], dtype=self.dtype, device=self.device)
        self._right = basis
        self._left = harmonic_left_factor(coeffs, self.n_channels)
        # G = L^T L (r x r): the solver works with L^T (A x - y) = G (blur R x) - L^T y, never
        # forming the c-channel residual (SPoDOperator.low_rank_residual)
        self._gram = self._left.T @ self._left
        self._spectra: dict[tuple[int, int], torch.Tensor] = {}

    # -- shapes -------------------------------------------------------------------
    def image_shape(self, observation_shape) -> tuple[int, int]:
        """(H, W) of an observation -> (h, w) of the image it sees."""
        H, W = observation_shape[-2:]
        return H + self.psf_shape[0] - 1, W + self.psf_shape[1] - 1

    def observation_shape(self, image_shape) -> tuple[int, int]:
        h, w = image_shape[-2:]
        return h - self.psf_shape[0] + 1, w - self.psf_shape[1] + 1

    def _spectrum(self, image_hw) -> torch.Tensor:
        s = fft_shape(tuple(int(v) for v in image_hw))
        spec = self._spectra.get(s)
        if spec is None:
            spec = self._spectra[s] = kernel_spectrum(self.psf, s)
        return spec

    def to(self, device=None, dtype=None) -> "SPoDOperator":
        """A copy on another device / dtype."""
        return SPoDOperator(self.psf, self.n_channels, device=device or self.device, dtype=dtype or self.dtype,
                            normalize_psf=False)

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        if t.ndim < 3 or t.shape[-3] != self.n_channels:
            raise SPoDInputError(f"{what} must be (..., {self.n_channels}, rows, cols), got {tuple(t.shape)}")
        return t.to(device=self.device, dtype=self.dtype)

    # -- the operator ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x: (..., c, h, w) -> (..., c, h-a+1, w-b+1)."""
        x = self._check(x, "x")
        if x.shape[-2] < self.psf_shape[0] or x.shape[-1] < self.psf_shape[1]:
            raise SPoDInputError(f"The PSF {self.psf_shape} is larger than the image {tuple(x.shape[-2:])}.")
        return SeparableSPoDConv.forward(x, self._spectrum(x.shape[-2:]), self._left, self._right, self.psf_shape)

    __call__ = forward

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y: (..., c, H, W) -> (..., c, H+a-1, W+b-1)."""
        y = self._check(y, "y")
        return SeparableSPoDConv.adjoint(y, self._spectrum(self.image_shape(y.shape)), self._left, self._right,
                                         self.psf_shape)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A x - y`` (..., c, H, W), with the subtraction fused into the forward pass's mixing."""
        x, y = self._check(x, "x"), self._check(y, "y")
        blurred = _blur_valid(x, self._spectrum(x.shape[-2:]), self._right, self.psf_shape)
        return _mix_into(self._left, blurred, y.expand(*blurred.shape[:-3], *y.shape[-3:]).contiguous()
                         if y.shape[:-3] != blurred.shape[:-3] else y.contiguous(), beta=-1.0, alpha=1.0)

    def gradient_step(self, r: torch.Tensor, z: torch.Tensor, alpha: float, shift: float = 0.0) -> torch.Tensor:
        """``z + alpha * A^T r - shift`` (..., c, h, w) in one pass over the image (a new tensor)."""
        r, z = self._check(r, "r"), self._check(z, "z")
        corr = _correlate_full(r, self._spectrum(self.image_shape(r.shape)), self._left, self.psf_shape)
        return _mix_into(self._right.T, corr, z.contiguous(), beta=1.0, alpha=alpha, shift=shift)

    # -- the solver's low-rank form --------------------------------------------------
    # A = L blur R with R (r, c) the harmonic projection (its first row is all ones) and L (c, r).
    # The solver keeps u = L^T (A x - y) = G blur(R x) - L^T y (r = 3 channels) instead of the
    # c-channel residual: the momentum step on residuals, the subtraction of y and both channel
    # mixings of the residual then cost 3/c of an image pass. The data term needs no c-channel
    # residual either: with P the projection onto the columns of L, ||A x - y||^2 =
    # ||P (A x - y)||^2 + ||(1 - P) y||^2 (A x lies in range L), where ||P r||^2 = ||W L^T r||^2,
    # W^T W = G^+ (the whitening of G = L^T L), and the second term does not depend on x.

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``R x``: (..., c, h, w) -> (..., r, h, w). Channel 0 is the sum over polarizations
        (the first harmonic row is all ones), so for ``x >= 0`` its sum is ``||x||_1``."""
        return torch.einsum("rk,...khw->...rhw", self._right, x)

    def blur_projected(self, p: torch.Tensor) -> torch.Tensor:
        """Valid blur of ``p = R x`` (..., r, h, w) -> (..., r, H, W); ``A x = L @ blur_projected(R x)``."""
        return _blur_projected(p, self._spectrum(p.shape[-2:]), self.psf_shape)

    def mix_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``L^T y``: (..., c, H, W) -> (..., r, H, W)."""
        y = self._check(y, "y")
        return torch.einsum("tr,...thw->...rhw", self._left, y)

    def low_rank_residual(self, blurred: torch.Tensor, mixed_y: torch.Tensor) -> torch.Tensor:
        """``u = L^T (A x - y) = G blurred - L^T y`` (..., r, H, W) from ``blurred = blur_projected(R x)``
        and ``mixed_y = mix_adjoint(y)``, in one small GEMM."""
        return _mix_into(self._gram, blurred, mixed_y, beta=-1.0, alpha=1.0)

    @property
    def _whitening(self) -> torch.Tensor:
        """W (r, r) with ``W^T W = G^+``: ``||P r||^2 = ||W L^T r||^2`` for any residual r."""
        if getattr(self, "_whitening_cache", None) is None:
            evals, evecs = torch.linalg.eigh(self._gram.double())
            keep = evals > 1e-12 * evals.max()
            inv_sqrt = torch.where(keep, evals.clamp_min(1e-300).rsqrt(), torch.zeros_like(evals))
            self._whitening_cache = (inv_sqrt[:, None] * evecs.T).to(self.dtype)
        return self._whitening_cache

    def unexplained_energy(self, y: torch.Tensor) -> torch.Tensor:
        """``||(1 - P) y||^2 = ||y||^2 - ||W L^T y||^2`` per item (float64, shape ``y.shape[:-3]``): the
        part of ``||A x - y||^2`` no image x changes (y's polarization components outside the
        orientation harmonics). Accumulated in float64, one dot product per plane (converting
        the whole array first costs 10x as much)."""
        y = self._check(y, "y")
        white = torch.einsum("sr,...rhw->...shw", self._whitening, self.mix_adjoint(y))

        def energy(t):
            planes = t.reshape(-1, t.shape[-3], t.shape[-2] * t.shape[-1])
            return torch.stack([sum(torch.dot(row.double(), row.double()) for row in item) for item in planes])

        return (energy(y) - energy(white)).clamp_min(0).reshape(y.shape[:-3])

    def squared_residual(self, u: torch.Tensor, unexplained: torch.Tensor) -> torch.Tensor:
        """``||A x - y||^2`` per item (float64, shape ``u.shape[:-3]``) from ``u = L^T (A x - y)``
        (:meth:`low_rank_residual`) and ``unexplained = unexplained_energy(y)``: ``||W u||^2`` over
        3 channels (summed like ``torch.linalg.vector_norm``) plus the constant."""
        white = torch.einsum("sr,...rhw->...shw", self._whitening, u)
        return torch.linalg.vector_norm(white, dim=(-3, -2, -1)).double().square() + unexplained

    def back_project_step(self, u: torch.Tensor, z: torch.Tensor, alpha: float, shift: float = 0.0,
                          in_place: bool = False) -> torch.Tensor:
        """``z + alpha * A^T r - shift`` (..., c, h, w) from ``u = L^T r`` (..., r, H, W): the
        correlation of 3 channels, then one GEMM that mixes them into c channels onto ``z``
        (into ``z`` itself with ``in_place``, which saves copying z; else a new tensor). The shift
        rides on channel 0 (``R^T``'s first column is all ones), so it costs 1/c of an image."""
        corr = _correlate_mixed(u, self._spectrum(self.image_shape(u.shape)), self.psf_shape)
        if shift:
            corr[..., 0, :, :] -= shift / alpha
        if in_place and z.is_contiguous():
            lead, (c, h, w) = z.shape[:-3], z.shape[-3:]
            n = int(np.prod(lead)) if lead else 1
            low = corr.reshape(n, corr.shape[-3], h * w)
            z.view(n, c, h * w).baddbmm_(self._right.T.expand(n, c, low.shape[1]), low, beta=1.0, alpha=alpha)
            return z
        return _mix_into(self._right.T, corr, z.contiguous(), beta=1.0, alpha=alpha)

    def sizes(self, y_shape) -> tuple[int, int]:
        """Normalisation constants (A, B) of the objective: observation and image element counts."""
        h, w = self.image_shape(y_shape)
        return self.n_channels * y_shape[-2] * y_shape[-1], self.n_channels * h * w

    def gradient(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gradient of the data term ``1/(2A) ||A x - y||^2`` with respect to x."""
        n_obs, _ = self.sizes(y.shape)
        return self.adjoint(self.forward(x) - y) / n_obs

    def objective(self, y: torch.Tensor, x: torch.Tensor, lam: float) -> torch.Tensor:
        """``L(Y, x) = 1/(2A) sum_t ||y_t - (A x)_t||^2 + lam/B ||x||_1``, one value per batch item.

        Returns a tensor of shape ``y.shape[:-3]`` (a 0-d tensor for a single observation).
        """
        y = self._check(y, "y")
        x = self._check(x, "x")
        n_obs, n_img = self.sizes(y.shape)
        residual = self.forward(x) - y
        data = residual.pow(2).sum(dim=(-3, -2, -1)) / (2 * n_obs)
        return data + lam / n_img * x.abs().sum(dim=(-3, -2, -1))

    # -- Lipschitz constant of A^T A --------------------------------------------------
    def lipschitz_bound(self) -> float:
        """``||A||^2 <= (c/2)^2 (sum |phi|)^2``: exact in the large-image limit for a non-negative PSF."""
        return float((self.n_channels / 2) ** 2 * self.psf.abs().sum().item() ** 2)

    def lipschitz(self, image_shape=None, n_iter: int = 50, seed: int = 0) -> float:
        """Largest eigenvalue of ``A^T A`` by power iteration on images of ``image_shape``.

        Without a shape, the closed-form bound :meth:`lipschitz_bound` is returned.
        """
        if image_shape is None:
            return self.lipschitz_bound()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.rand((self.n_channels, *image_shape[-2:]), generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(device=self.device, dtype=self.dtype)
        value = 0.0
        for _ in range(n_iter):
            w = self.adjoint(self.forward(v))
            value = float(w.norm().item())
            v = w / value
        return value


def lipschitz_step(op: SPoDOperator) -> float:
    """Default ISTA/FISTA step on the normalised objective: ``A / ||A||^2`` per observation size."""
    return 1.0 / op.lipschitz_bound()


# -- direct spatial reference (the paper's formulation) -------------------------------

def direct_forward(x: torch.Tensor, psf: torch.Tensor, n_channels: int = DEFAULT_CHANNELS) -> torch.Tensor:
    """Reference ``A x`` as the paper writes it: one (a, b, c) filter ``a_t`` per output channel.

    A plain spatial convolution over all ``c x c`` channel pairs (``torch.conv2d``); slow,
    kept for tests and as the benchmark baseline. (..., c, h, w) -> (..., c, H, W).
    """
    c = n_channels
    mix = torch.as_tensor(mixing_matrix(c), dtype=x.dtype, device=x.device)
    # conv2d computes cross-correlation; flipping the PSF gives the physical convolution.
    weight = mix[:, :, None, None] * torch.flip(psf, dims=(-2, -1)).to(x)[None, None]
    lead = x.shape[:-3]
    out = torch.nn.functional.conv2d(x.reshape(-1, *x.shape[-3:]), weight)
    return out.reshape(*lead, *out.shape[-3:])


def direct_adjoint(y: torch.Tensor, psf: torch.Tensor, n_channels: int = DEFAULT_CHANNELS) -> torch.Tensor:
    """Reference ``A^T y`` (the paper's transposed convolution, eq. 2)."""
    c = n_channels
    mix = torch.as_tensor(mixing_matrix(c), dtype=y.dtype, device=y.device)
    weight = mix[:, :, None, None] * torch.flip(psf, dims=(-2, -1)).to(y)[None, None]
    lead = y.shape[:-3]
    out = torch.nn.functional.conv_transpose2d(y.reshape(-1, *y.shape[-3:]), weight)
    return out.reshape(*lead, *out.shape[-3:])
