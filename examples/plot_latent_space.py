"""
Sampling and the latent space: transform and inverse_transform
==============================================================

A residual flow is an invertible map ``z = f(x)`` under which the data look like
standard normal noise. ``transform`` computes ``f(x)``, ``inverse_transform``
inverts it by fixed-point iteration (each block ``x + g(x)`` has ``Lip(g) < 1``,
so the iteration converges), and ``sample`` pushes normal noise through the
inverse.

The figure shows the data coloured by position, their latent codes (same
colours), samples, and a regular grid of latent points mapped back to the data
space: the flow's deformation of space.

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

X = make_toy("moons", 400 if QUICK else 2000, random_state=0)
est = ResidualFlowDensity(
    n_blocks=2 if QUICK else 10,
    hidden_dims=(16,) if QUICK else (32, 32),
    max_iter=1 if QUICK else 20,
    learning_rate=1e-2,
    batch_size=64,
    validation_fraction=0.0,
    n_iter_no_change=None,
    random_state=0,
).fit(X)

Z = est.transform(X)
X_back = est.inverse_transform(Z)
print(f"max |inverse_transform(transform(X)) - X| = {np.abs(X_back - X).max():.1e}")
# Under the model Z is standard normal: mean 0, std 1, excess kurtosis 0.
for j in range(2):
    z = (Z[:, j] - Z[:, j].mean()) / Z[:, j].std()
    print(
        f"latent coordinate {j}: mean {Z[:, j].mean():+.3f}, std {Z[:, j].std():.3f}, "
        f"excess kurtosis {np.mean(z**4) - 3:+.3f}"
    )
samples = est.sample(len(X), random_state=1)

# A regular grid in latent space, mapped back to the data space line by line.
ticks = np.linspace(-2.5, 2.5, 11)
line = np.linspace(-2.5, 2.5, 60 if QUICK else 200)
lines = [np.column_stack([line, np.full_like(line, t)]) for t in ticks]
lines += [np.column_stack([np.full_like(line, t), line]) for t in ticks]

colour = X[:, 0]
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
axes[0].scatter(*X.T, c=colour, s=2, cmap="coolwarm")
axes[0].set_title("data x")
axes[1].scatter(*Z.T, c=colour, s=2, cmap="coolwarm")
axes[1].set_title("latent codes z = transform(x)")
axes[2].scatter(*samples.T, s=2, c="k")
axes[2].set_title("sample(): inverse of z ~ N(0, I)")
for latent_line in lines:
    axes[3].plot(*est.inverse_transform(latent_line).T, lw=0.6, c="tab:blue")
axes[3].scatter(*X.T, s=1, c="0.7")
axes[3].set_title("latent grid mapped back: inverse_transform")
for ax in axes:
    ax.set_aspect("equal")
fig.tight_layout()
fig.savefig(OUT / "plot_latent_space.png", dpi=60)
print(f"saved {OUT / 'plot_latent_space.png'}")
