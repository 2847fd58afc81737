"""Fit-time checks of the training data that warn about degenerate columns.

A continuous density is degenerate on constant features, on features that
take few distinct values (integer codes, counts, values recorded at a coarse
resolution) and on features that are strictly monotone functions of each other
(copies, affine maps, logs): the likelihood can grow without bound. A few
extreme values squeeze the rest of a
feature under the internal standardisation. None of these is an error,
but each silently ruins a model, so each gets a warning with its remedy.
"""

import warnings

import numpy as np

# Training runs in float32: larger magnitudes overflow to inf there.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# A value this many interquartile ranges from its feature's median is "extreme".
OUTLIER_IQRS = 1e3
# Shared ranks are looked for on at most this many rows and features.
_MAX_ROWS, _MAX_FEATURES = 5000, 256
_MAX_QUANTILE_ROWS = 20_000
# A feature with at most this many distinct values, and at most a quarter as
# many as rows, is discrete (every value repeated about four times or more).
DISCRETE_MAX_LEVELS = 100


def check_training_data(X, *, warn=True, stacklevel=2):
    """Raise for values training cannot represent; warn about degenerate features.

    ``X`` has shape ``(n_samples, *event_shape)``, continuous values (no
    ``n_bins``). ``stacklevel`` points the warnings at the user's ``fit`` call.
    """
    X = X.reshape(X.shape[0], -1)
    largest = float(np.max(np.abs(X))) if X.size else 0.0
    if largest > FLOAT32_MAX:
        raise ValueError(
            f"X has values up to {largest:.3g} in magnitude, beyond the float32 "
            f"range used in training ({FLOAT32_MAX:.3g}); rescale X."
        )
    if not warn or X.shape[0] < 2:
        return
    varying = np.ptp(X, axis=0) > 0
    for message in (
        _constant_message(varying),
        _discrete_message(X, varying),
        _collinear_message(X, varying),
        _outlier_message(X, varying),
    ):
        if message:
            warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def _sample_rows(X):
    """Every k-th row, at most ``_MAX_QUANTILE_ROWS`` of them."""
    return X[:: -(-X.shape[0] // _MAX_QUANTILE_ROWS)]


def _constant_message(varying):
    index = np.flatnonzero(~varying)
    if index.size:
        return (
            f"X has {index.size} constant feature(s) (indices {index[:10].tolist()}): "
            "a continuous density is degenerate there and the likelihood can grow "
            "without bound. Drop them, or use n_bins for discrete values."
        )


def _discrete_message(X, varying):
    columns = np.flatnonzero(varying)
    # A subsample sees no more levels than the whole column, and its own row
    # count sets the threshold, so this stays a statement about repeated values.
    sub = _sample_rows(X)[:, columns]
    limit = min(DISCRETE_MAX_LEVELS, sub.shape[0] // 4)
    if limit < 2 or not columns.size:
        return
    ordered = np.sort(sub, axis=0)
    levels = 1 + np.count_nonzero(ordered[1:] != ordered[:-1], axis=0)
    few = levels <= limit
    if few.any():
        rows = f"{sub.shape[0]} rows" + (" sampled" if sub.shape[0] < len(X) else "")
        return (
            f"X has {few.sum()} feature(s) with few distinct values (indices "
            f"{columns[few][:10].tolist()}: {levels[few].max()} or fewer values in "
            f"{rows}): a continuous density is degenerate on repeated values and "
            "the likelihood can grow without bound as the model puts spikes on "
            "them. Add uniform noise of one resolution step to those features "
            "(dequantise), or use n_bins for integer levels; a single value "
            "repeated among continuous ones (e.g. many zeros) is better modelled "
            "apart."
        )


def _collinear_message(X, varying):
    columns = np.flatnonzero(varying)
    # With few rows, unrelated columns share their ranks by chance.
    if X.shape[0] < 20 or not 2 <= columns.size <= _MAX_FEATURES:
        return
    # Ranks, not correlations: one outlier makes any two columns look correlated,
    # while a feature that is a strictly monotone function of another (a copy, an
    # affine map, a log) gives the same ranks up to reversal and is degenerate too.
    rows = slice(None, None, max(1, X.shape[0] // _MAX_ROWS))
    ranks = _oriented_ranks(X[rows][:, columns])
    _, group = np.unique(ranks, axis=1, return_inverse=True)
    group = group.ravel()
    pairs = [
        (int(columns[a]), int(columns[b]))
        for b in range(columns.size)
        for a in np.flatnonzero(group[:b] == group[b])[:1]
    ]
    pairs = [p for p in pairs[:10] if _same_ranks(X[:, p])]
    if pairs:
        return (
            f"X has duplicated features, or features that are monotone functions "
            f"of each other (index pairs {pairs}): a continuous density is "
            "degenerate on them and the likelihood can grow without bound. Drop one "
            "feature of each pair (or reduce X with PCA)."
        )


def _oriented_ranks(X):
    """Dense ranks of each column, reversed where the column starts by decreasing."""
    ranks = np.stack(
        [np.unique(c, return_inverse=True)[1].ravel() for c in X.T], axis=1
    )
    first_move = np.argmax(ranks != ranks[0], axis=0)
    falling = ranks[first_move, np.arange(X.shape[1])] < ranks[0]
    return np.where(falling, ranks.max(0) - ranks, ranks)


def _same_ranks(X):
    ranks = _oriented_ranks(X)
    return bool(np.all(ranks[:, 0] == ranks[:, 1]))


def _outlier_message(X, varying):
    columns = np.flatnonzero(varying)
    if X.shape[0] < 4 or not columns.size:
        return
    # Quartiles of a subsample are plenty for a 1000-IQR threshold, and cheap.
    sub = np.ascontiguousarray(_sample_rows(X).T)
    q1, median, q3 = np.percentile(sub[columns], [25, 50, 75], axis=1)
    iqr = q3 - q1
    spread = np.maximum(X.max(0)[columns] - median, median - X.min(0)[columns])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(iqr > 0, spread / iqr, 0.0)
    extreme = ratio > OUTLIER_IQRS
    if extreme.any():
        index = columns[extreme]
        return (
            f"X has extreme values in {index.size} feature(s) (indices "
            f"{index[:10].tolist()}), up to {ratio.max():.3g} interquartile ranges "
            "from the median: the internal standardisation squeezes the rest of "
            "those features and the model will fit them poorly. Remove or clip the "
            "outliers, or transform those features (e.g. np.log1p or sklearn's "
            "QuantileTransformer)."
        )
