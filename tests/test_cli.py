"""Smoke tests of the ``spodnet`` command, including its error paths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_spodnet import cli
from napari_spodnet.core.checkpoint import load_checkpoint
from napari_spodnet.io import read_observation, read_stack_metadata


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert cli.main(["simulate", "-o", str(out), "--size", "64", "--seed", "3"]) == 0
    return out


def test_simulate_writes_observation_psf_truth(data_dir):
    obs = read_observation(data_dir / "observation.tif")
    assert obs.data.shape == (18, 64, 64) and obs.axes == "CYX"
    psf = tifffile.imread(data_dir / "psf.tif")
    assert psf.shape == (32, 32) and psf.sum() == pytest.approx(1.0, rel=1e-5)
    assert tifffile.imread(data_dir / "truth.tif").shape == (18, 95, 95)
    assert read_stack_metadata(data_dir / "observation.tif")["seed"] == 3


def test_simulate_time_series(tmp_path):
    assert cli.main(["simulate", "-o", str(tmp_path), "--size", "48", "--frames", "3"]) == 0
    assert read_observation(tmp_path / "observation.tif").data.shape == (3, 18, 48, 48)


def test_fista_writes_result_with_metadata(data_dir, tmp_path, capsys):
    out = tmp_path / "fista.tif"
    code = cli.main(["fista", str(data_dir / "observation.tif"), "--psf", str(data_dir / "psf.tif"), "-o", str(out),
                     "--iterations", "20", "--lam", "0.05", "--quiet"])
    assert code == 0
    image = tifffile.imread(out)
    assert image.shape == (18, 95, 95) and image.min() >= 0 and image.max() > 0
    meta = read_stack_metadata(out)
    assert meta["method"] == "fista" and meta["lambda"] == 0.05 and meta["iterations"] == 20
    assert meta["psf_shape"] == [32, 32] and meta["translate"] == [-15.5, -15.5]
    assert "objective" in capsys.readouterr().out


def test_train_then_recover_with_own_model(data_dir, tmp_path):
    model = tmp_path / "m.safetensors"
    code = cli.main(["train", str(data_dir / "observation.tif"), "--psf", str(data_dir / "psf.tif"), "-o", str(model),
                     "--layers", "2", "--epochs", "1", "--crops", "4", "--batch-size", "2", "--crop-size", "32",
                     "--quiet"])
    assert code == 0
    net = load_checkpoint(model)
    assert net.n_layers == 2 and net.metadata["name"] == "m"
    assert net.momentum  # the product default; --no-momentum gives the paper's network
    out = tmp_path / "rec.tif"
    code = cli.main(["recover", str(data_dir / "observation.tif"), "--model", str(model), "-o", str(out), "--quiet"])
    assert code == 0
    assert tifffile.imread(out).shape == (18, 95, 95)
    assert read_stack_metadata(out)["model"] == str(model)


def test_fine_tune_the_shipped_model(data_dir, tmp_path, capsys):
    """--fine-tune default: the shipped model, trained further on the user's data (same PSF)."""
    from napari_spodnet.core.recover import DEFAULT_MODEL_PATH
    from napari_spodnet.core.simulate import default_psf, gaussian_psf

    psf = tmp_path / "airy.tif"
    tifffile.imwrite(psf, default_psf())
    model = tmp_path / "tuned.safetensors"
    args = ["train", str(data_dir / "observation.tif"), "--psf", str(psf), "--epochs", "1", "--crops", "2",
            "--batch-size", "2", "--crop-size", "48", "--quiet"]
    capsys.readouterr()
    assert cli.main([*args, "-o", str(model), "--fine-tune", "default"]) == 0
    tuned, shipped = load_checkpoint(model), load_checkpoint(DEFAULT_MODEL_PATH)
    # when no epoch beat the shipped model, the user is told the model written is that model, unchanged
    assert ("returned unchanged" in capsys.readouterr().out) == tuned.metadata["training"]["unchanged"]
    assert tuned.n_layers == shipped.n_layers
    # one Adam step at a fifth of the rate: near the shipped schedule, not back at FISTA's steps
    eta = [float(layer.eta.detach()) for layer in tuned.layers]
    assert np.allclose(eta, [float(layer.eta.detach()) for layer in shipped.layers], atol=0.05)
    assert max(abs(e) for e in eta) > 0.3
    # the output may not overwrite the model it starts from; another PSF is refused with a clear message
    before = model.read_bytes()
    capsys.readouterr()
    assert cli.main([*args, "-o", str(model), "--fine-tune", str(model)]) != 0
    assert model.read_bytes() == before
    gaussian = tmp_path / "gaussian.tif"
    tifffile.imwrite(gaussian, gaussian_psf(32, 2.5))
    other = tmp_path / "other.safetensors"
    assert cli.main([*args, "-o", str(other), "--psf", str(gaussian), "--fine-tune", str(model)]) != 0
    assert "another PSF" in capsys.readouterr().err and not other.exists()
    # a model of the user's own (2 layers, trained here) is fine-tuned as it is: its layer count is kept
    small = tmp_path / "small.safetensors"
    assert cli.main([*args, "-o", str(small), "--layers", "2", "--dense-epochs", "1"]) == 0
    assert load_checkpoint(small).metadata["training"]["config"]["dense_stage_epochs"] == 1
    assert tuned.metadata["training"]["config"].get("dense_stage_epochs", 0) == 0  # fine-tuning: none by default
    assert tuned.metadata["training"]["config"].get("stability_bound", 0) == 0  # nor a stability bound
    # a dense stage needs an end-to-end preset: one clear line, nothing written
    capsys.readouterr()
    assert cli.main([*args, "-o", str(tmp_path / "x.safetensors"), "--preset", "paper", "--dense-epochs", "2"]) == 2
    assert "dense" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert cli.main([*args, "-o", str(tmp_path / "small2.safetensors"), "--fine-tune", str(small)]) == 0
    small2 = load_checkpoint(tmp_path / "small2.safetensors")
    assert small2.n_layers == 2 and small2.metadata["training"]["fine_tuned_from"]["name"] == "small"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 300)
    assert cli.main([*args, "-o", str(other), "--fine-tune", str(broken)]) == 2
    assert "not a napari-spodnet checkpoint" in capsys.readouterr().err and not other.exists()


