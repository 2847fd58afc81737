import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import roc_auc_score
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks

# The two-process gloo launcher of the data-parallel tests.
from test_distributed import finish_rank, init_gloo, needs_gloo, spawn_two_ranks

import skresflow
import skresflow._outlier as outlier_module
from skresflow import ResidualFlowDensity, ResidualFlowOutlierDetector

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

SMALL = dict(n_blocks=2, hidden_dims=(16,), max_iter=5, random_state=0)

EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data": (
        "mini-batch training: repeating or removing rows changes which rows share a "
        "batch, so the optimisation path (not the objective) differs"
    ),
}


def _expected_failures(estimator):
    return EXPECTED_FAILURES


@parametrize_with_checks(
    [ResidualFlowOutlierDetector(**SMALL)], expected_failed_checks=_expected_failures
)
def test_sklearn_compatible_small(estimator, check):
    check(estimator)


# The default architecture with a short training run: a fully default fit runs
# at least about 550 optimiser steps (max_iter="auto" with early stopping), over
# a minute per fit on a shared CPU core, and the checks fit it many times.
@pytest.mark.slow
@parametrize_with_checks(
    [ResidualFlowOutlierDetector(max_iter=20)],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_compatible_defaults(estimator, check):
    check(estimator)


def test_defaults_are_those_of_residual_flow_density():
    detector = ResidualFlowOutlierDetector().get_params()
    assert detector.pop("contamination") == "auto"
    assert detector == ResidualFlowDensity().get_params()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 2)) * [1.0, 0.5] + [3.0, -1.0]


@pytest.fixture(scope="module")
def fitted(data):
    return ResidualFlowOutlierDetector(**SMALL).fit(data)


def test_decision_function_and_predict(fitted, data):
    scores = fitted.score_samples(data)
    np.testing.assert_allclose(fitted.decision_function(data), scores - fitted.offset_)
    pred = fitted.predict(data)
    assert pred.dtype.kind == "i" and set(np.unique(pred)) <= {-1, 1}
    np.testing.assert_array_equal(pred, np.where(scores >= fitted.offset_, 1, -1))
    far = np.array([[3.0, -1.0], [30.0, 30.0]])
    np.testing.assert_array_equal(fitted.predict(far), [1, -1])


def test_auto_offset_is_the_one_percent_training_quantile(fitted, data):
    expected = np.quantile(fitted.score_samples(data), outlier_module.AUTO_LEVEL)
    assert fitted.offset_ == pytest.approx(expected)
    assert np.sum(fitted.predict(data) == -1) == 3


@pytest.mark.parametrize("contamination", [0.05, 0.2, 0.5])
def test_contamination_flags_that_share_of_the_training_rows(data, contamination):
    det = ResidualFlowOutlierDetector(**SMALL, contamination=contamination)
    pred = det.fit_predict(data)
    assert np.sum(pred == -1) == round(contamination * len(data))
    np.testing.assert_array_equal(pred, det.predict(data))


def test_weighted_contamination(data):
    weights = np.ones(len(data))
    weights[:150] = 3.0
    det = ResidualFlowOutlierDetector(**SMALL, contamination=0.1)
    det.fit(data, sample_weight=weights)
    flagged = det.predict(data) == -1
    share = weights[flagged].sum() / weights.sum()
    assert share == pytest.approx(0.1, abs=0.02)


def test_novelty_detection(data):
    det = ResidualFlowOutlierDetector(**{**SMALL, "max_iter": 15}).fit(data)
    rng = np.random.default_rng(1)
    inliers = rng.normal(size=(200, 2)) * [1.0, 0.5] + [3.0, -1.0]
    novel = rng.normal(size=(200, 2)) * [1.0, 0.5] + [3.0, 2.0]
    truth = np.r_[np.ones(200), np.zeros(200)]
    auroc = roc_auc_score(truth, det.decision_function(np.r_[inliers, novel]))
    assert auroc > 0.95


def test_same_density_as_residual_flow_density(data):
    det = ResidualFlowOutlierDetector(**SMALL).fit(data)
    params = {k: v for k, v in det.get_params().items() if k != "contamination"}
    density = ResidualFlowDensity(**params).fit(data)
    np.testing.assert_array_equal(det.score_samples(data), density.score_samples(data))


def test_save_load_and_pickle_round_trips(fitted, data, tmp_path):
    path = tmp_path / "det.skf"
    fitted.save(path)
    loaded = skresflow.load(path)
    assert type(loaded) is ResidualFlowOutlierDetector
    assert loaded.offset_ == fitted.offset_
    np.testing.assert_array_equal(
        loaded.decision_function(data), fitted.decision_function(data)
    )
    clone = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(clone.predict(data), fitted.predict(data))


def test_partial_fit_updates_the_offset(data):
    det = ResidualFlowOutlierDetector(**SMALL, contamination=0.1)
    det.partial_fit(data)
    first = det.offset_
    det.partial_fit(data)
    assert det.n_iter_ == 2 and det.offset_ != first
    assert np.sum(det.predict(data) == -1) == 30


@pytest.mark.parametrize("contamination", [0.0, 0.6, "high", -0.1])
def test_bad_contamination(data, contamination):
    with pytest.raises(InvalidParameterError, match="'contamination' parameter"):
        ResidualFlowOutlierDetector(**SMALL, contamination=contamination).fit(data)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_non_finite_offset_is_loud(data, monkeypatch):
    det = ResidualFlowOutlierDetector(**{**SMALL, "max_iter": 1}, contamination=0.1)
    monkeypatch.setattr(
        ResidualFlowOutlierDetector,
        "score_samples",
        lambda self, X: np.full(len(X), -np.inf),
    )
    with pytest.raises(FloatingPointError, match="offset_ is (-inf|nan)"):
        det.fit(data)


def _data_parallel_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    X[:100] *= 3.0  # rank 0's rows are wider: its own quantile would be lower
    rows = slice(0, 100) if rank == 0 else slice(100, 300)
    weights = np.linspace(0.5, 1.5, 300)[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = ResidualFlowOutlierDetector(**SMALL, contamination=0.1, device="cpu")
        weighted = clone(plain).fit(X[rows], sample_weight=weights)
        plain.fit(X[rows])
    result = {
        "offset": plain.offset_,
        "weighted_offset": weighted.offset_,
        "scores": plain.score_samples(X),
        "weighted_scores": weighted.score_samples(X),
    }
    finish_rank(rank, out, result)


@needs_gloo
def test_data_parallel_ranks_share_the_offset(tmp_path):
    a, b = spawn_two_ranks(_data_parallel_worker, tmp_path)
    np.testing.assert_array_equal(a["scores"], b["scores"])  # the same model
    assert a["offset"] == b["offset"]
    assert a["weighted_offset"] == b["weighted_offset"]
    # The quantile of all 300 training rows, not of either rank's own rows.
    assert a["offset"] == pytest.approx(np.quantile(a["scores"], 0.1))
    expected = outlier_module._weighted_quantile(
        a["weighted_scores"], 0.1, np.linspace(0.5, 1.5, 300)
    )
    assert a["weighted_offset"] == pytest.approx(expected)
