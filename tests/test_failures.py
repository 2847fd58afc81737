"""Training, scoring and inversion failures: loud, and never a model that scores NaN.

Covers issue 9: divergence (huge learning rate), extreme outliers, constant or
duplicated features, overflow far outside the training data, and models whose
Lipschitz bound no longer holds (hand-edited weights, tampered files).
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import skresflow
from skresflow import ResidualFlowDensity
from skresflow._base import BaseResidualFlow
from skresflow.core import LipschitzError
from skresflow.core.train import NonFiniteLossError

TINY = dict(
    n_blocks=2,
    hidden_dims=(8,),
    max_iter=2,
    learning_rate=1e-3,
    n_iter_no_change=None,
    random_state=0,
    device="cpu",
)
DIVERGED = r"training diverged.*Lower learning_rate \(got 10000\)"


def _fit(X, **params):
    return ResidualFlowDensity(**{**TINY, **params}).fit(X)


def _normal(n=200, d=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.fixture(scope="module")
def fitted():
    with torch.random.fork_rng(devices=[]):
        return _fit(_normal(), max_iter=3)


def _assert_finite_scores(est, X):
    scores = est.score_samples(X)
    assert scores.dtype == np.float64 and np.all(np.isfinite(scores))


# ------------------------------------------------------------------ divergence
@pytest.mark.parametrize("validation_fraction", [0.0, 0.2])
def test_huge_learning_rate_raises_and_stores_no_model(validation_fraction):
    est = ResidualFlowDensity(
        **{**TINY, "learning_rate": 1e4, "validation_fraction": validation_fraction}
    )
    with pytest.raises(NonFiniteLossError, match=DIVERGED):
        est.fit(_normal())
    assert not hasattr(est, "flow_")
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_diverged_warm_start_keeps_the_previous_model():
    X = _normal()
    est = _fit(X, warm_start=True)
    before = est.score_samples(X)
    est.set_params(learning_rate=1e4)
    with pytest.raises(NonFiniteLossError, match=DIVERGED):
        est.fit(X)
    np.testing.assert_array_equal(est.score_samples(X), before)


def test_a_diverged_epoch_is_dropped_with_a_warning(monkeypatch):
    original, calls = BaseResidualFlow._train_epoch, []

    def diverges_in_epoch_3(self, *args):
        calls.append(1)
        loss = original(self, *args)
        return float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(BaseResidualFlow, "_train_epoch", diverges_in_epoch_3)
    match = (
        r"loss was non-finite in epoch\(s\) \[3\]; the model of epoch 2 was kept\. "
        r"Lower learning_rate \(got 0\.001\)"
    )
    with pytest.warns(UserWarning, match=match):
        est = _fit(_normal(), max_iter=3, validation_fraction=0.0)
    assert est.n_iter_ == 3 and [h["epoch"] for h in est.history_] == [1, 2, 3]
    _assert_finite_scores(est, _normal())


def test_a_model_that_scores_nan_is_never_stored(monkeypatch):
    # Finite training losses, but averaged weights that overflow when scoring
    # (what a huge learning rate does to ActNorm's log-scale).
    original = BaseResidualFlow._make_scorer

    def overflowing(self, flow, state):
        state = {
            k: v.fill_(1e4) if k.endswith("log_scale") else v for k, v in state.items()
        }
        return original(self, flow, state)

    monkeypatch.setattr(BaseResidualFlow, "_make_scorer", overflowing)
    with pytest.raises(NonFiniteLossError, match="training diverged"):
        _fit(_normal(), validation_fraction=0.0)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_early_stopping_ignores_non_finite_validation_losses(monkeypatch):
    original, calls = BaseResidualFlow._evaluate, []

    def nan_in_epoch_2(self, *args):
        calls.append(1)
        return float("nan") if len(calls) == 2 else original(self, *args)

    monkeypatch.setattr(BaseResidualFlow, "_evaluate", nan_in_epoch_2)
    # Batches of 2: enough steps per epoch for a validation loss every epoch.
    with pytest.warns(UserWarning, match=r"epoch\(s\) \[2\]; the model of epoch 1"):
        est = _fit(
            _normal(),
            max_iter=2,
            batch_size=2,
            n_iter_no_change=5,
            validation_fraction=0.2,
        )
    assert len(calls) == 2
    _assert_finite_scores(est, _normal())


def test_interrupt_before_the_first_epoch_is_still_a_runtime_error(monkeypatch):
    def interrupted(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(BaseResidualFlow, "_train_epoch", interrupted)
    with pytest.warns(UserWarning, match="interrupted after 0 epochs"):
        with pytest.raises(RuntimeError, match="before one epoch finished"):
            _fit(_normal())


# ------------------------------------------------------------- degenerate data
def test_clean_data_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(_normal(d=3))


def test_extreme_outlier_warns_with_remedy_and_scores_stay_finite():
    X = _normal()
    X[0, 1] = 1e12
    match = (
        r"extreme values in 1 feature\(s\) \(indices \[1\]\), up to .* "
        r"interquartile ranges.*clip the outliers"
    )
    with pytest.warns(UserWarning, match=match):
        est = _fit(X)
    _assert_finite_scores(est, X)
    assert est.score_samples(X[:1])[0] < np.median(est.score_samples(X))


@pytest.mark.parametrize(
    "make_x, message",
    [
        (
            lambda rng: rng.integers(0, 5, size=(200, 2)).astype(float),
            r"2 feature\(s\) with few distinct values \(indices \[0, 1\]: 5 or fewer",
        ),
        # Recorded at a coarse resolution (like iris' 0.1 cm), one column only.
        (
            lambda rng: np.c_[rng.normal(size=400), np.round(rng.normal(size=400), 1)],
            r"1 feature\(s\) with few distinct values \(indices \[1\]:",
        ),
    ],
    ids=["integer-codes", "coarse-resolution"],
)
def test_discrete_features_warn_with_remedy(make_x, message):
    X = make_x(np.random.default_rng(0))
    with pytest.warns(UserWarning, match=message + r".*dequantise.*n_bins"):
        est = _fit(X)
    _assert_finite_scores(est, X)


@pytest.mark.parametrize(
    "X",
    [
        # Fine resolution: thousands of distinct values.
        np.round(np.random.default_rng(0).normal(size=(2000, 2)), 3),
        # Integer levels, dequantised by the user.
        np.random.default_rng(0).integers(0, 5, size=(200, 2))
        + np.random.default_rng(1).uniform(size=(200, 2)),
        # Seven rows: too few to call any repetition a pattern.
        np.array([[0.0, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 0], [0, 0]]),
    ],
    ids=["fine-resolution", "dequantised", "seven-rows"],
)
def test_continuous_or_tiny_data_gives_no_discrete_warning(X):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(X, max_iter=1)


def test_heavy_but_ordinary_tails_do_not_warn():
    X = np.random.default_rng(0).standard_t(3, size=(2000, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(X, max_iter=1)


@pytest.mark.parametrize(
    "make_copy, pair",
    [
        (lambda x: x, (0, 2)),
        (lambda x: 1 - 3 * x, (0, 2)),
        (np.exp, (0, 2)),
    ],
    ids=["duplicate", "affine", "monotone"],
)
def test_duplicated_features_warn_and_scores_stay_finite(make_copy, pair):
    X = _normal(d=2)
    X = np.c_[X, make_copy(X[:, 0])]
    match = rf"monotone functions of each other \(index pairs \[{pair}\]\).*Drop one"
    with pytest.warns(UserWarning, match=match.replace("(0, 2)", r"\(0, 2\)")):
        est = _fit(X)
    _assert_finite_scores(est, X)


def test_duplicate_check_needs_enough_rows():
    # Three rows: unrelated columns share their ranks by chance.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(_normal(n=3, d=8))


@pytest.mark.parametrize("n_constant", [1, 3])
def test_constant_features_warn_and_longer_fits_stay_finite(n_constant):
    X = _normal(d=3)
    X[:, 3 - n_constant :] = 1.0
    with pytest.warns(UserWarning, match=rf"{n_constant} constant feature\(s\)"):
        est = _fit(X, max_iter=6, learning_rate=1e-2)
    _assert_finite_scores(est, X)


def test_duplicated_features_with_a_long_fit_stay_finite():
    X = _normal(d=1)
    X = np.c_[X, X]
    with pytest.warns(UserWarning, match="duplicated features"):
        est = _fit(X, max_iter=6, learning_rate=1e-2)
    _assert_finite_scores(est, X)


# ------------------------------------------------------------------ magnitudes
def test_values_beyond_float32_are_a_clear_error():
    X = _normal()
    X[3, 0] = 1e300
    with pytest.raises(ValueError, match=r"values up to 1e\+300.*float32 range"):
        _fit(X)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_scales_beyond_float32_squares_fit_finitely(scale):
    # The standardising statistics of float32 data at 1e20 overflowed (var 1e40).
    X = _normal() * scale
    est = _fit(X)
    scores = est.score_samples(X)
    assert np.all(np.isfinite(scores))
    assert np.median(scores) == pytest.approx(-2 * np.log(scale) - 2.8, abs=1.0)


def test_scoring_far_outside_the_data_gives_minus_inf_not_nan(fitted):
    X = np.array([[1.7e308, 0.0], [0.0, 0.0], [1e300, 0.0]])
    with pytest.warns(UserWarning, match=r"\(indices \[0\]\) are so far outside"):
        scores = fitted.score_samples(X)
    assert scores[0] == -np.inf and np.isfinite(scores[1]) and scores[2] < -1e10
    assert not np.isnan(scores).any()


def test_transform_far_outside_the_data_is_a_clear_error(fitted):
    with pytest.raises(ValueError, match=r"indices \[1\]\) are so far outside"):
        fitted.transform(np.array([[0.0, 0.0], [1.7e308, 0.0]]))


# ------------------------------------------------------------ Lipschitz failures
def _edit_weight_data(est, factor=50.0):
    """Scale a weight through ``.data``: the layer's version counter never sees it."""
    est = copy.deepcopy(est)
    est.flow_.refresh_lipschitz()  # settle the copy first
    est.flow_.blocks[1].g[0].weight.data.mul_(factor)
    return est


