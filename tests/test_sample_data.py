"""Sample data contributions of napari-spodnet."""

from __future__ import annotations

import numpy as np

from napari_spodnet._sample_data import sample_observation, sample_time_series
from napari_spodnet.core.simulate import simulate


def test_sample_observation_layers():
    layers = sample_observation()
    kinds = [meta["metadata"]["spodnet"]["kind"] for _d, meta, _t in layers]
    assert kinds == ["observation", "psf", "truth"]
    (obs, obs_meta, _), (psf, _, _), (truth, truth_meta, _) = layers
    assert obs.shape == (18, 256, 256) and psf.shape == (32, 32) and truth.shape == (18, 287, 287)
    np.testing.assert_array_equal(obs, simulate((256, 256), seed=0).observation)  # the documented sample
    assert truth_meta["translate"] == (0.0, -15.5, -15.5)
    assert obs_meta["axis_labels"] == ("polarization", "y", "x")
    assert np.isclose(psf.sum(), 1.0, atol=1e-5)


def test_sample_time_series_layers():
    (obs, meta, _), (psf, _, _), (truth, truth_meta, _) = sample_time_series()
    assert obs.shape == (8, 18, 128, 128) and truth.shape == (8, 18, 159, 159)
    assert meta["axis_labels"][0] == "t"
    assert truth_meta["translate"] == (0.0, 0.0, -15.5, -15.5)


def test_open_sample_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-spodnet", "spod_sample")
    assert [layer.metadata["spodnet"]["kind"] for layer in viewer.layers] == ["observation", "psf", "truth"]
    truth = viewer.layers[-1]
    np.testing.assert_allclose(truth.translate, (0, -15.5, -15.5))
