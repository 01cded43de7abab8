"""Streamed recovery to BigTIFF and OME-Zarr: equal to recover(), selectable outputs,
cancel -> valid partial output -> --resume, existing outputs never replaced by partial ones."""

import json

import numpy as np
import pytest
import tifffile
import zarr

from napari_spodnet.core.recover import RecoveryCancelled, recover
from napari_spodnet.core.simulate import simulate_time_series
from napari_spodnet.core.validation import SPoDInputError
from napari_spodnet.io import read_observation, read_stack_metadata, write_stack
from napari_spodnet.stream import FrameSource, StreamProgress, output_paths, partial_path, recover_to_file

T = 5


@pytest.fixture(scope="module")
def series_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream")
    sim = simulate_time_series(T, (40, 40), seed=4)
    path = write_stack(folder / "obs.tif", sim.observation, axes="TCYX")
    return path, sim


@pytest.fixture(scope="module")
def reference(series_file):
    path, sim = series_file
    return recover(read_observation(path).data, None, method="spodnet")


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def test_tiff_outputs_equal_recover(series_file, reference, tmp_path):
    path, _ = series_file
    lines = []
    summary = recover_to_file(path, tmp_path / "rec.tif", progress=lambda p: lines.append(p.line()))
    paths = output_paths(tmp_path / "rec.tif", ("image", "intensity", "orientation"))
    assert summary.paths == list(paths.values()) and summary.computed == T
    assert _rel(tifffile.imread(paths["image"]), reference.image) < 1e-6
    assert _rel(tifffile.imread(paths["intensity"]), reference.intensity) < 1e-6
    assert _rel(tifffile.imread(paths["orientation"]), reference.orientation) < 1e-6
    np.testing.assert_allclose(summary.objective, reference.objective, rtol=1e-5)
    meta = read_stack_metadata(paths["image"])
    assert meta["method"] == "spodnet" and meta["complete"] and len(meta["objective"]) == T
    assert read_observation(paths["image"]).data.shape == reference.image.shape  # our own reader takes it back
    assert tifffile.TiffFile(paths["image"]).is_bigtiff
    assert lines[-1].startswith(f"{T}/{T} frames") and "frames/s" in lines[-1] and "left" in lines[-1]
    assert not list(tmp_path.glob("*partial*"))


def test_ome_zarr_equal_recover_and_lazy_in_napari(series_file, reference, tmp_path):
    from napari_builtins.io._read import read_zarr_dataset

    path, _ = series_file
    out = tmp_path / "rec.zarr"
    recover_to_file(path, out)
    group = zarr.open_group(str(out), mode="r")
    assert group["image"]["0"].chunks == (1, 18, *reference.image.shape[-2:])  # a chunk per frame
    assert group["image"].attrs["multiscales"][0]["axes"][0] == {"name": "t", "type": "time"}
    assert _rel(group["image"]["0"][:], reference.image) < 1e-6
    assert _rel(group["orientation"]["0"][:], reference.orientation) < 1e-6
    assert group["frames_done"][:].tolist() == [1] * T
    assert group.attrs["napari_spodnet"]["complete"]
    # napari's own reader: lazy dask arrays of the first output
    data, shape = read_zarr_dataset(str(out))
    assert type(data[0]).__name__ == "Array" and tuple(shape) == reference.image.shape
    data, shape = read_zarr_dataset(str(out / "intensity"))
    assert _rel(np.asarray(data[0][2]), reference.intensity[2]) < 1e-6


def test_only_intensity_goes_to_the_named_file(series_file, reference, tmp_path):
    path, _ = series_file
    out = tmp_path / "int.tif"
    summary = recover_to_file(path, out, outputs="intensity")
    assert summary.paths == [out] and sorted(p.name for p in tmp_path.iterdir()) == ["int.tif"]
    assert tifffile.imread(out).shape == reference.intensity.shape
    with pytest.raises(SPoDInputError, match="choose from"):
        recover_to_file(path, out, outputs="intensity,colour")