LIPSCHITZ = r"residual block 1 has Lipschitz constant \d+\.\d+ >= 1"


@pytest.mark.parametrize(
    "action",
    [
        lambda est: est.sample(5, random_state=0),
        lambda est: est.inverse_transform(np.zeros((2, 2))),
        lambda est: est.flow_.inverse(torch.zeros(2, 2, dtype=torch.float64)),
    ],
    ids=["sample", "inverse_transform", "flow.inverse"],
)
def test_hand_edited_weights_are_caught_before_inversion(fitted, action, monkeypatch):
    est = _edit_weight_data(fitted)
    inverted = []
    block = est.flow_.blocks[1]
    monkeypatch.setattr(block, "inverse", lambda y: inverted.append(y) or y)
    with pytest.raises(LipschitzError, match=LIPSCHITZ):
        action(est)
    assert not inverted  # detected before any block was inverted


def test_hand_edited_model_is_not_saved(fitted, tmp_path):
    est = _edit_weight_data(fitted)
    with pytest.raises(LipschitzError, match=LIPSCHITZ):
        est.save(tmp_path / "model.skrf")
    assert not (tmp_path / "model.skrf").exists()


def test_coefficient_above_one_is_caught(fitted):
    est = copy.deepcopy(fitted)
    for layer in est.flow_.blocks[0].g:
        if hasattr(layer, "coeff"):
            layer.coeff = 3.0
            with torch.no_grad():
                layer.weight.mul_(10.0)  # so that the new coefficient binds
    with pytest.raises(LipschitzError, match="residual block 0"):
        est.sample(2, random_state=0)


