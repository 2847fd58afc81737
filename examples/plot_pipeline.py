"""
Pipeline: scaling and PCA before the density
============================================

``ResidualFlowDensity`` is an ordinary final step of a
:class:`~sklearn.pipeline.Pipeline`: ``Pipeline.score_samples`` transforms the
rows and returns the flow's log-density **of the transformed features**. Here
the 64 pixel values of the digits are standardised and reduced to 8 principal
components, a residual flow models those 8 numbers, and a GaussianMixture in the
same pipeline is the baseline (both densities live in the same PCA space, so
their log-likelihoods compare; neither is a density over the 64 pixels).

The figure shows held-out digits in the first two principal components coloured
by the flow's log-density, and the least and most likely held-out digits.

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

X = load_digits().data  # (1797, 64) pixel values
X_train, X_test = train_test_split(X, test_size=297, random_state=0)
if QUICK:
    X_train = X_train[:300]

flow = make_pipeline(
    StandardScaler(),
    PCA(n_components=8, random_state=0),
    ResidualFlowDensity(
        n_blocks=2 if QUICK else 4,
        hidden_dims=(16,) if QUICK else (64, 64),
        max_iter=1 if QUICK else 30,
        learning_rate=3e-3,
        batch_size=128,
        validation_fraction=0.0,
        n_iter_no_change=None,
        random_state=0,
    ),
).fit(X_train)
gmm = make_pipeline(
    StandardScaler(),
    PCA(n_components=8, random_state=0),
    GaussianMixture(n_components=10, random_state=0),
).fit(X_train)

log_density = flow.score_samples(X_test)  # nats, in the 8-D PCA space
print(
    f"held-out log-likelihood in the 8-D PCA space (nats per digit): "
    f"residual flow {log_density.mean():.3f}, "
    f"GaussianMixture(10) {gmm.score(X_test):.3f}"
)

order = np.argsort(log_density)
pcs = flow[:-1].transform(X_test)
fig = plt.figure(figsize=(12, 4))
ax = fig.add_subplot(1, 3, 1)
points = ax.scatter(pcs[:, 0], pcs[:, 1], c=log_density, s=8, cmap="viridis")
fig.colorbar(points, ax=ax, label="log-density (nats)")
ax.set(xlabel="PC 1", ylabel="PC 2", title="held-out digits")
for col, (title, idx) in enumerate(
    [("8 least likely", order[:8]), ("8 most likely", order[-8:])]
):
    padded = np.pad(X_test[idx].reshape(8, 8, 8), ((0, 0), (1, 1), (1, 1)))
    mosaic = padded.reshape(2, 4, 10, 10).transpose(0, 2, 1, 3).reshape(20, 40)
    ax = fig.add_subplot(1, 3, col + 2)
    ax.imshow(mosaic, cmap="gray_r")
    ax.set_title(title)
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "plot_pipeline.png", dpi=60)
print(f"saved {OUT / 'plot_pipeline.png'}")
