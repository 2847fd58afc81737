"""ResidualFlowDensity: a Residual Flow as a scikit-learn density estimator."""

import numpy as np
import torch
from sklearn.base import DensityMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

from ._base import BaseResidualFlow, make_generator
from .core import (
    dequantize,
    image_flow,
    initialize_actnorm,
    quantize,
    standardizer,
    tabular_flow,
)

# Feature counts up to which the exact log-det is used ("auto"): for training, where
# the closed-form Jacobian of the MLP blocks costs about as much as the 4-term
# unbiased series plus its gradient (1.0-1.3x per step at 8-16 features, 2.5x at
# 32); for scoring, where exactness and zero variance are worth more.
EXACT_TRAIN_MAX_FEATURES = 8
EXACT_SCORE_MAX_FEATURES = 128
SCORING_EXACT_TERMS = 20  # series terms when scoring with the unbiased estimator
# "auto" architecture (docs/benchmarks/tabular_defaults.md): narrow MLP branches
# trained faster and better than wide ones at the default step budget; depth helps
# low-dimensional data most, where the exact log-det keeps 16 blocks cheap.
AUTO_BLOCKS = {"low_dim": 16, "tabular": 8, "image": 2}
# Tables that leave fewer than SMALL_TABLE_ROWS (_base.py) rows for training get
# a smaller model (docs/benchmarks/tabular_defaults.md, "Smaller models for small
# tables"): the default one overfits them, and early stopping on a validation
# split of a dozen rows cannot tell when.
AUTO_BLOCKS_SMALL = {"low_dim": 4, "tabular": 2}
AUTO_HIDDEN_DIMS_SMALL = (16, 16)
# max_iter="auto" for low-dimensional tables (up to EXACT_TRAIN_MAX_FEATURES):
# 4,500 optimiser steps instead of AUTO_STEPS' 2,000 (docs/benchmarks/
# tabular_defaults.md, "More steps for low-dimensional data" and "Longer
# training, with a decay at the plateau").
AUTO_STEPS_LOW_DIM = 4500
# Small tables (SMALL_TABLE_ROWS) of up to 8 features keep 3,000: on them the
# longer schedule lost in 12 of 17 cross-validation folds (same page).
AUTO_STEPS_LOW_DIM_SMALL = 3000
# learning_rate="auto" for the same tables: 2e-2 instead of AUTO_LEARNING_RATE's
# 1e-2 (tabular_defaults.md, "A higher learning rate for low-dimensional data").
AUTO_LEARNING_RATE_LOW_DIM = 2e-2
AUTO_HIDDEN_DIMS = {"tabular": (32, 32), "image": (128, 128)}
# Images (docs/benchmarks/digits.md): 2 conv blocks per scale (and 600 optimiser
# steps, AUTO_STEPS in _base.py) beat a tuned GaussianMixture on digits in a few
# CPU minutes.