def test_tracked_in_place_edits_are_renormalised(fitted):
    est = copy.deepcopy(fitted)
    with torch.no_grad():
        est.flow_.blocks[1].g[0].weight.mul_(50.0)  # bumps the version counter
    assert all(bound < 1 for bound in est.flow_.lipschitz_bounds())
    X = _normal(n=20)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X)), X, atol=1e-6)


def _tamper_dense(state, prefix, factor=100.0):
    """Inflate a weight's top singular value, and point the stored power-iteration
    vectors and sigma at its second one (a fixed point of power iteration)."""
    w = state[prefix + "weight"]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s.clone()
    s[0] *= factor
    state[prefix + "weight"] = u @ torch.diag(s) @ vh
    state[prefix + "_u"], state[prefix + "_v"] = u[:, 1].clone(), vh[1].clone()
    state[prefix + "sigma"] = s[1].clone()


def _rewrite(path, tamper):
    """Edit a saved model's weights; a checksum is no signature, so fix it too."""
    from skresflow._persistence import _digest

    payload = torch.load(path, weights_only=True)
    tamper(payload["state"])
    metadata = json.loads(payload["metadata"])
    metadata["sha256"] = _digest(payload["state"])
    payload["metadata"] = json.dumps(metadata)
    torch.save(payload, path)


