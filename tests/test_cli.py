import numpy as np
import pytest

from skresflow.cli import main


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
