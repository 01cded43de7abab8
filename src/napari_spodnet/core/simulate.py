"""Synthetic SPoD data: filaments and puncta seen through the SPoD forward model.

No public SPoD data set exists, so tests, benchmarks, demos and training examples
use this generator (method.md, end of section 8). It produces a sparse, non-negative
ground truth ``x`` of shape ``(c, h, w)`` (one channel per dipole orientation), the
expected camera signal ``A x`` (see :class:`~napari_spodnet.core.physics.SPoDOperator`)
and a noisy observation with Poisson shot noise, a camera offset and Gaussian read noise.

Conventions
-----------
Pixels
    Pixel ``(i, j)`` has its centre at the continuous coordinate ``(row, col) = (i, j)``;
    row 0 is the top row as displayed. Points between pixel centres are rendered with
    bilinear weights, so positions are sub-pixel accurate and intensity is conserved.
Dipole orientation
    Channel ``k`` (``k = 0 .. c-1``) holds fluorophores whose dipole angle is
    ``theta_k = pi * k / c`` (period ``pi``: a dipole has no head or tail). An angle
    ``phi`` is measured **counter-clockwise from the +column (x) axis as displayed with
    row 0 at the top**: the direction with angle ``phi`` is the vector
    ``(d_row, d_col) = (-sin(phi), cos(phi))``. A horizontal structure therefore lands in
    channel 0, a vertical one in channel ``c/2``, one running up-right (row decreasing,
    column increasing) at 45 degrees in channel ``c/4``. An angle between two channels
    is split between the two nearest ones with linear-interpolation weights, so the
    channel sum is the total intensity.
Filaments
    Smooth random curves (tangent angle = integral of a slowly varying random
    curvature), 150-450 px long, one pixel thin, with brightness varying slowly along
    them. Their dipoles follow the local tangent. Intensity is per pixel of length.
Puncta
    Single bright points or tiny clusters (sub-pixel spread) with a random dipole orientation.
Units
    ``truth`` is in photons: the noise-free expected signal is ``op.forward(truth)``
    (``clean``). It is scaled so that the brightest pixel of ``clean`` holds ``photons``
    expected photons. The camera then records
    ``Poisson(clean + background) + offset + Normal(0, read_noise)`` (camera counts with a
    gain of 1 count per photo-electron, not rounded to integers).
PSF
    PSFs are ``(a, b)`` float32 arrays summing to 1, centred at ``((a-1)/2, (b-1)/2)``,
    so that the recovered image overlays the observation when translated by
    ``-((a-1)/2, (b-1)/2)`` (method.md section 2). The default is the in-focus Airy PSF
    of a 1.2 NA objective at 520 nm emission sampled at 65 nm per pixel: FWHM about
    3.5 px (0.51 lambda / NA = 223 nm, broadened slightly by pixel integration), first
    dark ring at 0.61 lambda / NA = 4.07 px.

Everything random comes from one ``numpy.random.default_rng(seed)``: a seed gives
bit-identical output on a given machine and library versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage
import scipy.special
import torch

from .physics import SPoDOperator
from .validation import DEFAULT_CHANNELS, SPoDInputError, check_psf

__all__ = [
    "gaussian_psf",
    "airy_psf",
    "default_psf",
    "psf_fwhm",
    "orientation_weights",
    "render_filament",
    "render_puncta",
    "SimulatedObservation",
    "SimulatedTimeSeries",
    "simulate",
    "simulate_time_series",
]

# Density of structures when the caller does not give counts (per observed pixel).
FILAMENTS_PER_PIXEL = 8 / (256 * 256)
PUNCTA_PER_PIXEL = 30 / (256 * 256)
# Filament geometry, in pixels.
FILAMENT_LENGTH_RANGE = (150.0, 450.0)
SAMPLE_SPACING = 0.25
CURVATURE_STD = 1.0 / 150.0  # typical radius of curvature ~150 px: gently bent, not kinked
CURVATURE_CORR = 40.0  # curvature changes over ~40 px of length
BRIGHTNESS_CORR = 30.0
# Puncta are point sources: a few times brighter (in total) than a pixel of filament,
# so that both are visible after the blur spreads a point over ~10 px but a line over ~3.
PUNCTA_RELATIVE_BRIGHTNESS = 6.0


# -- PSFs --------------------------------------------------------------------------------

def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise SPoDInputError(f"The PSF size must be a positive integer, got {size!r}.")
    return int(size)


def _check_positive(value, what: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SPoDInputError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise SPoDInputError(f"{what} must be a finite {bound} number, got {value!r}.")
    return v


def gaussian_psf(size: int = 32, sigma: float = 2.0) -> np.ndarray:
    """Isotropic Gaussian PSF, integrated over each pixel.

    Parameters
    ----------
    size : int
        Support ``size x size`` pixels.
    sigma : float
        Standard deviation in pixels (FWHM about ``2.355 * sigma``).

    Returns
    -------
    (size, size) float32 array, sum 1, centred at ``((size-1)/2, (size-1)/2)``.
    """
    size = _check_size(size)
    sigma = _check_positive(sigma, "sigma")
    # Exact pixel integration via erf: no sampling bias for narrow PSFs.
    edges = np.arange(size + 1, dtype=np.float64) - size / 2.0
    cdf = scipy.special.erf(edges / (math.sqrt(2.0) * sigma))
    profile = np.diff(cdf)
    psf = np.outer(profile, profile)
    return (psf / psf.sum()).astype(np.float32)


def airy_psf(size: int = 32, na: float = 1.2, wavelength_nm: float = 520.0, pixel_nm: float = 65.0,
             supersample: int = 5) -> np.ndarray:
    """In-focus diffraction-limited (Born-Wolf / Airy) PSF ``[2 J1(v) / v]^2``.

    ``v = 2 pi NA r / lambda`` with ``r`` the distance from the centre. The intensity is
    averaged over ``supersample x supersample`` points per pixel (pixel integration).
    The defaults (NA 1.2, 520 nm, 65 nm pixels) give a FWHM of about 3.5 px and the first
    dark ring at ``0.61 lambda / NA`` = 4.07 px.

    Parameters
    ----------
    size : int
        Support ``size x size`` pixels.
    na : float
        Numerical aperture of the objective.
    wavelength_nm : float
        Emission wavelength in nanometres.
    pixel_nm : float
        Pixel size in the sample plane, in nanometres.
    supersample : int
        Sub-samples per pixel and axis (odd keeps a sample at the pixel centre).

    Returns
    -------
    (size, size) float32 array, sum 1 over the support, centred at ``((size-1)/2, (size-1)/2)``.
    """
    size = _check_size(size)
    na = _check_positive(na, "The numerical aperture")
    wavelength_nm = _check_positive(wavelength_nm, "The wavelength")
    pixel_nm = _check_positive(pixel_nm, "The pixel size")
    if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or supersample < 1:
        raise SPoDInputError(f"supersample must be a positive integer, got {supersample!r}.")
    n = int(supersample)
    sub = (np.arange(n) + 0.5) / n - 0.5
    coords = (np.arange(size)[:, None] - (size - 1) / 2.0 + sub[None, :]).ravel()  # (size * n,)
    r = np.hypot(coords[:, None], coords[None, :]) * pixel_nm
    v = 2.0 * math.pi * na * r / wavelength_nm
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(v > 1e-8, 2.0 * scipy.special.j1(v) / v, 1.0)
    intensity = amp ** 2
    psf = intensity.reshape(size, n, size, n).mean(axis=(1, 3))
    return (psf / psf.sum()).astype(np.float32)


def default_psf() -> np.ndarray:
    """The default PSF: :func:`airy_psf` with its defaults, (32, 32) float32, sum 1."""
    return airy_psf()


def psf_fwhm(psf, upsample: int = 20) -> float:
    """Full width at half maximum (pixels) of a centred PSF along its centre row.

    The PSF is interpolated (cubic) along the row through ``((a-1)/2, (b-1)/2)``;
    the half-maximum crossings are found by linear interpolation on that fine grid.
    """
    arr = np.asarray(psf, dtype=np.float64)
    a, b = arr.shape
    cols = np.linspace(0, b - 1, (b - 1) * upsample + 1)
    rows = np.full_like(cols, (a - 1) / 2.0)
    profile = scipy.ndimage.map_coordinates(arr, [rows, cols], order=3, mode="nearest")
    peak_i = int(np.argmax(profile))
    half = profile[peak_i] / 2.0
    right = peak_i + int(np.argmax(profile[peak_i:] < half))
    left = peak_i - int(np.argmax(profile[peak_i::-1] < half))

    def crossing(i_in, i_out):
        p_in, p_out = profile[i_in], profile[i_out]
        return cols[i_in] + (cols[i_out] - cols[i_in]) * (p_in - half) / (p_in - p_out)

    return float(crossing(right - 1, right) - crossing(left + 1, left))


# -- rendering ----------------------------------------------------------------------------

def orientation_weights(phi, n_channels: int = DEFAULT_CHANNELS):
    """Split dipole angles between the two nearest orientation channels.

    Parameters
    ----------
    phi : array of angles in radians (any value; taken modulo pi).
    n_channels : number of orientation channels ``c`` (channel ``k`` is angle ``pi k / c``).

    Returns
    -------
    k0, k1 : int arrays, the lower and upper neighbouring channels (``k1 = (k0 + 1) mod c``).
    w0, w1 : float arrays, linear-interpolation weights (``w0 + w1 = 1``).
    """
    c = int(n_channels)
    u = np.mod(np.asarray(phi, dtype=np.float64), math.pi) * (c / math.pi)
    # Snap angles that are a channel up to rounding (e.g. pi/2 * c/pi = 9.000000000000002)
    # so that axis-aligned structures do not leak a 1e-15 weight into a neighbour.
    nearest = np.round(u)
    u = np.where(np.abs(u - nearest) < 1e-9, nearest, u)
    k = np.floor(u)
    w1 = u - k
    k0 = k.astype(np.int64) % c
    return k0, (k0 + 1) % c, 1.0 - w1, w1


def _splat(shape, n_channels: int, rows, cols, phi, weights) -> np.ndarray:
    """Accumulate weighted points into a (c, h, w) float64 image.

    Bilinear in space and linear in orientation: each point touches at most 4 pixels in
    2 channels. Parts of a point's footprint outside the image are dropped.
    """
    h, w = shape
    c = int(n_channels)
    rows = np.asarray(rows, dtype=np.float64).ravel()
    cols = np.asarray(cols, dtype=np.float64).ravel()
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), rows.shape)
    phi = np.broadcast_to(np.asarray(phi, dtype=np.float64), rows.shape)
    inside = (rows > -1) & (rows < h) & (cols > -1) & (cols < w) & (weights != 0)
    rows, cols, weights, phi = rows[inside], cols[inside], weights[inside], phi[inside]
    k0, k1, wk0, wk1 = orientation_weights(phi, c)
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr = rows - r0
    fc = cols - c0
    idx_parts, w_parts = [], []
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        rr = r0 + dr
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            cc = c0 + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            pix = rr[ok] * w + cc[ok]
            base = (weights * wr * wc)[ok]
            for kk, wk in ((k0, wk0), (k1, wk1)):
                wgt = base * wk[ok]
                nz = wgt != 0
                idx_parts.append(kk[ok][nz] * (h * w) + pix[nz])
                w_parts.append(wgt[nz])
    if not idx_parts:
        return np.zeros((c, h, w))
    flat = np.bincount(np.concatenate(idx_parts), weights=np.concatenate(w_parts), minlength=c * h * w)
    return flat.reshape(c, h, w)


def render_filament(points, shape, n_channels: int = DEFAULT_CHANNELS, intensity=1.0,
                    spacing: float = SAMPLE_SPACING) -> np.ndarray:
    """Render a 1-px-thin filament along a polyline into a (c, h, w) image.

    Parameters
    ----------
    points : (n, 2) array of (row, col) vertices in pixel coordinates (n >= 2).
    shape : (h, w) of the image.
    n_channels : orientation channels ``c``.
    intensity : photons per pixel of length; a scalar or one value per vertex
        (linearly interpolated along the arc length).
    spacing : distance between rendered samples in pixels (sub-pixel: <= 0.5 is sensible).

    Returns
    -------
    (c, h, w) float64 image. Dipoles follow the local segment direction (see the module
    docstring for the angle convention). For a filament fully inside the image the total
    is ``intensity * length``.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
        raise SPoDInputError(f"points must be an (n, 2) array of (row, col) with n >= 2, got shape {pts.shape}.")
    spacing = _check_positive(spacing, "spacing")
    n_channels = _check_channels(n_channels)
    h, w = _check_shape(shape, "shape")
    seg = np.diff(pts, axis=0)
    seg_len = np.hypot(seg[:, 0], seg[:, 1])
    arc = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = arc[-1]
    if total == 0:
        raise SPoDInputError("The filament has zero length.")
    n = max(1, int(math.ceil(total / spacing)))
    step = total / n
    s = (np.arange(n) + 0.5) * step
    i_seg = np.clip(np.searchsorted(arc, s, side="right") - 1, 0, len(seg) - 1)
    t = (s - arc[i_seg]) / np.where(seg_len[i_seg] > 0, seg_len[i_seg], 1.0)
    rows = pts[i_seg, 0] + t * seg[i_seg, 0]
    cols = pts[i_seg, 1] + t * seg[i_seg, 1]
    phi = np.arctan2(-seg[i_seg, 0], seg[i_seg, 1])
    inten = np.asarray(intensity, dtype=np.float64)
    if inten.ndim == 0:
        weights = np.full(n, float(inten) * step)
    else:
        if inten.shape != (len(pts),):
            raise SPoDInputError(f"intensity must be a scalar or one value per point ({len(pts)}), "
                                 f"got shape {inten.shape}.")
        weights = np.interp(s, arc, inten) * step
    return _splat((h, w), n_channels, rows, cols, phi, weights)


