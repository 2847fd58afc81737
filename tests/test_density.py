import io
import pickle
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks

import skresflow._base as base_module
import skresflow._density as density_module
from skresflow import ResidualFlowDensity
from skresflow.core.train import Trainer
from skresflow.datasets import make_toy

SMALL = dict(n_blocks=2, hidden_dims=(16,), max_iter=3, batch_size=64, random_state=0)

EXPECTED_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data": (
        "mini-batch training: repeating or removing rows changes which rows share a "
        "batch, so the optimisation path (not the objective) differs"
    ),
}


def _expected_failures(estimator):
    return EXPECTED_FAILURES


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(
    [ResidualFlowDensity(**SMALL)], expected_failed_checks=_expected_failures
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _fit(X, **params):
    return ResidualFlowDensity(**{**SMALL, "n_iter_no_change": None, **params}).fit(X)


@pytest.fixture(scope="module")
def moons():
    return make_toy("moons", 600, random_state=0)


@pytest.fixture(scope="module")
def fitted(moons):
    return _fit(moons, max_iter=8, hidden_dims=(32, 32))


def test_density_integrates_to_one_in_odd_units(moons):
    scale, shift = 100.0, 1000.0
    est = _fit(moons * scale + shift, max_iter=5, hidden_dims=(32,))
    lo = (moons.min(0) - 2.5) * scale + shift
    hi = (moons.max(0) + 2.5) * scale + shift
    gx, gy = (np.linspace(lo[i], hi[i], 300) for i in range(2))
    grid = np.stack(np.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    mass = np.exp(est.score_samples(grid)).sum() * (gx[1] - gx[0]) * (gy[1] - gy[0])
    assert mass == pytest.approx(1.0, abs=0.02)


def test_normalised_in_six_dimensions_by_importance_sampling():
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((400, 6))
    X = (Z + 0.5 * np.sin(np.roll(Z, 1, axis=1))) * np.linspace(0.5, 3, 6) + 3.0
    est = _fit(X, max_iter=4)
    # Proposal: a Gaussian 1.5 times as wide as the data; integral = E_q[p / q].
    mean, cov = X.mean(0), 2.25 * np.cov(X.T)
    Q = rng.multivariate_normal(mean, cov, size=40_000)
    diff = Q - mean
    log_q = -0.5 * np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    log_q -= 0.5 * (np.linalg.slogdet(2 * np.pi * cov)[1])
    ratio = np.exp(est.score_samples(Q) - log_q)
    stderr = ratio.std() / np.sqrt(ratio.size)
    assert stderr < 0.02 and abs(ratio.mean() - 1.0) < 4 * stderr


def test_pipeline_and_grid_search(moons):
    pipe = make_pipeline(StandardScaler(), ResidualFlowDensity(**SMALL))
    search = GridSearchCV(pipe, {"residualflowdensity__n_blocks": [1, 2]}, cv=2)
    with pytest.warns(ConvergenceWarning):
        search.fit(moons)
    assert search.best_params_["residualflowdensity__n_blocks"] in (1, 2)
    assert np.isfinite(search.score(moons))


def test_pickle_and_joblib_round_trips_give_identical_scores(fitted, moons):
    expected = fitted.score_samples(moons)
    clone = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(clone.score_samples(moons), expected)
    buffer = io.BytesIO()
    joblib.dump(fitted, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).score_samples(moons), expected)


def test_random_state_reproducible(moons):
    a = _fit(moons, random_state=3).score_samples(moons)
    b = _fit(moons, random_state=3).score_samples(moons)
    c = _fit(moons, random_state=4).score_samples(moons)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_global_random_state_untouched(moons):
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    _fit(moons, max_iter=1).sample(5)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def test_samples_are_typical_under_the_model(fitted):
    held_out = make_toy("moons", 2000, random_state=1)
    samples = fitted.sample(2000, random_state=0)
    assert samples.shape == (2000, 2) and samples.dtype == np.float64
    gap = fitted.score(samples) - fitted.score(held_out)
    assert abs(gap) < 0.15
    np.testing.assert_array_equal(samples, fitted.sample(2000, random_state=0))


def test_transform_inverse_round_trip(fitted, moons):
    Z = fitted.transform(moons)
    np.testing.assert_allclose(fitted.inverse_transform(Z), moons, atol=1e-8)
    # Latent codes of the training data are roughly standard normal.
    assert np.all(np.abs(Z.mean(0)) < 0.3) and np.all(np.abs(Z.std(0) - 1) < 0.3)


def test_scores_are_batch_independent_with_the_unbiased_estimator(moons, monkeypatch):
    monkeypatch.setattr(density_module, "EXACT_SCORE_MAX_FEATURES", 1)
    est = _fit(moons, max_iter=1, logdet_estimator="unbiased")
    assert est.scoring_estimator_ == "unbiased"
    full = est.score_samples(moons[:50])
    np.testing.assert_allclose(est.score_samples(moons[10:20]), full[10:20], rtol=1e-12)
    np.testing.assert_array_equal(est.score_samples(moons[:50]), full)


def test_unbiased_score_close_to_exact(fitted, moons, monkeypatch):
    exact = fitted.score_samples(moons[:200])
    monkeypatch.setattr(density_module, "EXACT_SCORE_MAX_FEATURES", 1)
    fitted._configure_for_scoring(fitted.flow_)
    try:
        approx = fitted.score_samples(moons[:200])
    finally:
        monkeypatch.undo()
        fitted._configure_for_scoring(fitted.flow_)
    # Row-hashed probes: errors of distinct rows are nearly independent, so the
    # mean is accurate even though single rows carry Hutchinson noise.
    assert abs(np.mean(approx - exact)) < 0.03
    assert np.abs(approx - exact).mean() < 0.2


def test_history_and_verbose(moons, capsys):
    est = _fit(moons, max_iter=2, verbose=1)
    out = capsys.readouterr().out
    assert "epoch    2/2" in out and "val NLL" in out and "left" in out
    assert [h["epoch"] for h in est.history_] == [1, 2]
    assert est.n_iter_ == 2
    for h in est.history_:
        assert {"train_loss", "seconds"} <= set(h)
        assert np.isfinite(h["train_loss"])
    # Validation runs about every EVAL_STEPS steps, and always after the last epoch.
    assert np.isfinite(est.history_[-1]["val_loss"])


def test_validation_runs_every_few_epochs_on_small_data(moons):
    est = _fit(moons, max_iter=12, n_iter_no_change=None, batch_size=64)
    evaluated = [h["epoch"] for h in est.history_ if "val_loss" in h]
    n_train = len(moons) - int(0.1 * len(moons))
    every = -(-base_module.EVAL_STEPS // -(-n_train // 64))
    expected = sorted({*range(every, 13, every), 12})
    assert evaluated == expected


def test_auto_training_length_counts_optimiser_steps(moons, monkeypatch):
    monkeypatch.setattr(base_module, "AUTO_STEPS", {"tabular": 40, "image": 40})
    monkeypatch.setattr(density_module, "AUTO_STEPS_LOW_DIM", 20)
    est = _fit(moons, max_iter="auto", learning_rate="auto")
    assert est.n_iter_ == 3  # 20 steps; 540 training rows / 64 = 9 steps per epoch
    wide = np.hstack([moons] * 5)  # 10 features: more than the low-dimensional 8
    assert _fit(wide, max_iter="auto").n_iter_ == 5  # 40 steps
    assert est._learning_rate() == density_module.AUTO_LEARNING_RATE_LOW_DIM == 2e-2
    wide_est = _fit(wide, max_iter=1, learning_rate="auto")
    assert wide_est._learning_rate() == base_module.AUTO_LEARNING_RATE["tabular"]
    defaults = ResidualFlowDensity().get_params()
    assert defaults["max_iter"] == defaults["n_iter_no_change"] == "auto"


def test_small_low_dimensional_tables_train_for_fewer_steps(monkeypatch):
    monkeypatch.setattr(base_module, "AUTO_STEPS", {"tabular": 30, "image": 30})
    monkeypatch.setattr(density_module, "AUTO_STEPS_LOW_DIM", 20)
    monkeypatch.setattr(density_module, "AUTO_STEPS_LOW_DIM_SMALL", 10)
    rng = np.random.default_rng(0)

    def epochs(X, **params):
        params = {"n_iter_no_change": None, "batch_size": 64, **params}
        return ResidualFlowDensity(random_state=0, **params).fit(X).n_iter_

    # 100 rows: 90 for training, 2 steps per epoch; 300 rows: 270, 5 steps.
    assert epochs(rng.normal(size=(100, 2))) == 5  # 10 steps
    assert epochs(rng.normal(size=(300, 2))) == 4  # 20 steps
    assert epochs(rng.normal(size=(100, 10))) == 15  # 30 steps above 8 features
    assert epochs(rng.normal(size=(100, 2)), max_iter=3) == 3


def test_auto_architecture_is_smaller_for_small_tables(monkeypatch):
    # Built, not trained: the architecture is resolved before the first step.
    monkeypatch.setattr(base_module, "AUTO_STEPS", {"tabular": 1, "image": 1})
    monkeypatch.setattr(density_module, "AUTO_STEPS_LOW_DIM", 1)
    monkeypatch.setattr(density_module, "AUTO_STEPS_LOW_DIM_SMALL", 1)
    rng = np.random.default_rng(0)

    def arch(X, method="fit", **params):
        est = ResidualFlowDensity(n_iter_no_change=None, random_state=0, **params)
        getattr(est, method)(X)
        return est.n_blocks_, est.hidden_dims_

    # 198 rows leave 198 - 19 = 179 for training, 199 leave 180.
    assert arch(rng.normal(size=(198, 3))) == (4, (16, 16))
    assert arch(rng.normal(size=(199, 3))) == (16, (32, 32))
    assert arch(rng.normal(size=(150, 20))) == (2, (16, 16))
    assert arch(rng.normal(size=(300, 20))) == (8, (32, 32))
    # The rule counts training rows: without a validation split 198 are not small.
    assert arch(rng.normal(size=(198, 3)), validation_fraction=0) == (16, (32, 32))
    # partial_fit's first chunk says nothing about the size of the data.
    assert arch(rng.normal(size=(50, 3)), "partial_fit") == (16, (32, 32))
    # Explicit values are kept.
    assert arch(rng.normal(size=(100, 3)), n_blocks=3, hidden_dims=(8,)) == (3, (8,))


@pytest.mark.parametrize(
    "n_rows, fraction, n_val",
    [
        (30, 0.1, 3),
        (19, 0.1, 2),
        (4, 0.1, 2),
        (3, 0.1, 0),
        (13, 0.5, 6),
        (30, 0.9, 27),
        (20, 0.95, 0),
        (30, 0, 0),
    ],
)
def test_validation_split_keeps_two_rows_for_tiny_tables(n_rows, fraction, n_val):
    est = ResidualFlowDensity(validation_fraction=fraction)
    est._generator = torch.Generator().manual_seed(0)
    train, val = est._split(n_rows)
    assert len(val) == n_val
    assert sorted(torch.cat([train, val]).tolist()) == list(range(n_rows))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("seed", range(6))
def test_validation_rows_of_zero_weight_are_monitored_unweighted(seed):
    # 12 rows, 2 held out: for some seeds both have weight 0 (a NaN loss before).
    X = np.random.default_rng(0).normal(size=(12, 2))
    w = np.r_[np.ones(4), np.zeros(8)]
    params = {**SMALL, "max_iter": 20, "n_iter_no_change": 5, "random_state": seed}
    est = ResidualFlowDensity(**params).fit(X, sample_weight=w)
    assert all(np.isfinite(h["val_loss"]) for h in est.history_ if "val_loss" in h)
    assert np.isfinite(est.score_samples(X)).all()


def test_data_parallel_validation_loss_of_zero_weight_rows_is_finite(moons):
    class OneRank:  # the reductions of a one-process group
        def sum(self, values):
            return [float(v) for v in values]

    est = ResidualFlowDensity(**SMALL).fit(moons)
    flow, state = est.flow_, est.flow_.state_dict()
    val = (torch.tensor(moons[:8]), torch.zeros(8, dtype=torch.float64))
    unweighted = est._evaluate(flow, state, (val[0], torch.ones(8)))
    est._dp = OneRank()
    assert est._validation_loss(flow, state, val) == pytest.approx(unweighted)
    weighted = (val[0], torch.linspace(0, 1, 8, dtype=torch.float64))
    assert est._validation_loss(flow, state, weighted) == pytest.approx(
        est._evaluate(flow, state, weighted)
    )


def test_convergence_warning_names_the_monitored_loss(moons):
    params = {**SMALL, "max_iter": 2, "n_iter_no_change": 100}
    with pytest.warns(ConvergenceWarning, match="the validation loss"):
        ResidualFlowDensity(**params).fit(moons)
    with pytest.warns(ConvergenceWarning, match=r"training \(no validation split\)"):
        ResidualFlowDensity(**params, validation_fraction=0).fit(moons)


def test_early_stopping_restores_best(moons, monkeypatch):
    monkeypatch.setattr(base_module, "EVAL_STEPS", 1)  # validate every epoch
    est = ResidualFlowDensity(
        **{**SMALL, "max_iter": 60, "n_iter_no_change": 2, "tol": 10.0}
    ).fit(moons)
    # Epoch 1 is the best; after two epochs without a 10-nat gain the learning
    # rate decays over two more, then training stops.
    assert est.n_iter_ == 5
    assert est.score(moons) == pytest.approx(-est.history_[0]["val_loss"], abs=0.5)


def test_a_plateau_anneals_the_learning_rate_then_stops(moons, monkeypatch, capsys):
    monkeypatch.setattr(base_module, "EVAL_STEPS", 1)  # validate every epoch
    rates = []
    step = Trainer.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.learning_rate())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", recording_step)
    params = {**SMALL, "max_iter": 40, "n_iter_no_change": 3, "batch_size": 100}
    params["verbose"] = 1
    losses = iter([5.0, 4.0] + [4.0] * 3 + [3.0] + [3.5] * 3 + [9.0] * 40)
    monkeypatch.setattr(
        ResidualFlowDensity, "_validation_loss", lambda *args: next(losses)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # stopped, not cut off
        est = ResidualFlowDensity(**params).fit(moons)
    # Plateau after epoch 2 (epochs 3-5): the rate decays over 3 more epochs
    # (an improvement at epoch 6 is kept), then the fit ends.
    assert est.n_iter_ == 8
    per_epoch = len(rates) // est.n_iter_
    anneal = rates[5 * per_epoch :]
    assert all(a > b for a, b in zip(anneal, anneal[1:], strict=False))
    assert anneal[-1] < 0.1 * rates[5 * per_epoch - 1]
    assert "epoch 5: no improvement for 3 epochs; the learning rate decays until " \
        "epoch 8" in capsys.readouterr().out
    assert est.history_[-1]["val_loss"] == 3.5


def test_no_anneal_on_the_training_loss(moons, monkeypatch):
    # Without a validation split the monitored loss is the training loss, which
    # any decay of the rate lowers: plain early stopping.
    monkeypatch.setattr(base_module, "EVAL_STEPS", 1)
    params = {**SMALL, "max_iter": 60, "n_iter_no_change": 2, "tol": 10.0}
    est = ResidualFlowDensity(**params, validation_fraction=0).fit(moons)
    assert est.n_iter_ == 3


def test_no_anneal_once_the_schedule_is_nearly_over(moons, monkeypatch):
    monkeypatch.setattr(base_module, "EVAL_STEPS", 1)
    params = {**SMALL, "max_iter": 5, "n_iter_no_change": 3, "tol": 10.0}
    est = ResidualFlowDensity(**params).fit(moons)
    assert est.n_iter_ == 4  # patience runs out at epoch 4; one epoch was left


def test_convergence_warning_when_still_improving(moons):
    with pytest.warns(ConvergenceWarning, match="increase max_iter"):
        ResidualFlowDensity(**{**SMALL, "max_iter": 1, "tol": 0.0}).fit(moons)


def test_warm_start_and_partial_fit(moons):
    est = _fit(moons, max_iter=2, warm_start=True)
    before = est.score(moons)
    est.fit(moons)
    assert est.n_iter_ == 4 and len(est.history_) == 4
    assert est.score(moons) > before - 0.05
    inc = ResidualFlowDensity(**SMALL)
    for _ in range(3):
        inc.partial_fit(moons)
    assert inc.n_iter_ == 3


def test_partial_fit_continues_one_optimisation(moons):
    params = {**SMALL, "validation_fraction": 0.0}
    steps_per_epoch = -(-len(moons) // params["batch_size"])
    inc = ResidualFlowDensity(**params)
    for _ in range(2):
        inc.partial_fit(moons)
    state = inc._incremental_state["trainer"]
    assert state["n_steps"] == 2 * steps_per_epoch  # Adam's step count carried over
    assert state["optimizer"]["state"]  # and its moments
    # Pickling between calls loses nothing: the continuation is bit-identical.
    resumed = pickle.loads(pickle.dumps(inc))
    for est in (inc, resumed):
        est.partial_fit(moons)
    np.testing.assert_array_equal(
        inc.score_samples(moons), resumed.score_samples(moons)
    )
    # A partial_fit loop learns about as well as fit for as many epochs (a fresh
    # optimiser per call, with its warm-up and decay inside each epoch, did not).
    for _ in range(9):
        inc.partial_fit(moons)
    full = ResidualFlowDensity(**{**params, "max_iter": 12}).fit(moons)
    assert inc.score(moons) > full.score(moons) - 0.03  # fresh optimisers: -0.10
    # fit starts afresh.
    inc.set_params(max_iter=1).fit(moons)
    assert inc._incremental_state is None and inc.n_iter_ == 1


def test_sample_weight_moves_mass(moons):
    upper = moons[:, 1] > 0.25

    def gap(sample_weight):
        est = ResidualFlowDensity(**{**SMALL, "max_iter": 6, "n_iter_no_change": None})
        scores = est.fit(moons, sample_weight=sample_weight).score_samples(moons)
        return scores[upper].mean() - scores[~upper].mean()

    assert gap(np.where(upper, 1.0, 1e-3)) > gap(None) + 0.3


@pytest.mark.parametrize(
    "X, match",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "infinity"),
        (np.array([[1 + 1j, 2.0], [1.0, 2.0]]), "Complex data not supported"),
        (np.array([["a", "b"], ["c", "d"]], dtype=object), "could not convert"),
        (np.array([1.0, 2.0, 3.0]), "Expected 2D array, got 1D array instead"),
        (np.empty((0, 2)), "0 sample"),
    ],
)
def test_bad_data(X, match):
    with pytest.raises(ValueError, match=match):
        ResidualFlowDensity(**SMALL).fit(X)


def test_wrong_number_of_features(fitted):
    for method in ("score_samples", "transform", "inverse_transform", "score"):
        with pytest.raises(
            ValueError,
            match="X has 3 features, but ResidualFlowDensity is expecting 2 features",
        ):
            getattr(fitted, method)(np.zeros((4, 3)))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"lipschitz_coeff": 1.0}, "'lipschitz_coeff' parameter"),
        ({"activation": "sigmoid"}, "'activation' parameter"),
        ({"logdet_estimator": "approx"}, "'logdet_estimator' parameter"),
        ({"logdet_grad": "fast"}, "'logdet_grad' parameter"),
        ({"n_blocks": 0}, "'n_blocks' parameter"),
        ({"validation_fraction": 1.0}, "'validation_fraction' parameter"),
    ],
)
def test_bad_parameters(moons, params, match):
    with pytest.raises(InvalidParameterError, match=match):
        ResidualFlowDensity(**{**SMALL, **params}).fit(moons)


