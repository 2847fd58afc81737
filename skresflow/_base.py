"""The sklearn layer shared by all skresflow estimators: parameters, data, the loop.

No maths lives here: flows, log-dets and optimisation steps come from
:mod:`skresflow.core`; this module validates, converts, batches and records.
"""

import copy
import time
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from ._checks import check_training_data
from ._distributed import DataParallel
from .core import ACTIVATIONS, GRAD_MODES, FixedAffine, dequantize
from .core.train import NonFiniteLossError, Trainer

_LOGDET_ESTIMATORS = ("auto", "exact", "unbiased", "truncated")

# Training length in optimiser steps, so that "auto" means the same amount of
# training for 500 rows as for 50,000 (docs/benchmarks/tabular_defaults.md).
# max_iter="auto": epochs for about this many steps (>= 1 epoch). Images
# (docs/benchmarks/digits.md): 600 steps of a conv flow beat a tuned
# GaussianMixture on digits in a few CPU minutes; 2,000 cost several times that.
AUTO_STEPS = {"tabular": 2000, "image": 600}
AUTO_PATIENCE_STEPS = 500  # n_iter_no_change="auto": this many steps, >= 10 epochs
EVAL_STEPS = 50  # the validation loss is computed about every this many steps
# When early stopping's patience on the validation loss runs out at a high rate,
# decay it over one more patience before stopping (docs/benchmarks/
# tabular_defaults.md); False restores plain early stopping (for ablations).
ANNEAL_ON_PLATEAU = True
# learning_rate="auto": MLP flows on tables train best with a high rate (lr 1e-2
# beat 5e-3 and 1e-3 on every data set of the defaults experiment); convolutional
# image flows were tuned on digits at 3e-3. Tables of up to 8 features use 2e-2
# (AUTO_LEARNING_RATE_LOW_DIM in _density.py).
AUTO_LEARNING_RATE = {"tabular": 1e-2, "image": 3e-3}
# fit() on fewer training rows than this (after the validation split: tables of
# up to 198 rows at the default validation_fraction) builds the "auto"
# architecture of small tables (_density.py).
SMALL_TABLE_ROWS = 180


def validation_rows(n_samples, fraction):
    """Rows held out for validation: ``fraction`` of ``n_samples``, at least 2
    from 4 rows on; 0 if either part would have fewer than 2 rows."""
    n_val = int(fraction * n_samples)
    if fraction > 0 and n_samples >= 4:
        # Tiny tables keep 2 validation rows: monitoring the training loss
        # instead lets the flow collapse onto its few rows (docs/benchmarks/
        # tabular_defaults.md, "Unseen small tables, and tables of a few dozen
        # rows").
        n_val = max(n_val, 2)
    return n_val if n_val >= 2 and n_samples - n_val >= 2 else 0