def render_puncta(positions, orientations, intensities, shape, n_channels: int = DEFAULT_CHANNELS) -> np.ndarray:
    """Render point sources into a (c, h, w) float64 image.

    Parameters
    ----------
    positions : (n, 2) array of (row, col) in pixel coordinates.
    orientations : (n,) dipole angles in radians (module docstring convention).
    intensities : (n,) total photons per point (scalar broadcasts).
    shape : (h, w) of the image.
    """
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise SPoDInputError(f"positions must be an (n, 2) array of (row, col), got shape {pos.shape}.")
    h, w = _check_shape(shape, "shape")
    phi = np.asarray(orientations, dtype=np.float64)
    inten = np.asarray(intensities, dtype=np.float64)
    for name, arr in (("orientations", phi), ("intensities", inten)):
        if arr.ndim > 1 or (arr.ndim == 1 and len(arr) != len(pos)):
            raise SPoDInputError(f"{name} must be a scalar or have one value per position ({len(pos)}), "
                                 f"got shape {arr.shape}.")
    return _splat((h, w), _check_channels(n_channels), pos[:, 0], pos[:, 1], phi, inten)


# -- random structures ------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, n: int, corr_samples: float) -> np.ndarray:
    """Stationary Gaussian noise of unit variance, correlated over ``corr_samples`` samples."""
    sigma = max(float(corr_samples), 1e-3)
    pad = int(4 * sigma) + 1
    white = rng.standard_normal(n + 2 * pad)
    smooth = scipy.ndimage.gaussian_filter1d(white, sigma, mode="constant")[pad:pad + n]
    # Variance of white noise filtered by a unit-sum Gaussian of width sigma: 1 / (2 sqrt(pi) sigma).
    return smooth * math.sqrt(2.0 * math.sqrt(math.pi) * sigma)


