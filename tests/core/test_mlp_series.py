"""The closed-form series of MLP and conv branches (skresflow.core._mlp_series)
against the autograd path: same generator draws, same value and gradients to
rounding, in every gradient mode, for both series estimators and every activation."""

import pytest
import torch
from oracles import DTYPE, brute_logdet, fill_parameters_, randn, seeded, weighted_grads

from skresflow.core import (
    GRAD_MODES,
    LipschitzLinear,
    conv_branch,
    logdet_estimate,
    mlp_branch,
)
from skresflow.core._mlp_series import mlp_series_branch
from skresflow.core.activations import ACTIVATIONS, LipSwish
from skresflow.core.jacobian import _forward_factors


class Opaque(torch.nn.Module):
    """The same function and parameters as ``g``, hidden from the closed form."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x)


def assert_equals_autograd(g, x, a, **kwargs):
    """Value and gradients (x and parameters, weighted per row by ``a``) of the
    closed form equal those of the autograd path for the same draws."""
    leaf = x.clone().requires_grad_()

    def estimate(module):
        return lambda _, rows: logdet_estimate(
            module, rows, generator=seeded(4), **kwargs
        )

    value, grads = weighted_grads(estimate(g), g, leaf, a)
    expected_value, expected = weighted_grads(estimate(Opaque(g)), g, leaf, a)
    assert grads.abs().max() > 1e-3
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


def branch(d, hidden, activation, preactivation, seed):
    g = mlp_branch(
        d, hidden, coeff=0.9, activation=activation, preactivation=preactivation
    ).to(DTYPE)
    return fill_parameters_(g, seed)


# (d, hidden widths, seed, options): hidden layers narrower and wider than d; seeds
# for which no row has a ReLU Jacobian of zero.
SHAPES = [
    (4, (2,), 4, {"n_probes": 1}),
    (3, (7, 5), 1, {"n_probes": 2, "probe": "rademacher", "roulette": "poisson"}),
]


@pytest.mark.parametrize("shape", range(len(SHAPES)), ids=["narrow", "wide"])
@pytest.mark.parametrize("preactivation", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("estimator", ["unbiased", "truncated"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_closed_form_equals_autograd_for_same_draws(
    grad, estimator, activation, preactivation, shape
):
    d, hidden, seed, options = SHAPES[shape]
    g = branch(d, hidden, activation, preactivation, seed)
    x = randn(5, d, seed=20 + seed, scale=1.5)
    assert mlp_series_branch(g, x, 1, False) is not None  # the closed form applies
    a = randn(5, seed=21)  # per-row weights
    kwargs = {"estimator": estimator, "n_exact_terms": 3, "grad": grad, **options}
    assert_equals_autograd(g, x, a, **kwargs)


def bias_free_branch(d, seed):
    layers = [
        LipSwish(),
        LipschitzLinear(d, 6, bias=False, coeff=0.9),
        LipSwish(),
        LipschitzLinear(6, d, bias=False, coeff=0.9),
    ]
    return fill_parameters_(torch.nn.Sequential(*layers).to(DTYPE), seed)


@pytest.mark.parametrize("wrt", ["all", "x only", "parameters only"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_closed_form_equals_autograd_bias_free_and_frozen(grad, wrt):
    g, x = bias_free_branch(3, seed=2), randn(4, 3, seed=3, scale=1.5)
    if wrt == "x only":
        g.requires_grad_(False)
    leaf = x.clone().requires_grad_(wrt != "parameters only")
    kwargs = {"grad": grad, "n_probes": 2}

    def grads(module):
        logdet = logdet_estimate(module, leaf, generator=seeded(5), **kwargs)
        wrt = [t for t in (leaf, *g.parameters()) if t.requires_grad]
        found = torch.autograd.grad((logdet * randn(4, seed=6)).sum(), wrt)
        return logdet.detach(), torch.cat([q.flatten() for q in found])

    value, found = grads(g)
    expected_value, expected = grads(Opaque(g))
    assert found.abs().max() > 1e-3
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-12)


def test_memory_efficient_gradient_is_formed_in_one_fused_node():
    g, x = branch(3, (6,), "lipswish", True, seed=5), randn(4, 3, seed=6)
    gx_and_logdet = logdet_estimate(g, x.requires_grad_(), generator=seeded(7))
    nodes, stack = set(), [gx_and_logdet.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = {type(node).__name__ for node in nodes}
    assert "_DeferredNeumannBackward" in names
    assert not {"SigmoidBackward0", "MmBackward0"} & names  # no graph of the branch


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_closed_form_without_gradients_equals_autograd(grad):
    g, x = branch(3, (6,), "lipswish", True, seed=5), randn(4, 3, seed=6)
    with torch.no_grad():
        closed = logdet_estimate(g, x, grad=grad, generator=seeded(7))
        auto = logdet_estimate(Opaque(g), x, grad=grad, generator=seeded(7))
    assert closed.grad_fn is None
    torch.testing.assert_close(closed, auto, rtol=1e-12, atol=1e-13)


def test_closed_form_applies_to_mlp_and_conv_branches_only():
    x = randn(2, 3, seed=0)
    assert mlp_series_branch(branch(3, (4,), "elu", False, 0), x, 1, False) is not None
    assert (
        mlp_series_branch(Opaque(branch(3, (4,), "elu", False, 0)), x, 1, False) is None
    )
    assert (
        mlp_series_branch(torch.nn.Sequential(torch.nn.Linear(3, 3)), x, 1, False)
        is None
    )
    image = randn(2, 2, 3, 3, seed=1)
    assert mlp_series_branch(conv_branch(2, 4).to(DTYPE), image, 1, False) is not None
    assert mlp_series_branch(conv_branch(2, 4).to(DTYPE), x, 1, False) is None
    assert mlp_series_branch(branch(3, (4,), "elu", False, 0), image, 1, False) is None


def image_branch(channels, hidden, activation, seed):
    g = conv_branch(channels, hidden, activation=activation, coeff=0.9).to(DTYPE)
    return fill_parameters_(g, seed)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("estimator", ["unbiased", "truncated"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_closed_form_of_conv_branches_equals_autograd(grad, estimator, activation):
    """Convolutions are linear maps too: their products, adjoints (transposed
    convolutions) and weight gradients give the same value and gradients as
    autograd through the branch, padding at the borders included."""
    g = image_branch(2, 3, activation, seed=7)
    x = randn(3, 2, 4, 5, seed=8, scale=1.5)
    assert mlp_series_branch(g, x, 1, False) is not None
    kwargs = {"estimator": estimator, "n_exact_terms": 3, "grad": grad}
    assert_equals_autograd(
        g, x, randn(3, seed=9), n_probes=2, probe="rademacher", **kwargs
    )


@pytest.mark.parametrize(
    "grad, d, options",
    [
        ("naive", 3, {"n_probes": 2}),
        ("backward_in_forward", 3, {}),
        ("neumann", 1, {}),  # Neumann is the exact derivative in one dimension
        ("memory_efficient", 3, {"estimator": "truncated", "n_exact_terms": 1}),
        ("memory_efficient", 1, {"n_probes": 2}),
    ],
)
def test_gradcheck_closed_form(grad, d, options):
    # eval(): sigma is the stored buffer in value and gradient alike (gradcheck
    # perturbs weights through .data, which triggers no refresh).
    g = branch(d, (4,), "lipswish", True, seed=8).eval()
    x = randn(2, d, seed=9)

    def fn(x, *params):
        return logdet_estimate(g, x, grad=grad, generator=seeded(3), **options)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *g.parameters()))


def test_gradgradcheck_closed_form_naive():
    """The naive mode stays twice differentiable: the hand-written backward of the
    factors falls back on autograd under create_graph. (The Neumann gradient is
    not the derivative of a function autograd sees: w is computed without a
    graph, so its second derivative is not checkable this way.)"""
    g = branch(2, (3,), "lipswish", True, seed=10).eval()
    x = randn(2, 2, seed=11)

    def fn(x, *params):
        return logdet_estimate(g, x, grad="naive", generator=seeded(3))

    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), *g.parameters()))


def odd_conv_branch(seed):
    """A convolution first, without bias; a 1x1 and a 5x5 convolution in a row;
    two activations in a row at the end."""
    from skresflow.core import LipschitzConv2d

    layers = [
        LipschitzConv2d(2, 3, 1, bias=False, coeff=0.9),
        LipSwish(),
        LipschitzConv2d(3, 3, 1, coeff=0.9),
        LipschitzConv2d(3, 2, 5, coeff=0.9),
        LipSwish(),
        torch.nn.ELU(),
    ]
    return fill_parameters_(torch.nn.Sequential(*layers).to(DTYPE), seed)


@pytest.mark.parametrize("sharing", ["per_sample", "shared", "row_hash"])
@pytest.mark.parametrize("grad", GRAD_MODES)
def test_closed_form_of_unusual_conv_branches_equals_autograd(grad, sharing):
    g = odd_conv_branch(seed=3)
    kwargs = {"grad": grad, "n_probes": 2, "probe_sharing": sharing}
    for shape, seed in (((3, 2, 4, 5), 11), ((2, 2, 6, 3), 12)):  # sizes change
        x = randn(*shape, seed=seed, scale=1.5)
        assert_equals_autograd(g, x, randn(shape[0], seed=seed + 1), **kwargs)


@pytest.mark.parametrize("shape", [(3, 2, 4, 3), (2, 2, 8, 7)], ids=["dense", "local"])
@pytest.mark.parametrize("activation", [*ACTIVATIONS, "odd branch"])
def test_conv_exact_logdet_without_graph_equals_brute_force(activation, shape):
    """Small images take every column whole, larger ones only each column's
    window (radius 2 here; not square: rows and columns must not mix)."""
    from skresflow.core.jacobian import _local_columns, conv_branch_logdet
    from skresflow.core.logdet import logdet_estimate

    if activation == "odd branch":
        g = odd_conv_branch(seed=5)
    else:
        g = image_branch(2, 5, activation, seed=4)
    x = randn(*shape, seed=6)
    factors = _forward_factors(g, x)[1]
    assert (_local_columns(factors, x) is None) == (shape[-1] == 3)
    with torch.no_grad():
        gx, logdet = conv_branch_logdet(g, x)
        torch.testing.assert_close(gx, g(x), rtol=1e-12, atol=1e-12)
        via_estimate = logdet_estimate(g, x, estimator="exact")
    expected = brute_logdet(g, x, residual=True)
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(via_estimate, expected, rtol=1e-10, atol=1e-10)
    assert conv_branch_logdet(g, x.flatten(1)) is None  # not images
    # With a graph to build, the exact estimate still differentiates (autograd).
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(logdet_estimate(g, x, estimator="exact").sum(), x)
    (expected_grad,) = torch.autograd.grad(
        brute_logdet(g, x, residual=True, create_graph=True).sum(), x
    )
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


def test_conv_exact_logdet_of_activation_only_branch():
    from skresflow.core.jacobian import conv_branch_logdet

    g = torch.nn.Sequential(LipSwish().to(DTYPE))
    x = randn(2, 1, 3, 3, seed=0)
    with torch.no_grad():
        _, logdet = conv_branch_logdet(g, x)
    torch.testing.assert_close(logdet, brute_logdet(g, x, residual=True))
