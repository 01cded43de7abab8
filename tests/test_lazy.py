"""Lazy time series: frames recovered when indexed, equal to recover(), cache invalidated by
model / lambda changes, and a napari Image layer showing frame t after moving the t slider."""

import numpy as np
import pytest

from napari_spodnet.core.recover import recover
from napari_spodnet.core.simulate import simulate_time_series
from napari_spodnet.lazy import FrameCache, lazy_recover, lazy_series

T = 4


@pytest.fixture(scope="module")
def sim():
    return simulate_time_series(T, (40, 40), seed=11)


@pytest.fixture(scope="module")
def reference(sim):
    return recover(sim.observation, None, method="spodnet")


def test_frames_computed_when_indexed_and_equal_recover(sim, reference):
    cache, maps = FrameCache(max_frames=8), FrameCache(max_frames=100)
    series = lazy_series(sim.observation, cache=cache, map_cache=maps)
    assert series.image.shape == reference.image.shape and series.image.chunks[0] == (1,) * T
    assert len(cache) == 0  # nothing recovered yet
    np.testing.assert_allclose(np.asarray(series.image[2]), reference.image[2], rtol=1e-5, atol=1e-6)
    assert len(cache) == 1
    np.testing.assert_allclose(np.asarray(series.intensity[2]), reference.intensity[2], rtol=1e-5, atol=1e-5)
    assert maps.hits >= 1 and len(cache) == 1  # the intensity came from the maps kept with the frame
    np.testing.assert_allclose(series.orientation.compute(), reference.orientation, atol=1e-4)


def test_changing_lambda_or_model_invalidates(sim, tmp_path):
    import torch

    from napari_spodnet.core.recover import load_default_model

    cache = FrameCache()
    a = lazy_series(sim.observation, cache=cache)
    b = lazy_series(sim.observation, cache=cache, lam=0.2)
    assert a.token != b.token and a.image.name != b.image.name
    net = load_default_model()
    with torch.no_grad():
        net.layers[0].theta.mul_(3.0)  # another model: same shapes, other weights
    c = lazy_series(sim.observation, cache=cache, model=net)
    assert c.token != a.token
    assert not np.allclose(np.asarray(a.image[1]), np.asarray(c.image[1]))
    same = lazy_series(sim.observation, cache=cache)
    assert same.token == a.token  # equal settings share the cache
    a.invalidate()
    assert all(key[0] != a.token for key in cache._frames)


def test_lazy_recover_output_choice(sim, reference):
    intensity = lazy_recover(sim.observation, output="intensity")
    assert intensity.shape == reference.intensity.shape
    with pytest.raises(Exception, match="output"):
        lazy_recover(sim.observation, output="colour")


def test_napari_layer_follows_the_t_slider(make_napari_viewer, sim, reference):
    viewer = make_napari_viewer()
    cache = FrameCache()
    layer = viewer.add_image(lazy_recover(sim.observation, output="intensity", cache=cache), name="lazy",
                             contrast_limits=(0.0, 1.0))  # else napari samples frames to guess them
    viewer.dims.set_current_step(0, 3)
    layer.refresh()
    np.testing.assert_allclose(np.asarray(layer._slice.image.view), reference.intensity[3], rtol=1e-4, atol=1e-4)
    computed = {t for _, t in cache._frames}
    assert 3 in computed and 2 not in computed  # frames recovered as shown (napari peeks at one more)


def test_add_lazy_recovery_to_a_viewer(make_napari_viewer, sim, reference):
    from napari_spodnet.widgets.lazy_series import SESSION_CACHE, add_lazy_recovery

    viewer = make_napari_viewer()
    obs = viewer.add_image(sim.observation, name="obs")
    (intensity, orientation) = add_lazy_recovery(viewer, obs, outputs=("intensity", "orientation"))
    assert intensity.name == "obs intensity (lazy)"
    assert intensity.data.shape == (T, 1, *reference.intensity.shape[-2:])  # (T, c=1, h, w): follows t
    for c in (0, 17):  # shown whatever the polarization slider says
        viewer.dims.set_current_step(0, 2)
        viewer.dims.set_current_step(1, c)
        intensity.refresh()
        np.testing.assert_allclose(np.asarray(intensity._slice.image.view), reference.intensity[2],
                                   rtol=1e-4, atol=1e-4)
    assert tuple(intensity.translate[-2:]) == tuple(reference.translate)
    assert any(key[1] == 2 for key in SESSION_CACHE._frames)


