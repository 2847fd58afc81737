"""FactorOut and the multiscale image flow with factor-out: shapes, exact log-det
against the brute-force Jacobian, inversion, ActNorm initialisation, classifier taps."""

import math

import pytest
import torch
from oracles import DTYPE, brute_logdet, fill_parameters_, randn, seeded

from skresflow.core import (
    ActNorm,
    FactorOut,
    ResidualBlock,
    Squeeze,
    image_flow,
    initialize_actnorm,
)
from skresflow.core.heads import HybridFlow, MultiscaleHead, scale_channels

TINY = dict(n_blocks=1, hidden_channels=4, n_fc_blocks=1, fc_hidden=8, coeff=0.9)


def tiny_flow(shape, n_scales, seed=0, factor_out=True, preprocessing=None):
    """A float64 image flow with seeded weights and ActNorms initialised on data,
    every block on the exact log-det."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = image_flow(
            shape,
            n_scales=n_scales,
            factor_out=factor_out,
            preprocessing=preprocessing,
            **TINY,
        ).to(DTYPE)
    for block in flow.blocks:
        fill_parameters_(block.g, seed + 1, scale=0.5)
    if preprocessing == "logit":  # data in (0, 1)
        x = torch.rand(64, *shape, generator=seeded(seed + 2), dtype=DTYPE)
    else:
        x = randn(64, *shape, seed=seed + 2)
    initialize_actnorm(flow, x)
    return flow.configure_logdet(estimator="exact")


def factor_outs(flow):
    return [m for m in flow.modules() if isinstance(m, FactorOut)]


@pytest.mark.parametrize(
    "shape, n_scales, out_channels, n_blocks",
    [
        ((1, 4, 4), 2, [2], 3),
        ((1, 4, 4), 3, [2, 4], 4),
        ((2, 4, 4), 2, [4], 3),
        ((1, 8, 8), 3, [2, 4], 4),
        ((1, 4, 4), 1, [], 2),  # one scale: nothing to factor out
    ],
)
def test_structure_and_shapes(shape, n_scales, out_channels, n_blocks):
    flow = tiny_flow(shape, n_scales)
    assert [m.out_channels for m in factor_outs(flow)] == out_channels
    # Nested blocks are the flow's blocks (configuration, Lipschitz checks).
    assert len(flow.blocks) == n_blocks
    assert all(b.logdet_config["estimator"] == "exact" for b in flow.blocks)
    x = randn(5, *shape, seed=3)
    z, logdet = flow(x)
    assert z.shape == (5, math.prod(shape)) and logdet.shape == (5,)
    assert flow.latent_shape == (math.prod(shape),)


@pytest.mark.parametrize(
    "shape, n_scales", [((1, 4, 4), 2), ((1, 4, 4), 3), ((2, 4, 4), 3)]
)
def test_logdet_matches_brute_force_jacobian(shape, n_scales):
    flow = tiny_flow(shape, n_scales)
    x = randn(3, *shape, seed=4)
    _, logdet = flow(x)
    expected = brute_logdet(lambda v: flow(v)[0], x)
    torch.testing.assert_close(logdet, expected, rtol=1e-9, atol=1e-9)
    # log p: the standard normal density of every latent coordinate, factored-out
    # ones included, plus the log-det.
    z, _ = flow(x)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(flow.log_prob(x), base + expected, rtol=1e-9, atol=1e-9)


def test_logdet_matches_brute_force_with_logit_preprocessing():
    flow = tiny_flow((1, 4, 4), 3, preprocessing="logit")
    x = torch.rand(3, 1, 4, 4, generator=seeded(5), dtype=DTYPE) * 0.9 + 0.05
    _, logdet = flow(x)
    torch.testing.assert_close(
        logdet, brute_logdet(lambda v: flow(v)[0], x), rtol=1e-9, atol=1e-9
    )


def test_factored_channels_go_straight_to_the_latent():
    # The first coordinates of z are the second half of the squeezed channels
    # after one ActNorm: no later layer touches them.
    flow = tiny_flow((1, 4, 4), 3)
    x = randn(4, 1, 4, 4, seed=6)
    h = x
    for layer in list(flow.layers)[: list(flow.layers).index(factor_outs(flow)[0])]:
        h, _ = layer(h)
    outer = factor_outs(flow)[0]
    expected, _ = outer.norm(h[:, outer.kept_channels :])
    z, _ = flow(x)
    torch.testing.assert_close(z[:, : expected[0].numel()], expected.flatten(1))


@pytest.mark.parametrize("n_scales", [2, 3])
def test_inverse_round_trip(n_scales):
    flow = tiny_flow((2, 4, 4), n_scales)
    x = randn(6, 2, 4, 4, seed=7)
    with torch.no_grad():
        z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-8)
        w = randn(6, 32, seed=8)
        torch.testing.assert_close(flow(flow.inverse(w))[0], w, rtol=0, atol=1e-8)


def test_sampling_shape_and_determinism():
    flow = tiny_flow((1, 8, 8), 3, preprocessing="logit")
    a = flow.sample(5, seeded(0))
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, flow.sample(5, seeded(0)))
    assert a.min() >= -1e-5 and a.max() <= 1 + 1e-5  # inverse logit: [0, 1]


def test_actnorm_initialisation_reaches_nested_layers():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = image_flow((1, 8, 8), factor_out=True, preprocessing=None, **TINY)
    norms = [m for m in flow.modules() if isinstance(m, ActNorm)]
    inputs = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: inputs.append(out[0]))
        for m in norms
    ]
    x = randn(500, 1, 8, 8, seed=9, dtype=torch.float32) * 3 + 1
    initialize_actnorm(flow, x)
    for hook in hooks:
        hook.remove()
    assert all(bool(m.initialized) for m in norms)
    # Each ActNorm's output on its initialisation batch is standardised per
    # channel (variances above the 0.2 floor).
    for out in inputs:
        flat = out.transpose(0, 1).reshape(out.shape[1], -1)
        torch.testing.assert_close(
            flat.mean(1), torch.zeros(len(flat)), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            flat.var(1, unbiased=False), torch.ones(len(flat)), atol=1e-3, rtol=0
        )


def test_classifier_taps_read_the_factored_out_channels():
    flow = tiny_flow((1, 8, 8), 3)
    assert scale_channels(flow) == [2, 4, 4]
    assert scale_channels(tiny_flow((1, 8, 8), 3, factor_out=False)) == [1, 4, 16]
    head = MultiscaleHead(scale_channels(flow), 3, hidden_channels=5).to(DTYPE)
    hybrid = HybridFlow(flow, head)
    seen = []
    hybrid.head.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    x = randn(4, 1, 8, 8, seed=10)
    log_p, logits = hybrid.classify(x)
    assert logits.shape == (4, 3)
    assert [t.shape[1:] for t in seen[0]] == [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
    # The taps are the latent code's factored-out parts and the last scale's map.
    z, _ = flow(x)
    torch.testing.assert_close(seen[0][0].flatten(1), z[:, :32])
    torch.testing.assert_close(seen[0][1].flatten(1), z[:, 32:48])
    torch.testing.assert_close(log_p, flow.log_prob(x))
    _, logits_fast = hybrid.classify(x, density=False)
    torch.testing.assert_close(logits_fast, logits)


def test_factor_out_rejects_a_single_channel():
    with pytest.raises(
        ValueError, match=r"at least 2 channels .* got in_shape=\(1, 4, 4\)"
    ):
        FactorOut((1, 4, 4), [], (0,))


def test_layers_in_data_to_latent_order():
    flow = tiny_flow((1, 8, 8), 3)
    kinds = [
        type(m).__name__
        for m in flow.modules()
        if isinstance(m, (ResidualBlock, Squeeze, FactorOut))
    ]
    assert kinds == [
        "ResidualBlock",
        "Squeeze",
        "FactorOut",
        "ResidualBlock",
        "Squeeze",
        "FactorOut",
        "ResidualBlock",
        "ResidualBlock",
    ]
