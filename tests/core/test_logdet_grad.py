"""Gradients of the log-det estimators: the four modes against each other (same
draws), against the exact log-det's gradient (in mean) and against finite differences
(gradcheck)."""

import pytest
import torch
from oracles import (
    SmoothBranch,
    assert_within_se,
    brute_residual_logdet,
    contractive_mlp,
    mean_and_se,
    model_and_rows,
    randn,
    seeded,
    series_estimate,
    small_conv,
    weighted_grads,
)

from skresflow.core import GRAD_MODES, logdet_estimate

SAME_DRAW_PAIRS = [("backward_in_forward", "naive"), ("memory_efficient", "neumann")]


# ------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_exact_gradient_matches_brute_force(kind, grad):
    g, x = model_and_rows(kind)
    leaf, a = x.clone().requires_grad_(), randn(x.shape[0], seed=7)

    def estimate(g, x):
        return logdet_estimate(g, x, estimator="exact", grad=grad)

    _, grads = weighted_grads(estimate, g, leaf, a)
    _, expected = weighted_grads(lambda g, x: brute_residual_logdet(g, x, True), g,
                                 leaf, a)
    torch.testing.assert_close(grads, expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------- gradient modes
@pytest.mark.parametrize("deferred, plain", SAME_DRAW_PAIRS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("estimator", ["unbiased", "truncated"])
@pytest.mark.parametrize("n_probes", [1, 3])
def test_deferred_gradient_equals_plain_backprop_for_same_draws(deferred, plain, kind,
                                                                estimator, n_probes):
    g, x = model_and_rows(kind, seed=1)
    leaf, a = x.clone().requires_grad_(), randn(x.shape[0], seed=8)  # per-row weights
    options = {"estimator": estimator, "n_exact_terms": 3, "n_probes": n_probes}
    value, grads = weighted_grads(series_estimate(deferred, 4, **options), g, leaf, a)
    expected_value, expected = weighted_grads(series_estimate(plain, 4, **options),
                                              g, leaf, a)
    assert grads.abs().max() > 1e-3
    torch.testing.assert_close(grads, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(value, expected_value, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_value_is_the_same_in_every_gradient_mode(kind):
    g, x = model_and_rows(kind, seed=2)
    leaf, a = x.clone().requires_grad_(), randn(x.shape[0], seed=9)
    values = [weighted_grads(series_estimate(mode, 5), g, leaf, a)[0]
              for mode in GRAD_MODES]
    for value in values[1:]:
        torch.testing.assert_close(value, values[0], rtol=1e-14, atol=1e-15)


def test_value_is_bitwise_identical_in_every_gradient_mode():
    g, x = contractive_mlp(3, seed=3, coeff=0.9), randn(64, 3, seed=10, scale=2)
    leaf, a = x.clone().requires_grad_(), randn(64, seed=11)
    values = [weighted_grads(series_estimate(mode, seed), g, leaf, a)[0]
              for seed in range(3) for mode in ("naive", "neumann")]
    assert all(torch.equal(values[i], values[i + 1]) for i in range(0, 6, 2))


@pytest.mark.parametrize("estimator, n_exact_terms, d", [("unbiased", 2, 1),
                                                         ("truncated", 1, 3)])
def test_neumann_equals_naive_when_it_is_the_exact_derivative(estimator, n_exact_terms,
                                                              d):
    """The Neumann gradient differentiates v^T J^(k-1) (dJ) v instead of d(v^T J^k v)/k;
    the two agree draw by draw when J is a scalar (d = 1) or when k = 1 only."""
    g, x = contractive_mlp(d, seed=4, coeff=0.9), randn(4, d, seed=12, scale=2)
    leaf, a = x.clone().requires_grad_(), randn(4, seed=13)
    options = {"estimator": estimator, "n_exact_terms": n_exact_terms}
    _, neumann = weighted_grads(series_estimate("neumann", 6, **options), g, leaf, a)
    _, naive = weighted_grads(series_estimate("naive", 6, **options), g, leaf, a)
    torch.testing.assert_close(neumann, naive, rtol=0, atol=1e-12)


def test_neumann_differs_from_naive_draw_by_draw_in_several_dimensions():
    g, x = model_and_rows("mlp", seed=5)
    leaf, a = x.clone().requires_grad_(), randn(x.shape[0], seed=14)
    _, neumann = weighted_grads(series_estimate("neumann", 7), g, leaf, a)
    _, naive = weighted_grads(series_estimate("naive", 7), g, leaf, a)
    assert (neumann - naive).abs().max() > 1e-6


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_gradient_is_unbiased_in_every_mode(grad):
    g = contractive_mlp(2, seed=6, hidden=(8,), coeff=0.8)
    x, n_replicas, n_calls = randn(2, 2, seed=15, scale=2), 8, 300
    leaf, a = x.repeat(n_replicas, 1).requires_grad_(), randn(2, seed=16)
    a_rep = a.repeat(n_replicas) / n_replicas
    draws = torch.stack([weighted_grads(series_estimate(grad, seed), g, leaf, a_rep)[1]
                         for seed in range(n_calls)])
    mean, se = mean_and_se(draws)
    _, expected = weighted_grads(lambda g, x: brute_residual_logdet(g, x, True), g,
                                 leaf, a_rep)
    assert se.max() < 0.05 * expected.abs().max()  # precise enough to see a bias
    assert_within_se(mean, se, expected, n_se=4.5)


# ------------------------------------------------------------------------- gradcheck
def gradcheck_logdet(g, x, **kwargs):
    """gradcheck w.r.t. ``x`` and g's own parameters (which logdet_estimate reads from
    ``g``; gradcheck perturbs them in place). Re-seeding inside makes every call use
    the same draws, so the estimate is a deterministic function."""
    def fn(x, *params):
        return logdet_estimate(g, x, generator=seeded(3), **kwargs)

    return torch.autograd.gradcheck(fn, (x.requires_grad_(), *g.parameters()))


def test_gradcheck_exact():
    assert gradcheck_logdet(SmoothBranch(3, 5, seed=0), randn(2, 3, seed=1),
                            estimator="exact")


def test_gradcheck_exact_on_images():
    # eval(): sigma is then the stored buffer in value and gradient alike. gradcheck
    # perturbs weights through .data, which (by design) triggers no refresh, so in
    # training mode it would compare d(u^T W v)/dW against a frozen normalisation.
    g = small_conv(seed=2).eval()
    assert gradcheck_logdet(g, randn(1, 2, 3, 3, seed=3), estimator="exact")


@pytest.mark.parametrize("options", [{}, {"n_probes": 2, "roulette": "poisson"}])
def test_gradcheck_naive_series(options):
    assert gradcheck_logdet(SmoothBranch(3, 5, seed=4), randn(2, 3, seed=5),
                            grad="naive", **options)


@pytest.mark.parametrize("grad, d, options", [
    ("backward_in_forward", 3, {}),
    ("memory_efficient", 1, {}),  # Neumann is the exact derivative in one dimension
    ("memory_efficient", 3, {"estimator": "truncated", "n_exact_terms": 1}),
])
def test_gradcheck_deferred(grad, d, options):
    assert gradcheck_logdet(SmoothBranch(d, 5, seed=6), randn(2, d, seed=7),
                            grad=grad, **options)


@pytest.mark.parametrize("grad", ["backward_in_forward", "memory_efficient"])
def test_deferred_backward_twice_with_retained_graph(grad):
    g, x = model_and_rows("mlp")
    logdet = logdet_estimate(g, x, grad=grad, generator=seeded(0))
    weight = next(g.parameters())
    first = torch.autograd.grad(logdet.sum(), weight, retain_graph=True)
    second = torch.autograd.grad(logdet.sum(), weight)
    torch.testing.assert_close(first, second)
