"""
2-D densities: Residual Flow vs GaussianMixture and KernelDensity
=================================================================

Fits a :class:`skresflow.ResidualFlowDensity` to three of the built-in 2-D toy
densities and compares its held-out log-likelihood and its density with a
:class:`~sklearn.mixture.GaussianMixture` and a
:class:`~sklearn.neighbors.KernelDensity`, each tuned by cross-validated
likelihood (``GridSearchCV`` uses ``score``, the mean log-density).

All three models are densities on the same 2-D space, so their log-likelihoods
(nats per point, higher is better) are directly comparable.

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

DATASETS = ("8gaussians", "moons")
N_TRAIN, N_TEST, GRID = (400, 200, 30) if QUICK else (2000, 1000, 120)
FLOW = {
    "n_blocks": 2 if QUICK else 10,
    "hidden_dims": (16,) if QUICK else (32, 32),
    "max_iter": 1 if QUICK else 15,
    "learning_rate": 1e-2,
    "batch_size": 64,
    "validation_fraction": 0.0,  # fixed number of epochs: keep the last
    "n_iter_no_change": None,
    "random_state": 0,
}


def fit_models(X):
    flow = ResidualFlowDensity(**FLOW).fit(X)
    gmm = GridSearchCV(
        GaussianMixture(random_state=0), {"n_components": [1, 2, 4, 8, 16, 32]}, cv=3
    ).fit(X)
    kde = GridSearchCV(
        KernelDensity(), {"bandwidth": np.logspace(-1.5, 0, 10)}, cv=3
    ).fit(X)
    return {
        "Residual Flow": flow,
        f"GMM ({gmm.best_params_['n_components']} comp.)": gmm.best_estimator_,
        f"KDE (bw {kde.best_params_['bandwidth']:.2f})": kde.best_estimator_,
    }


fig, axes = plt.subplots(len(DATASETS), 4, figsize=(12, 3 * len(DATASETS)))
for row, name in zip(axes, DATASETS, strict=True):
    X = make_toy(name, N_TRAIN, random_state=0)
    X_test = make_toy(name, N_TEST, random_state=1)
    lim = np.abs(np.concatenate([X, X_test])).max() * 1.05
    xx, yy = np.meshgrid(*[np.linspace(-lim, lim, GRID)] * 2)
    grid = np.column_stack([xx.ravel(), yy.ravel()])
    row[0].hist2d(*X.T, bins=GRID // 2, range=[[-lim, lim]] * 2, cmap="viridis")
    row[0].set_title(f"{name}: {N_TRAIN} training points")
    for ax, (label, model) in zip(row[1:], fit_models(X).items(), strict=True):
        test_ll = model.score_samples(X_test).mean()
        print(f"{name:>13} {label:<22} held-out log-likelihood {test_ll:8.3f}")
        density = np.exp(model.score_samples(grid)).reshape(xx.shape)
        ax.pcolormesh(xx, yy, density, cmap="viridis", shading="auto")
        ax.set_title(f"{label}\nheld-out {test_ll:.3f} nats/point", fontsize=9)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(OUT / "plot_toy_densities.png", dpi=60)
print(f"saved {OUT / 'plot_toy_densities.png'}")
