"""Run every gallery example (examples/plot_*.py) with its quick settings.

The examples run one after the other in a single subprocess (importing torch,
sklearn and matplotlib once instead of once per script), each in a fresh
namespace with ``runpy``; each test then checks its example's outcome.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("plot_*.py"))

_RUNNER = """
import json, runpy, sys, time, traceback
import matplotlib.pyplot as plt
results = {}
for path in sys.argv[2:]:
    t0 = time.perf_counter()
    try:
        runpy.run_path(path, run_name="__main__")
        error = None
    except BaseException:
        error = traceback.format_exc()
    plt.close("all")
    results[path] = {"error": error, "seconds": time.perf_counter() - t0}
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    pytest.importorskip("matplotlib", reason="the examples need matplotlib")
    out = tmp_path_factory.mktemp("examples")
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        SKRESFLOW_EXAMPLES_QUICK="1",
        SKRESFLOW_EXAMPLES_OUT=str(out),
    )
    report = out / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(report), *map(str, EXAMPLES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text()), out, proc.stdout


def test_there_are_examples():
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_saves_its_figure(path, outcomes):
    results, out, stdout = outcomes
    result = results[str(path)]
    assert result["error"] is None, result["error"]
    figure = out / f"{path.stem}.png"
    assert figure.exists() and figure.stat().st_size > 1000
    assert f"saved {figure}" in stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_has_a_docstring_and_quick_mode(path):
    text = path.read_text()
    assert text.startswith('"""'), "a gallery example starts with its description"
    assert "SKRESFLOW_EXAMPLES_QUICK" in text and "SKRESFLOW_EXAMPLES_OUT" in text
