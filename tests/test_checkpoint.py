"""Tests of safe checkpoints (core/checkpoint.py): round trip, size, malicious and damaged files."""

import json
import os
import pickle

import numpy as np
import pytest
import torch


from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from napari_spodnet.core import checkpoint as ckpt  # noqa: E402
from napari_spodnet.core.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from napari_spodnet.core.network import LISTANet, SPoDNet  # noqa: E402
from napari_spodnet.core.simulate import default_psf, gaussian_psf  # noqa: E402
from napari_spodnet.core.validation import SPoDInputError  # noqa: E402

C = 18

METADATA = {
    "normalization": {"low": 20.0, "high": 99.5, "enabled": True},
    "preprocess": None,
    "training": {"config": {"lr": 0.002, "n_layers": 3, "architecture": "spodnet"}, "cancelled": False,
                 "layers_trained": 3, "final_val_loss": 0.0021, "device": "cpu", "flips": True},
    "name": "test model",
}


def _perturbed(net):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m, layer in enumerate(net.layers):
            for p in layer.parameters():
                p.mul_(1 + 0.1 * (m + 1) * torch.rand(p.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def psf():
    return gaussian_psf(9)


@pytest.fixture
def net(psf):
    net = _perturbed(SPoDNet(psf, C, n_layers=3, lam=0.07, alpha=0.15))
    net.metadata = json.loads(json.dumps(METADATA))
    return net


@pytest.fixture(scope="module")
def y():
    return torch.rand(C, 24, 24, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved(net, tmp_path):
    return save_checkpoint(net, tmp_path / "model.safetensors")


# -- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda psf: SPoDNet(psf, C, n_layers=3, lam=0.07, alpha=0.15),
    lambda psf: SPoDNet(psf, C, n_layers=2, orientation="full", threshold="nst"),
    lambda psf: SPoDNet(psf, C, n_layers=2, n_harmonics=3),
    lambda psf: LISTANet(psf, C, n_layers=2, lam=0.02),
], ids=["harmonic", "full-nst", "harmonics3", "listanet"])
def test_round_trip_identical_outputs(psf, y, tmp_path, make):
    net = _perturbed(make(psf))
    path = save_checkpoint(net, tmp_path / "sub" / "m.safetensors")  # creates the folder
    assert path.is_file()
    loaded = load_checkpoint(path)
    assert type(loaded) is type(net)
    assert loaded.config() == net.config()
    assert not loaded.training
    for (k1, v1), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(loaded.recover(y), net.recover(y))
    # the original outputs are not trivially equal to an untrained network's
    assert not torch.equal(make(psf).recover(y), net.recover(y))


def test_metadata_preserved(net, saved):
    config, meta = read_checkpoint_metadata(saved)
    assert config == net.config()
    assert meta == METADATA
    loaded = load_checkpoint(saved)
    assert loaded.metadata == METADATA
    assert loaded.lam == pytest.approx(0.07) and loaded.alpha == pytest.approx(0.15)


def test_extra_metadata_merged(net, tmp_path):
    path = save_checkpoint(net, tmp_path / "m.safetensors", extra_metadata={"note": "hello", "name": "renamed"})
    meta = load_checkpoint(path).metadata
    assert meta["note"] == "hello" and meta["name"] == "renamed"
    assert meta["training"] == METADATA["training"]
    assert net.metadata["name"] == "test model"  # the network itself is unchanged


def test_load_to_device_and_with_matching_checks(saved, y, net):
    loaded = load_checkpoint(saved, device="cpu", n_channels=C, psf_shape=(9, 9))
    assert loaded.psf.device.type == "cpu"
    assert torch.equal(loaded.recover(y), net.recover(y))


@pytest.mark.parametrize("orientation", [
    "harmonic",
    "full",
])
def test_ten_layer_spodnet_is_under_50kb(tmp_path, orientation):
    net = SPoDNet(default_psf(), C, n_layers=10, orientation=orientation)
    net.metadata = {"normalization": {"low": 25.0, "high": 99.9, "enabled": True}}
    path = save_checkpoint(net, tmp_path / "ten.safetensors")
    assert os.path.getsize(path) <= 50_000


def test_listanet_is_large(tmp_path):
    """The contrast in method.md: LISTA-Net carries a*b*c^2 weights per layer."""
    net = LISTANet(default_psf(), C, n_layers=1)
    path = save_checkpoint(net, tmp_path / "lista.safetensors")
    assert os.path.getsize(path) > 32 * 32 * C * C * 4


# -- files that must not load -------------------------------------------------------------------

class _Exploit:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save-legacy"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.safetensors"
    payload = {"psf": _Exploit(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif writer == "torch.save":
        torch.save(payload, path)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        read_checkpoint_metadata(path)
    assert not marker.exists()
    # the file really is dangerous: an unsafe loader runs the payload
    sanity = tmp_path / "sanity.txt"
    pickle.loads(pickle.dumps({"x": _Exploit(sanity)}))
    assert sanity.exists()


def test_truncated_checkpoint(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)
    saved.write_bytes(data[:-7])  # header intact, weights cut short
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)
    saved.write_bytes(data[:5])
    with pytest.raises(CheckpointError):
        load_checkpoint(saved)


def test_random_bytes_empty_and_missing(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a folder
    assert issubclass(CheckpointError, SPoDInputError)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.rand(4, 4), "bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="not a napari-spodnet checkpoint"):
        load_checkpoint(path)
    save_file({"psf": torch.rand(9, 9)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_mismatched_channels_or_psf_named(saved):
    with pytest.raises(CheckpointError, match=r"18 polarization channels.*12"):
        load_checkpoint(saved, n_channels=12)
    with pytest.raises(CheckpointError, match=r"\(9, 9\) PSF.*\(32, 32\)"):
        load_checkpoint(saved, psf_shape=(32, 32))
    with pytest.raises(CheckpointError, match="PSF"):
        load_checkpoint(saved, psf_shape=(9, 7))


def test_nan_weights_refused(net, tmp_path):
    with torch.no_grad():
        net.layers[1].g[2, 3] = float("nan")
    path = save_checkpoint(net, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="layers.1.g"):
        load_checkpoint(path)
    with torch.no_grad():
        net.layers[1].g[2, 3] = 0.0
        net.layers[0].theta.fill_(float("inf"))
    path = save_checkpoint(net, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_checkpoint(path)


def _rewrite(saved, tmp_path, tensors=None, **header_changes):
    with safe_open(str(saved), framework="pt") as f:
        header = dict(f.metadata())
    header.update(header_changes)
    tensors = load_file(str(saved)) if tensors is None else tensors
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=header)
    return path


def test_weights_that_do_not_fit_the_config(saved, tmp_path):
    cfg, _ = read_checkpoint_metadata(saved)
    path = _rewrite(saved, tmp_path, config=json.dumps({**cfg, "n_layers": 4}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)
    tensors = load_file(str(saved))
    tensors.pop("psf")
    with pytest.raises(CheckpointError, match="PSF"):
        load_checkpoint(_rewrite(saved, tmp_path, tensors=tensors))
    path = _rewrite(saved, tmp_path, config=json.dumps({**cfg, "architecture": "resnet"}))
    with pytest.raises(CheckpointError, match="architecture"):
        load_checkpoint(path)


def test_newer_format_and_bad_json(saved, tmp_path):
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(_rewrite(saved, tmp_path, format_version="99"))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(_rewrite(saved, tmp_path, config="{not json"))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(_rewrite(saved, tmp_path, metadata="[[["))


@pytest.mark.parametrize("change,error", [
    (dict(format_version="abc"), "ValueError (int('abc'))"),
    (dict(config="[1, 2]"), "AttributeError (list.get)"),
    (dict(config=json.dumps({"architecture": "spodnet", "psf_shape": [9, 9]})), "KeyError ('n_channels')"),
], ids=["format_version", "config-not-dict", "config-missing-key"])
def test_damaged_header_gives_checkpoint_error(saved, tmp_path, change, error):
    path = _rewrite(saved, tmp_path, **change)
    try:
        load_checkpoint(path, n_channels=C)
    except CheckpointError:
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"a damaged header raised {type(exc).__name__}, not CheckpointError (was {error}): {exc!r}")
    pytest.fail("a damaged header loaded")


# -- atomic writes ---------------------------------------------------------------------------------

def test_save_leaves_no_temp_files(net, tmp_path):
    save_checkpoint(net, tmp_path / "a.safetensors")
    save_checkpoint(net, tmp_path / "a.safetensors")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_failed_save_keeps_existing_file(net, saved, monkeypatch, y):
    before = saved.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a partial write, then the failure
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    other = SPoDNet(gaussian_psf(9), C, n_layers=1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(other, saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(saved).recover(y), net.recover(y))