@dataclass
class _Filaments:
    """Random filaments, described so that they can be re-rendered as they move."""

    centre: list  # (2,) arrays: position of the arc-length midpoint at frame 0
    psi0: np.ndarray  # tangent angle at the midpoint
    curvature: list  # (n,) per-sample curvature, 1/px
    bend: list  # (n,) curvature change per frame
    brightness: list  # (n,) photons per px length (before the global scale)
    omega: np.ndarray  # rotation about the midpoint, rad per frame
    velocity: np.ndarray  # (m, 2) px per frame


@dataclass
class _Puncta:
    positions: np.ndarray  # (p, 2) sub-points at frame 0
    owner: np.ndarray  # (p,) index of the punctum of each sub-point
    phi: np.ndarray  # (m,) dipole angle
    brightness: np.ndarray  # (p,) per sub-point
    omega: np.ndarray  # (m,) rad per frame
    velocity: np.ndarray  # (m, 2) px per frame


def _random_filaments(rng, n: int, box, drift, speed: float) -> _Filaments:
    (r_lo, r_hi), (c_lo, c_hi) = box
    ds = SAMPLE_SPACING
    out = _Filaments([], rng.uniform(0, 2 * math.pi, n), [], [], [], rng.normal(0, 0.003, n) * speed,
                     np.tile(np.asarray(drift, dtype=np.float64), (n, 1)))
    for _ in range(n):
        out.centre.append(np.array([rng.uniform(r_lo, r_hi), rng.uniform(c_lo, c_hi)]))
        length = rng.uniform(*FILAMENT_LENGTH_RANGE)
        m = int(length / ds)
        # A constant part gives arcs; the correlated part gives gentle wiggles.
        kappa = rng.normal(0, 0.5 * CURVATURE_STD) + CURVATURE_STD * _smooth_noise(rng, m, CURVATURE_CORR / ds)
        out.curvature.append(kappa)
        out.bend.append(0.01 * speed * CURVATURE_STD * _smooth_noise(rng, m, 2 * CURVATURE_CORR / ds))
        base = rng.lognormal(0.0, 0.3)
        out.brightness.append(base * np.exp(0.35 * _smooth_noise(rng, m, BRIGHTNESS_CORR / ds) - 0.5 * 0.35 ** 2))
    return out


