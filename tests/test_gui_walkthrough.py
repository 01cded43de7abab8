"""The GUI walk-through script's quick mode (scripts/gui_walkthrough.py), and the orientation legend."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_spodnet.core.recover import orientation_composite
from napari_spodnet.widgets._legend import orientation_wheel
from napari_spodnet.widgets._shared import reset_settings

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gui_walkthrough.py"


@pytest.fixture(autouse=True)
def fresh_settings():
    reset_settings()
    yield
    reset_settings()


def _load_script():
    spec = importlib.util.spec_from_file_location("gui_walkthrough", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_walkthrough_quick_mode(make_napari_viewer, tmp_path):
    walkthrough = _load_script()
    viewer = make_napari_viewer(show=True)
    report = walkthrough.walk(viewer, quick=True, folder=tmp_path)
    steps = [s.step for s in report.steps]
    assert steps[0].startswith("preprocess") and steps[-1].startswith("FISTA comparison")
    assert all(s.seconds > 0 and s.ticks >= 0 for s in report.steps)
    assert report.fista_gui_ms_per_iteration > 0 and report.fista_headless_ms_per_iteration > 0
    table = report.table()
    assert "longest gap (ms)" in table and "ratio GUI / headless" in table


def test_orientation_wheel_uses_the_composite_colours():
    size = 97
    wheel = orientation_wheel(size)
    centre = size // 2
    assert wheel[centre, centre, 3] == 0  # hole in the middle
    for degrees in (0, 30, 60, 90, 150):
        theta = np.deg2rad(degrees)
        r = 0.8 * centre
        row, col = int(round(centre - r * np.sin(theta))), int(round(centre + r * np.cos(theta)))
        expected = orientation_composite(np.ones((1, 1), np.float32), np.full((1, 1), theta, np.float32),
                                         saturation_percentile=100)[0, 0]
        np.testing.assert_allclose(wheel[row, col, :3] / 255, expected, atol=0.08)
        # the opposite side is the same orientation
        row2, col2 = 2 * centre - row, 2 * centre - col
        np.testing.assert_allclose(wheel[row2, col2, :3].astype(int), wheel[row, col, :3].astype(int), atol=25)
