import math
import re

import pytest
import torch
from oracles import DTYPE
from torch import nn

from skresflow.core import ACTIVATIONS, LipSwish, make_activation

# Betas chosen so that the maximum slope (at beta * z ~ 2.4) lies inside GRID.
BETAS = [0.1, 0.5, 1.0, 3.0, 30.0]
GRID = torch.linspace(-60.0, 60.0, 240_001, dtype=DTYPE)


def lipswish_with_beta(beta):
    act = LipSwish().to(DTYPE)
    with torch.no_grad():
        act.beta.fill_(math.log(math.expm1(beta)))  # inverse softplus
    return act


def max_abs_slope(act, z=GRID):
    z = z.clone().requires_grad_()
    (slope,) = torch.autograd.grad(act(z).sum(), z)
    return slope.abs().max().item()


def test_lipswish_value_matches_formula():
    act = LipSwish(beta_init=0.3).to(DTYPE)
    z = torch.linspace(-6, 6, 101, dtype=DTYPE)
    beta = math.log1p(math.exp(act.beta.item()))  # the raw parameter is stored
    expected = z / (1 + torch.exp(-beta * z)) / 1.1
    torch.testing.assert_close(act(z), expected, rtol=1e-14, atol=1e-15)


def test_lipswish_default_raw_beta_is_one_half():
    assert LipSwish().beta.item() == 0.5


def test_lipswish_beta_is_learnable_with_analytic_gradient():
    act = LipSwish(beta_init=0.2).to(DTYPE)
    raw = act.beta.item()
    z = torch.linspace(-3, 3, 13, dtype=DTYPE)
    act(z).sum().backward()
    # d/draw sum z sigmoid(beta z) / 1.1 = sum z^2 s (1 - s) / 1.1 * sigmoid(raw)
    beta = math.log1p(math.exp(raw))
    s = torch.sigmoid(beta * z)
    dbeta_draw = torch.sigmoid(torch.tensor(raw, dtype=DTYPE))
    expected = (z**2 * s * (1 - s)).sum() / 1.1 * dbeta_draw
    assert isinstance(act.beta, nn.Parameter)
    torch.testing.assert_close(act.beta.grad, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("beta", BETAS)
def test_lipswish_is_one_lipschitz_and_tight(beta):
    slope = max_abs_slope(lipswish_with_beta(beta))
    # sup |d/dz z sigmoid(beta z)| = 1.0998... for every beta: the 1.1 divisor makes
    # the bound hold with almost no slack.
    assert slope <= 1.0
    assert slope > 0.999


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_is_one_lipschitz(name):
    act = make_activation(name).to(DTYPE)
    assert isinstance(act, nn.Module)
    assert max_abs_slope(act) <= 1.0 + 1e-12


@pytest.mark.parametrize("name, cls", [("lipswish", LipSwish), ("elu", nn.ELU),
                                       ("softplus", nn.Softplus), ("tanh", nn.Tanh),
                                       ("relu", nn.ReLU)])
def test_make_activation_builds_a_fresh_module_of_the_named_kind(name, cls):
    first, second = make_activation(name), make_activation(name)
    assert isinstance(first, cls)
    assert first is not second  # learnable betas must not be shared between layers


def test_all_documented_names_are_listed():
    assert set(ACTIVATIONS) == {"lipswish", "elu", "softplus", "tanh", "relu"}


@pytest.mark.parametrize("name", ["swish", "LipSwish", "", None])
def test_unknown_activation_raises(name):
    match = (r"activation must be one of \('lipswish', 'elu', 'softplus', 'tanh', "
             rf"'relu'\); got {re.escape(repr(name))} instead")
    with pytest.raises(ValueError, match=match):
        make_activation(name)


def _lipswish_raw(x, b):
    """LipSwish as a function of its input and its raw (pre-softplus) parameter."""
    act = LipSwish()
    del act.beta
    act.beta = b  # a plain tensor, so gradcheck can perturb it
    return act(x)


def test_lipswish_first_and_second_derivatives_pass_gradcheck():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, dtype=DTYPE, generator=gen).requires_grad_()
    b = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(_lipswish_raw, (x, b))
    assert torch.autograd.gradgradcheck(_lipswish_raw, (x, b))


@pytest.mark.parametrize("raw_beta", [-30.0, -3.0, 0.5, 4.0])
def test_lipswish_gradient_free_form_matches_the_graph_form(raw_beta):
    """LipSwish evaluates silu(beta x) / (1.1 beta) without a graph and
    x sigmoid(beta x) / 1.1 with one: the same function to rounding."""
    act = LipSwish(beta_init=raw_beta).double()
    x = torch.linspace(-20, 20, 401, dtype=torch.float64)
    with torch.no_grad():
        fast = act(x)
    graph = act(x.clone().requires_grad_())
    assert graph.requires_grad
    torch.testing.assert_close(fast, graph.detach(), rtol=1e-12, atol=1e-14)