@pytest.mark.parametrize("name", ["rec.zarr", "rec.tif"])
def test_cancel_leaves_valid_partial_output_and_resume_finishes_it(series_file, reference, tmp_path, name):
    path, _ = series_file
    out = tmp_path / name
    # An earlier complete result at the same path must survive an interrupted run untouched.
    if name.endswith(".tif"):
        out.write_bytes(b"old result")
    else:
        (out).mkdir()
        (out / "old").write_text("old result")

    def stop_after_two(p: StreamProgress):
        return p.done >= 2

    with pytest.raises(RecoveryCancelled, match="resume"):
        recover_to_file(path, out, progress=stop_after_two)
    partial = partial_path(out)
    assert partial.exists()
    if name.endswith(".tif"):
        assert out.read_bytes() == b"old result"
        frames = tifffile.imread(partial)  # a valid TIFF with the finished frames in place
        assert _rel(frames[:2], reference.image[:2]) < 1e-6 and not frames[2:].any()
    else:
        assert (out / "old").read_text() == "old result"
        group = zarr.open_group(str(partial), mode="r")
        assert group["frames_done"][:].tolist() == [1, 1, 0, 0, 0]
        assert _rel(group["image"]["0"][:2], reference.image[:2]) < 1e-6

    with pytest.raises(SPoDInputError, match="--resume"):  # never silently discarded
        recover_to_file(path, out)
    with pytest.raises(SPoDInputError, match="other settings"):
        recover_to_file(path, out, resume=True, lam=0.2)

    summary = recover_to_file(path, out, resume=True)
    assert summary.skipped == 2 and summary.computed == T - 2
    image = tifffile.imread(out) if name.endswith(".tif") else zarr.open_group(str(out), mode="r")["image"]["0"][:]
    assert _rel(image, reference.image) < 1e-6
    np.testing.assert_allclose(summary.objective, reference.objective, rtol=1e-5)
    assert not partial.exists() and not list(tmp_path.glob(".*"))


def test_keyboard_interrupt_keeps_partial(series_file, tmp_path):
    path, _ = series_file
    out = tmp_path / "rec.zarr"

    def interrupt(p):
        if p.done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_to_file(path, out, progress=interrupt)
    assert not out.exists()
    assert zarr.open_group(str(partial_path(out)), mode="r")["frames_done"][:].sum() == 1
    assert recover_to_file(path, out, resume=True).skipped == 1


def test_output_equal_to_input_is_refused(series_file, tmp_path):
    path, _ = series_file
    before = path.read_bytes()
    with pytest.raises(SPoDInputError, match="is the input"):
        recover_to_file(path, path)
    assert path.read_bytes() == before
    # nor may the partial file of the output be the input
    named_like_partial = tmp_path / "rec.partial.tif"
    named_like_partial.write_bytes(before)
    with pytest.raises(SPoDInputError, match="is the input"):
        recover_to_file(named_like_partial, tmp_path / "rec.tif")
    assert named_like_partial.read_bytes() == before


def test_single_frame_and_array_input(series_file, reference, tmp_path):
    path, sim = series_file
    frame = read_observation(path).data[1]
    summary = recover_to_file(frame, tmp_path / "one.tif", outputs="image")
    single = recover(frame, None, method="spodnet")
    assert tifffile.imread(tmp_path / "one.tif").shape == single.image.shape
    assert _rel(tifffile.imread(tmp_path / "one.tif"), single.image) < 1e-6
    assert np.isclose(summary.objective[0], single.objective, rtol=1e-5)


def test_frame_source_reads_batches_without_a_resident_mapping(series_file):
    path, sim = series_file
    source = FrameSource(path)
    assert len(source) == T and source.frame_shape == sim.observation.shape[1:]
    batch = source.read([3, 1])
    assert type(batch) is np.ndarray and batch.flags.owndata  # a copy, not a view of a mapping
    np.testing.assert_array_equal(batch, sim.observation[[3, 1]].astype(batch.dtype))


def test_fista_streamed_equals_recover(series_file, tmp_path):
    path, sim = series_file
    data = read_observation(path).data[:2]
    ref = recover(data, sim.psf, method="fista", iterations=15, tol=0)
    recover_to_file(data, tmp_path / "f.zarr", psf=sim.psf, method="fista", iterations=15, tol=0,
                    outputs="image")
    got = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")["image"]["0"][:]
    assert _rel(got, ref.image) < 1e-6
    meta = zarr.open_group(str(tmp_path / "f.zarr"), mode="r").attrs["napari_spodnet"]
    assert meta["method"] == "fista" and json.dumps(meta)


