import math

import pytest
import torch
from oracles import DTYPE, brute_logdet, contractive_mlp, fill_parameters_, randn
from torch import nn

from skresflow.core import (
    LipschitzConv2d,
    LipschitzLinear,
    LipSwish,
    ResidualBlock,
    conv_branch,
    mlp_branch,
)


def lipschitz_layers(module):
    return [m for m in module.modules()
            if isinstance(m, LipschitzLinear | LipschitzConv2d)]


@pytest.mark.parametrize("hidden", [(8,), (16, 8, 4)])
@pytest.mark.parametrize("preactivation", [False, True])
def test_mlp_branch_layout(hidden, preactivation):
    g = mlp_branch(3, hidden, activation="elu", coeff=0.7, preactivation=preactivation)
    layers = lipschitz_layers(g)
    dims = [(m.in_features, m.out_features) for m in layers]
    assert dims == list(zip((3, *hidden), (*hidden, 3), strict=True))
    assert all(m.coeff == 0.7 for m in layers)
    n_acts = sum(isinstance(m, nn.ELU) for m in g)
    assert n_acts == len(hidden) + preactivation
    assert isinstance(g[0], nn.ELU) == preactivation
    assert isinstance(g[-1], LipschitzLinear)


def test_conv_branch_layout():
    g = conv_branch(3, 8, coeff=0.9)
    convs = lipschitz_layers(g)
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs] == [
        (3, 8, 3), (8, 8, 1), (8, 3, 3)]
    assert sum(isinstance(m, LipSwish) for m in g) == 3
    assert isinstance(g[0], LipSwish) and all(m.coeff == 0.9 for m in convs)


def block_and_rows(kind):
    if kind == "mlp":
        g, x = contractive_mlp(3, seed=0, hidden=(8, 8), coeff=0.9), randn(4, 3, seed=1)
    else:
        g = fill_parameters_(conv_branch(2, 4, coeff=0.9).to(DTYPE), seed=2)
        x = randn(2, 2, 3, 3, seed=3, scale=2)
    return ResidualBlock(g, estimator="exact"), x


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_block_forward_logdet_and_inverse(kind):
    block, x = block_and_rows(kind)
    y, logdet = block(x)
    torch.testing.assert_close(y, x + block.g(x), rtol=0, atol=1e-15)
    expected = brute_logdet(lambda t: block(t)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_block_bound_is_product_of_layer_norms_and_below_one(kind):
    block, x = block_and_rows(kind)
    block(x)
    layers = lipschitz_layers(block.g)
    bound = block.lipschitz_bound()
    assert bound == pytest.approx(math.prod(m.lipschitz_bound() for m in layers))
    assert bound < 1
    assert len(block.sigmas()) == len(layers)
    assert all(isinstance(s, float) and s > 0 for s in block.sigmas())


def test_conv_block_bound_needs_a_forward_pass():
    block, _ = block_and_rows("conv")
    with pytest.raises(RuntimeError, match="call forward first"):
        block.lipschitz_bound()


def test_block_rejects_bad_logdet_settings_and_keeps_old_ones():
    g = contractive_mlp(2, seed=4)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ResidualBlock(g, estimator="bogus")
    block = ResidualBlock(g, estimator="exact")
    with pytest.raises(ValueError, match="n_probes must be a positive int; got 0"):
        block.configure(n_probes=0)
    with pytest.raises(TypeError, match=r"unknown logdet options \['probes'\]"):
        block.configure(probes=2)
    assert block.logdet_config == {"estimator": "exact", "n_exact_terms": 2,
                                   "grad": "memory_efficient"}