@pytest.mark.parametrize("n_samples", [0, -1, 2.5])
def test_bad_n_samples(fitted, n_samples):
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        fitted.sample(n_samples)


def test_divergent_learning_rate_never_leaves_a_nan_model(moons):
    try:
        est = _fit(moons, learning_rate=1e4, max_iter=2)
    except FloatingPointError as exc:
        assert "non-finite" in str(exc)
    else:
        assert np.all(np.isfinite(est.score_samples(moons)))


def test_lipschitz_bound_holds_after_fit(fitted):
    assert all(bound < 1 for bound in fitted.flow_.lipschitz_bounds())


def test_keyboard_interrupt_keeps_best_model(moons, monkeypatch):
    from skresflow._base import BaseResidualFlow

    original, calls = BaseResidualFlow._train_epoch, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(BaseResidualFlow, "_train_epoch", interrupted)
    with pytest.warns(UserWarning, match="interrupted after 2 epochs"):
        est = _fit(moons, max_iter=10)
    assert est.n_iter_ == 2 and np.all(np.isfinite(est.score_samples(moons)))


def test_non_finite_losses_are_skipped_then_reported(moons, monkeypatch):
    from skresflow._base import BaseResidualFlow

    def poisoned(self, flow, X, w, generator):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(BaseResidualFlow, "_batch_loss", poisoned)
    with pytest.raises(
        FloatingPointError, match="consecutive training steps gave a non-finite loss"
    ):
        _fit(moons, max_iter=2)


