"""
Digits: fit, bits per dimension and samples
===========================================

sklearn's 8x8 digits have 17 grey levels (integers 0..16). With ``n_bins=17``
:class:`skresflow.ResidualFlowDensity` models them as discrete data: training
adds uniform noise to each pixel (dequantisation), ``score_samples`` returns the
dequantisation lower bound on ``log P(x)`` of the integer image, ``bits_per_dim``
turns it into the usual figure, and ``sample`` returns integer images.

This example fits the tabular (MLP) flow to the flattened images for a short
CPU budget and shows the training curve, samples and real digits. A longer fit
and the convolutional architecture do better: see the digits benchmark page of
the documentation (``docs/benchmarks/digits.md``).

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow.datasets import load_digits_images

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)

images, _ = load_digits_images()
X = images.reshape(len(images), -1)  # (1797, 64) integers 0..16
X_train, X_test = train_test_split(X, test_size=297, random_state=0)
if QUICK:
    X_train = X_train[:200]

est = ResidualFlowDensity(
    n_bins=17,
    n_blocks=2 if QUICK else 8,
    hidden_dims=(16,) if QUICK else (128, 128),
    max_iter=1 if QUICK else 35,
    learning_rate=3e-3,
    validation_fraction=0.0,
    n_iter_no_change=None,
    random_state=0,
).fit(X_train)

d = X.shape[1]
train_bpd = [h["train_loss"] / (d * np.log(2)) for h in est.history_]
test_bpd = est.bits_per_dim(X_test)
print(f"{est.n_iter_} epochs in {sum(h['seconds'] for h in est.history_):.0f} s")
print(f"held-out bits/dim {test_bpd:.3f} (uniform over 17 levels: {np.log2(17):.3f})")
samples = est.sample(36, random_state=0)


def tile(rows):
    """36 images of 8x8 as one 6x6 mosaic, one blank pixel around each."""
    padded = np.pad(rows.reshape(36, 8, 8), ((0, 0), (1, 1), (1, 1)))
    return padded.reshape(6, 6, 10, 10).transpose(0, 2, 1, 3).reshape(60, 60)


fig, axes = plt.subplots(1, 3, figsize=(12, 4))
axes[0].plot(np.arange(1, len(train_bpd) + 1), train_bpd, label="training (per epoch)")
axes[0].axhline(test_bpd, color="k", ls="--", label=f"held-out {test_bpd:.3f}")
axes[0].set(xlabel="epoch", ylabel="bits/dim", title="training curve")
axes[0].set_ylim(0, 2 * np.log2(17))  # the first epochs are far above
axes[0].legend()
axes[1].imshow(tile(samples), cmap="gray_r", vmin=0, vmax=16)
axes[1].set_title("est.sample(36)")
axes[2].imshow(tile(X_test[:36]), cmap="gray_r", vmin=0, vmax=16)
axes[2].set_title("held-out digits")
for ax in axes[1:]:
    ax.axis("off")
fig.tight_layout()
fig.savefig(OUT / "plot_digits.png", dpi=60)
print(f"saved {OUT / 'plot_digits.png'}")
