"""Structure families that :func:`~napari_spodnet.core.simulate.simulate` never draws.

A learned recovery is judged on data it never saw (``docs/results.md``, "SPoD-Net against
FISTA"). :func:`simulate` draws smooth filaments and isolated puncta; the shipped model is
trained on those. ``membranes``, ``branching``, ``textures``, ``bundles`` and ``mesh`` are *held
out*: no training uses them (``bundles`` and ``mesh`` joined in session 22, after the shipped
model and the presets were made). ``clusters`` is held out from the first training stage only: the dense stage of training
(``TrainingConfig.dense_stage_epochs``) and the shipped model's fine-tuning draw dense clusters
(other seeds than the benchmark's) so that a learned schedule does not fail on dense structure.

* ``"clusters"``: dense clusters of puncta (20-60 points within a few pixels, each cluster
  with one preferred dipole orientation and some spread), as in receptor clusters.
* ``"membranes"``: closed, smooth, wobbly contours (cell or vesicle outlines), dipoles
  tangent to the edge; several nested or overlapping ones.
* ``"branching"``: tree-like networks: short, slightly curved segments that fork at random,
  as in neurites or actin branches.
* ``"textures"``: textured patches: discs 16-40 px across filled with many short straight
  fibres (3-8 px) sharing a local orientation with some spread, as in an actin meshwork or
  aligned fibrils seen below the resolution limit.
* ``"bundles"``: bundles of 4-12 long, near-parallel filaments 1-2.5 px apart along a gently
  curved path, as in stress fibres or axon bundles: dense and aligned over tens of pixels.
* ``"mesh"``: patches of a dense mesh, straight filaments 10-30 px long crossing at random
  angles inside discs 30-60 px across, as in a cortical actin network.

Every function returns a :class:`~napari_spodnet.core.simulate.SimulatedObservation` with
the same camera model, units and PSF conventions as :func:`simulate` (the brightest pixel
of ``clean`` holds ``photons`` expected photons).
"""

from __future__ import annotations

import numpy as np
import torch

from .physics import SPoDOperator
from .simulate import (SimulatedObservation, _blur_and_scale, _camera, _check_common, render_filament,
                       render_puncta)

__all__ = ["FAMILIES", "simulate_family"]

FAMILIES = ("clusters", "membranes", "branching", "textures", "bundles", "mesh")


def _clusters(rng, h, w, c, area_scale):
    n_clusters = max(2, int(round(14 * area_scale)))
    image = np.zeros((c, h, w))
    for _ in range(n_clusters):
        centre = rng.uniform([0, 0], [h - 1, w - 1])
        n = int(rng.integers(20, 61))
        radius = rng.uniform(2.0, 6.0)
        pos = np.clip(centre + rng.normal(0.0, radius, size=(n, 2)), 0, [h - 1, w - 1])
        phi = (rng.uniform(0, np.pi) + rng.normal(0.0, 0.3, size=n)) % np.pi
        image += render_puncta(pos, phi, rng.uniform(0.3, 1.0, size=n), (h, w), c)
    return image


def _membranes(rng, h, w, c, area_scale):
    n = max(2, int(round(5 * area_scale)))
    image = np.zeros((c, h, w))
    t = np.linspace(0, 2 * np.pi, 400)
    for _ in range(n):
        centre = rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w])
        radius = rng.uniform(0.08, 0.3) * min(h, w)
        wobble = sum(rng.normal(0, 0.08) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
        r = radius * (1 + wobble)
        pts = np.stack([centre[0] + r * np.sin(t), centre[1] + r * np.cos(t)], axis=1)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] <= h - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= w - 1)
        pts = pts[inside]
        if len(pts) < 2 or np.any(np.hypot(*np.diff(pts, axis=0).T) > 5):
            # cut by the border: render the pieces inside separately
            breaks = np.nonzero(np.hypot(*np.diff(pts, axis=0).T) > 5)[0] + 1 if len(pts) >= 2 else []
            pieces = np.split(pts, breaks) if len(pts) >= 2 else []
        else:
            pieces = [pts]
        brightness = rng.uniform(0.5, 1.0)
        for piece in pieces:
            if len(piece) >= 2:
                image += render_filament(piece, (h, w), c, intensity=brightness)
    return image


def _branching(rng, h, w, c, area_scale):
    n_trees = max(2, int(round(3 * area_scale)))
    image = np.zeros((c, h, w))
    for _ in range(n_trees):
        # A tree is rooted in the central 70 % (the observation sees it, not only its blurred tail at
        # the border) and redrawn when the border stops it after a few segments: a lone stub beside the
        # frame would leave the observation almost empty and its truth dominated by unseen pixels.
        for _attempt in range(20):
            tree, segments = _grow_tree(rng, h, w, c)
            if segments >= 6:
                break
        image += tree
    return image


def _grow_tree(rng, h, w, c):
    image = np.zeros((c, h, w))
    stack = [(rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w]), rng.uniform(0, 2 * np.pi), 0)]
    segments = 0
    while stack and segments < 40:
        start, angle, depth = stack.pop()
        length = rng.uniform(12, 35)
        bend = rng.normal(0, 0.02)
        steps = np.arange(0, length, 1.0)
        angles = angle + bend * steps
        pts = start + np.cumsum(np.stack([-np.sin(angles), np.cos(angles)], axis=1), axis=0)
        pts = np.vstack([start, pts])
        keep = (pts[:, 0] >= 0) & (pts[:, 0] <= h - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= w - 1)
        end = int(np.argmin(keep)) if not keep.all() else len(pts)
        pts = pts[:end]
        if len(pts) >= 2:
            image += render_filament(pts, (h, w), c, intensity=rng.uniform(0.4, 1.0) / (1 + 0.2 * depth))
            segments += 1
            if end == len(keep) and depth < 6:
                for _ in range(int(rng.integers(1, 3))):
                    stack.append((pts[-1], angles[-1] + rng.choice([-1, 1]) * rng.uniform(0.3, 1.0), depth + 1))
    return image, segments


