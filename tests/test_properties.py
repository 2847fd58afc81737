"""Property-based tests: edge and adversarial inputs never crash, hang or give NaN.

For any input the estimator either returns a correct result (finite, the right
shape, float64; ``inverse_transform`` undoes ``transform``) or raises a clear
``ValueError``. Models are tiny so that each example costs a few milliseconds.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skresflow import ResidualFlowDensity

TINY = dict(
    n_blocks=1,
    hidden_dims=(8,),
    max_iter=1,
    n_iter_no_change=None,
    batch_size=64,
    random_state=0,
    device="cpu",
)
FAST = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, bool]


@st.composite
def tabular_data(draw, min_rows=1, max_rows=40, max_features=4):
    """Rows of mixed scales with, at times, constant or duplicated columns and
    outliers; cast to any of ``DTYPES``."""
    n = draw(st.integers(min_rows, max_rows))
    d = draw(st.integers(1, max_features))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    log_scale = draw(st.lists(st.floats(-8, 8), min_size=d, max_size=d))
    X = rng.normal(size=(n, d)) * 10.0 ** np.array(log_scale)
    X += draw(st.sampled_from([0.0, 1.0, -1e6]))
    kind = draw(st.sampled_from(["plain", "constant", "duplicate", "outlier"]))
    column = draw(st.integers(0, d - 1))
    if kind == "constant":
        X[:, column] = X[0, column]
    elif kind == "duplicate" and d > 1:
        X[:, column] = X[:, (column + 1) % d]
    elif kind == "outlier":
        X[draw(st.integers(0, n - 1)), column] = draw(
            st.sampled_from([1e12, -1e15, 1e30])
        )
    dtype = draw(st.sampled_from(DTYPES))
    if dtype is bool:
        return X > np.median(X, axis=0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)  # (half the range: float(int64 max) overflows)
        return np.clip(np.round(X), info.min // 2, info.max // 2).astype(dtype)
    with np.errstate(over="ignore"):
        return X.astype(dtype)  # float16 overflows to inf: must be a ValueError


def _fit_or_value_error(X, **params):
    """Fit quietly (data warnings are expected); ``None`` after a ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy, on inf inputs
        try:
            return ResidualFlowDensity(**{**TINY, **params}).fit(X)
        except ValueError as exc:
            assert str(exc), "a ValueError must say what is wrong"
            return None


def _assert_scores(scores, n):
    assert scores.shape == (n,) and scores.dtype == np.float64
    assert not np.isnan(scores).any()


# ---------------------------------------------------------------- tabular
@FAST
@given(X=tabular_data())
def test_fit_and_score_give_finite_float64_or_value_error(X):
    est = _fit_or_value_error(X)
    if est is None:
        assert (
            not np.all(np.isfinite(X.astype(np.float64)))
            or np.abs(X.astype(np.float64)).max() > np.finfo(np.float32).max
        )
        return
    scores = est.score_samples(X)
    _assert_scores(scores, len(X))
    assert np.all(np.isfinite(scores)), "training rows must score finitely"
    assert est.n_features_in_ == X.shape[1] and est.n_iter_ == 1


@FAST
@given(X=tabular_data(min_rows=2), n_samples=st.integers(1, 5))
def test_sample_is_finite_float64_shaped_like_rows(X, n_samples):
    est = _fit_or_value_error(X)
    if est is None:
        return
    samples = est.sample(n_samples, random_state=0)
    assert samples.shape == (n_samples, X.shape[1]) and samples.dtype == np.float64
    assert np.all(np.isfinite(samples))
    np.testing.assert_array_equal(samples, est.sample(n_samples, random_state=0))


@FAST
@given(X=tabular_data())
def test_transform_inverse_transform_round_trip(X):
    est = _fit_or_value_error(X)
    if est is None:
        return
    Z = est.transform(X)
    assert Z.shape == X.shape and Z.dtype == np.float64 and np.all(np.isfinite(Z))
    X_back = est.inverse_transform(Z)
    assert X_back.shape == X.shape and X_back.dtype == np.float64
    # The fixed-point inverse is accurate relative to the row's size where the flow
    # works (after the internal standardisation; a row far outside the data, e.g.
    # an outlier that fell in the validation split, is large there), in every
    # feature, since the blocks mix features.
    X64 = X.astype(np.float64)
    standardise = est.flow_.layers[0]
    scale, shift = standardise.scale.numpy(), standardise.shift.numpy()
    row_size = 1 + np.abs((X64 - shift) / scale).max(axis=1, keepdims=True)
    error = np.abs(X_back - X64) / (scale * row_size)
    assert np.all(error <= 1e-6), f"relative round-trip error {error.max():.3g}"


@FAST
@given(
    X=tabular_data(min_rows=2),
    log_factor=st.floats(-12, 300),
    shift=st.sampled_from([0.0, 1e10, -1e300]),
)
def test_scores_far_from_the_training_data_are_never_nan(X, log_factor, shift):
    est = _fit_or_value_error(X)
    if est is None:
        return
    far = X.astype(np.float64) * 10.0**log_factor + shift
    far = far[np.all(np.isfinite(far), axis=1)]
    if not len(far):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # overflow to -inf is announced
        scores = est.score_samples(far)
    _assert_scores(scores, len(far))
    assert np.all(scores < np.inf)


@FAST
@given(X=tabular_data(min_rows=2), log_scale=st.floats(-8, 300))
def test_inverse_transform_of_any_latent_is_finite(X, log_scale):
    est = _fit_or_value_error(X)
    if est is None:
        return
    Z = np.random.default_rng(0).normal(size=(3, X.shape[1])) * 10.0**log_scale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a far latent may not converge: announced
        X_back = est.inverse_transform(Z)
    assert X_back.shape == Z.shape and X_back.dtype == np.float64
    assert not np.isnan(X_back).any()


