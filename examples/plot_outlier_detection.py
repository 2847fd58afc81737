"""
Outlier detection on a 2-D toy: Residual Flow vs IsolationForest and LOF
========================================================================

:class:`skresflow.ResidualFlowOutlierDetector` fits a Residual Flow density and
calls a row an outlier when its log-density is below ``offset_``, a quantile
of the training rows' log-densities set by ``contamination``. Here it is
trained on the two moons with 5% of the rows replaced by points drawn
uniformly from a box around them (injected outliers), next to
:class:`~sklearn.ensemble.IsolationForest` and
:class:`~sklearn.neighbors.LocalOutlierFactor` (``novelty=True``, so it can
score new rows), all with ``contamination=0.05``.

A fresh sample, built the same way, is scored by each detector's
``score_samples`` (higher is more normal) and ROC AUC measures how well the
scores rank its inliers above its injected outliers. The figure shows each
detector's ``decision_function`` (0 is its threshold) with the fresh rows on
top. Uniform outliers that land on the moons cannot be told apart by any
detector, so no AUC reaches 1.

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowOutlierDetector
from skresflow.datasets import make_toy

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

CONTAMINATION = 0.05
N_TRAIN, N_TEST, GRID = (300, 200, 30) if QUICK else (1500, 1000, 100)
BOX = np.array([[-2.5, -2.0], [3.5, 2.5]])  # the moons span [-1.1, 2.1] x [-0.6, 1.1]


def contaminated_moons(n_samples, seed):
    """Moons with ``CONTAMINATION`` of the rows uniform in ``BOX``; 1 = outlier."""
    rng = np.random.default_rng(seed)
    n_out = int(round(CONTAMINATION * n_samples))
    inliers = make_toy("moons", n_samples - n_out, random_state=seed)
    outliers = rng.uniform(BOX[0], BOX[1], size=(n_out, 2))
    is_outlier = np.r_[np.zeros(len(inliers)), np.ones(n_out)].astype(int)
    return np.vstack([inliers, outliers]), is_outlier


X_train, _ = contaminated_moons(N_TRAIN, seed=0)
X_test, is_outlier = contaminated_moons(N_TEST, seed=1)

detectors = {
    "Residual Flow": ResidualFlowOutlierDetector(
        contamination=CONTAMINATION,
        n_blocks=2 if QUICK else 8,
        hidden_dims=(16,) if QUICK else (32, 32),
        max_iter=1 if QUICK else 25,
        batch_size=64,
        learning_rate=1e-2,
        validation_fraction=0.0,
        n_iter_no_change=None,
        random_state=0,
    ),
    "IsolationForest": IsolationForest(contamination=CONTAMINATION, random_state=0),
    "LocalOutlierFactor": LocalOutlierFactor(novelty=True, contamination=CONTAMINATION),
}

xx, yy = np.meshgrid(np.linspace(*BOX[:, 0], GRID), np.linspace(*BOX[:, 1], GRID))
grid = np.column_stack([xx.ravel(), yy.ravel()])
fig, axes = plt.subplots(1, len(detectors), figsize=(4.2 * len(detectors), 3.8))
for ax, (name, det) in zip(axes, detectors.items(), strict=True):
    det.fit(X_train)
    # roc_auc_score wants higher = more likely positive: outliers score low
    auc = roc_auc_score(is_outlier, -det.score_samples(X_test))
    flagged = det.predict(X_test) == -1
    print(
        f"{name:>18}: held-out ROC AUC {auc:.3f}; flags {flagged.mean():.3f} of "
        f"the rows, {flagged[is_outlier == 1].mean():.3f} of the outliers, "
        f"{flagged[is_outlier == 0].mean():.3f} of the inliers"
    )
    decision = det.decision_function(grid).reshape(xx.shape)
    # each detector's scale differs; symmetric limits keep 0 at the colormap's centre
    limit = np.quantile(np.abs(decision), 0.95)
    ax.contourf(
        xx,
        yy,
        decision,
        levels=np.linspace(-limit, limit, 15),
        cmap="RdBu",
        extend="both",
    )
    ax.contour(xx, yy, decision, levels=[0], colors="k", linewidths=1.5)
    ax.scatter(*X_test[is_outlier == 0].T, s=3, c="w", edgecolors="none")
    ax.scatter(*X_test[is_outlier == 1].T, s=12, c="orange", marker="x")
    ax.set_title(f"{name}\nheld-out ROC AUC {auc:.3f}", fontsize=10)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(OUT / "plot_outlier_detection.png", dpi=60)
print(f"saved {OUT / 'plot_outlier_detection.png'}")
