"""
Log-det estimators and gradient modes: bias, spread and memory
==============================================================

A residual block ``y = x + g(x)`` needs ``log det(I + J_g(x))``.
:func:`skresflow.core.logdet_estimate` computes it three ways: ``"exact"`` (the
full Jacobian and ``slogdet``), ``"truncated"`` (the first ``n_exact_terms``
terms of the power series, as in i-ResNet: biased) and ``"unbiased"`` (those
terms plus a Russian-roulette tail: unbiased in expectation, at a random extra
cost). On one small contractive block (``mlp_branch``, every layer at spectral
norm 0.97) this example draws both series estimators with many generator seeds
and compares them with the exact value: bias and spread against the number of
exact terms.

The second panel measures what the four gradient modes (``grad=``) keep for
backward in one training step of the same block (truncated series, so every
mode evaluates the same number of terms): peak bytes of the tensors autograd
saves, counted with ``torch.autograd.graph.saved_tensors_hooks`` (parameters
and the batch excluded; graphs built inside backward included). This is the
memory the modes differ in; ``benchmarks/bench_logdet_memory.py`` also measures
resident memory and time on larger models.

Environment: ``SKRESFLOW_EXAMPLES_QUICK=1`` runs tiny settings (for the tests);
``SKRESFLOW_EXAMPLES_OUT`` is the folder for the figure (default: next to this
script).
"""

import os
import weakref
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from skresflow.core import GRAD_MODES, ResidualBlock, logdet_estimate, mlp_branch

QUICK = os.environ.get("SKRESFLOW_EXAMPLES_QUICK") == "1"
OUT = Path(os.environ.get("SKRESFLOW_EXAMPLES_OUT", Path(__file__).parent))
# Small models on a possibly busy CPU: one thread (torch and BLAS) is fastest.
torch.set_num_threads(1)
threadpool_limits(1)
torch.manual_seed(0)

N_FEATURES = 8
N_BLOCKS = 4  # memory panel: a stack, so per-block savings can show
N_SEEDS = 20 if QUICK else 400
N_ROWS = 16 if QUICK else 64
TERMS = (1, 2, 4, 8) if QUICK else (1, 2, 3, 4, 6, 8, 12)
MEMORY_TERMS = (2, 10) if QUICK else (2, 5, 10, 20)
MEMORY_BATCH = 64 if QUICK else 512


def make_branch():
    """``W^T act(W x + b)``: a symmetric Jacobian, eigenvalues up to ~0.94.

    A random MLP branch has a Jacobian of small trace and a log-det near 0, where
    every estimator looks good; this one makes the series terms matter.
    """
    g = mlp_branch(N_FEATURES, (N_FEATURES,), coeff=0.97).double()
    first, last = g[0], g[2]
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(N_FEATURES, N_FEATURES, dtype=torch.float64))
        first.weight.copy_(q)
        last.weight.copy_(q.T)
        last.bias.zero_()
    return g.eval()


g = make_branch()
# spread-out inputs: LipSwish's slope is 0.45 at 0 and close to 1 a few units out
x = 3 * torch.randn(N_ROWS, N_FEATURES, dtype=torch.float64)
with torch.no_grad():
    exact = logdet_estimate(g, x, estimator="exact")
print(
    f"exact log-det per row: mean {exact.mean():.4f}, range "
    f"[{exact.min():.4f}, {exact.max():.4f}]"
)


def errors(estimator, n_terms):
    """Estimate minus exact, one row per seed (seed-wise mean over the rows)."""
    out = []
    for seed in range(N_SEEDS):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            est = logdet_estimate(
                g, x, estimator=estimator, n_exact_terms=n_terms, generator=gen
            )
        out.append((est - exact).numpy())
    return np.stack(out)  # (seeds, rows)


