"""Brute-force references and small seeded models shared by the core tests.

Everything random here takes an explicit seed and a ``torch.Generator``; nothing
touches torch's global generator.
"""

import math

import torch
from torch import nn

from skresflow.core import conv_branch, logdet_estimate, mlp_branch

DTYPE = torch.float64


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, scale=1.0, dtype=DTYPE):
    return scale * torch.randn(shape, generator=seeded(seed), dtype=dtype)


def fill_parameters_(module, seed, scale=1.0):
    """Overwrite every parameter with seeded normal draws (in place, version-counted
    so that Lipschitz layers re-estimate)."""
    gen = seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def contractive_mlp(d, seed, hidden=(16,), coeff=0.6, activation="lipswish"):
    """``mlp_branch`` in float64 with seeded weights.

    Lip(g) <= coeff ** (len(hidden) + 1): activations are 1-Lipschitz."""
    g = mlp_branch(d, hidden, coeff=coeff, activation=activation).to(DTYPE)
    return fill_parameters_(g, seed)


class SmoothBranch(nn.Module):
    """Plain ``scale * W2 tanh(W1 x + b1) + b2`` with ||W1||, ||W2|| = 1 at build time.

    No power-iteration state, so a finite-difference check sees exactly the function
    autograd differentiates (gradcheck perturbs parameters through ``.data``)."""

    def __init__(self, d, hidden, seed, scale=0.5):
        super().__init__()
        self.inner = nn.Linear(d, hidden).to(DTYPE)
        self.outer = nn.Linear(hidden, d).to(DTYPE)
        fill_parameters_(self, seed)
        with torch.no_grad():
            for layer in (self.inner, self.outer):
                layer.weight.div_(torch.linalg.matrix_norm(layer.weight, ord=2))
            self.outer.weight.mul_(scale)

    def forward(self, x):
        return self.outer(torch.tanh(self.inner(x)))


class SymmetricBranch(nn.Module):
    """``g(x) = c W^T tanh(W x)``: its Jacobian ``c W^T diag(sech^2) W`` is symmetric
    positive semi-definite with eigenvalues in [0, c ||W||^2)."""

    def __init__(self, d, seed, c=0.6):
        super().__init__()
        w = randn(d, d, seed=seed)
        self.weight = nn.Parameter(w / torch.linalg.matrix_norm(w, ord=2))
        self.c = c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.weight.t()) @ self.weight


def row_jacobians(fn, x, create_graph=False):
    """``(batch, D, D)`` Jacobians of a row-wise map, one autograd call per row."""
    d = math.prod(x.shape[1:])

    def one_row(xi):
        return fn(xi.unsqueeze(0)).squeeze(0)

    jacs = [torch.autograd.functional.jacobian(one_row, xi, create_graph=create_graph)
            for xi in x]
    return torch.stack([j.reshape(d, d) for j in jacs])


def brute_logdet(fn, x, *, residual=False, create_graph=False):
    """``log|det J|`` (or ``log det(I + J)`` with ``residual``) by ``slogdet``."""
    jac = row_jacobians(fn, x, create_graph=create_graph)
    if residual:
        jac = jac + torch.eye(jac.shape[-1], dtype=jac.dtype)
    return torch.linalg.slogdet(jac).logabsdet


def trace_powers(jac, n_terms):
    """``tr(J^k)`` for k = 1..n_terms, shape ``(n_terms, batch)``."""
    power, traces = jac, []
    for _ in range(n_terms):
        traces.append(power.diagonal(dim1=-2, dim2=-1).sum(-1))
        power = power @ jac
    return torch.stack(traces)


def series_terms(jac, n_terms):
    """The power-series terms ``(-1)^(k+1) tr(J^k) / k`` of ``log det(I + J)``."""
    k = torch.arange(1, n_terms + 1, dtype=jac.dtype).unsqueeze(1)
    signs = 1 - 2 * ((k - 1) % 2)
    return signs * trace_powers(jac, n_terms) / k


def mean_and_se(samples):
    """Sample mean and standard error along the first dimension."""
    n = samples.shape[0]
    return samples.mean(0), samples.std(0) / math.sqrt(n)


def assert_within_se(mean, se, target, n_se=4.0, atol=1e-12):
    """Every entry of ``mean`` is within ``n_se`` standard errors of ``target``."""
    gap = (mean - target).abs()
    worst = (gap / (se + atol)).max().item()
    assert bool((gap <= n_se * se + atol).all()), (
        f"estimate off by {worst:.2f} standard errors (allowed {n_se}); "
        f"mean={mean.tolist()}, target={target.tolist()}, se={se.tolist()}")


# ------------------------------------------------- log-det test models and helpers
def small_conv(seed, coeff=0.8):
    """conv_branch on 2 channels with 4 hidden channels, seeded."""
    return fill_parameters_(conv_branch(2, 4, coeff=coeff).to(DTYPE), seed)


def model_and_rows(kind, seed=0):
    """A contractive branch and a few input rows with non-negligible log-dets."""
    if kind == "mlp":
        return contractive_mlp(3, seed, coeff=0.9), randn(4, 3, seed=seed + 50, scale=2)
    if kind == "symmetric":
        return SymmetricBranch(5, seed, c=0.6), randn(3, 5, seed=seed + 50)
    return small_conv(seed), randn(3, 2, 3, 3, seed=seed + 50, scale=2)


def brute_residual_logdet(g, x, create_graph=False):
    """``log det(I + J_g(x))`` per row, by ``slogdet``."""
    return brute_logdet(g, x, residual=True, create_graph=create_graph)


def weighted_grads(estimate, g, leaf, a):
    """Value and gradients (to ``leaf`` and to every parameter of ``g``) of
    ``sum_i a_i logdet_i``; the log-det sees ``x``, a non-leaf function of ``leaf``."""
    x = 1.5 * leaf - 0.2
    logdet = estimate(g, x)
    wrt = [leaf, *g.parameters()]
    grads = torch.autograd.grad((a * logdet).sum(), wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if q is None else q
             for q, w in zip(grads, wrt, strict=True)]
    return logdet.detach(), torch.cat([q.flatten() for q in grads])


def series_estimate(grad, seed, **kwargs):
    """``logdet_estimate`` with gradient mode ``grad`` and a fresh generator seeded
    with ``seed``: the same draws on every call."""
    def estimate(g, x):
        return logdet_estimate(g, x, grad=grad, generator=seeded(seed), **kwargs)
    return estimate
