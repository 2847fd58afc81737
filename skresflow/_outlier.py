"""ResidualFlowOutlierDetector: low density under a Residual Flow = outlier."""

from numbers import Real

import numpy as np
import torch.distributed as dist
from sklearn.base import OutlierMixin, _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _check_sample_weight, check_is_fitted

from ._density import ResidualFlowDensity
from ._distributed import DataParallel

# contamination="auto": offset_ is this quantile of the training log-densities.
AUTO_LEVEL = 0.01


class ResidualFlowOutlierDetector(OutlierMixin, ResidualFlowDensity):
    """Outlier and novelty detection with a Residual Flow density.

    A :class:`ResidualFlowDensity` is fitted to the training rows; a row is an
    outlier when its score, the log-density or (``outlier_score=
    "likelihood_ratio"``) a likelihood ratio against a simple background
    model, is below the threshold ``offset_``.

    Parameters
    ----------
    contamination : "auto" or float, default="auto"
        Expected share of outliers in the training data, in (0, 0.5]: then
        ``offset_`` is that quantile of the training rows' log-densities, so
        that share of the training rows is flagged. ``"auto"``: the 1% quantile
        (``AUTO_LEVEL``), a threshold for clean training data. Held-out inliers
        score lower than training rows on average, so expect somewhat more than
        1% of new inliers below it; set ``offset_`` from validation data when
        the false-alarm rate matters.
    outlier_score : {"log_density", "likelihood_ratio"}, default="log_density"
        What :meth:`score_samples` returns, and so what ``offset_``,
        :meth:`decision_function`, :meth:`predict` and :meth:`fit_predict`
        use (higher is more normal either way).

        - ``"log_density"``: ``log p(x)``, the flow's log-density.
        - ``"likelihood_ratio"``: ``log p(x) - log q(x)``, with ``q`` a
          background model of independent features fitted on the same
          training rows (``background_``, see Notes): what is left is what the
          flow learnt beyond each feature on its own. With ``n_bins``, ``q``
          is a product of per-feature categorical distributions over the
          ``n_bins`` values (add-one smoothing); without, a product of
          per-feature Gaussians (the weighted mean and standard deviation of
          each feature, as the flow's own standardisation computes them).
    n_blocks, hidden_dims, hidden_channels, n_fc_blocks, n_bins, image_shape, \
factor_out, lipschitz_coeff, activation, logdet_estimator, n_exact_terms, logdet_grad, \
max_iter, batch_size, learning_rate, weight_decay, validation_fraction, \
n_iter_no_change, tol, random_state, device, dtype, verbose, warm_start
        As in :class:`ResidualFlowDensity`, with the same defaults (the
        ``"auto"`` architecture, learning rate and training length, early
        stopping on a 10% validation split; ``docs/benchmarks/novelty.md``
        compares them with the detector's earlier, smaller defaults). Even a
        tiny table gets hundreds of optimiser steps by default; pass a small
        ``max_iter`` for quick experiments.

    Attributes
    ----------
    offset_ : float
        Threshold on :meth:`score_samples`: ``decision_function`` is
        ``score_samples - offset_`` and negative values are outliers. In a
        data-parallel fit (a ``torch.distributed`` process group) the quantile
        is taken over the training rows of all processes, so that every
        process gets the same ``offset_``.
    background_ : ndarray of shape (n_features, n_bins) or (n_features, 2)
        Only with ``outlier_score="likelihood_ratio"``: the background model
        ``q``, fitted on the training rows (weighted by ``sample_weight``).
        ``n_features`` counts the values of a row (``C * H * W`` for images,
        in the order of the flattened pixels). With ``n_bins``: ``log q`` of
        each value ``0..n_bins-1`` of each feature. Without: the mean and
        standard deviation of each feature's Gaussian (columns 0 and 1). In a
        data-parallel fit the counts and sums are added up over all processes,
        so every process gets the same background.
    flow_, n_features_in_, feature_names_in_, n_iter_, history_, device_, \
n_blocks_, hidden_dims_, logdet_estimator_, scoring_estimator_
        As in :class:`ResidualFlowDensity`.

    See Also
    --------
    ResidualFlowDensity, sklearn.ensemble.IsolationForest,
    sklearn.neighbors.LocalOutlierFactor

    Notes
    -----
    Fitted on clean data, the detector is a novelty detector (``predict`` on
    new rows); fitted on contaminated data with ``contamination`` set, it flags
    that share of the training rows (``fit_predict``). Log-densities compare
    rows of the same kind only: deep generative models can give higher density
    to simpler data from elsewhere (Nalisnick et al. 2019, "Do deep generative
    models know what they don't know?").

    The likelihood ratio (``outlier_score="likelihood_ratio"``) is a remedy
    for that (Schirrmeister et al. 2020, "Understanding anomaly detection with
    deep invertible networks through hierarchies of distributions and
    features"; Serrà et al. 2020, "Input complexity and out-of-distribution
    detection with likelihood-based generative models"): the background ``q``
    explains the low-level statistics that all data share (how much ink each
    pixel carries), and ``log p(x) - log q(x)`` measures how much better the
    flow explains ``x`` than those statistics do. On digits it ranked unseen
    classes better than the log-density on 20 of 21 (class split, seed)
    pairs (``docs/benchmarks/novelty.md``). It suits discrete data best: the
    categorical background is bounded below (``log q >= -log(n + n_bins)``
    per feature, ``n`` the total training weight), so the credit a row gets
    for rare values is bounded too. The Gaussian background of continuous
    data is not: its log-density falls quadratically far from the data, as
    the flow's roughly does, so rows far from all the data can get
    unremarkable or even high ratios. On 2-D standard normal data the ideal
    flow equals the background and the ratio is 0 everywhere; the short fit
    of the first example below gives the training rows ratios in [-0.33,
    0.29] and ``[8, 8]`` a ratio of 11.4, an inlier (its log-density, -56.0,
    makes it an outlier). The ratio then measures only the dependence
    between features, not how unusual each feature is: use it on continuous
    data when that is the question, and the log-density otherwise. The
    background costs ``n_features * n_bins`` numbers (``2 * n_features``
    without ``n_bins``) and one pass over the training rows.

    Examples
    --------
    >>> import numpy as np
    >>> from skresflow import ResidualFlowOutlierDetector
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> det = ResidualFlowOutlierDetector(n_blocks=2, hidden_dims=(16,), max_iter=5,
    ...                                   n_iter_no_change=None, random_state=0).fit(X)
    >>> det.predict([[0.0, 0.0], [8.0, 8.0]])
    array([ 1, -1])

    Pixels with a likelihood-ratio score:

    >>> from sklearn.datasets import load_digits
    >>> X = load_digits().data
    >>> det = ResidualFlowOutlierDetector(
    ...     outlier_score="likelihood_ratio", n_bins=17, n_blocks=2,
    ...     hidden_dims=(16,), max_iter=1, n_iter_no_change=None, random_state=0,
    ... ).fit(X[:200])
    >>> det.background_.shape
    (64, 17)
    """

    _parameter_constraints = {
        **ResidualFlowDensity._parameter_constraints,
        "contamination": [
            StrOptions({"auto"}),
            Interval(Real, 0, 0.5, closed="right"),
        ],
        "outlier_score": [StrOptions({"log_density", "likelihood_ratio"})],
    }

    def __init__(
        self,
        *,
        contamination="auto",
        outlier_score="log_density",
        n_blocks="auto",
        hidden_dims="auto",
        hidden_channels=32,
        n_fc_blocks=2,
        n_bins=None,
        image_shape=None,
        factor_out=False,
        lipschitz_coeff=0.97,
        activation="lipswish",
        logdet_estimator="auto",
        n_exact_terms=2,
        logdet_grad="memory_efficient",
        max_iter="auto",
        batch_size=256,
        learning_rate="auto",
        weight_decay=0.0,
        validation_fraction=0.1,
        n_iter_no_change="auto",
        tol=1e-4,
        random_state=None,
        device="auto",
        dtype="float32",
        verbose=0,
        warm_start=False,
    ):
        self.contamination = contamination
        self.outlier_score = outlier_score
        self.n_blocks = n_blocks
        self.hidden_dims = hidden_dims
        self.hidden_channels = hidden_channels
        self.n_fc_blocks = n_fc_blocks
        self.n_bins = n_bins
        self.image_shape = image_shape
        self.factor_out = factor_out
        self.lipschitz_coeff = lipschitz_coeff
        self.activation = activation
        self.logdet_estimator = logdet_estimator
        self.n_exact_terms = n_exact_terms
        self.logdet_grad = logdet_grad
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.warm_start = warm_start

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Fit the density (and ``background_``), then set ``offset_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or images
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Per-row weights of the log-likelihood, of the background model's
            counts and sums, and of the quantile that sets ``offset_``.

        Returns
        -------
        self
        """
        super().fit(X, sample_weight=sample_weight)
        self._fit_background(X, sample_weight)
        return self._set_offset(X, sample_weight)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None):
        """One more epoch over ``X``, then a new ``background_`` (if any) and
        ``offset_``, both from this ``X``."""
        super().partial_fit(X, sample_weight=sample_weight)
        self._fit_background(X, sample_weight)
        return self._set_offset(X, sample_weight)

    def _fit_background(self, X, sample_weight):
        if self.outlier_score != "likelihood_ratio":
            self.__dict__.pop("background_", None)  # a refit drops an older one
            return
        X = self._validate_X(X, reset=False)
        X = X.reshape(X.shape[0], -1)
        weights = _check_sample_weight(sample_weight, X, dtype=np.float64)
        dp = DataParallel.current()
        if self.n_bins is None:
            self.background_ = _gaussian_background(X, weights, dp)
        else:
            X = X.astype(np.intp)
            self.background_ = _categorical_background(X, weights, self.n_bins, dp)

    def _set_offset(self, X, sample_weight):
        level = AUTO_LEVEL if self.contamination == "auto" else self.contamination
        scores, weights = self._training_scores(X, sample_weight)
        self.offset_ = float(_weighted_quantile(scores, level, weights))
        if not np.isfinite(self.offset_):
            raise FloatingPointError(
                f"the outlier threshold offset_ is {self.offset_}: the fitted "
                "density gives non-finite log-densities. Lower learning_rate or "
                "check X for extreme values."
            )
        return self

    def _training_scores(self, X, sample_weight):
        """Scores and weights of the training rows; of all ranks' rows, in rank
        order, in a data-parallel fit, so that every rank gets the same offset_."""
        scores = self.score_samples(X)
        weights = None if sample_weight is None else np.asarray(sample_weight, float)
        dp = DataParallel.current()
        if dp is None:
            return scores, weights
        parts = [None] * dp.world_size
        dist.all_gather_object(parts, (scores, weights))
        if all(w is None for _, w in parts):
            return np.concatenate([s for s, _ in parts]), None
        weights = [np.ones(len(s)) if w is None else w for s, w in parts]
        return np.concatenate([s for s, _ in parts]), np.concatenate(weights)

    def score_samples(self, X):
        """Score of each row of ``X`` (see ``outlier_score``): higher is more
        normal.

        Returns
        -------
        scores : ndarray of shape (n_samples,), float64
            ``log p(x)`` in nats, or with ``outlier_score="likelihood_ratio"``
            ``log p(x) - log q(x)``.
        """
        log_p = super().score_samples(X)
        if self.outlier_score != "likelihood_ratio":
            return log_p
        return log_p - self._log_background(X)

    def _log_background(self, X):
        """``log q(x)`` per row under ``background_``."""
        if not hasattr(self, "background_"):
            raise NotFittedError(
                f"This {type(self).__name__} has no background_: it was fitted "
                "with outlier_score='log_density'. Fit it again with "
                "outlier_score='likelihood_ratio'."
            )
        X = self._validate_X(X, reset=False)
        X = X.reshape(X.shape[0], -1)
        if self.n_bins is not None:
            columns = np.arange(X.shape[1])
            return self.background_[columns, X.astype(np.intp)].sum(axis=1)
        mean, std = self.background_.T
        z = (X - mean) / std
        return -0.5 * (z**2 + np.log(2 * np.pi)).sum(axis=1) - np.log(std).sum()

    def _restore(self, metadata, state, device):
        super()._restore(metadata, state, device)
        if self.outlier_score == "likelihood_ratio":
            if not hasattr(self, "background_"):
                raise ValueError(
                    "corrupted model file: outlier_score='likelihood_ratio' "
                    "but no background_ is stored."
                )
            self.background_ = np.asarray(self.background_, dtype=np.float64)
            # n_features_in_ counts columns only; images have C * H * W features.
            shape = (int(np.prod(self.event_shape_)), self.n_bins or 2)
            if self.background_.shape != shape:
                raise ValueError(
                    f"corrupted model file: background_ has shape "
                    f"{self.background_.shape}, expected {shape}."
                )
        return self

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for outliers.

        Returns
        -------
        decision : ndarray of shape (n_samples,), float64
        """
        check_is_fitted(self)
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """-1 for outliers, +1 for inliers.

        Returns
        -------
        labels : ndarray of shape (n_samples,), int
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)


def _sum_over_ranks(values, dp):
    """``values`` summed over the ranks of a data-parallel fit (in rank order,
    so every rank gets the same bits); unchanged in a single process."""
    if dp is None:
        return values
    return np.asarray(dp.sum(values.ravel()), dtype=np.float64).reshape(values.shape)


def _categorical_background(X, weights, n_bins, dp):
    """``log q`` of every value of every column of integer ``X``: independent
    categoricals from weighted counts with add-one smoothing (one pseudo-count
    per value keeps every ``log q`` finite, also of values unseen in training)."""
    counts = np.stack(
        [np.bincount(col, weights=weights, minlength=n_bins) for col in X.T]
    )
    counts = _sum_over_ranks(counts, dp) + 1.0
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def _gaussian_background(X, weights, dp):
    """``(n_features, 2)`` weighted means and standard deviations of ``X``."""
    total = _sum_over_ranks(np.array([weights.sum()]), dp)[0]
    mean = _sum_over_ranks(weights @ X, dp) / total
    std = np.sqrt(_sum_over_ranks(weights @ (X - mean) ** 2, dp) / total)
    # As the flow's standardisation (core.standardizer): a feature constant up
    # to rounding keeps scale 1 instead of a degenerate density.
    std = np.where((std <= 1e-6 * np.abs(mean)) | (std == 0), 1.0, std)
    return np.stack([mean, std], axis=1)


def _weighted_quantile(values, q, weights=None):
    """``q``-quantile of ``values`` (linear interpolation when unweighted)."""
    if weights is None:
        return np.quantile(values, q)
    weights = np.asarray(weights, dtype=np.float64)
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    index = np.searchsorted(cumulative, q * cumulative[-1], side="right")
    return values[order][min(index, len(values) - 1)]
