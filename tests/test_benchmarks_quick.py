"""Smoke runs of benchmarks/paper_experiments.py (the script behind docs/results.md), so it cannot rot.

Each subcommand runs in ``--quick`` mode (tiny images, a 7 x 7 PSF, one or two training steps);
the full runs stay out of CI.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_experiments.py"


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("paper_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _run(experiments, name, tmp_path):
    result = experiments.main([name, "--quick", "--out", str(tmp_path)])
    assert (tmp_path / f"{name}.png").is_file()
    assert (tmp_path / f"{name}.md").read_text().count("|") > 10
    assert json.loads((tmp_path / f"{name}.json").read_text())
    return result


def test_fig6a_quick(experiments, tmp_path):
    r = _run(experiments, "fig6a", tmp_path)
    assert set(r["variants"]) == {"ours", "paper", "paper-post"}
    runs = r["variants"]["ours"]["runs"]
    assert {x["label"] for x in runs} >= {"SPoD-LST (0.0001)", "ISTA-LST (0.0001)", "SPoD-NST (1e-05)"}
    for x in runs:
        assert len(x["layer_end_train"]) == 3 and all(v > 0 for v in x["train_curve"])


def test_fig6b_quick(experiments, tmp_path):
    r = _run(experiments, "fig6b", tmp_path)
    assert len(r["runs"]["SPoD-LST"]["test"]) == r["settings"]["layers"]
    assert len(r["runs"]["ISTA-LST"]["test"]) == r["settings"]["lista_layers"]
    sizes = {row["model"].split(",")[0].split(" (")[0]: row["bytes"] for row in r["model_sizes"]}
    assert sizes["SPoD-LST"] < 60e3 < 13e6 < sizes["ISTA-LST"]  # the paper's < 50 kB vs > 13 MB
    # fig6a reuses fig6b's layer-wise runs from the cache (first layers of the same run)
    r6a = experiments.main(["fig6a", "--quick", "--out", str(tmp_path), "--variants", "ours"])
    lst = [x for x in r6a["variants"]["ours"]["runs"] if x["label"] == "SPoD-LST (0.0001)"][0]
    assert lst["cached"]


def test_fig7_quick(experiments, tmp_path):
    r = _run(experiments, "fig7", tmp_path)
    assert (tmp_path / "fig8.png").is_file()
    assert len(r["patches"]) == 4
    for p in r["patches"]:
        assert p["zero_objective"] > p["net_objective"] > 0
        assert len(p["fista_history"]) == r["settings"]["fista_iterations"]
        assert all(b >= a for a, b in zip(p["fista_seconds"], p["fista_seconds"][1:]))
    # the learned-momentum variant (not in the paper) trains and evaluates too
    r2 = experiments.main(["fig7", "--quick", "--momentum", "--out", str(tmp_path / "momentum")])
    assert "momentum" in r2["models"][0]["source"] and len(r2["patches"]) == 4


def test_speed_quick(experiments, tmp_path):
    r = _run(experiments, "speed", tmp_path)
    assert [row["size"] for row in r["rows"]] == [40, 64]
    for row in r["rows"]:
        assert row["net_seconds"] > 0 and row["direct_iteration_seconds"] > 0
        assert row["direct_vs_fft_rel_diff"] < 1e-3
    assert r["rows"][0]["memory"]["net_harmonic"]["peak_mb"] >= 0
    assert r["throughput"]["fps"] > 0


def test_truth_quick(experiments, tmp_path):
    pytest.importorskip("skimage")
    r = _run(experiments, "truth", tmp_path)
    assert (tmp_path / "truth_images.png").is_file()
    methods = {row["method"] for row in r["rows"]}
    assert "SPoD-Net" in methods and len(r["rows"]) == 4 * len(r["settings"]["photons"])
    for row in r["rows"]:
        assert 0 <= row["orientation_error_deg"] <= 90
        assert -1 <= row["ssim_intensity"] <= 1


def test_spodnet_vs_fista_quick(tmp_path):
    """benchmarks/spodnet_vs_fista.py --quick: every variant gets a FISTA-equivalent, a speed-up and a PSNR gap."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "spodnet_vs_fista.py"
    spec = importlib.util.spec_from_file_location("spodnet_vs_fista", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(tmp_path)])
    assert len(result["variants"]) == 5 and len(result["cases"]) == 2  # five recipes trained on one PSF
    deep = [info for key, info in result["variants"].items() if "20 layers" in key]
    assert len(deep) == 1 and deep[0]["config"]["n_layers"] == 5  # (its quick mode: 5 layers against 3)
    assert any("supervised" in key for key in result["variants"])
    assert any("without the stability bound" in key for key in result["variants"])
    for case in result["cases"]:
        assert np.isfinite(case["fista_best_psnr"])
        # the first FISTA iteration within 0.5 dB of FISTA's best comes no later than the best itself
        assert 10 <= case["fista_near_best_iteration"] <= case["fista_best_iteration"]
        for row in case["networks"].values():
            assert row["fista_equivalent"] is None or row["fista_equivalent"] >= 1
            assert np.isfinite(row["psnr_minus_fista_best"]) and row["seconds_1t"] > 0
    assert (tmp_path / "spodnet_vs_fista.md").read_text().count("|") > 20


def test_spodnet_vs_fista_judges_given_checkpoints(tmp_path):
    """--checkpoints: the given checkpoints and the shipped default are judged, nothing is trained."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "spodnet_vs_fista.py"
    spec = importlib.util.spec_from_file_location("spodnet_vs_fista", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    other = Path(__file__).resolve().parent / "data" / "default_model_v1.safetensors"
    result = module.main(["--quick", "--out", str(tmp_path), "--checkpoints", str(other)])
    labels = sorted(result["variants"])  # "<checkpoint stem> (<n> layers) [<PSF>]"
    assert len(labels) == 2 and labels[0].startswith("default (10 layers)") \
        and labels[1].startswith("default_model_v1 (10 layers)")
    assert {case["psf"] for case in result["cases"]} == {"default Airy"}
    for case in result["cases"]:
        assert len(case["networks"]) == 2
        for row in case["networks"].values():
            assert row["fista_equivalent"] is None or row["fista_equivalent"] >= 1  # None: beyond --fista-iterations
            assert np.isfinite(row["psnr_minus_fista_best"]) and row["seconds_1t"] > 0