def _random_puncta(rng, n: int, box, drift, speed: float) -> _Puncta:
    (r_lo, r_hi), (c_lo, c_hi) = box
    centres = np.column_stack([rng.uniform(r_lo, r_hi, n), rng.uniform(c_lo, c_hi, n)])
    phi = rng.uniform(0, math.pi, n)
    total = PUNCTA_RELATIVE_BRIGHTNESS * rng.lognormal(0.0, 0.4, n)
    # Most puncta are single points; some are tiny clusters (sub-pixel to ~1 px blobs).
    n_sub = rng.choice([1, 1, 2, 3, 4], size=n)
    owner = np.repeat(np.arange(n), n_sub)
    offsets = rng.normal(0.0, 0.5, (len(owner), 2))
    offsets[np.cumsum(n_sub) - n_sub] = 0.0  # each punctum's first sub-point sits at its centre
    positions = centres[owner] + offsets
    brightness = total[owner] / n_sub[owner]
    direction = rng.uniform(0, 2 * math.pi, n)
    own_v = 0.5 * speed * np.column_stack([np.sin(direction), np.cos(direction)])
    velocity = np.asarray(drift, dtype=np.float64)[None, :] + own_v
    omega = rng.normal(0.0, 0.03, n) * speed
    return _Puncta(positions, owner, phi, brightness, omega, velocity)


