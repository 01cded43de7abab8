"""The dask.distributed path: a scheduler and two workers on loopback, results identical to the
single-process recovery, and a worker killed mid-run loses nothing."""

import os
import signal

import numpy as np
import pytest
import zarr

distributed = pytest.importorskip("distributed")

from napari_spodnet import cli  # noqa: E402
from napari_spodnet.cluster import recover_on_cluster  # noqa: E402
from napari_spodnet.core.recover import recover  # noqa: E402
from napari_spodnet.core.simulate import simulate_time_series  # noqa: E402
from napari_spodnet.core.validation import SPoDInputError  # noqa: E402
from napari_spodnet.io import read_observation, write_stack  # noqa: E402
from napari_spodnet.stream import recover_to_file  # noqa: E402

T = 6


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    sim = simulate_time_series(T, (40, 40), seed=7)
    path = write_stack(folder / "obs.tif", sim.observation, axes="TCYX")
    data = read_observation(path).data
    return path, sim, recover(data, None, method="spodnet")


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def threaded_cluster():
    """Two single-thread workers in this process, on loopback only."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        yield cluster


def test_cluster_equals_single_process_and_uses_both_workers(series, threaded_cluster, tmp_path):
    path, _, reference = series
    with distributed.Client(threaded_cluster, set_as_default=False, timeout=30) as client:
        summary = recover_on_cluster(path, tmp_path / "c.zarr", client, outputs="all")
        group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
        assert _rel(group["image"]["0"][:], reference.image) <= 1e-5
        assert _rel(group["intensity"]["0"][:], reference.intensity) <= 1e-5
        np.testing.assert_allclose(summary.objective, reference.objective, rtol=1e-5)
        assert summary.computed == T
        assert len(client.nthreads()) == 2


def test_cli_scheduler_address(series, threaded_cluster, tmp_path, capsys):
    path, _, reference = series
    out = tmp_path / "int.tif"
    code = cli.main(["recover", str(path), "-o", str(out), "--only", "intensity", "--quiet",
                     "--scheduler", threaded_cluster.scheduler_address])
    assert code == 0, capsys.readouterr().err
    import tifffile

    assert _rel(tifffile.imread(out), reference.intensity) <= 1e-5


def test_unreachable_scheduler_is_a_clear_error(series, tmp_path, monkeypatch):
    import napari_spodnet.cluster as cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 2.0)
    path, _, _ = series
    with pytest.raises(SPoDInputError, match="scheduler"):
        recover_to_file(path, tmp_path / "x.zarr", scheduler="tcp://127.0.0.1:9")
    assert not (tmp_path / "x.zarr").exists()


def test_a_worker_killed_mid_run_loses_nothing(series, tmp_path):
    """Two worker processes; the one that finished the first batch is killed; its frames and
    the ones it was running are recomputed elsewhere and the output is complete and correct."""
    path, _, reference = series
    killed = []

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, worker_dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False, timeout=60) as client:

        def kill_one(progress):
            if progress.done >= 1 and not killed:
                victim = sorted(client.scheduler_info()["workers"])[0]
                pid = client.run(os.getpid, workers=[victim])[victim]
                killed.append(victim)
                os.kill(pid, signal.SIGKILL)  # the nanny starts a new worker; its tasks are rerun
            return False

        summary = recover_to_file(path, tmp_path / "k.zarr", scheduler=client, progress=kill_one, outputs="image")
    assert killed
    image = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")["image"]["0"][:]
    assert summary.computed == T and _rel(image, reference.image) <= 1e-5
