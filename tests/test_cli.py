import sys

import numpy as np
import pytest

from skresflow.cli import _demo_gmm, main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "moons.skf"
    assert main(["fit", "moons", "--out", str(path), "--max-iter", "1",
                 "--n-blocks", "1", "--n-samples", "300", "--verbose", "0"]) == 0
    return path


def test_fit_score_sample_info(model, tmp_path, capsys):
    assert main(["score", str(model), "moons", "--n-samples", "50",
                 "--out", str(tmp_path / "s.npy")]) == 0
    assert "50 rows: mean log-likelihood" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npy").shape == (50,)
    assert main(["sample", str(model), "-n", "7", "--out", str(tmp_path / "x.npy"),
                 "--random-state", "0"]) == 0
    assert np.load(tmp_path / "x.npy").shape == (7, 2)
    assert main(["info", str(model)]) == 0
    assert '"lipschitz_bounds"' in capsys.readouterr().out


def test_fit_from_files(tmp_path):
    X = np.random.default_rng(0).normal(size=(120, 3))
    np.save(tmp_path / "x.npy", X)
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    for name in ("x.npy", "x.csv"):
        assert main(["fit", str(tmp_path / name), "--out", str(tmp_path / "m.skf"),
                     "--max-iter", "1", "--n-blocks", "1", "--verbose", "0"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "nowhere.npy", "--out", "m.skf"], "no such file, and not a built-in"),
        (["score", "missing.skf", "moons"], "No such file"),
        (["fit", "README.md", "--out", "m.skf"], "must end in .npy or .csv"),
    ],
)
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_arguments_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample"])
    assert exc.value.code == 2


def _bits_per_dim(text, model):
    line = next(s for s in text.splitlines() if s.strip().startswith(model))
    return float(line.split()[1])


def test_demo_quick_prints_both_models_and_saves_samples(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("SKRESFLOW_DEMO_QUICK", "1")
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "held-out bits/dim" in text and "dequantisation lower bound" in text
    for model in ("ResidualFlowDensity", "GaussianMixture"):
        assert 0 < _bits_per_dim(text, model) < 100
    assert _bits_per_dim(text, "uniform") == pytest.approx(np.log2(17), abs=1e-3)
    assert out.stat().st_size > 1000


def test_demo_without_matplotlib_skips_the_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    out = tmp_path / "demo.png"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not out.exists()


def test_demo_gmm_bits_per_dim_are_those_of_the_discrete_data():
    # Independent uniform pixels: no model beats log2(17) bits/dim (the entropy),
    # and one Gaussian fitted to the dequantised (uniform) values pays the gap
    # between a Gaussian's and a uniform's entropy, 0.5 log2(2 pi e / 12) per
    # dim; the tuned mixture lies in between.
    rng = np.random.default_rng(0)
    X = rng.integers(0, 17, size=(4000, 3))
    _, bpd = _demo_gmm(X[:3000], X[3000:], quick=True)
    one_gaussian = np.log2(17) + 0.5 * np.log2(2 * np.pi * np.e / 12)
    assert np.log2(17) - 0.02 < np.mean(bpd) < one_gaussian + 0.02
