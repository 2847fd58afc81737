"""Values of the log-det estimators against brute-force Jacobians: exact to 1e-10,
unbiased in mean over many draws, truncated with the predicted bias; options,
determinism and errors. Gradients are in test_logdet_grad.py."""

import pytest
import torch
from oracles import (
    DTYPE,
    SymmetricBranch,
    assert_within_se,
    brute_residual_logdet,
    contractive_mlp,
    mean_and_se,
    model_and_rows,
    randn,
    row_jacobians,
    seeded,
    series_terms,
)

from skresflow.core import ESTIMATORS, GRAD_MODES, logdet_estimate, residual_logdet


def kwargs_id(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


# ------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_exact_matches_brute_force(d):
    g = contractive_mlp(d, seed=d, coeff=0.9)
    x = randn(5, d, seed=100 + d, scale=2)
    expected = brute_residual_logdet(g, x)
    assert expected.abs().max() > 1e-2  # a log-det the comparison can see
    torch.testing.assert_close(logdet_estimate(g, x, estimator="exact"), expected,
                               rtol=0, atol=1e-10)


def test_exact_matches_brute_force_on_images():
    g, x = model_and_rows("conv")
    expected = brute_residual_logdet(g, x)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(logdet_estimate(g, x, estimator="exact"), expected,
                               rtol=0, atol=1e-10)


# ------------------------------------------------------------------ unbiased estimator
def call_means(g, x, n_calls, n_replicas, **kwargs):
    """``(n_calls, batch)``: per call, the mean over ``n_replicas`` copies of each row.

    Calls are independent (one roulette draw each); replicas only average probes."""
    batch = x.repeat(n_replicas, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        calls = [logdet_estimate(g, batch, generator=seeded(seed), **kwargs)
                 for seed in range(n_calls)]
    return torch.stack(calls).view(n_calls, n_replicas, -1).mean(1)


UNBIASED_CASES = [
    ("symmetric", 2, {}),
    ("symmetric", 2, {"roulette": "poisson"}),
    ("symmetric", 2, {"probe": "rademacher"}),
    ("symmetric", 2, {"n_probes": 3}),
    ("symmetric", 2, {"probe_sharing": "shared"}),
    ("symmetric", 2, {"probe_sharing": "row_hash", "n_probes": 2}),
    ("symmetric", 0, {"p": 0.3}),
    ("symmetric", 1, {"roulette": "poisson", "lam": 3.0}),
    ("symmetric", 0, {"roulette": "poisson"}),
    ("mlp", 2, {}),
    ("conv", 2, {"roulette": "poisson", "probe": "rademacher"}),
]


def case_id(kind, n_exact_terms, options):
    return f"{kind}-exact{n_exact_terms}-{kwargs_id(options) or 'defaults'}"


@pytest.mark.parametrize("kind, n_exact_terms, options", UNBIASED_CASES,
                         ids=[case_id(*case) for case in UNBIASED_CASES])
def test_unbiased_mean_matches_exact(kind, n_exact_terms, options):
    g, x = model_and_rows(kind)
    draws = call_means(g, x, 500, 20, n_exact_terms=n_exact_terms, **options)
    mean, se = mean_and_se(draws)
    exact = brute_residual_logdet(g, x)
    assert_within_se(mean, se, exact)
    if kind == "symmetric" and options.get("probe_sharing") is None:
        # Power: a series stopped after its exact terms (or its first term) would be
        # several standard errors off (not measurable with shared or row-hashed
        # probes: identical replicas share one probe, so they average nothing).
        head = series_terms(row_jacobians(g, x), max(n_exact_terms, 1)).sum(0)
        assert ((head - exact).abs() > 4 * se).any()


@pytest.mark.parametrize("d", [1, 2, 10])
def test_unbiased_mean_matches_exact_across_dimensions(d):
    g, x = contractive_mlp(d, seed=d, coeff=0.9), randn(3, d, seed=60 + d, scale=2)
    mean, se = mean_and_se(call_means(g, x, 300, 10))
    assert_within_se(mean, se, brute_residual_logdet(g, x))


# ----------------------------------------------------------------- truncated estimator
def test_truncated_one_term_is_hutchinson_trace():
    g, x = model_and_rows("mlp")
    n_draws = 4000
    with torch.no_grad():
        draws = logdet_estimate(g, x.repeat(n_draws, 1), estimator="truncated",
                                n_exact_terms=1, generator=seeded(0)).view(n_draws, -1)
    mean, se = mean_and_se(draws)
    trace = row_jacobians(g, x).diagonal(dim1=-2, dim2=-1).sum(-1)
    assert_within_se(mean, se, trace)


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_truncated_bias_is_predicted_by_next_series_term(n_terms):
    """For J symmetric with eigenvalues in [0, 1), log det(I + J) = sum over eigenvalues
    of an alternating series with decreasing terms, so the truncation error has the sign
    of the first omitted term, (-1)^n: truncating after an odd number of terms
    overestimates, after an even number underestimates, and
    |t_{n+1}| - |t_{n+2}| <= |bias| <= |t_{n+1}|."""
    g = SymmetricBranch(4, seed=3, c=0.9)
    x = randn(3, 4, seed=4, scale=0.5)
    n_draws = 8000
    with torch.no_grad():
        draws = logdet_estimate(g, x.repeat(n_draws, 1), estimator="truncated",
                                n_exact_terms=n_terms, probe="rademacher",
                                generator=seeded(0)).view(n_draws, -1)
    mean, se = mean_and_se(draws)
    jac, exact = row_jacobians(g, x), brute_residual_logdet(g, x)
    assert (torch.linalg.eigvalsh(jac) >= 0).all()
    terms = series_terms(jac, n_terms + 2)
    assert_within_se(mean, se, terms[:n_terms].sum(0))
    bias, sign = mean - exact, (-1) ** (n_terms + 1)
    assert (sign * bias > 4 * se).all()  # the bias is visible, with the predicted sign
    first_omitted, second_omitted = terms[n_terms].abs(), terms[n_terms + 1].abs()
    assert (bias.abs() <= first_omitted + 4 * se).all()
    assert (bias.abs() >= first_omitted - second_omitted - 4 * se).all()


# -------------------------------------------------------------- determinism, no_grad
@pytest.mark.parametrize("estimator", ["unbiased", "truncated"])
def test_same_generator_state_same_value(estimator):
    g, x = model_and_rows("mlp")
    first = logdet_estimate(g, x, estimator=estimator, generator=seeded(0))
    second = logdet_estimate(g, x, estimator=estimator, generator=seeded(0))
    other = logdet_estimate(g, x, estimator=estimator, generator=seeded(1))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("sharing", ["shared", "row_hash"])
def test_probe_sharing_makes_a_row_independent_of_the_batch(sharing):
    g, x = model_and_rows("mlp")
    batch = logdet_estimate(g, x, probe_sharing=sharing, generator=seeded(0))
    for i in range(x.shape[0]):
        alone = logdet_estimate(g, x[i:i + 1], probe_sharing=sharing,
                                generator=seeded(0))
        torch.testing.assert_close(alone, batch[i:i + 1], rtol=0, atol=1e-13)


def test_row_hash_gives_distinct_rows_distinct_probes():
    # For a linear g, J is the same for every row, so with one term (v^T J v) equal
    # estimates mean equal probes.
    g = torch.nn.Linear(3, 3, bias=False).to(DTYPE)
    with torch.no_grad():
        g.weight.copy_(0.5 * torch.eye(3, dtype=DTYPE) + 0.1 * randn(3, 3, seed=1))
    x = randn(12, 3, seed=2)

    def estimate(sharing):
        return logdet_estimate(g, x, estimator="truncated", n_exact_terms=1,
                               probe_sharing=sharing, generator=seeded(0))

    assert estimate("shared").unique().numel() == 1
    assert estimate("row_hash").unique().numel() >= 11  # a hash collision at most


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_no_grad_returns_plain_tensors_with_the_same_value(estimator, grad):
    g, x = model_and_rows("mlp")
    x.requires_grad_()
    with torch.no_grad():
        gx, logdet = residual_logdet(g, x, estimator=estimator, grad=grad,
                                     generator=seeded(0))
    assert logdet.grad_fn is None and gx.grad_fn is None
    assert not logdet.requires_grad and not gx.requires_grad
    with_grad = logdet_estimate(g, x, estimator=estimator, grad=grad,
                                generator=seeded(0))
    torch.testing.assert_close(logdet, with_grad.detach(), rtol=1e-14, atol=1e-15)


def test_nothing_to_differentiate_returns_plain_tensors():
    g, x = model_and_rows("mlp")
    g.requires_grad_(False)
    logdet = logdet_estimate(g, x, generator=seeded(0))
    assert logdet.grad_fn is None and not logdet.requires_grad


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("estimator, n_probes", [("exact", 1), ("unbiased", 1),
                                                 ("unbiased", 3)])
def test_residual_logdet_returns_g_of_x(kind, estimator, n_probes):
    g, x = model_and_rows(kind)
    gx, logdet = residual_logdet(g, x, estimator=estimator, n_probes=n_probes,
                                 generator=seeded(0))
    assert gx.shape == x.shape and logdet.shape == (x.shape[0],)
    torch.testing.assert_close(gx, g(x), rtol=0, atol=1e-14)


# ---------------------------------------------------------------------- bad arguments
BAD_ARGUMENTS = [
    ({"estimator": "stochastic"}, ValueError,
     r"estimator must be one of \('exact', 'unbiased', 'truncated'\); "
     r"got 'stochastic' instead"),
    ({"grad": "fast"}, ValueError,
     r"grad must be one of \('memory_efficient', 'neumann', 'backward_in_forward', "
     r"'naive'\); got 'fast' instead"),
    ({"n_exact_terms": -1}, ValueError,
     "n_exact_terms must be a non-negative int; got -1 instead"),
    ({"n_exact_terms": 2.0}, ValueError,
     "n_exact_terms must be a non-negative int; got 2.0 instead"),
    ({"estimator": "truncated", "n_exact_terms": 0}, ValueError,
     "the truncated estimator needs n_exact_terms >= 1"),
    ({"n_probe": 2}, TypeError,
     r"unknown logdet options \['n_probe'\]; allowed: \['lam', 'n_probes', 'p', "
     r"'probe', 'probe_sharing', 'roulette'\]"),
    ({"probe": "uniform"}, ValueError,
     r"probe must be one of \('gaussian', 'rademacher'\); got 'uniform' instead"),
    ({"probe_sharing": "batch"}, ValueError,
     r"probe_sharing must be one of \('per_sample', 'shared'.*\); got 'batch' instead"),
    ({"roulette": "binomial"}, ValueError,
     r"roulette must be one of \('geometric', 'poisson'\); got 'binomial' instead"),
    ({"p": 1.0}, ValueError, r"p must be in \(0, 1\); got 1.0 instead"),
    ({"lam": 0.0}, ValueError, "lam must be positive; got 0.0 instead"),
    ({"n_probes": 0}, ValueError, "n_probes must be a positive int; got 0 instead"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_ARGUMENTS,
                         ids=[kwargs_id(case[0]) for case in BAD_ARGUMENTS])
def test_bad_arguments_raise(kwargs, error, match):
    g, x = model_and_rows("mlp")
    with pytest.raises(error, match=match):
        logdet_estimate(g, x, **kwargs)


@pytest.mark.parametrize("x", [torch.zeros(3, dtype=DTYPE),
                               torch.zeros(3, 3, dtype=torch.long)], ids=["1-D", "int"])
def test_bad_input_raises(x):
    g, _ = model_and_rows("mlp")
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor of shape "
                                         r"\(batch, \*event\); got Tensor"):
        logdet_estimate(g, x)