def test_unavailable_device_is_a_clear_error(moons):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        _fit(moons, device="cuda")


def test_constant_feature_warns_and_scores_stay_finite():
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=200), np.full(200, 3.0)]
    with pytest.warns(UserWarning, match=r"1 constant feature\(s\) \(indices \[1\]\)"):
        est = _fit(X, max_iter=2)
    assert np.all(np.isfinite(est.score_samples(X)))


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_extreme_scales(scale):
    X = np.random.default_rng(0).normal(size=(200, 2)) * scale
    est = _fit(X, max_iter=2)
    scores = est.score_samples(X)
    assert np.all(np.isfinite(scores))
    # Densities scale as 1 / scale^2 in 2-D.
    assert np.median(scores) == pytest.approx(-2 * np.log(scale) - 2.8, abs=1.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_dtype(moons, dtype, monkeypatch):
    seen = set()
    original = ResidualFlowDensity._batch_loss

    def recording(self, flow, X, *args, **kwargs):
        seen.update({X.dtype, next(flow.parameters()).dtype})
        return original(self, flow, X, *args, **kwargs)

    monkeypatch.setattr(ResidualFlowDensity, "_batch_loss", recording)
    est = ResidualFlowDensity(**{**SMALL, "dtype": dtype}).fit(moons)
    assert seen == {getattr(torch, dtype)}
    assert next(est.flow_.parameters()).dtype == torch.float64  # scoring: float64
    # Warm start and partial_fit keep training in that precision.
    est.set_params(warm_start=True, max_iter=1).fit(moons)
    est.partial_fit(moons)
    assert seen == {getattr(torch, dtype)}
    assert np.isfinite(est.score(moons))


def test_float64_training_matches_float32_in_quality(moons):
    single = ResidualFlowDensity(**SMALL).fit(moons).score(moons)
    double = ResidualFlowDensity(**{**SMALL, "dtype": "float64"}).fit(moons)
    assert abs(double.score(moons) - single) < 0.05
