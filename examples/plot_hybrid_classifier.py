"""
Hybrid classifier on digits: accuracy against bits per dimension
================================================================

:class:`skresflow.ResidualFlowClassifier` trains one flow for a density
``p(x)`` and a classifier ``p(y | x)`` at once, maximising
``density_weight * log p(x) + log p(y | x)``. This example fits it to sklearn's
8x8 digits (64 pixel values 0..16, ``n_bins=17``) with the three usual weights:

- ``0``: a pure classifier (log-determinants skipped in training);
- ``"per_dim"``: ``1 / 64``, the paper's hybrid setting;
- ``1``: the full log-likelihood, which dominates the classification term;

and reports held-out accuracy and bits per dimension (the dequantisation bound
of ``bits_per_dim``; the uniform distribution over 17 levels is 4.087), next
to a :class:`~sklearn.linear_model.LogisticRegression` on the same split. The
flows are short fits sized for a one-minute budget, not the benchmark's
settings (see ``benchmarks/bench_hybrid.py``).

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowClassifier
from skresflow.datasets import load_digits_images

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

images, labels = load_digits_images()
X = images.reshape(len(images), -1)
X_train, X_test, y_train, y_test = train_test_split(
    X, labels, test_size=297, random_state=0
)
if QUICK:
    X_train, y_train = X_train[:300], y_train[:300]

FLOW = {
    "n_bins": 17,
    "n_blocks": 2 if QUICK else 4,
    "hidden_dims": (16,) if QUICK else (64, 64),
    "max_iter": 1 if QUICK else 25,
    "batch_size": 128,
    "learning_rate": 3e-3,
    "n_iter_no_change": None,
    "random_state": 0,
}
WEIGHTS = (0, "per_dim", 1)

results = {}
for weight in WEIGHTS:
    clf = ResidualFlowClassifier(density_weight=weight, **FLOW).fit(X_train, y_train)
    accuracy, bpd = clf.score(X_test, y_test), clf.bits_per_dim(X_test)
    results[f"flow, density_weight={weight!r}"] = (accuracy, bpd)
    print(
        f"density_weight={weight!r:>9} (lambda {clf.density_weight_:.4f}): "
        f"held-out accuracy {accuracy:.3f}, {bpd:.3f} bits/dim"
    )

logreg = LogisticRegression(max_iter=2000).fit(X_train / 16, y_train)
results["LogisticRegression"] = (logreg.score(X_test / 16, y_test), np.nan)
print(f"LogisticRegression: held-out accuracy {results['LogisticRegression'][0]:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
names = list(results)
colors = ["C0", "C1", "C2", "C7"]
axes[0].barh(names, [results[n][0] for n in names], color=colors)
axes[0].set(xlabel="held-out accuracy", xlim=(0, 1.15), title="classification")
for i, name in enumerate(names):
    axes[0].text(results[name][0], i, f" {results[name][0]:.3f}", va="center")
for name, color in zip(names[:-1], colors, strict=False):
    acc, bpd = results[name]
    axes[1].scatter(bpd, acc, color=color, s=60, label=name)
axes[1].axvline(np.log2(17), color="k", ls=":", lw=1, label="uniform (4.087)")
axes[1].axhline(
    results["LogisticRegression"][0],
    color="C7",
    ls="--",
    lw=1,
    label="LogisticRegression",
)
axes[1].set(
    xlabel="held-out bits/dim (lower is better)",
    ylabel="accuracy",
    xscale="log",
    title="accuracy vs density",
)
axes[1].xaxis.set_minor_locator(plt.NullLocator())
ticks = [2, 3, 4, 6, 10, 20, 50]
axes[1].set_xticks(ticks, labels=[str(t) for t in ticks])
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "plot_hybrid_classifier.png", dpi=60)
print(f"saved {OUT / 'plot_hybrid_classifier.png'}")