def _filament_samples(f: _Filaments, frame: float):
    """Sample positions, tangent angles and weights of all filaments at a (possibly fractional) frame."""
    ds = SAMPLE_SPACING
    rows, cols, phis, wts = [], [], [], []
    for i in range(len(f.centre)):
        kappa = f.curvature[i] + frame * f.bend[i]
        m = len(kappa)
        mid = m // 2
        psi = np.cumsum(kappa) * ds
        psi = psi - psi[mid] + f.psi0[i] + frame * f.omega[i]
        step_r, step_c = -np.sin(psi) * ds, np.cos(psi) * ds
        r = np.cumsum(step_r)
        c = np.cumsum(step_c)
        centre = f.centre[i] + frame * f.velocity[i]
        rows.append(r - r[mid] + centre[0])
        cols.append(c - c[mid] + centre[1])
        phis.append(psi)
        wts.append(f.brightness[i] * ds)
    if not rows:
        return (np.zeros(0),) * 4
    return tuple(np.concatenate(v) for v in (rows, cols, phis, wts))


def _render_truth(filaments: _Filaments, puncta: _Puncta, shape, n_channels: int, frame: float = 0.0):
    fr, fc, fphi, fw = _filament_samples(filaments, frame)
    pos = puncta.positions + frame * puncta.velocity[puncta.owner]
    pphi = (puncta.phi + frame * puncta.omega)[puncta.owner]
    rows = np.concatenate([fr, pos[:, 0]])
    cols = np.concatenate([fc, pos[:, 1]])
    phi = np.concatenate([fphi, pphi])
    wts = np.concatenate([fw, puncta.brightness])
    return _splat(shape, n_channels, rows, cols, phi, wts)


# -- the public simulators ----------------------------------------------------------------

@dataclass
class SimulatedObservation:
    """One synthetic SPoD observation and everything needed to check a recovery.

    Attributes
    ----------
    observation : (c, H, W) float32
        Camera counts: ``Poisson(clean + background) + offset + Normal(0, read_noise)``.
    psf : (a, b) float32, sum 1.
    truth : (c, h, w) float32, ``h = H + a - 1``, ``w = W + b - 1``
        Ground-truth image in photons (non-negative, sparse); ``clean = op.forward(truth)``.
    clean : (c, H, W) float32
        Expected signal in photons, without background, offset or noise.
    params : dict
        All settings (including the seed and the derived counts and scale).
    """

    observation: np.ndarray
    psf: np.ndarray
    truth: np.ndarray
    clean: np.ndarray
    params: dict = field(default_factory=dict)