def test_recover_with_the_shipped_model(data_dir, tmp_path):
    out = tmp_path / "rec.tif"
    assert cli.main(["recover", str(data_dir / "observation.tif"), "-o", str(out), "--quiet"]) == 0
    assert read_stack_metadata(out)["method"] == "spodnet"


def test_headless_demo_writes_tiffs_and_png(tmp_path, capsys):
    code = cli.main(["demo", "--headless", "-o", str(tmp_path), "--size", "64", "--iterations", "300"])
    assert code == 0
    assert (tmp_path / "fista.tif").is_file() and (tmp_path / "spodnet.tif").is_file()
    png = tmp_path / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "SPoD-Net" in text and "FISTA" in text and "faster" in text


def test_demo_without_display_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert cli.main(["demo", "-o", str(tmp_path), "--size", "48", "--iterations", "5"]) == 0
    assert "No display found" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["fista", "{missing}", "--psf", "{psf}", "-o", "{out}"], "not found"),
    (["fista", "{three}", "--psf", "{psf}", "-o", "{out}"], "18"),
    (["fista", "{nan}", "--psf", "{psf}", "-o", "{out}"], "NaN"),
    (["fista", "{obs}", "--psf", "{negpsf}", "-o", "{out}"], "negative"),
    (["fista", "{obs}", "--psf", "{bigpsf}", "-o", "{out}"], "larger than the image"),
    (["recover", "{obs}", "--model", "{corrupt}", "-o", "{out}"], "not a napari-spodnet checkpoint"),
    (["recover", "{obs}", "--device", "cuda:7", "-o", "{out}"], "cuda"),
])
def test_errors_are_one_clear_line(data_dir, tmp_path, capsys, argv, needle):
    rng = np.random.default_rng(0)
    paths = {"missing": tmp_path / "missing.tif", "psf": data_dir / "psf.tif", "out": tmp_path / "out.tif",
             "obs": data_dir / "observation.tif", "three": tmp_path / "three.tif", "nan": tmp_path / "nan.tif",
             "negpsf": tmp_path / "neg.tif", "bigpsf": tmp_path / "big.tif", "corrupt": tmp_path / "bad.safetensors"}
    tifffile.imwrite(paths["three"], rng.random((3, 40, 40)).astype(np.float32), photometric="minisblack")
    nan = rng.random((18, 40, 40)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    tifffile.imwrite(paths["nan"], nan)
    tifffile.imwrite(paths["negpsf"], rng.random((5, 5)).astype(np.float32) - 0.5)
    tifffile.imwrite(paths["bigpsf"], np.ones((80, 80), np.float32))
    paths["corrupt"].write_bytes(b"\x80\x04not a checkpoint" * 10)
    code = cli.main([a.format(**{k: str(v) for k, v in paths.items()}) for a in argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    assert needle.lower() in err.lower()
    assert "Traceback" not in err
    assert not paths["out"].exists()  # nothing half-written


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "napari_spodnet.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for command in ("demo", "simulate", "fista", "train", "recover"):
        assert command in result.stdout


def test_gui_demo_opens_napari_with_widgets_and_results(make_napari_viewer, qtbot, monkeypatch):
    """`spodnet demo` on a machine with a display: napari, the four widgets, recovered layers."""
    import napari

    viewer = make_napari_viewer()
    monkeypatch.setattr(napari, "Viewer", lambda *a, **k: viewer)
    assert cli.main(["demo", "--no-block"]) == 0
    qtbot.waitUntil(lambda: any(layer.metadata.get("spodnet", {}).get("kind") == "recovered"
                                for layer in viewer.layers), timeout=120_000)
    names = [layer.name for layer in viewer.layers]
    assert len(names) >= 4
    assert len(viewer.window.dock_widgets) >= 4


def test_recover_check_prints_and_records_the_comparison(data_dir, tmp_path, capsys):
    out = tmp_path / "checked.tif"
    assert cli.main(["recover", str(data_dir / "observation.tif"), "-o", str(out), "--quiet", "--check",
                     "--check-iterations", "30"]) == 0
    text = capsys.readouterr().out
    assert "Check against FISTA on 64 x 64 pixels" in text and "SPoD-Net:" in text
    check = read_stack_metadata(out)["check"]
    assert check["fista_iterations"] == 30 and check["region"] == [[0, 64], [0, 64]]
    assert check["network_seconds"] > 0 and isinstance(check["suits"], bool)
    assert tifffile.imread(out).shape == (18, 95, 95)  # and the recovery itself was written
    assert cli.main(["recover", str(data_dir / "observation.tif"), "-o", str(tmp_path / "x.tif"), "--check",
                     "--check-iterations", "0"]) == 2
    assert not (tmp_path / "x.tif").exists()


def test_progress_in_a_log_shows_a_stage_news_between_quarters(capsys):
    bar = cli._Progress("training")  # stderr is not a terminal here: one line per quarter
    bar(0.30, "end-to-end epoch 3/10")
    bar(0.35, "end-to-end epoch 4/10")  # throttled
    bar(0.36, "dense stage: simulating dense clusters", news=True)
    bar(1.0, "done")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[-1] for line in lines] == [
        "end-to-end epoch 3/10", "dense stage: simulating dense clusters", "done"]
