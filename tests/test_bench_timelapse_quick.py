"""benchmarks/bench_timelapse.py --quick runs end to end (tiny sizes), so the script cannot rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_timelapse.py"


@pytest.mark.slow
def test_bench_timelapse_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_timelapse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        tables = module.main(["--quick", "--no-cluster", "--out", str(tmp_path)])
    finally:
        sys.modules.pop(spec.name, None)
    short, long = tables["memory"]
    assert long["frames"] > short["frames"] and long["anon_peak_mb"] > 0 and long["vmhwm_mb"] > 0
    assert {(r["method"], r["threads"]) for r in tables["speed"]} == {("spodnet", 1), ("spodnet", 2),
                                                                     ("fista", 1), ("fista", 2)}
    f = tables["fista_pass"]
    assert min(f["ratio"], f["ratio_tol"], f["layer_ratio"], f["tuned_layer_ratio"]) > 0
    assert tables["lazy"]["first_ms"] > 0
    assert json.loads((tmp_path / "timelapse.json").read_text())
    assert (tmp_path / "timelapse.md").read_text().count("|") > 20


def test_bench_timelapse_ratios_only_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_timelapse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        tables = module.main(["--quick", "--ratios-only"])
    finally:
        sys.modules.pop(spec.name, None)
    assert tables["fista_pass"]["layer_ms"] > 0 and tables["fista_pass"]["iteration_tol_ms"] > 0
    assert "SPoD-Net layer" in capsys.readouterr().out