def test_cli_only_and_resume_after_interrupt(series_file, reference, tmp_path, monkeypatch, capsys):
    import napari_spodnet.stream as stream
    from napari_spodnet import cli

    path, _ = series_file
    out = tmp_path / "cli.zarr"
    real = stream.local_batches

    def interrupted(engine, source, batches, **kw):
        for k, item in enumerate(real(engine, source, batches, **kw)):
            if k == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(stream, "local_batches", interrupted)
    argv = ["recover", str(path), "-o", str(out), "--only", "intensity,orientation"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "frames/s" in err and "left" in err
    assert cli.main(argv + ["--quiet"]) == cli.EXIT_ERROR and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(stream, "local_batches", real)
    assert cli.main(argv + ["--resume", "--quiet"]) == 0
    assert "3 frames from an earlier run" in capsys.readouterr().out
    group = zarr.open_group(str(out), mode="r")
    assert sorted(group.group_keys()) == ["intensity", "orientation"]
    assert _rel(group["intensity"]["0"][:], reference.intensity) < 1e-6


def test_napari_opens_the_ome_zarr_lazily(make_napari_viewer, series_file, reference, tmp_path):
    path, _ = series_file
    out = tmp_path / "view.zarr"
    recover_to_file(path, out, outputs="intensity,orientation")
    viewer = make_napari_viewer()
    layers = viewer.open(str(out / "intensity"), plugin="napari")
    assert layers[0].data.shape == reference.intensity.shape
    assert type(layers[0].data).__name__ in ("Array", "MultiScaleData")  # dask-backed, read when shown
    viewer.dims.set_current_step(0, 3)
    np.testing.assert_allclose(np.asarray(layers[0].data[3]), reference.intensity[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mid.zarr", "mid.tif"])
def test_cancel_within_a_fista_frame_is_prompt_and_resumable(series_file, tmp_path, name):
    """Cancel between FISTA iterations of frame 2: it stops within an iteration, frame 1 is kept,
    frame 2 is not marked done, and --resume finishes a result equal to an uninterrupted run."""
    path, sim = series_file
    data = read_observation(path).data[:3]
    iterations = 400
    settings = dict(psf=sim.psf, method="fista", iterations=iterations, tol=0, outputs="image")
    seen = []

    def cancel_in_frame_two(p: StreamProgress):
        seen.append((p.done, p.within, p.message))
        return p.done == 1 and "iteration 5/" in p.message

    out = tmp_path / name
    with pytest.raises(RecoveryCancelled, match="1 of 3 frames.*resume"):
        recover_to_file(data, out, progress=cancel_in_frame_two, **settings)
    assert seen[-1][2] == f"frame 2: FISTA iteration 5/{iterations}"
    assert 0 < seen[-1][1] < 1  # the progress counted the part of frame 2 that was done
    within_frame_one = [m for d, w, m in seen if d == 0 and "FISTA iteration" in m]
    assert len(within_frame_one) == iterations  # every iteration of frame 1 was reported
    partial = partial_path(out)
    ref = recover(data, sim.psf, method="fista", iterations=iterations, tol=0)
    if name.endswith(".zarr"):
        group = zarr.open_group(str(partial), mode="r")
        assert group["frames_done"][:].tolist() == [1, 0, 0]
        assert _rel(group["image"]["0"][0], ref.image[0]) < 1e-6 and not group["image"]["0"][1].any()
    else:
        frames = tifffile.imread(partial)  # a valid TIFF: frame 1 recovered, the rest zeros
        assert _rel(frames[0], ref.image[0]) < 1e-6 and not frames[1:].any()
    summary = recover_to_file(data, out, resume=True, **settings)
    assert summary.skipped == 1 and summary.computed == 2 and not partial.exists()
    got = zarr.open_group(str(out), mode="r")["image"]["0"][:] if name.endswith(".zarr") else tifffile.imread(out)
    assert _rel(got, ref.image) < 1e-6
