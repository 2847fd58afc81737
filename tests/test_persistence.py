import json
import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import skresflow
from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy

SMALL = dict(
    n_blocks=2, hidden_dims=(16,), max_iter=2, random_state=0, n_iter_no_change=None
)


@pytest.fixture(scope="module")
def data():
    return make_toy("moons", 300, random_state=0)


@pytest.fixture(scope="module")
def fitted(data):
    return ResidualFlowDensity(**SMALL).fit(data)


@pytest.fixture
def saved(fitted, tmp_path):
    path = tmp_path / "model.skf"
    fitted.save(path)
    return path


def test_round_trip_gives_identical_results(fitted, saved, data):
    loaded = skresflow.load(saved)
    np.testing.assert_array_equal(
        loaded.score_samples(data), fitted.score_samples(data)
    )
    np.testing.assert_array_equal(
        loaded.sample(5, random_state=0), fitted.sample(5, random_state=0)
    )
    assert loaded.get_params() == fitted.get_params()
    assert loaded.n_iter_ == fitted.n_iter_ and loaded.history_ == fitted.history_


def test_unfitted_model_cannot_be_saved(tmp_path):
    with pytest.raises(NotFittedError):
        ResidualFlowDensity().save(tmp_path / "m.skf")


def _payload(path):
    return torch.load(path, weights_only=True)


def test_pickle_payload_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.skf"
    with open(path, "wb") as f:
        pickle.dump({"format": "skresflow-model", "x": ResidualFlowDensity()}, f)
    with pytest.raises(
        ValueError,
        match="evil.skf: not a readable skresflow model file: it holds pickled objects",
    ):
        skresflow.load(path)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted or not a torch file"):
        skresflow.load(saved)


def test_foreign_file(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="tensor.pt: not a skresflow model file"):
        skresflow.load(path)


def test_newer_format_version(saved):
    payload = _payload(saved)
    payload["format_version"] = 99
    torch.save(payload, saved)
    with pytest.raises(
        ValueError, match="format version 99; this skresflow reads versions up to 1"
    ):
        skresflow.load(saved)


def test_unknown_class(saved):
    payload = _payload(saved)
    payload["metadata"] = payload["metadata"].replace("ResidualFlowDensity", "Nope")
    _rewrite(saved, payload)
    with pytest.raises(ValueError, match="unknown estimator class 'Nope'"):
        skresflow.load(saved)


def _rewrite(path, payload):
    """Save an edited payload with a valid checksum (a deliberate re-signing)."""
    from skresflow._persistence import _digest

    metadata = json.loads(payload["metadata"])
    metadata["sha256"] = _digest(payload["state"])
    payload["metadata"] = json.dumps(metadata)
    torch.save(payload, path)


def test_edited_weights_fail_the_checksum(saved):
    payload = _payload(saved)
    key = next(k for k in payload["state"] if k.endswith("g.0.weight"))
    payload["state"][key] *= 1.001
    torch.save(payload, saved)
    with pytest.raises(ValueError, match="do not match the file's checksum"):
        skresflow.load(saved)


def test_weights_not_matching_the_architecture(saved):
    payload = _payload(saved)
    payload["state"].pop(next(iter(payload["state"])))
    _rewrite(saved, payload)
    with pytest.raises(
        ValueError, match=f"{saved.name}: model file weights do not match the arch"
    ):
        skresflow.load(saved)


def test_loading_re_establishes_the_lipschitz_constraint(saved, data):
    # Even a re-signed file whose stored sigma lies about a scaled-up weight
    # loads as an invertible model: the constraint is recomputed on load.
    payload = _payload(saved)
    key = next(k for k in payload["state"] if k.endswith("g.0.weight"))
    payload["state"][key] *= 100
    payload["state"][key.replace("weight", "sigma")] /= 100
    _rewrite(saved, payload)
    loaded = skresflow.load(saved)
    assert all(bound < 1 for bound in loaded.flow_.lipschitz_bounds())
    Z = loaded.transform(data)
    np.testing.assert_allclose(loaded.inverse_transform(Z), data, atol=1e-8)


def test_small_table_architecture_round_trips(tmp_path):
    small_table = make_toy("moons", 100, random_state=0)
    params = {**SMALL, "n_blocks": "auto", "hidden_dims": "auto"}
    est = ResidualFlowDensity(**params).fit(small_table)
    assert (est.n_blocks_, est.hidden_dims_) == (4, (16, 16))
    est.save(tmp_path / "small.skf")
    loaded = skresflow.load(tmp_path / "small.skf")
    assert (loaded.n_blocks_, loaded.hidden_dims_) == (4, (16, 16))
    np.testing.assert_array_equal(
        loaded.score_samples(small_table), est.score_samples(small_table)
    )
    detector = skresflow.ResidualFlowOutlierDetector(**params).fit(small_table)
    assert (detector.n_blocks_, detector.hidden_dims_) == (4, (16, 16))


def test_auto_architecture_is_stored_with_the_model(data, tmp_path, monkeypatch):
    # The "auto" values may change between versions: a saved model keeps its own.
    params = {**SMALL, "n_blocks": "auto", "hidden_dims": "auto"}
    monkeypatch.setattr("skresflow._density.AUTO_BLOCKS", {"low_dim": 3})
    monkeypatch.setattr("skresflow._density.AUTO_HIDDEN_DIMS", {"tabular": (8, 4)})
    est = ResidualFlowDensity(**params).fit(data)
    assert (est.n_blocks_, est.hidden_dims_) == (3, (8, 4))
    est.save(tmp_path / "auto.skf")
    monkeypatch.setattr("skresflow._density.AUTO_BLOCKS", {"low_dim": 5})
    monkeypatch.setattr("skresflow._density.AUTO_HIDDEN_DIMS", {"tabular": (6,)})
    loaded = skresflow.load(tmp_path / "auto.skf")
    assert (loaded.n_blocks_, loaded.hidden_dims_) == (3, (8, 4))
    np.testing.assert_array_equal(loaded.score_samples(data), est.score_samples(data))
    # Files written before these attributes resolve "auto" again when loaded.
    payload = _payload(tmp_path / "auto.skf")
    metadata = json.loads(payload["metadata"])
    for name in ("n_blocks_", "hidden_dims_"):
        del metadata["fitted"][name]
    payload["metadata"] = json.dumps(metadata)
    _rewrite(tmp_path / "old.skf", payload)
    with pytest.raises(ValueError, match="weights do not match the architecture"):
        skresflow.load(tmp_path / "old.skf")  # the "auto" of today: 5 blocks
    monkeypatch.setattr("skresflow._density.AUTO_BLOCKS", {"low_dim": 3})
    monkeypatch.setattr("skresflow._density.AUTO_HIDDEN_DIMS", {"tabular": (8, 4)})
    assert skresflow.load(tmp_path / "old.skf").n_blocks_ == 3