def resolve_device(device):
    """``"auto"``: CUDA when available, else CPU; other values as torch reads them."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available."
        )
    return device


def make_generator(random_state, device="cpu"):
    """A torch.Generator seeded from an sklearn ``random_state``."""
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    return torch.Generator(device=device).manual_seed(seed)


class BaseResidualFlow(BaseEstimator):
    """Template for the estimators: subclasses build the flow and define the loss."""

    _parameter_constraints = {
        "n_blocks": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_bins": [Interval(Integral, 2, None, closed="left"), None],
        "image_shape": ["array-like", None],
        "hidden_channels": [Interval(Integral, 1, None, closed="left")],
        "n_fc_blocks": [Interval(Integral, 0, None, closed="left")],
        "hidden_dims": ["array-like", StrOptions({"auto"})],
        "lipschitz_coeff": [Interval(Real, 0, 1, closed="neither")],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "logdet_estimator": [StrOptions(set(_LOGDET_ESTIMATORS))],
        "n_exact_terms": [Interval(Integral, 0, None, closed="left")],
        "logdet_grad": [StrOptions(set(GRAD_MODES))],
        "max_iter": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [
            Interval(Real, 0, None, closed="neither"),
            StrOptions({"auto"}),
        ],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "n_iter_no_change": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
            None,
        ],
        "tol": [Interval(Real, 0, None, closed="left")],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "dtype": [StrOptions({"float32", "float64"})],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    # ------------------------------------------------------------------ hooks
    def _build_flow(self, X, sample_weight, device="cpu", small=False):
        """The flow for ``X``, on ``device``, data-dependent parts initialised;
        ``small``: ``fit`` was given a small table (:meth:`partial_fit`'s first
        chunk never counts as one)."""
        raise NotImplementedError

    def _configure_for_training(self, flow):
        raise NotImplementedError

    def _configure_for_scoring(self, flow):
        raise NotImplementedError

    def _batch_loss(self, flow, X, w, generator):
        """Weighted mean negative log-likelihood of one batch (honest value)."""
        log_p = self._log_likelihood(flow, X, generator, noise="random")
        return -(w * log_p).sum() / w.sum()

    # ------------------------------------------------------------------- data
    def _validate_X(self, X, *, reset):
        """Validate ``X`` and return it shaped ``(n_samples, *event_shape_)``."""
        X = validate_data(
            self, X, reset=reset, dtype=[np.float64, np.float32], allow_nd=True
        )
        event = self._event_shape(X)
        if reset:
            self.event_shape_, self._input_ndim = event, X.ndim
        elif event != self.event_shape_:
            raise ValueError(
                f"X has rows of shape {event}, but {type(self).__name__} "
                f"was fitted on rows of shape {self.event_shape_}."
            )
        if self.n_bins is not None:
            bad = (X < 0) | (X > self.n_bins - 1) | (X != np.floor(X))
            if bad.any():
                raise ValueError(
                    f"with n_bins={self.n_bins}, X must hold integers in "
                    f"[0, {self.n_bins - 1}]; got {X[bad].ravel()[0]!r} instead."
                )
        return X.reshape(X.shape[0], *event)

    def _event_shape(self, X):
        if X.ndim == 3:
            return (1, *X.shape[1:])
        if X.ndim == 4:
            return tuple(X.shape[1:])
        if X.ndim != 2:
            raise ValueError(f"X must have 2, 3 or 4 dimensions; got {X.ndim} instead.")
        if self.image_shape is None:
            return (X.shape[1],)
        shape = tuple(int(s) for s in self.image_shape)
        if len(shape) != 3 or int(np.prod(shape)) != X.shape[1]:
            raise ValueError(
                f"image_shape={self.image_shape!r} must be (C, H, W) with "
                f"C * H * W = {X.shape[1]} (the number of columns of X)."
            )
        return shape

    def _to_tensor(self, X, dtype=torch.float64):
        # A copy: X may be read-only.
        return torch.tensor(X, dtype=dtype, device=self.device_)

    def _to_output(self, t):
        """Tensor of rows -> float64 numpy array laid out like the training input."""
        out = t.detach().cpu().double().numpy()
        if self._input_ndim == 2:
            return out.reshape(out.shape[0], -1)
        if self._input_ndim == 3:
            return out.reshape(out.shape[0], *self.event_shape_[1:])
        return out

    def _log_likelihood(self, flow, X, generator, *, noise):
        """log p(x) per row; with ``n_bins``, the dequantisation lower bound."""
        if self.n_bins is None:
            return flow.log_prob(X, generator)
        y, log_jacobian = dequantize(X, self.n_bins, generator, noise=noise)
        return flow.log_prob(y, generator) + log_jacobian

    def _training_view(self, X):
        """Data as the flow sees it at build time (dequantised at the bin centres)."""
        return X if self.n_bins is None else (X + 0.5) / self.n_bins

    # -------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, sample_weight=None):
        """Fit the flow by maximum likelihood.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : None
            Ignored.
        sample_weight : array-like of shape (n_samples,), default=None
            Per-row weights of the log-likelihood.

        Returns
        -------
        self
        """
        reset = not (self.warm_start and hasattr(self, "flow_"))
        return self._fit(
            X, sample_weight, reset=reset, n_epochs=self.max_iter, warn=True
        )

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, sample_weight=None):
        """One more epoch over ``X`` (the first call builds the model from ``X``).

        Successive calls continue one optimisation: the live weights, Adam's
        moments, the weight average and the step count carry over (in memory and
        through pickling, not through :meth:`save`), and the learning rate stays
        at its peak after the warm-up instead of decaying within each call.
        """
        return self._fit(
            X,
            sample_weight,
            reset=not hasattr(self, "flow_"),
            n_epochs=1,
            warn=False,
            incremental=True,
        )

    def _fit(
        self, X, sample_weight, *, reset, n_epochs, warn, y=None, incremental=False
    ):
        """``y``: optional per-row targets (a tensor), batched with ``X`` and
        passed to :meth:`_batch_loss` (and found in ``val[2]`` by ``_evaluate``).
        ``incremental``: resume and keep the optimiser state (``partial_fit``)."""
        self._dp = DataParallel.current()  # None: one process (the usual case)
        X = self._validate_X(X, reset=reset)
        sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
        if self.n_bins is None:
            check_training_data(X, warn=reset, stacklevel=4)
        if reset and self._dp is None:
            self.device_ = resolve_device(self.device)
            self._generator = make_generator(self.random_state)
        elif reset:
            setup = self._dp.setup(self.device, self.random_state)
            self.device_, self._generator = setup
        if reset:
            self.history_ = []
            self.n_iter_ = 0
        if self._dp is not None:
            self._dp.start(self._generator, self.device_)
        dtype = getattr(torch, self.dtype)  # of training; scoring is float64
        Xt = torch.tensor(X, dtype=dtype)  # a copy: X may be read-only
        wt = torch.as_tensor(sample_weight, dtype=dtype)
        train, val = self._split(Xt.shape[0])
        if self._dp is not None:  # every rank builds (and checks) on the same rows
            self._dp.gather_rows(Xt[train], wt[train])
        build = (Xt[train], wt[train]) if self._dp is None else self._dp.rows
        small = not incremental and build[0].shape[0] < SMALL_TABLE_ROWS
        if reset:
            # Module constructors draw from torch's global RNG: fork it, seed the fork
            # from our generator, and leave the user's global state untouched.
            seed = int(torch.randint(2**31 - 1, (), generator=self._generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                # Built (and initialised) in float32, then cast to ``dtype``.
                build = tuple(t.float() for t in build)
                flow = self._build_flow(*build, device=self.device_, small=small)
                flow = flow.to(dtype)
            if self._dp is not None:
                self._dp.broadcast_module(flow)
        else:
            flow = copy.deepcopy(self.flow_).to(dtype)
        resume = getattr(self, "_incremental_state", None) if incremental else None
        self._incremental_state = None  # only partial_fit after partial_fit resumes
        if resume is not None:  # the live weights, not the averaged ones of flow_
            flow.load_state_dict(resume["weights"])
        self._configure_for_training(flow)
        rows = (Xt, wt) if y is None else (Xt, wt, y)
        self._run_epochs(
            flow,
            tuple(t[train] for t in rows),
            tuple(t[val] for t in rows),
            n_epochs,
            warn,
            incremental=incremental,
            resume=resume,
            small=small,
        )
        self._dp = None  # holds rows and generators: not part of the model
        return self

    def _data_kind(self):
        return "image" if len(self.event_shape_) == 3 else "tabular"

    def _learning_rate(self):
        if self.learning_rate != "auto":
            return self.learning_rate
        return AUTO_LEARNING_RATE[self._data_kind()]

    def _split(self, n_samples):
        """Random train/validation split: ``validation_fraction`` of the rows, at
        least 2 from 4 rows on; none if either part would have fewer than 2."""
        dp = getattr(self, "_dp", None)
        generator = self._generator if dp is None else dp.local_generator
        perm = torch.randperm(n_samples, generator=generator)
        n_val = validation_rows(n_samples, self.validation_fraction)
        return perm[n_val:], perm[:n_val]

    def _auto_steps(self, small=False):
        """Optimiser steps that ``max_iter="auto"`` aims at (``small``: see
        :meth:`_build_flow`)."""
        return AUTO_STEPS[self._data_kind()]

    def _run_epochs(
        self, flow, train, val, n_epochs, warn, incremental, resume, small=False
    ):
        n_train = train[0].shape[0]
        batch_size = min(self.batch_size, n_train)
        steps_per_epoch = -(-n_train // batch_size)
        has_val = bool(val[0].shape[0])
        if self._dp is not None:  # the same steps and validation on every rank
            _, batch_size, steps_per_epoch = self._dp.epoch_plan(
                n_train, self.batch_size
            )
            has_val = self._dp.any(has_val)
        if n_epochs == "auto":
            n_epochs = -(-self._auto_steps(small) // steps_per_epoch)
        patience = self.n_iter_no_change
        if patience == "auto":
            patience = max(10, -(-AUTO_PATIENCE_STEPS // steps_per_epoch))
        trainer = Trainer(
            flow,
            lr=self._learning_rate(),
            # partial_fit: open-ended, warm-up over a tenth of the auto budget
            total_steps=None if incremental else n_epochs * steps_per_epoch,
            warmup_steps=(
                self._auto_steps() // 10
                if incremental
                else min(500, steps_per_epoch * max(n_epochs // 10, 1))
            ),
            weight_decay=self.weight_decay,
            grad_sync=None if self._dp is None else self._dp.sync_gradients,
        )
        if resume is not None:
            trainer.load_state_dict(resume["trainer"])
        monitor = _EarlyStopping(patience, self.tol, start=self.n_iter_)
        # Validation costs about as much as several training steps: with short
        # epochs (small data) it runs every few epochs, and after the last one.
        eval_every = -(-EVAL_STEPS // steps_per_epoch) if has_val else 1
        start, stopped_early, pending = time.perf_counter(), False, 0
        end = n_epochs  # brought forward when a plateau ends the schedule early
        try:
            for epoch in range(n_epochs):
                t0 = time.perf_counter()
                train_nll = self._train_epoch(flow, trainer, train, batch_size)
                self.n_iter_ += 1
                pending += 1
                if pending < eval_every and epoch < end - 1:
                    self.history_.append(
                        {
                            "epoch": self.n_iter_,
                            "train_loss": train_nll,
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    continue
                state = trainer.averaged_state()
                val_nll = self._validation_loss(flow, state, val) if has_val else None
                record = {
                    "epoch": self.n_iter_,
                    "train_loss": train_nll,
                    "seconds": time.perf_counter() - t0,
                }
                if val_nll is not None:
                    record["val_loss"] = val_nll
                self.history_.append(record)
                self._report(record, epoch, end, time.perf_counter() - start)
                loss = val_nll if val_nll is not None else train_nll
                if monitor.update(loss, state, n_epochs=pending):
                    stopped_early = True
                    # A validation plateau at a high learning rate can be noise:
                    # decay the rate over one more patience, then stop (best
                    # kept). Not for a diverging fit, nor on the training loss,
                    # which any decay lowers.
                    if not (
                        ANNEAL_ON_PLATEAU
                        and has_val
                        and monitor.best_state is not None
                        and np.isfinite(loss)
                        and trainer.anneal(patience * steps_per_epoch)
                    ):
                        break
                    end = min(end, epoch + 1 + patience)
                    monitor.bad_epochs = 0
                    self._report_anneal(patience, self.n_iter_ + end - epoch - 1)
                pending = 0
                if epoch + 1 >= end:
                    break
        except KeyboardInterrupt:
            warnings.warn(
                f"fit interrupted after {self.n_iter_} epochs; keeping the best "
                "model found so far.",
                UserWarning,
                stacklevel=5,
            )
            stopped_early = True
            if pending:  # epochs finished since the last validation: check them now
                state = trainer.averaged_state()
                loss = self._validation_loss(flow, state, val) if has_val else train_nll
                monitor.update(loss, state, n_epochs=pending)
            if monitor.best_state is None and not monitor.diverged:
                raise RuntimeError(
                    "fit was interrupted before one epoch finished; no model was "
                    "stored."
                ) from None
        rows = train[0] if self._dp is None else self._dp.rows[0]
        self.flow_ = self._finite_scorer(flow, monitor, rows)
        if incremental:
            weights = {
                k: v.detach().cpu().clone() for k, v in flow.state_dict().items()
            }
            self._incremental_state = {
                "weights": weights,
                "trainer": trainer.state_dict(),
            }
        if self._dp is not None:  # bit-identical models, even across unlike hardware
            self._dp.broadcast_module(self.flow_)
        if warn and not stopped_early and patience is not None:
            monitored = "validation" if has_val else "training (no validation split)"
            warnings.warn(
                f"{type(self).__name__} reached max_iter={self.max_iter} "
                f"({n_epochs} epochs) while the {monitored} loss was still "
                "improving; increase max_iter (or learning_rate) for a better model.",
                ConvergenceWarning,
                stacklevel=5,
            )

    def _finite_scorer(self, flow, monitor, X):
        """The best epoch's model, once it is known to score ``X`` finitely.

        Epochs with a non-finite monitored loss are never kept (see
        :class:`_EarlyStopping`); a diverged fit raises rather than store a model
        that scores NaN, and a partly diverged one says which epochs it dropped.
        """
        remedy = (
            f"Lower learning_rate (got {self._learning_rate():g}), and check X for "
            "extreme values or degenerate (constant, duplicated) features."
        )
        scorer = None
        if monitor.best_state is not None:
            scorer = self._make_scorer(flow, monitor.best_state)
            log_p = self._log_prob(scorer, X[:256].double())
            if not bool(torch.isfinite(log_p).all()):
                scorer = None
        if scorer is None:
            raise NonFiniteLossError(
                f"training diverged: the model gives non-finite losses (epochs "
                f"with a non-finite loss: {monitor.diverged[:10]}); no model was "
                f"stored. {remedy}"
            )
        if monitor.diverged:
            warnings.warn(
                f"training diverged: the loss was non-finite in epoch(s) "
                f"{monitor.diverged[:10]}; the model of epoch {monitor.best_epoch} "
                f"was kept. {remedy}",
                UserWarning,
                stacklevel=6,
            )
        return scorer

    def _train_epoch(self, flow, trainer, train, batch_size):
        flow.train()
        if self._dp is None:
            perm = torch.randperm(train[0].shape[0], generator=self._generator)
            generator = self._generator
        else:  # shuffle and probes per rank, roulette shared (see core.logdet)
            perm = self._dp.epoch_order(train[0].shape[0])
            generator = self._dp.generators(self._generator)
        total, weight = 0.0, 0.0
        for idx in perm.split(batch_size):
            xb, wb, *targets = (t[idx].to(self.device_) for t in train)
            loss = trainer.step(
                lambda xb=xb, wb=wb, targets=targets: self._batch_loss(
                    flow, xb, wb, generator, *targets
                ),
                weight=float(wb.sum()),
            )
            if np.isfinite(loss):
                total += loss * float(wb.sum())
                weight += float(wb.sum())
        if self._dp is not None:
            total, weight = self._dp.sum([total, weight])
        return total / weight if weight else float("nan")

    def _validation_loss(self, flow, state, val):
        """:meth:`_evaluate`, averaged over the ranks of a data-parallel fit."""
        if self._dp is None:
            return self._evaluate(flow, state, val)
        n = val[0].shape[0]
        weight = float(val[1].sum()) if n else 0.0
        loss = self._evaluate(flow, state, val) if n else 0.0
        # Unweighted as well, for when every held-out row of every rank weighs
        # 0 (then each rank's loss is its unweighted mean, as in one process).
        total, weight, total_rows, rows = self._dp.sum(
            [loss * weight, weight, loss * n, n]
        )
        if weight:
            return total / weight
        return total_rows / rows if rows else float("nan")

    def _evaluate(self, flow, state, val):
        """Validation NLL of the averaged weights, with the scoring estimator."""
        scorer = self._make_scorer(flow, state)
        X, w = val[:2]
        log_p = self._log_prob(scorer, X.double())
        w = w.double().to(log_p.device)
        if not float(w.sum()) > 0:  # all held-out rows weigh 0: monitor them all
            w = torch.ones_like(w)
        return float(-(w * log_p).sum() / w.sum())

    def _make_scorer(self, flow, state):
        scorer = copy.deepcopy(flow)
        scorer.load_state_dict(state)
        scorer = scorer.double().eval()
        self._configure_for_scoring(scorer)
        scorer.refresh_lipschitz()
        return scorer

    def _prints(self):
        """Print progress: ``verbose``, and rank 0 of a data-parallel fit."""
        return self.verbose and not (getattr(self, "_dp", None) and self._dp.rank)

    def _report_anneal(self, patience, last):
        if self._prints():
            print(
                f"epoch {self.n_iter_}: no improvement for {patience} epochs; the "
                f"learning rate decays until epoch {last}, then training stops",
                flush=True,
            )

    def _report(self, record, epoch, n_epochs, elapsed):
        if not self._prints():
            return
        remaining = elapsed / (epoch + 1) * (n_epochs - epoch - 1)
        val = f"  val NLL {record['val_loss']:.4f}" if "val_loss" in record else ""
        print(
            f"epoch {record['epoch']:4d}/{n_epochs}  "
            f"train NLL {record['train_loss']:.4f}"
            f"{val}  {elapsed:6.1f}s elapsed, ~{remaining:.0f}s left",
            flush=True,
        )

    # --------------------------------------------------------------- scoring
    def _log_prob(self, flow, X):
        """Row-wise log-likelihood, in chunks small enough for exact Jacobians."""
        rows = max(1, 2**23 // self._scoring_cost_per_row())
        with torch.no_grad():
            out = [
                self._log_likelihood(
                    flow,
                    chunk.to(self.device_),
                    self._scoring_generator(),
                    noise="row_hash",
                )
                for chunk in X.split(rows)
            ]
        return torch.cat(out)

    def _scoring_cost_per_row(self):
        """Rough count of activations one row costs when scored (for chunking)."""
        raise NotImplementedError

    def _scoring_generator(self):
        # Fixed seed per call: with row-hashed probes and dequantisation noise a
        # row's value is deterministic and independent of the rest of the call.
        return torch.Generator(device=self.device_).manual_seed(0)

    def score_samples(self, X):
        """Log-density of each row of ``X``, in nats, in the units of the data.

        Returns
        -------
        log_density : ndarray of shape (n_samples,), float64
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        log_p = self._log_prob(self.flow_, self._to_tensor(X)).cpu().numpy()
        overflow = np.isnan(log_p)
        if overflow.any():
            # The fitted model is finite on its training data (checked at fit), so a
            # NaN here is float64 overflow on a row far outside it: its density
            # underflows, and -inf is the float64 value of its log.
            warnings.warn(
                f"{overflow.sum()} row(s) of X (indices "
                f"{np.flatnonzero(overflow)[:10].tolist()}) are so far outside the "
                "training data that the flow overflows float64 on them; their "
                "log-density is returned as -inf.",
                UserWarning,
                stacklevel=2,
            )
            log_p[overflow] = -np.inf
        return log_p

    # ------------------------------------------------------------ persistence
    def save(self, path):
        """Write the fitted model to ``path`` as a safe file (tensors + JSON).

        Read it back with :func:`skresflow.load`; no code is stored in or run
        from the file. Pickle and joblib also work, for trusted files only.
        """
        check_is_fitted(self)
        from ._persistence import save

        self.flow_.check_invertible()  # never write a model that is not invertible
        save(self, path)

    def _restore(self, metadata, state, device):
        """Rebuild the fitted model from :func:`skresflow.load`'s pieces."""
        from ._persistence import _params

        fitted = metadata["fitted"]
        for name, value in fitted.items():
            if name == "feature_names_in_":
                value = np.asarray(value, dtype=object)
            elif name in ("event_shape_", "hidden_dims_"):
                value = tuple(value)
            setattr(self, name, value)
        wanted = device if device is not None else metadata["device"]
        if (
            device is None
            and wanted.startswith("cuda")
            and not torch.cuda.is_available()
        ):
            wanted = "cpu"
        self.device_ = resolve_device(wanted)
        self._generator = make_generator(_params(metadata["params"])["random_state"])
        flow = self._make_flow(self._placeholder_preprocessing()).double()
        try:
            flow.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"model file weights do not match the architecture its "
                f"parameters describe: {str(exc)[:300]}"
            ) from None
        self.flow_ = flow.eval().to(self.device_)
        self._configure_for_scoring(self.flow_)
        self.flow_.check_invertible()
        return self

    def _placeholder_preprocessing(self):
        if len(self.event_shape_) == 3 and self.n_bins:
            return "logit"
        shape = self.event_shape_
        return FixedAffine(torch.zeros(shape), torch.ones(shape))

    def __getstate__(self):
        state = self.__dict__.copy()
        if "flow_" in state:
            state["flow_"] = copy.deepcopy(self.flow_).cpu()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "flow_" not in state:
            return
        device = self.device_
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(
                f"this model was fitted on {device} but CUDA is not available; "
                "it was loaded on the CPU.",
                UserWarning,
                stacklevel=2,
            )
            device = torch.device("cpu")
        self.device_ = device
        self.flow_ = self.flow_.to(device)


class _EarlyStopping:
    """Track the best monitored loss and its averaged weights."""

    def __init__(self, patience, tol, start=0):
        self.patience, self.tol = patience, tol
        self.best, self.best_state, self.bad_epochs = np.inf, None, 0
        self.epoch, self.best_epoch, self.diverged = start, None, []

    def update(self, loss, state, n_epochs=1):
        """Record the loss after ``n_epochs`` more epochs; True means stop.

        Without patience (no early stopping) the latest state is kept. A state
        whose loss is not finite is never kept (and counts as bad epochs).
        """
        self.epoch += n_epochs
        if not np.isfinite(loss):
            self.diverged.append(self.epoch)
            self.bad_epochs += n_epochs
        elif self.patience is None or loss < self.best - self.tol:
            self.best, self.best_state, self.bad_epochs = loss, state, 0
            self.best_epoch = self.epoch
        else:
            self.bad_epochs += n_epochs
        return self.patience is not None and self.bad_epochs >= self.patience
