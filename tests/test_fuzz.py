"""Hostile files and values: a short seeded fuzz run and a table of bad API / CLI values."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from napari_spodnet import cli, io
from napari_spodnet.core.checkpoint import CheckpointError, load_checkpoint
from napari_spodnet.core.physics import SPoDOperator
from napari_spodnet.core.recover import DEFAULT_MODEL_PATH, recover
from napari_spodnet.core.solvers import fista, ista
from napari_spodnet.core.validation import SPoDInputError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("spod_fuzz", ROOT / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def _psf(size=7):
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return np.exp(-(yy**2 + xx**2) / 4).astype(np.float32)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks one child per case")
def test_short_seeded_fuzz_has_no_foreign_exception_hang_or_nan():
    counts = fuzz.fuzz(150, seed=7, timeout=10.0)
    bad = {k: v for k, v in counts.items() if k[1] not in ("ok", "refused")}
    assert sum(counts.values()) == 150
    assert not bad, fuzz.table(counts)
    assert sum(v for k, v in counts.items() if k[1] == "refused") > 20  # the mutations do bite


def test_huge_declared_ome_size_is_refused_fast(tmp_path):
    import re
    import resource
    import time

    path = tmp_path / "huge.ome.tif"
    tifffile.imwrite(path, np.ones((18, 8, 8), np.uint16), ome=True, metadata={"axes": "CYX"})
    data = path.read_bytes()
    start, end = data.find(b"<?xml"), data.find(b"</OME>") + 6
    xml = re.sub(rb'\s*xsi:schemaLocation="[^"]*"', b"", data[start:end]).replace(b'SizeC="18"', b'SizeC="1300000"')
    path.write_bytes(data[:start] + xml.ljust(end - start) + data[end:])
    assert path.stat().st_size < 10_000
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(SPoDInputError, match="truncated or damaged"):
        io.read_observation(path)
    assert io.peek_polarization_axis(path) is None
    from napari_spodnet._reader import napari_get_reader

    # The reader claims readable TIFFs so that a refusal carries its reason into napari's message.
    reader = napari_get_reader(str(path))
    if reader is not None:
        with pytest.raises(SPoDInputError):
            reader(str(path))
    assert time.perf_counter() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # kB


def test_truncated_imagej_stack_is_refused(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.ones((18, 64, 64), np.uint16), imagej=True, metadata={"axes": "CYX"})
    data = path.read_bytes()
    for cut in (data[: len(data) // 2], data[: len(data) // 2] + b"\0" * (len(data) - len(data) // 2)):
        path.write_bytes(cut)
        with pytest.raises(SPoDInputError):
            io.read_observation(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_])
def test_non_real_pixels_refused(tmp_path, dtype):
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, np.ones((18, 8, 8), dtype))
    with pytest.raises(SPoDInputError, match="real number"):
        io.read_observation(path)
    with pytest.raises(SPoDInputError):
        io.read_psf(path)


# -- bad API values ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def op():
    return SPoDOperator(_psf(), 18)


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -1.0, True, "0.1", None])
@pytest.mark.parametrize("solver", [fista, ista])
def test_bad_lambda(op, solver, lam):
    with pytest.raises(SPoDInputError, match="lambda"):
        solver(op, np.ones((18, 16, 16), np.float32), lam, max_iter=2)


@pytest.mark.parametrize("y,needle", [
    (np.full((18, 16, 16), np.nan, np.float32), "NaN"),
    (np.ones((18, 16, 16), bool), "real"),
    (np.ones((18, 16, 16), np.complex64), "real"),
    (np.ones((18, 5, 16), np.float32), "larger than the image"),
    (np.ones((5, 16, 16), np.float32), "18"),
])
def test_bad_observation_for_fista(op, y, needle):
    with pytest.raises(SPoDInputError, match=needle):
        fista(op, y, 0.05, max_iter=2)


def test_integer_observation_accepted(op):
    res = fista(op, np.ones((18, 16, 16), np.uint16), 0.05, max_iter=2)
    assert torch.isfinite(res.x).all()


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("method", ["fista", "spodnet"])
def test_recover_bad_lambda(method, lam):
    with pytest.raises(SPoDInputError, match="lambda"):
        recover(np.ones((18, 40, 40), np.float32), _psf(32) if method == "spodnet" else _psf(), method=method,
                lam=lam, iterations=2)


def test_folder_and_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def _edited_default(tmp_path, **changes):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(DEFAULT_MODEL_PATH), framework="pt") as f:
        header = dict(f.metadata())
    config = json.loads(header["config"])
    config.update(changes)
    header["config"] = json.dumps(config)
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(DEFAULT_MODEL_PATH)), str(path), metadata=header)
    return path


@pytest.mark.parametrize("key,value", [
    ("lam", float("nan")), ("lam", -1.0), ("alpha", float("nan")), ("alpha", 3.0), ("lipschitz", float("inf")),
    ("lipschitz", 0.0), ("lipschitz", float("nan")), ("n_layers", 2**31), ("n_layers", 2**63), ("n_channels", 2**31),
    ("n_layers", -1), ("psf_shape", [2**31, 32]), ("new_size", 2**40), ("new_scale", float("nan")),
])
def test_hostile_checkpoint_header_values_refused(tmp_path, key, value):
    with pytest.raises(CheckpointError):
        load_checkpoint(_edited_default(tmp_path, **{key: value}))


def test_unknown_finite_config_key_passes_validation(tmp_path):
    """Header validation lets a finite unknown key through (newer code may add parameters);
    the network constructor then decides, and a key it does not know is a clean CheckpointError."""
    from napari_spodnet.core.checkpoint import read_checkpoint_metadata

    path = _edited_default(tmp_path, some_new_option=3)
    assert read_checkpoint_metadata(path)[0]["some_new_option"] == 3
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_huge_weight_is_caught_by_the_probe(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(DEFAULT_MODEL_PATH), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(DEFAULT_MODEL_PATH))
    tensors["layers.3.eta"] = torch.tensor(1e38)
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)
    assert json.loads(header["config"])["n_layers"] == 10


def test_shipped_model_still_loads():
    assert load_checkpoint(DEFAULT_MODEL_PATH).n_layers == 10


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lam=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10),
       scale=st.floats(-1e6, 1e6, allow_nan=False))
def test_fista_values_hypothesis(op, lam, scale):
    y = np.ones((18, 12, 12), np.float32) * np.float32(scale)
    try:
        res = fista(op, y, lam, max_iter=3, tol=0)
    except SPoDInputError:
        assert not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0 <= lam <= 1e30)
        return
    assert torch.isfinite(res.x).all()


# -- bad CLI values ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "obs.tif", (rng.random((18, 40, 40)) * 100).astype(np.float32))
    tifffile.imwrite(folder / "psf.tif", _psf())
    os.link(folder / "obs.tif", folder / "hard.tif")
    os.symlink(folder / "obs.tif", folder / "soft.tif")
    (folder / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    return folder


@pytest.mark.parametrize("argv,needle", [
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{obs}"], "input file"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{psf}"], "input file"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{hard}"], "input file"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{soft}"], "input file"),
    (["recover", "{obs}", "-o", "{obs}"], "input file"),
    (["train", "{obs}", "--psf", "{psf}", "-o", "{obs}"], "input file"),
    (["train", "{obs}", "--psf", "{psf}", "-o", "{obs}/x.safetensors"], "not a folder"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{out}", "--lam", "nan"], "--lam"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{out}", "--lam", "inf"], "--lam"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{out}", "--lam", "-1"], "--lam"),
    (["fista", "{obs}", "--psf", "{psf}", "-o", "{out}", "--iterations", "0"], "--iterations"),
    (["recover", "{obs}", "--model", "{dir}", "-o", "{out}"], "is a folder, not a checkpoint file"),
    (["recover", "{obs}", "--model", "{bad}", "-o", "{out}"], "not a napari-spodnet checkpoint"),
    (["recover", "{obs}", "--model", "{dir}/missing.safetensors", "-o", "{out}"], "not found"),
    (["simulate", "-o", "{obs}"], "is a file"),
])
def test_cli_bad_values_exit_2_with_one_line(files, capsys, argv, needle):
    before = (files / "obs.tif").read_bytes()
    names = {"obs": files / "obs.tif", "psf": files / "psf.tif", "hard": files / "hard.tif",
             "soft": files / "soft.tif", "out": files / "out.tif", "dir": files, "bad": files / "bad.safetensors"}
    code = cli.main([a.format(**{k: str(v) for k, v in names.items()}) for a in argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err and "unexpected" not in err
    assert len(err.strip().splitlines()) == 1
    assert (files / "obs.tif").read_bytes() == before
    assert not (files / "out.tif").exists()