def _textures(rng, h, w, c, area_scale):
    n_patches = max(3, int(round(12 * area_scale)))
    image = np.zeros((c, h, w))
    for _ in range(n_patches):
        centre = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w])
        radius = rng.uniform(8.0, 20.0)
        orientation = rng.uniform(0, np.pi)
        brightness = rng.uniform(0.3, 0.8)
        for _ in range(int(radius ** 2 / 5)):
            r, a = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            mid = centre + r * np.array([np.sin(a), np.cos(a)])
            angle = orientation + rng.normal(0.0, 0.25)
            half = 0.5 * rng.uniform(3.0, 8.0) * np.array([-np.sin(angle), np.cos(angle)])
            pts = np.clip(np.stack([mid - half, mid + half]), 0, [h - 1, w - 1])
            if np.hypot(*(pts[1] - pts[0])) > 1.0:
                image += render_filament(pts, (h, w), c, intensity=brightness)
    return image


def _bundles(rng, h, w, c, area_scale):
    """Bundles of 4-12 long, near-parallel filaments 1-2.5 px apart along a gently curved path."""
    n_bundles = max(2, int(round(4 * area_scale)))
    image = np.zeros((c, h, w))
    for _ in range(n_bundles):
        start = rng.uniform([0.1 * h, 0.1 * w], [0.9 * h, 0.9 * w])
        angle, bend = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.01)
        steps = np.arange(0, rng.uniform(40, 90), 1.0)
        angles = angle + bend * steps
        axis = start + np.cumsum(np.stack([-np.sin(angles), np.cos(angles)], axis=1), axis=0)
        normal = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        n_fibres, spacing = int(rng.integers(4, 13)), rng.uniform(1.0, 2.5)
        brightness = rng.uniform(0.3, 0.8)
        for k in range(n_fibres):
            offset = (k - (n_fibres - 1) / 2) * spacing + rng.normal(0, 0.3)
            pts = axis + offset * normal + rng.normal(0, 0.15, size=axis.shape)
            keep = (pts[:, 0] >= 0) & (pts[:, 0] <= h - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= w - 1)
            pts = pts[keep]
            if len(pts) >= 2:
                image += render_filament(pts, (h, w), c, intensity=brightness * rng.uniform(0.7, 1.0))
    return image


def _mesh(rng, h, w, c, area_scale):
    """Patches of a dense mesh: straight filaments 10-30 px long crossing at random angles inside discs of
    radius 15-30 px; dense like the textures, but every orientation crosses every other at each place."""
    n_patches = max(2, int(round(6 * area_scale)))
    image = np.zeros((c, h, w))
    for _ in range(n_patches):
        centre = rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w])
        radius = rng.uniform(15.0, 30.0)
        for _ in range(int(radius ** 2 / 20)):
            r, a = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            mid = centre + r * np.array([np.sin(a), np.cos(a)])
            angle = rng.uniform(0, np.pi)
            half = 0.5 * rng.uniform(10.0, 30.0) * np.array([-np.sin(angle), np.cos(angle)])
            pts = np.clip(np.stack([mid - half, mid + half]), 0, [h - 1, w - 1])
            if np.hypot(*(pts[1] - pts[0])) > 1.0:
                image += render_filament(pts, (h, w), c, intensity=rng.uniform(0.3, 1.0))
    return image


_RENDERERS = {"clusters": _clusters, "membranes": _membranes, "branching": _branching, "textures": _textures,
              "mesh": _mesh, "bundles": _bundles}


def simulate_family(family: str, shape=(256, 256), n_channels: int = 18, psf=None, seed: int | None = 0,
                    photons: float = 200.0, background: float = 2.0, offset: float = 100.0,
                    read_noise: float = 2.0, noise: bool = True) -> SimulatedObservation:
    """One observation of a held-out structure family (see the module docstring).

    family : one of :data:`FAMILIES`. The other arguments are those of :func:`simulate`.
    Returns a :class:`SimulatedObservation` (``params["family"]`` names the family).
    """
    from .validation import SPoDInputError

    if family not in _RENDERERS:
        raise SPoDInputError(f"Unknown structure family {family!r}; choose one of {FAMILIES}.")
    (H, W), c, psf_arr, seed, _, _, photons, background, offset, read_noise = _check_common(
        shape, n_channels, psf, seed, None, None, photons, background, offset, read_noise)
    rng = np.random.default_rng(seed)
    op = SPoDOperator(psf_arr, c, dtype=torch.float64)
    h, w = op.image_shape((H, W))
    frame = _RENDERERS[family](rng, h, w, c, H * W / (256 * 256))
    truth, clean, scale = _blur_and_scale([frame], 1, op, (h, w), photons)
    observation = _camera(rng, clean[0], background, offset, read_noise, bool(noise))
    params = {"family": family, "shape": (H, W), "image_shape": (h, w), "n_channels": c,
              "psf_shape": tuple(psf_arr.shape), "seed": seed, "photons": photons, "background": background,
              "offset": offset, "read_noise": read_noise, "noise": bool(noise), "scale": scale}
    return SimulatedObservation(observation, psf_arr, truth[0], clean[0], params)