def test_stale_dense_power_iteration_state_is_recomputed_on_load(fitted, tmp_path):
    path = tmp_path / "model.skrf"
    fitted.save(path)
    _rewrite(path, lambda state: _tamper_dense(state, "layers.4.g.0."))
    est = skresflow.load(path)  # dense norms come from an exact SVD
    assert all(bound < 1 for bound in est.flow_.lipschitz_bounds())
    X = _normal(n=20)
    _assert_finite_scores(est, X)
    np.testing.assert_allclose(est.inverse_transform(est.transform(X)), X, atol=1e-6)


# ------------------------------------------------------------------ images
@pytest.fixture(scope="module")
def image_model():
    X = np.random.default_rng(0).integers(0, 17, size=(40, 1, 4, 4)).astype(float)
    with torch.random.fork_rng(devices=[]):
        est = ResidualFlowDensity(
            **{**TINY, "n_blocks": 1, "max_iter": 1},
            hidden_channels=4,
            n_fc_blocks=1,
            n_bins=17,
        ).fit(X)
    return est, X


def test_image_model_with_edited_conv_weights_is_caught(image_model):
    est = copy.deepcopy(image_model[0])
    est.flow_.refresh_lipschitz()
    est.flow_.blocks[0].g[1].weight.data.mul_(50.0)
    with pytest.raises(LipschitzError, match="residual block 0"):
        est.sample(2, random_state=0)


def test_image_model_at_another_input_size_is_refused(image_model):
    est, X = image_model
    with pytest.raises(ValueError, match=r"rows of shape \(1, 6, 6\).*\(1, 4, 4\)"):
        est.score_samples(np.zeros((2, 1, 6, 6)))


def test_conv_block_at_a_larger_size_is_renormalised(image_model):
    # The operator norm of a zero-padded convolution grows with the input size;
    # the layer re-estimates it (and re-normalises) for every new size.
    block = copy.deepcopy(image_model[0].flow_.blocks[0])
    for size in (4, 9, 4):
        x = torch.randn(3, 1, size, size, dtype=torch.float64)
        with torch.no_grad():
            y, _ = block(x)
            assert block.lipschitz_bound() < 1
            np.testing.assert_allclose(block.inverse(y), x, atol=1e-8)


def _tamper_conv(state, prefix, spatial=(4, 4)):
    """Inflate one output channel, and point the conv layer's stored power-iteration
    state at the *smallest* singular pair of its operator: a fixed point that a
    warm start accepts as converged."""
    w = state[prefix + "weight"]
    w[0] *= 100.0
    c_out, c_in = w.shape[:2]
    n_in = c_in * spatial[0] * spatial[1]
    basis = torch.eye(n_in, dtype=w.dtype).view(n_in, c_in, *spatial)
    matrix = torch.nn.functional.conv2d(basis, w, padding=w.shape[-1] // 2)
    u, s, vh = torch.linalg.svd(matrix.flatten(1).T, full_matrices=False)
    state[prefix + "_u"] = u[:, -1].reshape(1, c_out, *spatial).clone()
    state[prefix + "_v"] = vh[-1].reshape(1, c_in, *spatial).clone()
    state[prefix + "sigma"] = s[-1].clone()


def test_tampered_conv_power_iteration_state_is_caught_on_load(image_model, tmp_path):
    path = tmp_path / "images.skrf"
    image_model[0].save(path)
    _rewrite(path, lambda state: _tamper_conv(state, "layers.2.g.1."))
    with pytest.raises(ValueError, match="residual block 0 has Lipschitz constant"):
        skresflow.load(path)
