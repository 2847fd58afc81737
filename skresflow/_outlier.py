"""ResidualFlowOutlierDetector: low density under a Residual Flow = outlier."""

from numbers import Real

import numpy as np
import torch.distributed as dist
from sklearn.base import OutlierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._density import ResidualFlowDensity
from ._distributed import DataParallel

# contamination="auto": offset_ is this quantile of the training log-densities.
AUTO_LEVEL = 0.01


class ResidualFlowOutlierDetector(OutlierMixin, ResidualFlowDensity):
    """Outlier and novelty detection with a Residual Flow density.

    A :class:`ResidualFlowDensity` is fitted to the training rows; a row is an
    outlier when its log-density is below the threshold ``offset_``.

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
    n_blocks, hidden_dims, hidden_channels, n_fc_blocks, n_bins, image_shape, \
lipschitz_coeff, activation, logdet_estimator, n_exact_terms, logdet_grad, \
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

    Examples
    --------
    >>> import numpy as np
    >>> from skresflow import ResidualFlowOutlierDetector
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> det = ResidualFlowOutlierDetector(n_blocks=2, hidden_dims=(16,), max_iter=5,
    ...                                   n_iter_no_change=None, random_state=0).fit(X)
    >>> det.predict([[0.0, 0.0], [8.0, 8.0]])
    array([ 1, -1])
    """

    _parameter_constraints = {
        **ResidualFlowDensity._parameter_constraints,
        "contamination": [
            StrOptions({"auto"}),
            Interval(Real, 0, 0.5, closed="right"),
        ],
    }

    def __init__(
        self,
        *,
        contamination="auto",
        n_blocks="auto",
        hidden_dims="auto",
        hidden_channels=32,
        n_fc_blocks=2,
        n_bins=None,
        image_shape=None,
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
        self.n_blocks = n_blocks
        self.hidden_dims = hidden_dims
        self.hidden_channels = hidden_channels
        self.n_fc_blocks = n_fc_blocks
        self.n_bins = n_bins
        self.image_shape = image_shape
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
        """Fit the density, then set ``offset_`` (see ``contamination``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or images
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Per-row weights of the log-likelihood and of the quantile that
            sets ``offset_``.

        Returns
        -------
        self
        """
        super().fit(X, sample_weight=sample_weight)
        return self._set_offset(X, sample_weight)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None):
        """One more epoch over ``X``, then a new ``offset_``."""
        super().partial_fit(X, sample_weight=sample_weight)
        return self._set_offset(X, sample_weight)

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


def _weighted_quantile(values, q, weights=None):
    """``q``-quantile of ``values`` (linear interpolation when unweighted)."""
    if weights is None:
        return np.quantile(values, q)
    weights = np.asarray(weights, dtype=np.float64)
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    index = np.searchsorted(cumulative, q * cumulative[-1], side="right")
    return values[order][min(index, len(values) - 1)]
