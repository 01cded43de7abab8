"""napari reader and writer of napari-spodnet (through napari itself, as drag and drop does)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_spodnet import io as sio
from napari_spodnet._reader import napari_get_reader
from napari_spodnet._writer import write_spod_tiff

C, H, W = 18, 20, 24  # H != W so that a wrong transpose shows


def _obs(shape, seed=0):
    return np.random.default_rng(seed).integers(100, 4000, size=shape).astype(np.uint16)


def _write_layout(tmp_path, layout):
    """(file path, the (c, H, W) / (T, c, H, W) array the plugin must produce)."""
    path = tmp_path / f"{layout}.tif"
    if layout == "cyx":
        data = _obs((C, H, W))
        tifffile.imwrite(path, data)
        return path, data
    if layout == "tcyx":
        data = _obs((3, C, H, W))
        tifffile.imwrite(path, data)
        return path, data
    if layout == "channel_last":
        data = _obs((C, H, W))
        tifffile.imwrite(path, np.moveaxis(data, 0, -1), photometric="minisblack")
        return path, data
    if layout == "imagej_hyperstack":
        data = _obs((2, C, H, W))
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"})
        return path, data
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["cyx", "tcyx", "channel_last", "imagej_hyperstack"])
def test_open_spod_tiff_through_the_plugin(make_napari_viewer, tmp_path, layout):
    path, expected = _write_layout(tmp_path, layout)
    assert napari_get_reader(str(path)) is not None
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-spodnet")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.data.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(layer.data), expected)
    meta = layer.metadata["spodnet"]
    assert meta["kind"] == "observation"
    assert meta["axes"] == ("TCYX" if expected.ndim == 4 else "CYX")
    labels = tuple(layer.axis_labels)
    assert labels[-3:] == ("polarization", "y", "x")
    assert (labels[0] == "t") == (expected.ndim == 4)
    lo, hi = layer.contrast_limits
    assert expected.min() <= lo < hi <= expected.max()


def test_psf_images_open_as_psfs_and_other_tiffs_say_why(make_napari_viewer, tmp_path):
    from napari_spodnet.core.validation import SPoDInputError

    plain = tmp_path / "bead.tif"
    tifffile.imwrite(plain, _obs((H, W)))
    zstack = tmp_path / "beads.tif"
    tifffile.imwrite(zstack, _obs((3, H, W)), photometric="minisblack")
    pages = tmp_path / "pages.tif"  # 36 pages (2 x 18) without axis metadata: ambiguous
    tifffile.imwrite(pages, _obs((36, 300, 300)), photometric="minisblack")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert napari_get_reader(str(other)) is None
    assert napari_get_reader(str(tmp_path / "missing.tif")) is None
    viewer = make_napari_viewer()
    # a 2-D PSF and a 3-D stack of PSFs open as PSF layers (averaged, sum 1, as io.read_psf does)
    psf = viewer.open(str(plain), plugin="napari-spodnet")[0]
    assert psf.metadata["spodnet"]["kind"] == "psf" and psf.data.shape == (H, W)
    assert psf.data.sum() == pytest.approx(1, abs=1e-5)
    stack = viewer.open(str(zstack), plugin="napari-spodnet")[0]
    assert stack.metadata["spodnet"]["kind"] == "psf" and stack.data.shape == (H, W)
    assert stack.metadata["spodnet"]["averaged_slices"] == 3
    # anything else: napari's message carries the reason and what to do
    with pytest.raises(Exception) as info:
        viewer.open(str(pages), plugin="napari-spodnet")
    text = str(info.value) + str(getattr(info.value, "__cause__", ""))
    assert "not a SPoD stack" in text and "36 pages" in text and "Split into time points" in text
    with pytest.raises(SPoDInputError, match="not a SPoD stack"):
        napari_get_reader(str(pages))(str(pages))
    # napari's own reader still opens the plain TIFF (e.g. a PSF dropped on the window)
    layers = viewer.open(str(plain))
    assert len(layers) == 1 and layers[0].data.shape == (H, W)
    assert "spodnet" not in layers[0].metadata


def test_write_and_reread_a_recovered_stack(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(1).random((C, H + 7, W + 7)).astype(np.float32)
    info = {"kind": "recovered", "method": "spodnet", "lam": 0.05, "seconds": 0.12, "objective": 1.5e-3,
            "translate": [-3.5, -3.5]}
    layer = viewer.add_image(stack, name="obs SPoD-Net", translate=(0, -3.5, -3.5), metadata={"spodnet": info})
    path = tmp_path / "recovered.tif"
    written = layer.save(str(path), plugin="napari-spodnet")
    assert written and path.is_file()

    meta = sio.read_stack_metadata(path)
    assert meta["method"] == "spodnet" and meta["lam"] == 0.05 and meta["kind"] == "recovered"
    assert meta["translate"] == [0.0, -3.5, -3.5]
    # ImageJ sees one channel per orientation
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej and tf.imagej_metadata["channels"] == C

    again = viewer.open(str(path), plugin="napari-spodnet")[0]
    assert again.metadata["spodnet"]["kind"] == "recovered"
    assert again.metadata["spodnet"]["method"] == "spodnet"
    np.testing.assert_allclose(again.data, stack)
    np.testing.assert_allclose(again.translate, (0, -3.5, -3.5))


def test_write_intensity_and_composite(tmp_path):
    intensity = np.random.default_rng(2).random((H, W)).astype(np.float32)
    paths = write_spod_tiff(str(tmp_path / "intensity.tif"), intensity,
                            {"name": "I", "translate": (-1.5, -1.5), "scale": (1, 1),
                             "metadata": {"spodnet": {"kind": "intensity", "method": "fista"}}})
    assert sio.read_stack_metadata(paths[0])["method"] == "fista"
    reader = napari_get_reader(paths[0])  # ours: it remembers the kind and the registration
    assert reader is not None
    data, kwargs, layer_type = reader(paths[0])[0]
    np.testing.assert_allclose(data, intensity)
    assert kwargs["translate"] == (-1.5, -1.5) and layer_type == "image"

    series = np.random.default_rng(4).random((2, H, W)).astype(np.float32)  # intensity of a time series
    paths = write_spod_tiff(str(tmp_path / "series.tif"), series,
                            {"name": "I(t)", "metadata": {"spodnet": {"kind": "intensity"}}})
    with tifffile.TiffFile(paths[0]) as tf:  # ImageJ frames, not channels
        assert tf.imagej_metadata.get("frames") == 2 and tf.imagej_metadata.get("channels", 1) == 1
    data, kwargs, _ = napari_get_reader(paths[0])(paths[0])[0]
    np.testing.assert_allclose(data, series)

    rgb = np.random.default_rng(3).random((H, W, 3)).astype(np.float32)
    paths = write_spod_tiff(str(tmp_path / "rgb.tif"), rgb,
                            {"name": "composite", "rgb": True, "metadata": {"spodnet": {"kind": "orientation"}}})
    data, kwargs, _ = napari_get_reader(paths[0])(paths[0])[0]
    assert kwargs["rgb"] and data.shape == (H, W, 3)
    np.testing.assert_allclose(data, rgb)


def test_writer_rejects_5d(tmp_path):
    from napari_spodnet.core.validation import SPoDInputError

    with pytest.raises(SPoDInputError, match="5-D"):
        write_spod_tiff(str(tmp_path / "x.tif"), np.zeros((2, 2, 2, 2, 2), np.float32), {})


# --------------------------------------------------------------------------- hostile files with our metadata


def _ours(tmp_path, name, info: dict | str, data=None):
    """An ImageJ TIFF carrying napari-spodnet metadata ``info`` (a dict, or raw JSON text) where our
    writer puts it (the ImageJ ``Info`` property)."""
    import json

    data = np.random.default_rng(5).random((C, H, W)).astype(np.float32) if data is None else data
    text = info if isinstance(info, str) else json.dumps({sio.METADATA_KEY: info})
    path = tmp_path / f"{name}.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX", "Info": text})
    return path, data


def test_written_colormap_and_contrast_are_restored(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image = np.random.default_rng(6).random((H, W)).astype(np.float32)
    layer = viewer.add_image(image, name="I", colormap="magma", contrast_limits=(0.2, 0.7), scale=(0.1, 0.1),
                             metadata={"spodnet": {"kind": "intensity", "pixel_size": 0.1}})
    path = tmp_path / "intensity.tif"
    layer.save(str(path), plugin="napari-spodnet")
    again = viewer.open(str(path), plugin="napari-spodnet")[0]
    assert again.colormap.name == "magma"
    np.testing.assert_allclose(again.contrast_limits, (0.2, 0.7))
    np.testing.assert_allclose(again.scale, (0.1, 0.1))
    assert str(again.units[-1]) == "micrometer"


@pytest.mark.parametrize("field, value", [
    ("translate", ["a", "b", "c"]),
    ("translate", [0.0, float("nan"), 1.0]),
    ("translate", [0.0, float("inf"), 1.0]),
    ("translate", [True, 1.0, 2.0]),
    ("translate", list(range(200_000))),
    ("translate", {"y": 1}),
    ("scale", [1.0, 0.0, 1.0]),
    ("scale", [1.0, -2.0, 1.0]),
    ("scale", [[1.0], [2.0], [3.0]]),
    ("contrast_limits", [float("nan"), 1.0]),
    ("contrast_limits", [1.0, 0.5]),
    ("contrast_limits", ["0", "1"]),
    ("contrast_limits", [0.0, 1.0, 2.0]),
    ("colormap", 42),
    ("colormap", {"name": "magma", "controls": [[0]]}),
    ("layer_name", {"evil": True}),
    ("layer_name", ""),
    ("layer_name", "x" * 10_000),
    ("rgb", "yes"),
    ("rgb", True),  # 18 planes are no colour image
    ("shape", "abc"),
    ("shape", [C, H, W + 1]),
    ("shape", [1e300, 1e300]),
    ("shape", list(range(1, 100_000))),
    ("pixel_size", "0.1"),
    ("pixel_size", float("nan")),
    ("pixel_size", -1.0),
])
def test_damaged_metadata_fields_are_ignored_with_a_warning(tmp_path, field, value):
    path, data = _ours(tmp_path, "hostile", {"kind": "recovered", field: value})
    reader = napari_get_reader(str(path))
    assert reader is not None
    with pytest.warns(UserWarning, match=f"damaged napari-spodnet metadata ignored .*{field}"):
        layer_data, kwargs, layer_type = reader(str(path))[0]
    np.testing.assert_array_equal(layer_data, data)  # the pixels are shown as stored
    assert layer_type == "image" and kwargs["rgb"] is False
    assert kwargs["name"] == "hostile" or (field != "layer_name")
    for key in ("translate", "scale", "contrast_limits", "colormap"):
        if key == field:
            assert key not in kwargs or key == "contrast_limits"
    lo, hi = kwargs["contrast_limits"]
    assert np.isfinite(lo) and np.isfinite(hi) and lo < hi
    meta = kwargs["metadata"]["spodnet"]
    assert meta["kind"] == "recovered" and field in meta["ignored_metadata"]


def test_hostile_metadata_opens_in_napari_without_foreign_errors(make_napari_viewer, tmp_path):
    nested = {"a": {"b": {"c": {"d": {"e": {"f": [[[[1]]]]}}}}}}
    info = {"kind": "orientation", "translate": [float("nan")] * 3, "scale": ["1", 1, 1],
            "method": nested, "notes": list(range(100_000)), "objective": float("nan"),
            "colormap": ["magma"], "contrast_limits": {"lo": 0}}
    path, data = _ours(tmp_path, "junk", info)
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="damaged napari-spodnet metadata"):
        layer = viewer.open(str(path), plugin="napari-spodnet")[0]
    np.testing.assert_array_equal(layer.data, data)
    np.testing.assert_allclose(layer.translate, 0)
    np.testing.assert_allclose(layer.scale, 1)
    meta = layer.metadata["spodnet"]
    assert meta["notes"] is None  # a huge list is not carried into the layer
    assert set(meta["ignored_metadata"]) == {"method (too large or too deeply nested)", "translate", "scale",
                                             "notes (too large or too deeply nested)", "contrast_limits", "colormap"}
    assert meta["method"]["a"]["b"]["c"] is None  # nesting is cut, the rest of the field is kept

    # nesting too deep for JSON: not our metadata at all, so the reader goes by the shape (a stack of 18)
    deep = '{"napari_spodnet": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path, data = _ours(tmp_path, "deep", deep)
    layer = viewer.open(str(path), plugin="napari-spodnet")[0]
    assert layer.metadata["spodnet"]["kind"] == "observation"


def test_written_files_go_through_the_vetted_open(tmp_path):
    """A file with our metadata but damaged pixels is refused with io's reason (SPoDInputError)."""
    from napari_spodnet.core.validation import SPoDInputError

    stack = np.random.default_rng(7).random((C, H, W)).astype(np.float32)
    paths = write_spod_tiff(str(tmp_path / "recovered.tif"), stack,
                            {"name": "r", "metadata": {"spodnet": {"kind": "recovered"}}})
    path = tmp_path / "recovered.tif"
    assert paths == [str(path)]
    whole = path.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(whole[: len(whole) - stack[0].nbytes * 3])
    reader = napari_get_reader(str(truncated))
    assert reader is not None
    with pytest.raises(SPoDInputError, match="truncated"):
        reader(str(truncated))
