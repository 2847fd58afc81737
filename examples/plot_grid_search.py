"""
Choosing a parameter with GridSearchCV
======================================

``ResidualFlowDensity.score`` is the mean held-out log-likelihood, so sklearn's
model selection tools work unchanged. Here ``GridSearchCV`` picks the number of
residual blocks for the two-moons density by 3-fold cross-validated
likelihood. (On a machine with several free cores, ``n_jobs`` runs the folds in
parallel through joblib.)

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.model_selection import GridSearchCV
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

X = make_toy("moons", 300 if QUICK else 1200, random_state=0)
X_test = make_toy("moons", 1000, random_state=1)
base = ResidualFlowDensity(
    hidden_dims=(16,) if QUICK else (32, 32),
    max_iter=1 if QUICK else 20,
    learning_rate=1e-2,
    batch_size=64,
    validation_fraction=0.0,
    n_iter_no_change=None,
    random_state=0,
)
grid = {"n_blocks": [1, 2] if QUICK else [1, 2, 4]}
search = GridSearchCV(base, grid, cv=3).fit(X)

means = search.cv_results_["mean_test_score"]
stds = search.cv_results_["std_test_score"]
for n, m, s in zip(grid["n_blocks"], means, stds, strict=True):
    print(f"n_blocks={n}: cross-validated log-likelihood {m:.3f} +- {s:.3f}")
best = search.best_estimator_
print(f"best: {search.best_params_}; held-out log-likelihood {best.score(X_test):.3f}")

n_grid = 40 if QUICK else 120
xx, yy = np.meshgrid(np.linspace(-1.5, 2.5, n_grid), np.linspace(-1, 1.5, n_grid))
density = np.exp(best.score_samples(np.column_stack([xx.ravel(), yy.ravel()])))
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
axes[0].errorbar(grid["n_blocks"], means, yerr=stds, marker="o", capsize=3)
axes[0].set(
    xlabel="n_blocks", ylabel="mean log-likelihood (3-fold CV)", title="GridSearchCV"
)
axes[1].pcolormesh(xx, yy, density.reshape(xx.shape), shading="auto")
axes[1].set_title(f"best model: n_blocks={search.best_params_['n_blocks']}")
axes[1].set_aspect("equal")
fig.tight_layout()
fig.savefig(OUT / "plot_grid_search.png", dpi=60)
print(f"saved {OUT / 'plot_grid_search.png'}")
