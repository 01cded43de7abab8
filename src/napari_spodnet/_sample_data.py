"""napari sample data: synthetic SPoD observations (core.simulate) with their PSF and ground truth."""

from __future__ import annotations

from .core.simulate import simulate, simulate_time_series


def _layers(sim, name: str, source: str) -> list[tuple]:
    from .widgets._layers import METADATA_KEY, display_range, jsonable

    obs, psf, truth = sim.observation, sim.psf, sim.truth
    a, b = psf.shape
    series = obs.ndim == 4
    offset = (-(a - 1) / 2, -(b - 1) / 2)  # registers the (larger) truth on the observation (method.md 2)
    lead = (0.0,) * (truth.ndim - 2)
    params = jsonable(sim.params)
    return [
        (obs, {"name": name, "axis_labels": ("t", "polarization", "y", "x") if series else ("polarization", "y", "x"),
               "contrast_limits": display_range(obs[0] if series else obs),
               "metadata": {METADATA_KEY: {"kind": "observation", "source": source, "params": params}}}, "image"),
        (psf, {"name": f"{name} PSF", "colormap": "magma", "visible": False,
               "metadata": {METADATA_KEY: {"kind": "psf", "source": source}}}, "image"),
        (truth, {"name": f"{name} ground truth", "translate": lead + offset, "visible": False,
                 "colormap": "gray", "contrast_limits": display_range(truth[0] if series else truth),
                 "metadata": {METADATA_KEY: {"kind": "truth", "source": source, "translate": list(offset)}}},
         "image"),
    ]


def sample_observation() -> list[tuple]:
    """A 256 x 256 SPoD observation (18 polarization images) of filaments and puncta."""
    return _layers(simulate((256, 256), seed=0), "SPoD sample", "simulate((256, 256), seed=0)")


def sample_time_series() -> list[tuple]:
    """A short SPoD time series (8 frames of 128 x 128) of slowly drifting structures."""
    return _layers(simulate_time_series(n_frames=8, shape=(128, 128), seed=0), "SPoD time series",
                   "simulate_time_series(n_frames=8, shape=(128, 128), seed=0)")
