"""Tests for napari_spodnet.io: layouts, axis detection, PSFs and writing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from napari_spodnet import io as sio
from napari_spodnet.core.validation import SPoDInputError

H, W = 6, 7  # deliberately not 18 and not equal, so a wrong transpose shows


def _stack(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "u":
        return rng.integers(0, 60000, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


# --------------------------------------------------------------------------- layouts


def test_plain_cyx_roundtrip_keeps_uint16(tmp_path):
    data = _stack((18, H, W), np.uint16)
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path)
    assert obs.axes == "CYX"
    assert obs.source_axes == "QYX"
    assert obs.data.dtype == np.uint16
    np.testing.assert_array_equal(obs.data, data)
    assert obs.path == str(path)
    assert obs.metadata["polarization_axis"] == 0


def test_plain_tcyx_roundtrip(tmp_path):
    data = _stack((3, 18, H, W))
    path = tmp_path / "tcyx.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path)
    assert obs.axes == "TCYX"
    assert obs.is_time_series
    np.testing.assert_array_equal(obs.data, data)


@pytest.mark.parametrize("shape", [(H, W, 18), (2, H, W, 18)])
def test_channel_last_is_moved_to_front(tmp_path, shape):
    data = _stack(shape)
    path = tmp_path / "hwc.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path)
    np.testing.assert_array_equal(obs.data, np.moveaxis(data, -1, -3))
    assert obs.data.shape[-3:] == (18, H, W)
    assert sio.peek_polarization_axis(path) == len(shape) - 1


def test_contiguous_samples_yxs(tmp_path):
    # 18 samples per pixel, as some acquisition software writes channel-last data
    data = _stack((H, W, 18), np.uint16)
    path = tmp_path / "yxs.tif"
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig")
    obs = sio.read_observation(path)
    assert obs.source_axes == "YXS"
    np.testing.assert_array_equal(obs.data, np.moveaxis(data, -1, 0))


@pytest.mark.parametrize(
    "ij_axes, shape, expected_axes",
    [
        ("TCYX", (3, 18, H, W), "TCYX"),
        ("CYX", (18, H, W), "CYX"),
        ("ZCYX", (1, 18, H, W), "CYX"),
        ("TZCYX", (2, 1, 18, H, W), "TCYX"),
    ],
)
def test_imagej_hyperstacks(tmp_path, ij_axes, shape, expected_axes):
    data = _stack(shape)
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": ij_axes})
    obs = sio.read_observation(path)
    assert obs.axes == expected_axes
    np.testing.assert_array_equal(obs.data, np.squeeze(data))
    assert obs.metadata["format"] == "imagej"


@pytest.mark.parametrize(
    "description, label",
    [
        ("ImageJ=1.54f\nimages=18\nslices=18\n", "Z"),
        ("ImageJ=1.54f\nimages=18\nframes=18\n", "T"),
        ("ImageJ=1.54f\nimages=18\n", "I"),
    ],
)
def test_imagej_stack_without_channels(tmp_path, description, label):
    data = _stack((18, H, W), np.uint16)
    path = tmp_path / "ijstack.tif"
    tifffile.imwrite(path, data, description=description, metadata=None)
    obs = sio.read_observation(path)
    assert obs.source_axes == f"{label}YX"
    assert obs.axes == "CYX"
    np.testing.assert_array_equal(obs.data, data)


def test_imagej_stack_written_as_z(tmp_path):
    data = _stack((18, H, W))
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"})
    obs = sio.read_observation(path)
    assert obs.source_axes == "ZYX"
    np.testing.assert_array_equal(obs.data, data)


@pytest.mark.parametrize(
    "ome_axes, shape",
    [("TCYX", (3, 18, H, W)), ("TCZYX", (2, 18, 1, H, W)), ("CYX", (18, H, W))],
)
def test_ome_tiff(tmp_path, ome_axes, shape):
    data = _stack(shape, np.uint16)
    path = tmp_path / "x.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={"axes": ome_axes, "PhysicalSizeX": 0.065})
    obs = sio.read_observation(path)
    np.testing.assert_array_equal(obs.data, np.squeeze(data))
    assert obs.axes == ("TCYX" if shape[0] != 18 else "CYX")
    assert obs.data.dtype == np.uint16
    assert obs.metadata["pixel_size"] == pytest.approx(0.065)


def test_singleton_axes_are_squeezed(tmp_path):
    data = _stack((1, 1, 18, H, W))
    path = tmp_path / "five.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path)
    assert obs.data.shape == (18, H, W)
    np.testing.assert_array_equal(obs.data, data[0, 0])


def test_explicit_channel_label_wins_over_other_18_axis(tmp_path):
    data = _stack((18, 18, H, W))
    path = tmp_path / "tc.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TCYX"})
    obs = sio.read_observation(path)
    assert obs.metadata["polarization_axis"] == 1
    np.testing.assert_array_equal(obs.data, data)


def test_ambiguous_file_needs_axis_argument(tmp_path):
    data = _stack((18, 18, H, W))
    path = tmp_path / "amb.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(SPoDInputError, match="(?i)ambiguous.*axis="):
        sio.read_observation(path)
    assert sio.peek_polarization_axis(path) is None
    obs = sio.read_observation(path, axis=0)
    np.testing.assert_array_equal(obs.data, np.swapaxes(data, 0, 1))
    obs = sio.read_observation(path, axis=1)
    np.testing.assert_array_equal(obs.data, data)


def test_axis_argument_with_wrong_length(tmp_path):
    path = tmp_path / "cyx.tif"
    tifffile.imwrite(path, _stack((18, H, W)))
    with pytest.raises(SPoDInputError, match="n_channels"):
        sio.read_observation(path, axis=1)
    with pytest.raises(SPoDInputError, match="not a valid axis"):
        sio.read_observation(path, axis=5)


def test_too_many_extra_axes_are_refused(tmp_path):
    path = tmp_path / "tz.tif"
    tifffile.imwrite(path, _stack((3, 2, 18, H, W)), imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(SPoDInputError, match="Too many axes") as info:
        sio.read_observation(path)
    assert "'T'" in str(info.value) and "'Z'" in str(info.value)
    assert sio.peek_polarization_axis(path) is None


def test_other_channel_count(tmp_path):
    data = _stack((2, 12, H, W))
    path = tmp_path / "c12.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path, n_channels=12)
    np.testing.assert_array_equal(obs.data, data)
    assert obs.n_channels == 12
    assert sio.peek_polarization_axis(path, n_channels=12) == 1
    assert sio.peek_polarization_axis(path) is None
    with pytest.raises(SPoDInputError, match="n_channels"):
        sio.read_observation(path)


# --------------------------------------------------------------------------- memmap


def test_memmap_gives_same_data(tmp_path):
    data = _stack((4, 18, H, W), np.uint16)
    path = tmp_path / "long.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path, memmap=True)
    assert obs.metadata["memmap"] is True
    assert isinstance(obs.data, np.memmap)
    np.testing.assert_array_equal(obs.data, data)
    np.testing.assert_array_equal(obs.data, sio.read_observation(path).data)


def test_memmap_channel_last_view(tmp_path):
    data = _stack((H, W, 18))
    path = tmp_path / "hwc.tif"
    tifffile.imwrite(path, data)
    obs = sio.read_observation(path, memmap=True)
    assert obs.metadata["memmap"] is True
    np.testing.assert_array_equal(obs.data, np.moveaxis(data, -1, 0))


def test_memmap_falls_back_for_compressed_file(tmp_path):
    data = _stack((18, H, W), np.uint16)
    path = tmp_path / "zlib.tif"
    tifffile.imwrite(path, data, compression="zlib")
    obs = sio.read_observation(path, memmap=True)
    assert obs.metadata["memmap"] is False
    assert not isinstance(obs.data, np.memmap)
    np.testing.assert_array_equal(obs.data, data)


# --------------------------------------------------------------------------- peek


def test_peek_finds_axis_in_spod_stacks(tmp_path):
    cases = {
        "cyx.tif": ((18, H, W), {}, 0),
        "tcyx.tif": ((3, 18, H, W), {}, 1),
        "ij.tif": ((3, 18, H, W), {"imagej": True, "metadata": {"axes": "TCYX"}}, 1),
        "ome.tif": ((2, 18, 1, H, W), {"ome": True, "metadata": {"axes": "TCZYX"}}, 1),
    }
    for name, (shape, kwargs, expected) in cases.items():
        path = tmp_path / name
        tifffile.imwrite(path, _stack(shape), **kwargs)
        assert sio.peek_polarization_axis(path) == expected, name


def test_peek_returns_none_for_other_files(tmp_path):
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _stack((H, W)))
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, _stack((5, H, W)))
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"this is not a tiff file at all" * 10)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    for path in (plain, five, garbage, text, empty, tmp_path / "missing.tif", tmp_path):
        assert sio.peek_polarization_axis(path) is None, path


# --------------------------------------------------------------------------- find_polarization_axis


@pytest.mark.parametrize(
    "shape, axes, expected",
    [
        ((18, H, W), None, 0),
        ((3, 18, H, W), None, 1),
        ((H, W, 18), None, 2),
        ((2, H, W, 18), None, 3),
        ((1, 1, 18, H, W), None, 2),
        ((3, 1, 18, H, W), "TZCYX", 2),
        ((3, 18, 1, H, W), "TCZYX", 1),
        ((18, H, W), "CYX", 0),
        ((18, H, W), "ZYX", 0),
        ((18, H, W), "QYX", 0),
        ((H, W, 18), "YXS", 2),
        ((18, 18, H, W), "TCYX", 1),
        ((18, 18, H, W), "CTYX", 0),
    ],
)
def test_find_polarization_axis(shape, axes, expected):
    assert sio.find_polarization_axis(shape, axes) == expected


def test_find_polarization_axis_none_found_message():
    with pytest.raises(SPoDInputError) as info:
        sio.find_polarization_axis((5, 64, 64))
    msg = str(info.value)
    assert "(5, 64, 64)" in msg and "18" in msg and "n_channels" in msg


def test_find_polarization_axis_2d_and_labelled_y():
    with pytest.raises(SPoDInputError, match="2-D"):
        sio.find_polarization_axis((64, 64))
    # real labels: an 18 on the X axis of an ImageJ file is the image width
    with pytest.raises(SPoDInputError, match="No polarization axis"):
        sio.find_polarization_axis((5, 64, 18), "CYX")


def test_find_polarization_axis_ambiguous_message():
    with pytest.raises(SPoDInputError) as info:
        sio.find_polarization_axis((18, 18, 32, 32))
    msg = str(info.value).lower()
    assert "ambiguous" in msg and "axis=" in msg
    with pytest.raises(SPoDInputError, match="(?i)ambiguous"):
        sio.find_polarization_axis((18, 32, 18))


def test_find_polarization_axis_other_n_channels():
    assert sio.find_polarization_axis((2, 12, 32, 32), n_channels=12) == 1
    with pytest.raises(SPoDInputError, match="n_channels"):
        sio.find_polarization_axis((18, 32, 32), n_channels=1)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(SPoDInputError, match="not found"):
        sio.read_observation(tmp_path / "nope.tif")
    with pytest.raises(SPoDInputError, match="not found"):
        sio.read_psf(tmp_path / "nope.tif")


def test_not_a_tiff(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(SPoDInputError, match="fake.tif.*not a TIFF"):
        sio.read_observation(path)
    with pytest.raises(SPoDInputError, match="fake.tif"):
        sio.read_psf(path)
    with pytest.raises(SPoDInputError, match="fake.tif"):
        sio.read_stack_metadata(path)


def test_truncated_tiff(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, _stack((18, 32, 32)))
    bad = tmp_path / "cut.tif"
    # cut inside the pixel data, and cut inside the header of the first page
    for n_bytes in (3000, 200):
        bad.write_bytes(good.read_bytes()[:n_bytes])
        with pytest.raises(SPoDInputError, match="cut.tif"):
            sio.read_observation(bad)


def test_plain_2d_image_is_refused_with_shape(tmp_path):
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, _stack((H, W)))
    with pytest.raises(SPoDInputError, match=rf"\({H}, {W}\)"):
        sio.read_observation(path)


# --------------------------------------------------------------------------- PSFs


def _gaussian(size=9, sigma=1.5, amplitude=1.0, shift=0.0):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return (amplitude * np.exp(-((yy - shift) ** 2 + xx**2) / (2 * sigma**2))).astype(np.float32)


def test_read_psf_2d(tmp_path):
    psf = _gaussian(amplitude=500.0)
    path = tmp_path / "psf.tif"
    tifffile.imwrite(path, psf.astype(np.uint16))
    out = sio.read_psf(path)
    assert out.shape == (9, 9) and out.dtype == np.float32
    assert out.sum() == pytest.approx(1.0, rel=1e-5)
    expected = psf.astype(np.uint16).astype(np.float64)
    np.testing.assert_allclose(out, expected / expected.sum(), rtol=1e-5)


def test_read_psf_stack_is_averaged(tmp_path):
    a, b = _gaussian(amplitude=10.0), _gaussian(amplitude=1000.0, shift=1.0)
    path = tmp_path / "psfs.tif"
    tifffile.imwrite(path, np.stack([a, b]))
    out = sio.read_psf(path)
    expected = (a / a.sum() + b / b.sum()) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-8)


def test_read_psf_rejects_negative_and_npy(tmp_path):
    psf = _gaussian()
    psf[0, 0] = -0.5
    path = tmp_path / "neg.tif"
    tifffile.imwrite(path, psf)
    with pytest.raises(SPoDInputError, match="neg.tif.*negative"):
        sio.read_psf(path)
    npy = tmp_path / "psf.npy"
    np.save(npy, _gaussian())
    assert sio.read_psf(npy).sum() == pytest.approx(1.0, rel=1e-5)


def test_average_psfs_normalises_each_first():
    dim, bright = _gaussian(amplitude=1.0), _gaussian(amplitude=1e4, shift=2.0)
    out = sio.average_psfs([dim, bright])
    expected = (dim / dim.sum() + bright / bright.sum()) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-8)
    assert out.dtype == np.float32
    assert out.sum() == pytest.approx(1.0, rel=1e-5)


def test_average_psfs_shape_mismatch():
    small, big = _gaussian(size=7, sigma=1.0), _gaussian(size=11, sigma=2.5)
    with pytest.raises(SPoDInputError, match="different shapes"):
        sio.average_psfs([small, big])
    out = sio.average_psfs([small, big], crop=True)
    assert out.shape == (7, 7)
    cropped = big[2:9, 2:9]
    expected = (small / small.sum() + cropped / cropped.sum()) / 2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(SPoDInputError, match="No PSFs"):
        sio.average_psfs([])


# --------------------------------------------------------------------------- writing


def test_write_stack_cyx_roundtrip(tmp_path):
    data = _stack((18, H, W), np.float64)
    meta = {"method": "fista", "lambda": np.float32(0.5), "iterations": np.int64(200), "psf_shape": (9, 9)}
    path = sio.write_stack(tmp_path / "rec.tif", data, axes="CYX", metadata=meta, pixel_size=0.1)
    assert path == tmp_path / "rec.tif"
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej
        assert tf.imagej_metadata["channels"] == 18
        assert tf.imagej_metadata["hyperstack"] is True
        assert tf.series[0].dtype == np.float32
    read = sio.read_stack_metadata(path)
    assert read == {"method": "fista", "lambda": 0.5, "iterations": 200, "psf_shape": [9, 9]}
    obs = sio.read_observation(path)
    assert obs.axes == "CYX" and obs.source_axes == "CYX"
    np.testing.assert_array_equal(obs.data, data.astype(np.float32))
    assert obs.metadata[sio.METADATA_KEY]["method"] == "fista"
    assert obs.metadata["pixel_size"] == pytest.approx(0.1)


def test_write_stack_tcyx_and_yx(tmp_path):
    data = _stack((2, 18, H, W))
    path = sio.write_stack(tmp_path / "t.tif", data, axes="TCYX", metadata={"model": "spodnet-10"})
    with tifffile.TiffFile(path) as tf:
        assert tf.imagej_metadata["channels"] == 18 and tf.imagej_metadata["frames"] == 2
    obs = sio.read_observation(path)
    assert obs.axes == "TCYX"
    np.testing.assert_array_equal(obs.data, data)
    assert sio.read_stack_metadata(path) == {"model": "spodnet-10"}

    image = _stack((H, W))
    path2 = sio.write_stack(tmp_path / "sum.tif", image, axes="YX")
    np.testing.assert_array_equal(tifffile.imread(path2), image)
    assert sio.read_stack_metadata(path2) == {}


def test_write_stack_rejects_bad_input(tmp_path):
    with pytest.raises(SPoDInputError, match="axes"):
        sio.write_stack(tmp_path / "a.tif", _stack((18, H, W)), axes="ZYX")
    with pytest.raises(SPoDInputError, match="4-D"):
        sio.write_stack(tmp_path / "a.tif", _stack((18, H, W)), axes="TCYX")
    with pytest.raises(SPoDInputError, match="does not exist"):
        sio.write_stack(tmp_path / "no" / "a.tif", _stack((18, H, W)))
    with pytest.raises(SPoDInputError, match="pixel_size"):
        sio.write_stack(tmp_path / "a.tif", _stack((18, H, W)), pixel_size=-1)
    assert os.listdir(tmp_path) == []


def test_read_stack_metadata_of_foreign_file(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _stack((18, H, W)), imagej=True, metadata={"axes": "CYX", "Info": "not json"})
    assert sio.read_stack_metadata(path) == {}


def test_atomic_write_leaves_no_temp_files(tmp_path):
    sio.write_stack(tmp_path / "out.tif", _stack((18, H, W)), metadata={"a": 1})
    assert os.listdir(tmp_path) == ["out.tif"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.tif"
    sio.write_stack(target, _stack((18, H, W)), metadata={"version": "old"})
    before = target.read_bytes()

    def broken_imwrite(fh, *args, **kwargs):
        fh.write(b"II*\0partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sio.tifffile, "imwrite", broken_imwrite)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sio.write_stack(target, _stack((18, H, W), seed=1), metadata={"version": "new"})
    assert os.listdir(tmp_path) == ["out.tif"]
    assert target.read_bytes() == before

    monkeypatch.undo()
    with pytest.raises(TypeError):
        sio.write_stack(tmp_path / "other.tif", _stack((18, H, W)), metadata={"bad": object()})
    assert os.listdir(tmp_path) == ["out.tif"]
    assert json.loads(json.dumps(sio.read_stack_metadata(target))) == {"version": "old"}