@settings(max_examples=15, deadline=None, database=None)
@given(X=tabular_data(min_rows=2, max_rows=20))
def test_a_row_scores_the_same_alone_and_in_a_batch(X):
    est = _fit_or_value_error(X)
    if est is None:
        return
    batch = est.score_samples(X)
    alone = np.array([est.score_samples(X[i : i + 1])[0] for i in range(len(X))])
    np.testing.assert_allclose(alone, batch, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None, database=None)
@given(
    n_bins=st.integers(2, 20),
    n=st.integers(2, 30),
    d=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_discrete_values_sample_valid_levels(n_bins, n, d, seed):
    X = np.random.default_rng(seed).integers(0, n_bins, size=(n, d))
    est = _fit_or_value_error(X, n_bins=n_bins)
    scores = est.score_samples(X)
    _assert_scores(scores, n)
    # (Not <= 0: a score is one dequantisation draw of the bound, not its mean,
    # and exceeds 0 where the model squeezes its mass inside one bin.)
    assert np.all(np.isfinite(scores))
    samples = est.sample(4, random_state=0)
    assert samples.shape == (4, d) and np.all(np.isfinite(samples))
    assert np.all((samples >= 0) & (samples <= n_bins - 1))
    np.testing.assert_array_equal(samples, np.round(samples))


# --------------------------------------------------------- invalid inputs
BAD_INPUTS = [
    (lambda X: X[:, 0], "Expected 2D array"),
    (lambda X: X[:0], "minimum of 1 is required"),
    (lambda X: np.where(X > 1, np.nan, X), "NaN"),
    (lambda X: np.where(X > 1, np.inf, X), "infinity"),
    (lambda X: X[:, :1], "features"),
    (lambda X: X.reshape(len(X), 1, 2), r"X has 1 features"),
    (lambda X: X.astype(str).astype(object) + "x", "could not convert"),
    (lambda X: X.astype(np.complex128) + 1j, "[Cc]omplex"),
]


@pytest.fixture(scope="module")
def fitted():
    X = np.random.default_rng(0).normal(size=(50, 2))
    with torch.random.fork_rng(devices=[]):
        return ResidualFlowDensity(**TINY).fit(X), X


@pytest.mark.parametrize("corrupt, match", BAD_INPUTS)
@pytest.mark.parametrize(
    "method", ["score_samples", "transform", "inverse_transform", "score"]
)
def test_bad_inputs_are_value_errors(fitted, method, corrupt, match):
    est, X = fitted
    with pytest.raises(ValueError, match=match):
        getattr(est, method)(corrupt(X))


@pytest.mark.parametrize("corrupt, match", BAD_INPUTS[:4] + BAD_INPUTS[6:])
def test_bad_training_inputs_are_value_errors(fitted, corrupt, match):
    with pytest.raises(ValueError, match=match):
        ResidualFlowDensity(**TINY).fit(corrupt(fitted[1]))


@pytest.mark.parametrize("n_samples", [0, -3, 1.5, "2", None])
def test_bad_n_samples_is_a_value_error(fitted, n_samples):
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        fitted[0].sample(n_samples)


# ------------------------------------------------------------------ pandas
def test_dataframes_keep_feature_names(fitted):
    pd = pytest.importorskip("pandas")
    X = fitted[1]
    frame = pd.DataFrame(X, columns=["height", "weight"])
    est = ResidualFlowDensity(**TINY).fit(frame)
    np.testing.assert_array_equal(est.feature_names_in_, ["height", "weight"])
    scores = est.score_samples(frame)
    _assert_scores(scores, len(X))
    assert est.transform(frame).shape == X.shape
    with pytest.raises(ValueError, match="feature names should match"):
        est.score_samples(frame.rename(columns={"weight": "mass"}))
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        np.testing.assert_array_equal(scores, est.score_samples(X))


@pytest.mark.parametrize("dtype", ["float32", "float64", "Int64", "int8"])
def test_dataframes_of_any_numeric_dtype(dtype, fitted):
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame((fitted[1] * 10).round(), columns=["a", "b"]).astype(dtype)
    est = ResidualFlowDensity(**TINY).fit(frame)
    _assert_scores(est.score_samples(frame), len(frame))


# ------------------------------------------------------------------ images
@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None)
@given(
    height=st.integers(2, 6),
    width=st.integers(2, 6),
    channels=st.integers(1, 2),
    n_bins=st.sampled_from([2, 17, 256]),
    layout=st.sampled_from(["3d", "4d", "flat"]),
)
def test_images_of_any_small_shape(height, width, channels, n_bins, layout):
    shape = (channels, height, width)
    rng = np.random.default_rng(0)
    X = rng.integers(0, n_bins, size=(12, *shape)).astype(np.float64)
    params = dict(n_bins=n_bins, hidden_channels=4, n_fc_blocks=1)
    if layout == "3d":
        if channels > 1:
            return
        X = X[:, 0]
    elif layout == "flat":
        X, params["image_shape"] = X.reshape(len(X), -1), shape
    est = _fit_or_value_error(X, **params)
    _assert_scores(est.score_samples(X), len(X))
    samples = est.sample(2, random_state=0)
    assert samples.shape == (2, *X.shape[1:]) and np.all(np.isfinite(samples))
    Z = est.transform(X)
    assert Z.shape == (len(X), int(np.prod(shape))) and np.all(np.isfinite(Z))
