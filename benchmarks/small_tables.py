#!/usr/bin/env python
"""Architectures for small tables, compared by cross-validation inside training data.

Each data set is the training split of ``bench_tabular.py`` (the benchmark's test
rows are never used), optionally a random subsample of it (``name:rows``, drawn
with ``numpy.random.default_rng(0)``). It is cut into 3 folds
(``KFold(3, shuffle=True, random_state=0)``); every variant is fitted on two
folds with ``random_state`` = the index of the held-out fold and scored on the
held-out one (mean log-likelihood, nats per row). One torch thread per run.
The variants ``gmm`` and ``kde`` are ``bench_tabular.py``'s GaussianMixture and
KernelDensity, tuned on a validation split of the two fitting folds.

Variants fix the architecture explicitly, so the numbers do not depend on what
``"auto"`` resolves to: ``large`` is the "auto" model of tables with at least
180 training rows (16 blocks of 32 x 32 up to 8 features, 8 blocks above),
``s16x4`` the one of smaller tables (4 blocks of 16 x 16, 2 above 8 features).

Usage::

    python benchmarks/small_tables.py --datasets iris wine moons:150 \\
        --variants large s16x4 b4 --out /tmp/small.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as skdata
from sklearn.model_selection import KFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tabular as bench  # noqa: E402

import skresflow._base as base  # noqa: E402
from skresflow import ResidualFlowDensity  # noqa: E402
from skresflow._density import EXACT_TRAIN_MAX_FEATURES  # noqa: E402


def variant_params(name, n_features):
    """Parameters of ``name``; block counts depend on the low-dimensional bound."""
    low = n_features <= EXACT_TRAIN_MAX_FEATURES
    large = dict(n_blocks=16 if low else 8, hidden_dims=(32, 32))
    shallow = dict(n_blocks=4 if low else 2)
    return {
        "large": large,
        "s16x4": dict(shallow, hidden_dims=(16, 16)),
        "s16x4lr2e-2": dict(shallow, hidden_dims=(16, 16), learning_rate=2e-2),
        "s8x4": dict(shallow, hidden_dims=(8, 8)),
        "b4": dict(shallow, hidden_dims=(32, 32)),
        "h16": dict(large, hidden_dims=(16, 16)),
        "lr3e-3": dict(large, learning_rate=3e-3),
        "c0.9": dict(large, lipschitz_coeff=0.9),
        "vf0.2": dict(large, validation_fraction=0.2),
        # Package defaults ("auto" architecture), with and without the
        # learning-rate decay when early stopping's patience runs out.
        "default": {},
        "noanneal": dict(anneal_on_plateau=False),
    }[name]


VARIANTS = (
    "large", "s16x4", "s16x4lr2e-2", "s8x4", "b4", "h16", "lr3e-3", "c0.9", "vf0.2",
    "default", "noanneal",
)
BASELINES = {"gmm": bench.tune_gmm, "kde": bench.tune_kde}


# Small tables outside bench_tabular.py, to check the rule on data it was not
# chosen on: 150 rows each (linnerud has 20).
EXTRA = {
    "blobs": lambda: skdata.make_blobs(150, n_features=5, centers=3, random_state=0)[0],
    "s_curve": lambda: skdata.make_s_curve(150, noise=0.05, random_state=0)[0],
    "swiss_roll": lambda: skdata.make_swiss_roll(150, noise=0.5, random_state=0)[0],
    "linnerud": lambda: skdata.load_linnerud().data.astype(float),
}


def load(spec):
    """``name`` or ``name:rows``: the benchmark's training rows (subsampled), or
    one of ``EXTRA``."""
    name, _, rows = spec.partition(":")
    X = EXTRA[name]() if name in EXTRA else bench.load_dataset(name)[0]
    if rows:
        X = X[np.random.default_rng(0).permutation(len(X))[: int(rows)]]
    return X


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=VARIANTS + tuple(BASELINES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for spec in args.datasets:
        X = load(spec)
        folds = KFold(3, shuffle=True, random_state=0).split(X)
        for fold, (fit_rows, held_out) in enumerate(folds):
            for variant in args.variants:
                start = time.process_time()
                if variant in BASELINES:
                    est, params = BASELINES[variant](X[fit_rows])[:2]
                else:
                    params = variant_params(variant, X.shape[1])
                    base.ANNEAL_ON_PLATEAU = params.get("anneal_on_plateau", True)
                    est = ResidualFlowDensity(
                        random_state=fold,
                        **{k: v for k, v in params.items() if k != "anneal_on_plateau"},
                    )
                    est.fit(X[fit_rows])
                ll = float(est.score_samples(X[held_out]).mean())
                row = dict(data=spec, variant=variant, fold=fold, ll=ll,
                           cpu_s=time.process_time() - start, params=params)
                results.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
