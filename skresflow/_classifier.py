"""ResidualFlowClassifier: a hybrid density + classifier on one Residual Flow."""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._density import ResidualFlowDensity
from ._distributed import DataParallel
from .core import dequantize
from .core.heads import (
    HybridFlow,
    LinearHead,
    MultiscaleHead,
    hybrid_loss,
    scale_channels,
)


class ResidualFlowClassifier(ClassifierMixin, ResidualFlowDensity):
    """Hybrid Residual Flow: a density ``p(x)`` and a classifier ``p(y | x)``.

    One invertible flow maps ``x`` to its latent code ``z``; a classifier head
    reads the flow's features. Training maximises
    ``density_weight * log p(x) + log p(y | x)`` (Nalisnick et al. 2019; Chen
    et al. 2019, section 6), so the model predicts labels and still scores
    densities (:meth:`score_samples`), samples and maps to the latent space.

    Rows labelled ``unlabeled_label`` (-1 by default, sklearn's semi-supervised
    convention) contribute only the density term.

    Parameters
    ----------
    density_weight : float or "per_dim", default="per_dim"
        ``lambda`` of the objective. ``"per_dim"``: ``1 / D`` with ``D`` the
        number of dimensions of a row (all pixels for images); ``1``: the full
        log-likelihood; ``0``: a pure classifier (log-determinants are then
        skipped in training, which is much cheaper).
    head : {"auto", "linear", "multiscale"}, default="auto"
        ``"linear"``: logits linear in the latent code ``z``.
        ``"multiscale"`` (images only): per scale 3x3 conv -> ActNorm -> ReLU ->
        global average pool, concatenated, one linear layer. ``"auto"``:
        multiscale for images, linear otherwise.
    head_channels : int, default=64
        Channels of each scale's convolution in the multiscale head (256 in the
        paper).
    unlabeled_label : int, str or None, default=-1
        Label marking unlabelled rows. None: every value of ``y`` is a class
        (use it when -1 is a real class, as in labels ``{-1, 1}``).
    n_blocks : int or "auto", default=4
        Residual blocks: in total for tabular data, per scale for images
        (``"auto"``: as in :class:`ResidualFlowDensity`).
    hidden_dims : tuple of int, default=(64, 64)
        Hidden widths of each block's MLP branch (images: of the fully connected
        blocks).
    hidden_channels, n_fc_blocks, n_bins, image_shape, lipschitz_coeff, \
activation, logdet_estimator, n_exact_terms, logdet_grad
        As in :class:`ResidualFlowDensity`.
    factor_out : bool, default=False
        As in :class:`ResidualFlowDensity` (images only). The multiscale head
        then reads, at every scale but the last, the channels factored out
        there, and the last scale's feature map (the paper's hybrid model).
    max_iter : int, default=100
        Maximum number of epochs.
    batch_size : int, default=64
    learning_rate : float, default=3e-3
        Peak Adam learning rate (linear warm-up, cosine decay).
    weight_decay : float, default=0.0
    validation_fraction : float, default=0.0
        Share of rows held out to monitor the objective (early stopping keeps
        the best epoch; at least 2 rows from 4 rows on, none if fewer than 2
        would be left for training); 0 monitors the training objective. Off by
        default: monitoring scores the held-out rows' exact density every
        epoch, which costs more than a small training epoch.
    n_iter_no_change : int or None, default=10
        Epochs without improvement before stopping, as in
        :class:`ResidualFlowDensity` (with a validation split, where they run
        out early the learning rate first decays over as many more epochs).
    tol : float, default=1e-4
        Minimum improvement of the monitored objective (nats per row).
    random_state, device, dtype, verbose, warm_start
        As in :class:`ResidualFlowDensity`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels (``unlabeled_label`` excluded).
    density_weight_ : float
        The resolved ``lambda``.
    head_ : str
        The resolved head, "linear" or "multiscale".
    flow_ : skresflow.core.heads.HybridFlow
        The fitted flow and its head (float64, evaluation mode).
    n_features_in_, feature_names_in_, n_iter_, device_, n_blocks_, \
hidden_dims_, logdet_estimator_, scoring_estimator_
        As in :class:`ResidualFlowDensity`.
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss`` and ``val_loss`` (the objective
        ``-(lambda log p(x) + log p(y | x))`` in nats per row), ``seconds``.

    See Also
    --------
    ResidualFlowDensity, ResidualFlowOutlierDetector

    Notes
    -----
    With ``density_weight=1`` the density term (``D`` nats-sized) swamps the
    classification term and accuracy suffers; ``1 / D`` balances them, which is
    the paper's recommended hybrid setting. The density of a hybrid model is a
    proper normalised density whatever ``lambda`` is; only its quality changes.

    References
    ----------
    R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for
    Invertible Generative Modeling. NeurIPS 2019.

    E. Nalisnick, A. Matsukawa, Y. W. Teh, D. Gorur, B. Lakshminarayanan.
    Hybrid Models with Deep and Invertible Features. ICML 2019.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> from skresflow import ResidualFlowClassifier
    >>> X, y = make_blobs(200, centers=2, random_state=0)
    >>> clf = ResidualFlowClassifier(n_blocks=2, hidden_dims=(16,), max_iter=10,
    ...                              learning_rate=1e-2, n_iter_no_change=None,
    ...                              random_state=0).fit(X, y)
    >>> clf.score(X, y) > 0.9
    True
    >>> clf.score_samples(X[:3]).shape
    (3,)
    """

    _parameter_constraints = {
        **ResidualFlowDensity._parameter_constraints,
        "density_weight": [
            Interval(Real, 0, None, closed="left"),
            StrOptions({"per_dim"}),
        ],
        "head": [StrOptions({"auto", "linear", "multiscale"})],
        "head_channels": [Interval(Integral, 1, None, closed="left")],
        "unlabeled_label": [Integral, str, None],
    }

    def __init__(
        self,
        *,
        density_weight="per_dim",
        head="auto",
        head_channels=64,
        unlabeled_label=-1,
        n_blocks=4,
        hidden_dims=(64, 64),
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
        max_iter=100,
        batch_size=64,
        learning_rate=3e-3,
        weight_decay=0.0,
        validation_fraction=0.0,
        n_iter_no_change=10,
        tol=1e-4,
        random_state=None,
        device="auto",
        dtype="float32",
        verbose=0,
        warm_start=False,
    ):
        self.density_weight = density_weight
        self.head = head
        self.head_channels = head_channels
        self.unlabeled_label = unlabeled_label
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

    # -------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the hybrid model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features) or images
        y : array-like of shape (n_samples,)
            Labels of any type; ``unlabeled_label`` marks unlabelled rows.
        sample_weight : array-like of shape (n_samples,), default=None

        Returns
        -------
        self
        """
        reset = not (self.warm_start and hasattr(self, "flow_"))
        return self._fit_labelled(X, y, sample_weight, reset, self.max_iter, True)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """One more epoch over ``(X, y)``.

        Parameters
        ----------
        X, y, sample_weight
            As in :meth:`fit`.
        classes : array-like of shape (n_classes,), default=None
            All the classes, needed on the first call when ``y`` lacks some.

        Returns
        -------
        self
        """
        reset = not hasattr(self, "flow_")
        if reset and classes is not None:
            self.classes_ = np.unique(np.asarray(classes))
        return self._fit_labelled(
            X, y, sample_weight, reset, 1, False, classes, incremental=True
        )

    def _fit_labelled(
        self,
        X,
        y,
        sample_weight,
        reset,
        n_epochs,
        warn,
        classes=None,
        incremental=False,
    ):
        X, y = validate_data(
            self, X, y, reset=reset, dtype=[np.float64, np.float32], allow_nd=True
        )
        check_classification_targets(y)
        codes = self._encode(y, reset=reset and classes is None)
        if reset and sample_weight is not None:
            self._check_weighted_classes(codes, np.asarray(sample_weight, float))
        self._resolve_density_weight(X)
        return self._fit(
            X,
            sample_weight,
            reset=reset,
            n_epochs=n_epochs,
            warn=warn,
            y=torch.as_tensor(codes, dtype=torch.int64),
            incremental=incremental,
        )

    def _encode(self, y, *, reset):
        """Class indices of ``y``, with -1 for unlabelled rows."""
        unlabelled = _is_unlabelled(y, self.unlabeled_label)
        if reset:
            self.classes_ = np.unique(y[~unlabelled])
            dp = DataParallel.current()
            if dp is not None:  # the classes of every rank's rows, on every rank
                self.classes_ = dp.union(self.classes_)
            if len(self.classes_) < 2:
                found = ", ".join(map(repr, self.classes_.tolist())) or "none"
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes; "
                    f"got {len(self.classes_)} class ({found}) among the "
                    "labelled rows." + self._unlabelled_hint(unlabelled)
                )
        codes = np.searchsorted(self.classes_, y[~unlabelled])
        codes = np.minimum(codes, len(self.classes_) - 1)
        unknown = self.classes_[codes] != y[~unlabelled]
        if unknown.any():
            raise ValueError(
                f"y contains labels not in classes_ {self.classes_.tolist()}: "
                f"{np.unique(y[~unlabelled][unknown]).tolist()[:10]}."
            )
        out = np.full(y.shape[0], -1, dtype=np.int64)
        out[~unlabelled] = codes
        return out

    def _unlabelled_hint(self, unlabelled):
        if not unlabelled.any():
            return ""
        return (
            f" {int(unlabelled.sum())} row(s) are labelled "
            f"unlabeled_label={self.unlabeled_label!r} and count as unlabelled; "
            "set unlabeled_label=None if that value is a class."
        )

    def _check_weighted_classes(self, codes, sample_weight):
        if not (sample_weight > 0).any():
            return  # BaseResidualFlow._fit reports all-zero weights
        present = np.unique(codes[(codes >= 0) & (sample_weight > 0)])
        if len(present) < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes with "
                f"positive sample_weight; got {len(present)} class."
            )

    def _resolve_density_weight(self, X):
        if self.density_weight == "per_dim":
            self.density_weight_ = 1.0 / int(np.prod(X.shape[1:]))
        else:
            self.density_weight_ = float(self.density_weight)

    # ------------------------------------------------------------------ hooks
    def _make_flow(self, preprocessing):
        flow = super()._make_flow(preprocessing)
        head = self.head
        if head == "auto":
            head = "multiscale" if self._is_image else "linear"
        if head == "multiscale" and not self._is_image:
            raise ValueError(
                "head='multiscale' needs images (3-D or 4-D X, or image_shape); "
                "use head='linear' for tabular data."
            )
        self.head_ = head
        n_classes = len(self.classes_)
        if head == "linear":
            module = LinearHead(int(np.prod(flow.latent_shape)), n_classes)
        else:
            module = MultiscaleHead(
                scale_channels(flow), n_classes, int(self.head_channels)
            )
        return HybridFlow(flow, module)

    def _build_flow(self, X, sample_weight, device="cpu", small=False):
        flow = super()._build_flow(X, sample_weight, device, small)
        with torch.no_grad():  # data-dependent init of the head's ActNorms
            flow.classify(self._training_view(X[:2048]).to(device), density=False)
        return flow

    def _batch_loss(self, flow, X, w, generator, y=None):
        lam = self.density_weight_
        if self.n_bins is None:
            log_jacobian = 0.0
        else:
            X, log_jacobian = dequantize(X, self.n_bins, generator, noise="random")
        log_p, logits = flow.classify(X, generator, density=lam > 0)
        if log_p is not None:
            log_p = log_p + log_jacobian
        return hybrid_loss(log_p, logits, y, w, lam)

    def _evaluate(self, flow, state, val):
        """Validation objective of the averaged weights (scoring estimator)."""
        scorer = self._make_scorer(flow, state)
        X, w, y = val
        w = w.double().to(self.device_)
        if not float(w.sum()) > 0:  # all held-out rows weigh 0: monitor them all
            w = torch.ones_like(w)
        log_p = self._log_prob(scorer, X.double()) if self.density_weight_ else None
        with torch.no_grad():
            logits = self._logits(scorer, X)
        return float(
            hybrid_loss(log_p, logits, y.to(self.device_), w, self.density_weight_)
        )

    # ------------------------------------------------------------- prediction
    def _logits(self, flow, X):
        """Logits in float64, in chunks; pixels at the centres of their bins."""
        X = self._training_view(X.double())
        with torch.no_grad():
            return torch.cat(
                [
                    flow.classify(chunk.to(self.device_), density=False)[1]
                    for chunk in X.split(4096)
                ]
            )

    def _predict_logits(self, X):
        check_is_fitted(self)
        X = self._to_tensor(self._validate_X(X, reset=False))
        return self._logits(self.flow_, X)

    def decision_function(self, X):
        """Confidence scores: class log-probabilities up to a per-row constant.

        Returns
        -------
        scores : ndarray of shape (n_samples,) for two classes (the log-odds of
            ``classes_[1]``), else (n_samples, n_classes)
        """
        logits = self._predict_logits(X).cpu().numpy()
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_log_proba(self, X):
        """Log-probability of each class, ``log p(y | x)``.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        logits = self._predict_logits(X)
        return torch.log_softmax(logits, dim=1).cpu().numpy()

    def predict_proba(self, X):
        """Probability of each class, ``p(y | x)``.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        return np.exp(self.predict_log_proba(X))

    def predict(self, X):
        """Most probable class of each row.

        Returns
        -------
        y : ndarray of shape (n_samples,)
        """
        logits = self._predict_logits(X).cpu().numpy()
        return self.classes_[np.argmax(logits, axis=1)]

    def score(self, X, y, sample_weight=None):
        """Mean accuracy on ``(X, y)`` (use :meth:`score_samples` for densities).

        Returns
        -------
        score : float
        """
        return ClassifierMixin.score(self, X, y, sample_weight)

    def _restore(self, metadata, state, device):
        super()._restore(metadata, state, device)
        dtype = metadata.get("dtypes", {}).get("classes_")
        self.classes_ = np.asarray(
            self.classes_, dtype=object if dtype == "object" else dtype
        )
        return self


def _is_unlabelled(y, label):
    """Boolean mask of the rows of ``y`` equal to ``label`` (None: no row)."""
    if label is None:
        return np.zeros(y.shape[0], dtype=bool)
    if y.dtype.kind in "iufb":
        if isinstance(label, str):
            return np.zeros(y.shape[0], dtype=bool)
        return y == label
    return np.fromiter((v == label for v in y), dtype=bool, count=y.shape[0])