def test_lazy_layer_steps_add_one_layer_each(make_napari_viewer, sim):
    # The Recover widget runs these one per event-loop turn (StepChain): each adds exactly one layer.
    from napari_spodnet.widgets.lazy_series import lazy_layer_steps

    viewer = make_napari_viewer()
    obs = viewer.add_image(sim.observation, name="obs")
    added = []
    steps = lazy_layer_steps(viewer, obs, outputs=("image", "intensity", "composite"), added=added)
    assert len(steps) == 3 and len(viewer.layers) == 1 and added == []
    for n, step in enumerate(steps, start=1):
        step()
        assert len(viewer.layers) == 1 + n and len(added) == n
    assert [layer.name for layer in added] == ["obs image (lazy)", "obs intensity (lazy)", "obs composite (lazy)"]
    assert added[2].rgb and not added[0].visible and added[1].visible
    with pytest.raises(KeyError, match="colour"):
        lazy_layer_steps(viewer, obs, outputs=("colour",))


def test_fill_keeps_every_frames_maps_and_reports_progress(sim, reference):
    from napari_spodnet.core.recover import RecoveryCancelled

    cache, maps = FrameCache(max_frames=1), FrameCache(max_frames=100)
    series = lazy_series(sim.observation, cache=cache, map_cache=maps)
    seen = []
    with pytest.raises(RecoveryCancelled):
        series.fill(progress=lambda p: seen.append((p.done, p.total, p.computed)) or p.done == 2)
    assert seen == [(1, T, 1), (2, T, 2)]
    assert series.is_filled(0) and series.is_filled(1) and not series.is_filled(2)  # kept when cancelled
    state = series.fill()
    assert (state.done, state.computed) == (T, T - 2)  # the finished frames are not recovered again
    assert all(series.is_filled(t) for t in range(T)) and len(cache) == 1  # maps kept, frames not
    misses = cache.misses
    np.testing.assert_allclose(series.intensity.compute(), reference.intensity, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(series.orientation.compute(), reference.orientation, atol=1e-4)
    assert cache.misses == misses  # scrubbing after fill recovers nothing


def test_map_cache_byte_budget_and_fill_limit(sim):
    h, w = lazy_series(sim.observation).shape[-2:]
    per_frame = 2 * 4 * h * w  # intensity and orientation, float32
    maps = FrameCache(max_frames=100, max_bytes=2 * per_frame + 10)
    series = lazy_series(sim.observation, cache=FrameCache(), map_cache=maps)
    assert series.frames_the_map_cache_holds() == 2
    assert series.fill().total == 2  # fills what it can keep, not T frames that would evict each other
    assert maps.nbytes <= maps.max_bytes and len(maps) == 4
    series.frame_map("intensity", 3)
    assert maps.nbytes <= maps.max_bytes and not series.is_filled(0)  # the oldest went first


def test_composite_uses_one_brightness_for_all_frames(sim, reference):
    from napari_spodnet.core.recover import orientation_composite

    series = lazy_series(sim.observation, cache=FrameCache(), map_cache=FrameCache(max_frames=100))
    top = series.saturation(0)
    composite = series.composite(top)
    assert composite.shape == (*reference.intensity.shape, 3)
    expected = orientation_composite(reference.intensity[3], reference.orientation[3], top=top)
    np.testing.assert_allclose(np.asarray(composite[3]), expected, atol=2e-3)
    assert series.composite(2 * top).name != composite.name  # another brightness, another dask name