stats = {}
for estimator in ("truncated", "unbiased"):
    for n in TERMS:
        err = errors(estimator, n)
        # Standard error from the seeds' row means: the rows of one call share
        # its roulette length, so their errors are not independent.
        bias, se = err.mean(), err.mean(1).std() / np.sqrt(N_SEEDS)
        stats[estimator, n] = (bias, se, err.std())
        print(
            f"{estimator:>9} n_exact_terms={n:>2}: bias {bias:+.4f} +- {se:.4f}, "
            f"spread (std of one estimate) {err.std():.4f}"
        )


class SavedBytes:
    """Live and peak bytes of the storages autograd saves for backward."""

    def __init__(self, exclude):
        self.exclude, self.live, self.current, self.peak = set(exclude), {}, 0, 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self.exclude or nbytes == 0:
            return t
        count = self.live.setdefault(ptr, [nbytes, 0])
        if count[1] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        count[1] += 1
        box = _Box(t)
        # why: the storage is released when autograd drops its last saved copy
        weakref.finalize(box, self._release, ptr)
        return box

    def _release(self, ptr):
        count = self.live[ptr]
        count[1] -= 1
        if count[1] == 0:
            self.current -= count[0]
            del self.live[ptr]

    @staticmethod
    def unpack(box):
        return box.t if isinstance(box, _Box) else box


class _Box:
    def __init__(self, t):
        self.t = t


def negative_log_prob(blocks, batch):
    logdet = 0
    for block in blocks:
        batch, block_logdet = block(batch)
        logdet = logdet + block_logdet
    return (0.5 * batch.pow(2).sum(1) - logdet).mean()


def step_memory(grad, n_terms):
    """Peak saved bytes (MiB) of one Adam step of -log p(x) through the blocks."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        ResidualBlock(
            mlp_branch(N_FEATURES, (128, 128), coeff=0.97),
            estimator="truncated",
            n_exact_terms=n_terms,
            grad=grad,
        )
        for _ in range(N_BLOCKS)
    )
    opt = torch.optim.Adam(blocks.parameters(), lr=1e-3)
    batch = torch.randn(MEMORY_BATCH, N_FEATURES)
    for _ in range(2):  # warm-up (power iterations, Adam state), then measured
        opt.zero_grad(set_to_none=True)
        owned = [*blocks.parameters(), *blocks.buffers(), batch]
        tracker = SavedBytes(t.untyped_storage().data_ptr() for t in owned)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            negative_log_prob(blocks, batch).backward()
        opt.step()
    return tracker.peak / 2**20


memory = {(grad, n): step_memory(grad, n) for grad in GRAD_MODES for n in MEMORY_TERMS}
for grad in GRAD_MODES:
    cells = ", ".join(f"n={n}: {memory[grad, n]:6.2f}" for n in MEMORY_TERMS)
    print(f"{grad:>19} saved-tensor peak (MiB) {cells}")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for estimator, marker in (("truncated", "o"), ("unbiased", "s")):
    bias = [stats[estimator, n][0] for n in TERMS]
    se = [stats[estimator, n][1] for n in TERMS]
    spread = [stats[estimator, n][2] for n in TERMS]
    axes[0].errorbar(TERMS, bias, yerr=se, marker=marker, capsize=3, label=estimator)
    axes[1].plot(TERMS, spread, marker=marker, label=estimator)
axes[0].axhline(0, color="k", lw=0.8)
axes[0].set(
    xlabel="n_exact_terms",
    ylabel="mean(estimate - exact)",
    title=f"bias ({N_SEEDS} seeds x {N_ROWS} rows)",
)
axes[1].set(xlabel="n_exact_terms", ylabel="std of one estimate", title="spread")
for grad in GRAD_MODES:
    axes[2].plot(
        MEMORY_TERMS, [memory[grad, n] for n in MEMORY_TERMS], marker="o", label=grad
    )
axes[2].set(
    xlabel="series terms (truncated)",
    ylabel="peak saved tensors (MiB)",
    title=f"one step, {N_BLOCKS} blocks, batch {MEMORY_BATCH}",
)
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "plot_logdet_estimators.png", dpi=60)
print(f"saved {OUT / 'plot_logdet_estimators.png'}")