class ResidualFlowDensity(DensityMixin, TransformerMixin, BaseResidualFlow):
    """Residual Flow density estimator (Chen et al. 2019) for tabular data.

    An exact-likelihood model ``x -> z`` built from invertible residual blocks
    ``x + g(x)`` with ``Lip(g) < 1``, trained by maximum likelihood. Data are
    standardised internally (the log-Jacobian of that step is included, so
    densities are in the units of the data).

    Images are modelled with the multiscale convolutional architecture of the
    paper when ``X`` is 3-D ``(n, H, W)``, 4-D ``(n, C, H, W)``, or 2-D with
    ``image_shape=(C, H, W)``; ``n_bins`` turns on uniform dequantisation for
    discrete values (pixels).

    Parameters
    ----------
    n_blocks : int or "auto", default="auto"
        Residual blocks, each preceded by an ActNorm layer: in total for tabular
        data ("auto": 16 up to 8 features, 8 above; for small tables, which
        leave fewer than 180 rows for training after the validation split, 4
        and 2), per scale for images ("auto": 2).
    hidden_dims : tuple of int or "auto", default="auto"
        Hidden widths of each block's MLP branch (for images: of the fully
        connected blocks at the end). "auto": (32, 32) for tabular data, (16, 16)
        for small tables, (128, 128) for images. :meth:`partial_fit` never
        counts as a small table (its first chunk says nothing about the size of
        the data).
    hidden_channels : int, default=32
        Hidden channels of the convolutional branches (images only; the paper
        uses 512 on GPUs).
    n_fc_blocks : int, default=2
        Fully connected residual blocks after the last scale (images only; the
        paper uses 4).
    n_bins : int or None, default=None
        Number of discrete levels (256 for 8-bit pixels, 17 for sklearn's
        digits): values must be integers in ``0..n_bins-1``. Training then
        dequantises with uniform noise, and ``score_samples`` returns a
        one-draw estimate of the dequantisation lower bound
        ``E_u log p(x + u) <= log P(x)`` (the draw is fixed per row, so scores are
        deterministic; a single row's value can exceed the bound, the mean over
        many rows estimates it).
    image_shape : tuple (C, H, W) or None, default=None
        Treat 2-D rows as flattened images (e.g. inside a Pipeline).
    factor_out : bool, default=False
        Images only: after every squeeze (every scale but the last), half of
        the channels leave the flow for the latent code, through a per-channel
        ActNorm (see :class:`skresflow.core.FactorOut`), and the later scales
        and fully connected blocks model the other half only (the paper's
        option for larger images). Cheaper per step; measured on sklearn's
        digits in docs/benchmarks/digits.md.
    lipschitz_coeff : float, default=0.97
        Spectral-norm bound of every linear layer, in (0, 1).
    activation : {"lipswish", "elu", "softplus", "tanh", "relu"}, default="lipswish"
    logdet_estimator : {"auto", "exact", "unbiased", "truncated"}, default="auto"
        Log-det used in training. ``"auto"``: exact up to
        ``EXACT_TRAIN_MAX_FEATURES`` (8) features, unbiased above. Scoring is
        exact up to 128 features (or whenever ``"exact"`` is chosen) and
        otherwise uses the unbiased estimator with 20 exact terms and a fixed
        seed, so that it is deterministic row by row.
    n_exact_terms : int, default=2
        Series terms always computed in training (``"truncated"``: the length).
    logdet_grad : {"memory_efficient", "neumann", "backward_in_forward", "naive"}, \
default="memory_efficient"
        Gradient of the series estimators (see :func:`skresflow.core.logdet_estimate`).
    max_iter : int or "auto", default="auto"
        Maximum number of epochs. ``"auto"``: as many as make about 2,000
        optimiser steps (``ceil(2000 / steps_per_epoch)``), 4,500 for tables of
        up to 8 features (300 epochs for 4,000 rows, 64 for 20,000; 3,000 when
        fewer than 180 rows are left for training), which the
        defaults experiments found enough for a good model at a minute or two of
        CPU time; for images about 600 steps (``ceil(600 / steps_per_epoch)``,
        100 epochs for 1,500 digits with the default validation split).
    batch_size : int, default=256
    learning_rate : float or "auto", default="auto"
        Peak Adam learning rate (linear warm-up over the first 10% of steps, at
        most 500, then cosine decay). ``"auto"``: 2e-2 for tables of up to 8
        features, 1e-2 above, 3e-3 for images.
    weight_decay : float, default=0.0
        Decoupled weight decay.
    validation_fraction : float, default=0.1
        Share of rows held out to monitor the loss (early stopping keeps the best
        epoch), at least 2 rows from 4 rows on (at the default 0.1, tables of 4
        to 19 rows hold out 2); none if fewer than 2 would be left for training.
        0 monitors the training loss. In a data-parallel fit each process holds
        out its share of its own rows.
    n_iter_no_change : int, "auto" or None, default="auto"
        Epochs without improvement of more than ``tol`` before stopping; None
        trains for ``max_iter`` epochs and keeps the last. When they run out
        on the validation loss while the learning rate is still high (the
        schedule has more than ``n_iter_no_change`` epochs to go), the rate
        first decays to its final value over ``n_iter_no_change`` more epochs,
        then training stops; the best epoch's model is kept either way.
        ``"auto"``: the epochs of 500 optimiser steps, at least 10. The
        validation loss is computed every ``ceil(50 / steps_per_epoch)``
        epochs and after the last (``history_`` has ``val_loss`` on those
        epochs only).
    tol : float, default=1e-4
        Minimum improvement of the monitored NLL (nats per row).
    random_state : int, RandomState instance or None, default=None
        Seeds the torch generators of batching, probes and sampling.
    device : str, default="auto"
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float32", "float64"}, default="float32"
        Precision of training. Scoring, sampling and the fitted ``flow_`` are
        float64 either way. float64 training took 1.3-1.4x the time per step on
        one CPU thread (2 and 64 features); on GPUs, most of which run float64
        far slower than float32, it is not measured.
    verbose : int, default=0
        Print one line per epoch when > 0.
    warm_start : bool, default=False
        Continue from the fitted flow on the next ``fit``.

    Attributes
    ----------
    flow_ : skresflow.core.Flow
        The fitted flow (float64, evaluation mode, averaged weights).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape ``(n_features_in_,)``
        Only when ``X`` has string column names.
    n_iter_ : int
        Epochs run.
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss`` and ``val_loss`` (NLL in nats per
        row; the training value is the honest estimate), ``seconds``.
    device_ : torch.device
    n_blocks_ : int
        Resolved ``n_blocks``.
    hidden_dims_ : tuple of int
        Resolved ``hidden_dims``.
    logdet_estimator_ : str
        Resolved training estimator.
    scoring_estimator_ : str
        Estimator used by ``score_samples``.

    See Also
    --------
    sklearn.neighbors.KernelDensity, sklearn.mixture.GaussianMixture

    References
    ----------
    R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for
    Invertible Generative Modeling. NeurIPS 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from skresflow import ResidualFlowDensity
    >>> X = np.random.default_rng(0).normal(size=(200, 2))
    >>> est = ResidualFlowDensity(n_blocks=2, hidden_dims=(16,), max_iter=2,
    ...                           n_iter_no_change=None, random_state=0).fit(X)
    >>> est.score_samples(X[:3]).shape
    (3,)
    """

    _parameter_constraints = {
        **BaseResidualFlow._parameter_constraints,
        "factor_out": ["boolean"],
    }

    def __init__(
        self,
        *,
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

    # ------------------------------------------------------------------ hooks
    @property
    def _is_image(self):
        return len(self.event_shape_) == 3

    @property
    def _n_dims(self):
        return int(np.prod(self.event_shape_))

    def _build_flow(self, X, sample_weight, device="cpu", small=False):
        self.n_blocks_, self.hidden_dims_ = (
            self._n_blocks(small),
            self._hidden_dims(small),
        )
        centres = self._training_view(X)
        if self._is_image and self.n_bins:
            preprocessing = "logit"
        else:
            noise_var = 0.0 if self.n_bins is None else 1 / (12 * self.n_bins**2)
            preprocessing = standardizer(centres, sample_weight, noise_var=noise_var)
        # Weights are drawn on the CPU (the same initial model on every device);
        # the ActNorm pass, the costly part for large image models, runs on device.
        flow = self._make_flow(preprocessing).to(device)
        idx = torch.randperm(X.shape[0], generator=self._generator)[:2048]
        if not self.n_bins:
            return initialize_actnorm(flow, X[idx].to(device))
        # ActNorm statistics from one dequantised draw, the data training sees (on
        # the bin centres an always-zero pixel has variance 0). For MLP flows on
        # flattened digits the evidence is split by model (docs/guide_images.md);
        # this is the choice that does not depend on it.
        y, _ = dequantize(X[idx], self.n_bins, self._generator, noise="random")
        return initialize_actnorm(flow, y.to(device))

    def _make_flow(self, preprocessing):
        """The architecture for ``event_shape_``, before any data is seen."""
        n_blocks, hidden_dims = self._architecture()
        if self._is_image:
            c, h, w = self.event_shape_
            return image_flow(
                self.event_shape_,
                n_scales=_n_scales(h, w),
                n_blocks=n_blocks,
                hidden_channels=self.hidden_channels,
                n_fc_blocks=self.n_fc_blocks,
                fc_hidden=max(hidden_dims),
                activation=self.activation,
                coeff=self.lipschitz_coeff,
                preprocessing=preprocessing,
                factor_out=self.factor_out,
            )
        return tabular_flow(
            self._n_dims,
            n_blocks=n_blocks,
            hidden_dims=hidden_dims,
            activation=self.activation,
            coeff=self.lipschitz_coeff,
            preprocessing=preprocessing,
        )

    def _scoring_cost_per_row(self):
        d = self._n_dims
        copies = d if self.scoring_estimator_ == "exact" else 4 * SCORING_EXACT_TERMS
        if self._is_image:
            width = self.hidden_channels * d // self.event_shape_[0]
        else:
            width = max(self._architecture()[1])
        return copies * width

    def _restore(self, metadata, state, device):
        super()._restore(metadata, state, device)
        self.n_blocks_, self.hidden_dims_ = self._architecture()  # older files
        return self

    def _architecture(self):
        """``(n_blocks, hidden_dims)`` of the fitted model: resolved at fit and
        saved with it, so a change of the "auto" values never changes a loaded
        model (files written before these attributes resolve them again)."""
        if hasattr(self, "n_blocks_"):
            return self.n_blocks_, tuple(self.hidden_dims_)
        return self._n_blocks(), self._hidden_dims()

    def _n_blocks(self, small=False):
        if self.n_blocks != "auto":
            return self.n_blocks
        if self._is_image:
            return AUTO_BLOCKS["image"]
        low = self._low_dim_table()
        return (AUTO_BLOCKS_SMALL if small else AUTO_BLOCKS)[
            "low_dim" if low else "tabular"
        ]

    def _low_dim_table(self):
        return not self._is_image and self._n_dims <= EXACT_TRAIN_MAX_FEATURES

    def _auto_steps(self, small=False):
        if self._low_dim_table():
            return AUTO_STEPS_LOW_DIM_SMALL if small else AUTO_STEPS_LOW_DIM
        return super()._auto_steps(small)

    def _learning_rate(self):
        if self.learning_rate == "auto" and self._low_dim_table():
            return AUTO_LEARNING_RATE_LOW_DIM
        return super()._learning_rate()

    def _hidden_dims(self, small=False):
        if self.hidden_dims != "auto":
            return tuple(self.hidden_dims)
        if self._is_image:
            return AUTO_HIDDEN_DIMS["image"]
        return AUTO_HIDDEN_DIMS_SMALL if small else AUTO_HIDDEN_DIMS["tabular"]

    def _resolved_estimator(self):
        if self.logdet_estimator != "auto":
            return self.logdet_estimator
        return "exact" if self._n_dims <= EXACT_TRAIN_MAX_FEATURES else "unbiased"

    def _configure_for_training(self, flow):
        self.logdet_estimator_ = self._resolved_estimator()
        n_terms = self.n_exact_terms
        if self.logdet_estimator_ == "truncated":
            n_terms = max(n_terms, 1)
        flow.configure_logdet(
            estimator=self.logdet_estimator_,
            n_exact_terms=n_terms,
            grad=self.logdet_grad,
            probe_sharing="per_sample",
        )

    def _configure_for_scoring(self, flow):
        exact = (
            self.logdet_estimator == "exact" or self._n_dims <= EXACT_SCORE_MAX_FEATURES
        )
        self.scoring_estimator_ = "exact" if exact else "unbiased"
        flow.configure_logdet(
            estimator=self.scoring_estimator_,
            n_exact_terms=max(SCORING_EXACT_TERMS, self.n_exact_terms),
            grad="naive",
            probe_sharing="row_hash",
            n_probes=4,
        )

    def score(self, X, y=None):
        """Mean log-density of the rows of ``X`` (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    # -------------------------------------------------------------- latent space
    def transform(self, X):
        """Map rows of ``X`` to the latent space (standard normal under the model).

        With ``n_bins`` the values are first dequantised with the deterministic
        per-row noise also used by :meth:`score_samples`.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_dims), float64
            ``n_dims`` is the number of features (all pixels for images).
        """
        check_is_fitted(self)
        X = self._to_tensor(self._validate_X(X, reset=False))
        if self.n_bins is not None:
            X, _ = dequantize(
                X, self.n_bins, self._scoring_generator(), noise="row_hash"
            )
        with torch.no_grad():
            z, _ = self.flow_(X)
        z = z.reshape(z.shape[0], -1).cpu().numpy()
        overflow = np.flatnonzero(np.isnan(z).any(axis=1))
        if overflow.size:
            raise ValueError(
                f"{overflow.size} row(s) of X (indices {overflow[:10].tolist()}) are "
                "so far outside the training data that the flow overflows float64 "
                "on them; rescale X or drop those rows."
            )
        return z

    def inverse_transform(self, Z):
        """Map latent rows back to the data space (fixed-point inversion).

        Returns continuous values (before any quantisation), laid out like the
        training input.
        """
        check_is_fitted(self)
        if self._is_image:
            Z = check_array(Z, dtype=[np.float64, np.float32])
            if Z.shape[1] != self._n_dims:
                raise ValueError(
                    f"X has {Z.shape[1]} features, but "
                    f"{type(self).__name__} is expecting "
                    f"{self._n_dims} features as input."
                )
        else:
            Z = self._validate_X(Z, reset=False)
        with torch.no_grad():
            X = self.flow_.inverse(self._to_tensor(Z).reshape(len(Z), -1))
        if self.n_bins is not None:
            X = X * self.n_bins
        return self._to_output(X)

    def sample(self, n_samples=1, random_state=None):
        """Draw samples from the fitted density.

        Parameters
        ----------
        n_samples : int, default=1
        random_state : int, RandomState instance or None, default=None

        Returns
        -------
        X : ndarray, float64
            Shaped like the training rows; with ``n_bins``, integer values in
            ``0..n_bins-1``.
        """
        check_is_fitted(self)
        if not isinstance(n_samples, int | np.integer) or n_samples < 1:
            raise ValueError(
                f"n_samples must be a positive integer; got {n_samples!r} instead."
            )
        generator = make_generator(random_state)
        X = self.flow_.sample(
            int(n_samples), generator, dtype=torch.float64, device=self.device_
        )
        if self.n_bins is not None:
            X = quantize(X, self.n_bins)
        return self._to_output(X)

    def bits_per_dim(self, X):
        """Mean negative log-likelihood of ``X`` in bits per dimension.

        With ``n_bins`` this is the usual figure for discrete data (an upper bound,
        from the dequantisation lower bound on the log-probability).
        """
        return float(-np.mean(self.score_samples(X)) / (self._n_dims * np.log(2)))


def _n_scales(height, width, max_scales=3):
    """Scales of the multiscale image flow: halve while both sides stay even."""
    scales = 1
    while scales < max_scales and height % 2 == 0 and width % 2 == 0 and height > 2:
        height, width, scales = height // 2, width // 2, scales + 1
    return scales