@dataclass
class SimulatedTimeSeries:
    """A synthetic SPoD time series; like :class:`SimulatedObservation` with a leading time axis.

    observation (T, c, H, W), psf (a, b), truth (T, c, h, w), clean (T, c, H, W), all float32.
    """

    observation: np.ndarray
    psf: np.ndarray
    truth: np.ndarray
    clean: np.ndarray
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.observation.shape[0])

    def frame(self, t: int) -> SimulatedObservation:
        """Frame ``t`` as a :class:`SimulatedObservation`."""
        return SimulatedObservation(self.observation[t], self.psf, self.truth[t], self.clean[t],
                                    {**self.params, "frame": int(t)})


def _check_shape(shape, what: str) -> tuple[int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise SPoDInputError(f"{what} must be (rows, cols), got {shape!r}.") from None
    if len(dims) != 2 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
        raise SPoDInputError(f"{what} must be two positive integers (rows, cols), got {shape!r}.")
    return int(dims[0]), int(dims[1])


def _check_channels(n_channels) -> int:
    if isinstance(n_channels, bool) or not isinstance(n_channels, (int, np.integer)) or n_channels < 3:
        raise SPoDInputError(
            f"n_channels must be an integer >= 3 (the cos^2 mixing needs at least 3 polarization steps), "
            f"got {n_channels!r}.")
    return int(n_channels)


def _check_count(value, what: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise SPoDInputError(f"{what} must be a non-negative integer or None, got {value!r}.")
    return int(value)


def _check_common(shape, n_channels, psf, seed, n_filaments, n_puncta, photons, background, offset, read_noise):
    H, W = _check_shape(shape, "shape")
    n_channels = _check_channels(n_channels)
    psf_arr = default_psf() if psf is None else check_psf(psf, normalize=True).astype(np.float32)
    a, b = psf_arr.shape
    if H < a or W < b:
        raise SPoDInputError(f"The observation shape {(H, W)} is smaller than the PSF ({a} x {b}); "
                             f"use a larger shape or a smaller PSF.")
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
    elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SPoDInputError(f"seed must be a non-negative integer or None, got {seed!r}.")
    values = {
        "photons": _check_positive(photons, "photons", allow_zero=True),
        "background": _check_positive(background, "background", allow_zero=True),
        "read_noise": _check_positive(read_noise, "read_noise", allow_zero=True),
    }
    try:
        offset = float(offset)
    except (TypeError, ValueError):
        raise SPoDInputError(f"offset must be a number, got {offset!r}.") from None
    if not math.isfinite(offset):
        raise SPoDInputError(f"offset must be finite, got {offset!r}.")
    return (H, W), int(n_channels), psf_arr, int(seed), _check_count(n_filaments, "n_filaments"), \
        _check_count(n_puncta, "n_puncta"), values["photons"], values["background"], offset, values["read_noise"]


def _blur_and_scale(frames, n_frames: int, op: SPoDOperator, image_shape, photons: float):
    """Blur rendered truth frames and scale them so that the brightest expected pixel is ``photons``.

    ``frames`` yields (c, h, w) float64 images. Returns float32 truth (T, c, h, w), float32
    clean (T, c, H, W) and the scale (photons per unit of the rendered image). The float32
    truth itself is blurred, and blurring is linear, so ``clean == op.forward(truth)`` up to
    float32 rounding. Frame by frame keeps the memory at one float64 frame.
    """
    c = op.n_channels
    h, w = image_shape
    H, W = op.observation_shape(image_shape)
    truth = np.empty((n_frames, c, h, w), dtype=np.float32)
    clean = np.empty((n_frames, c, H, W), dtype=np.float32)
    for t, frame in enumerate(frames):
        truth[t] = frame
        clean[t] = op.forward(torch.from_numpy(truth[t])).numpy()
    # FFT round-off leaves values of order -1e-16 where there is nothing: clip for Poisson.
    np.clip(clean, 0.0, None, out=clean)
    peak = float(clean.max())
    scale = photons / peak if peak > 0 else 0.0
    truth *= np.float32(scale)
    clean *= np.float32(scale)
    return truth, clean, scale


def _camera(rng, clean: np.ndarray, background: float, offset: float, read_noise: float, noise: bool):
    """Camera counts for (..., c, H, W) expected photons ``clean``: Poisson, then offset and read noise."""
    out = np.empty(clean.shape, dtype=np.float32)
    # One (c, H, W) frame at a time bounds the float64 temporaries for long time series.
    for idx in np.ndindex(clean.shape[:-3]):
        expected = clean[idx].astype(np.float64) + background
        if noise:
            counts = rng.poisson(expected).astype(np.float64)
            if read_noise > 0:
                counts += rng.normal(0.0, read_noise, size=counts.shape)
        else:
            counts = expected
        out[idx] = counts + offset
    return out


def _default_count(value, density: float, area: float, minimum: int = 1) -> int:
    if value is not None:
        return value
    return max(minimum, int(round(density * area)))


def simulate(shape=(256, 256), n_channels: int = DEFAULT_CHANNELS, psf=None, seed: int | None = 0,
             n_filaments: int | None = None, n_puncta: int | None = None, photons: float = 200.0,
             background: float = 2.0, offset: float = 100.0, read_noise: float = 2.0,
             noise: bool = True) -> SimulatedObservation:
    """Simulate one SPoD observation of random filaments and puncta.

    Parameters
    ----------
    shape : (H, W)
        Size of the observation (the truth is ``(H + a - 1, W + b - 1)``, valid convolution).
    n_channels : int
        Polarization steps / orientation channels ``c`` (>= 3).
    psf : (a, b) array or None
        PSF (normalised to sum 1); None uses :func:`default_psf` (32 x 32 Airy, FWHM ~3.5 px).
    seed : int or None
        Seed of ``numpy.random.default_rng``; None draws one (recorded in ``params``).
    n_filaments, n_puncta : int or None
        Counts; None gives 8 filaments and 30 puncta per 256 x 256 observed pixels
        (at least one of each).
    photons : float
        Expected photons in the brightest pixel of ``clean``.
    background : float
        Uniform expected background photons per pixel (added before Poisson noise).
    offset : float
        Camera offset in counts (added after the noise).
    read_noise : float
        Standard deviation of the Gaussian read noise, in counts.
    noise : bool
        False returns the exact expectation ``clean + background + offset``.

    Returns
    -------
    :class:`SimulatedObservation`.
    """
    (H, W), c, psf_arr, seed, n_filaments, n_puncta, photons, background, offset, read_noise = _check_common(
        shape, n_channels, psf, seed, n_filaments, n_puncta, photons, background, offset, read_noise)
    rng = np.random.default_rng(seed)
    op = SPoDOperator(psf_arr, c, dtype=torch.float64)
    h, w = op.image_shape((H, W))
    n_filaments = _default_count(n_filaments, FILAMENTS_PER_PIXEL, H * W)
    n_puncta = _default_count(n_puncta, PUNCTA_PER_PIXEL, H * W)
    box = ((0.0, h - 1.0), (0.0, w - 1.0))
    filaments = _random_filaments(rng, n_filaments, box, (0.0, 0.0), 0.0)
    puncta = _random_puncta(rng, n_puncta, box, (0.0, 0.0), 0.0)
    truth, clean, scale = _blur_and_scale([_render_truth(filaments, puncta, (h, w), c)], 1, op, (h, w), photons)
    truth, clean = truth[0], clean[0]
    observation = _camera(rng, clean, background, offset, read_noise, bool(noise))
    params = {
        "shape": (H, W), "image_shape": (h, w), "n_channels": c, "psf_shape": tuple(psf_arr.shape),
        "psf": "default_psf()" if psf is None else "user", "seed": seed,
        "n_filaments": n_filaments, "n_puncta": n_puncta, "photons": photons, "background": background,
        "offset": offset, "read_noise": read_noise, "noise": bool(noise), "scale": scale,
        "angle_convention": "channel k = dipole angle pi*k/c, counter-clockwise from +col, row 0 at top",
    }
    return SimulatedObservation(observation, psf_arr, truth, clean, params)


def simulate_time_series(n_frames: int = 10, shape=(128, 128), n_channels: int = DEFAULT_CHANNELS, psf=None,
                         seed: int | None = 0, speed: float = 1.0, **simulate_kwargs) -> SimulatedTimeSeries:
    """Simulate a SPoD time series of slowly moving filaments and puncta.

    All structures drift together by ``speed`` px/frame in a random direction; filaments
    also rotate slowly about their midpoints and bend, puncta wander (about
    ``speed / 2`` px/frame of their own) and their dipoles turn. Consecutive frames are
    therefore strongly correlated, distant ones less so. Noise is independent per frame.
    Structures are placed over the region the field of view sweeps, so the density stays
    about constant; ``n_filaments`` / ``n_puncta`` (if given) are counts per field of view.
    One intensity scale serves all frames: the brightest pixel of ``clean`` over the
    whole series holds ``photons``.

    Parameters
    ----------
    n_frames : int
        T >= 1.
    shape, n_channels, psf, seed :
        As in :func:`simulate`.
    speed : float
        Drift in px per frame (>= 0); all motion scales with it (0 gives static structures).
    **simulate_kwargs :
        ``n_filaments``, ``n_puncta``, ``photons``, ``background``, ``offset``,
        ``read_noise``, ``noise`` as in :func:`simulate`.

    Returns
    -------
    :class:`SimulatedTimeSeries` with observation (T, c, H, W), truth (T, c, h, w),
    clean (T, c, H, W) and the PSF, all float32.
    """
    allowed = {"n_filaments", "n_puncta", "photons", "background", "offset", "read_noise", "noise"}
    unknown = set(simulate_kwargs) - allowed
    if unknown:
        raise SPoDInputError(f"Unknown argument(s) for simulate_time_series: {sorted(unknown)}.")
    if isinstance(n_frames, bool) or not isinstance(n_frames, (int, np.integer)) or n_frames < 1:
        raise SPoDInputError(f"n_frames must be a positive integer, got {n_frames!r}.")
    speed = _check_positive(speed, "speed", allow_zero=True)
    kw = {"n_filaments": None, "n_puncta": None, "photons": 200.0, "background": 2.0, "offset": 100.0,
          "read_noise": 2.0, "noise": True, **simulate_kwargs}
    (H, W), c, psf_arr, seed, n_filaments, n_puncta, photons, background, offset, read_noise = _check_common(
        shape, n_channels, psf, seed, kw["n_filaments"], kw["n_puncta"], kw["photons"], kw["background"],
        kw["offset"], kw["read_noise"])
    T = int(n_frames)
    rng = np.random.default_rng(seed)
    op = SPoDOperator(psf_arr, c, dtype=torch.float64)
    h, w = op.image_shape((H, W))
    angle = rng.uniform(0, 2 * math.pi)
    drift = speed * np.array([-math.sin(angle), math.cos(angle)])
    # Place structures over the area the field of view sweeps in the structures' frame,
    # so that what drifts out of view is replaced by what drifts in.
    sweep = -drift * (T - 1)
    box = ((min(0.0, sweep[0]), h - 1.0 + max(0.0, sweep[0])), (min(0.0, sweep[1]), w - 1.0 + max(0.0, sweep[1])))
    area_ratio = (box[0][1] - box[0][0] + 1) * (box[1][1] - box[1][0] + 1) / (h * w)
    n_fil_view = _default_count(n_filaments, FILAMENTS_PER_PIXEL, H * W)
    n_pun_view = _default_count(n_puncta, PUNCTA_PER_PIXEL, H * W)
    n_fil = int(round(n_fil_view * area_ratio))
    n_pun = int(round(n_pun_view * area_ratio))
    filaments = _random_filaments(rng, n_fil, box, drift, speed)
    puncta = _random_puncta(rng, n_pun, box, drift, speed)
    frames = (_render_truth(filaments, puncta, (h, w), c, frame=float(t)) for t in range(T))
    truth, clean, scale = _blur_and_scale(frames, T, op, (h, w), photons)
    observation = _camera(rng, clean, background, offset, read_noise, bool(kw["noise"]))
    params = {
        "n_frames": T, "shape": (H, W), "image_shape": (h, w), "n_channels": c, "psf_shape": tuple(psf_arr.shape),
        "psf": "default_psf()" if psf is None else "user", "seed": seed, "speed": speed,
        "drift": (float(drift[0]), float(drift[1])),
        "n_filaments": n_fil_view, "n_puncta": n_pun_view, "n_filaments_total": n_fil, "n_puncta_total": n_pun,
        "photons": photons, "background": background, "offset": offset, "read_noise": read_noise,
        "noise": bool(kw["noise"]), "scale": scale,
        "angle_convention": "channel k = dipole angle pi*k/c, counter-clockwise from +col, row 0 at top",
    }
    return SimulatedTimeSeries(observation, psf_arr, truth, clean, params)
