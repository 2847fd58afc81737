"""Smoke test of the paper-reproduction scripts (experiments/*.py) in --quick mode.

The full runs take minutes and are not part of the test suite; this only checks
that every script runs end to end on tiny settings and writes its JSON (and its
PNG when matplotlib is installed).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(p for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_"))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def test_there_are_experiments():
    assert {p.stem for p in SCRIPTS} >= {
        "exp_biased_logdet",
        "exp_estimator_variance",
        "exp_activations",
        "plot_logdet_memory",
        "exp_hybrid",
        "exp_activations_digits",
    }


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_experiment_runs_quick(path, tmp_path):
    out = tmp_path / path.stem
    proc = subprocess.run(
        [sys.executable, str(path), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"MPLBACKEND": "Agg", **__import__("os").environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["command"].startswith("python experiments/")
    if HAS_MPL:
        assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_experiment_states_its_runtime(path):
    doc = path.read_text().split('"""')[1]
    assert "Runtime (measured" in doc and "--quick" in path.read_text()
