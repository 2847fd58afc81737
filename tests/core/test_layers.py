import math

import pytest
import torch
from oracles import DTYPE, brute_logdet, randn

from skresflow.core import ActNorm, FixedAffine, LogitTransform, Reshape, Squeeze


def output(layer):
    return lambda x: layer(x)[0]


def assert_logdet_matches_brute_force(layer, x):
    _, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(logdet, brute_logdet(output(layer), x), rtol=0,
                               atol=1e-10)


def assert_inverts(layer, x, atol=1e-12):
    torch.testing.assert_close(layer.inverse(layer(x)[0]), x, rtol=0, atol=atol)


def feature_data(n, means, stds, seed, spatial=()):
    """(n, d) or (n, C, *spatial) data with the given per-feature means and stds."""
    shape = (1, len(means), *([1] * len(spatial)))
    z = randn(n, len(means), *spatial, seed=seed)
    z = (z - z.transpose(0, 1).flatten(1).mean(1).view(shape))
    z = z / z.transpose(0, 1).flatten(1).std(1, unbiased=False).view(shape)
    stds, means = torch.tensor(stds, dtype=DTYPE), torch.tensor(means, dtype=DTYPE)
    return z * stds.view(shape) + means.view(shape)


def per_feature(y):
    return y.transpose(0, 1).flatten(1)


# ----------------------------------------------------------------------------- ActNorm
@pytest.mark.parametrize("spatial", [(), (3, 4)])
def test_actnorm_initializes_to_zero_mean_unit_variance(spatial):
    # Variances 4, 0.49, 0.2 (at the clamp) and 0.01 (clamped to 0.2).
    stds = [2.0, 0.7, math.sqrt(0.2), 0.1]
    x = feature_data(500, [1.0, -3.0, 5.0, 0.5], stds, seed=0, spatial=spatial)
    layer = ActNorm(4).to(DTYPE)
    y, _ = layer(x)
    stats = per_feature(y)
    torch.testing.assert_close(stats.mean(1), torch.zeros(4, dtype=DTYPE), rtol=0,
                               atol=1e-12)
    expected_var = torch.tensor([1.0, 1.0, 1.0, 0.01 / 0.2], dtype=DTYPE)
    torch.testing.assert_close(stats.var(1, unbiased=False), expected_var, rtol=1e-10,
                               atol=0)
    expected_log_scale = -0.5 * torch.tensor([4.0, 0.49, 0.2, 0.2], dtype=DTYPE).log()
    torch.testing.assert_close(layer.log_scale.detach(), expected_log_scale,
                               rtol=1e-10, atol=0)


def test_actnorm_initializes_only_once():
    layer = ActNorm(2).to(DTYPE)
    layer(feature_data(100, [1.0, 2.0], [3.0, 0.5], seed=1))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(feature_data(100, [-5.0, 0.0], [0.1, 9.0], seed=2))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key])
    assert bool(layer.initialized)


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 3, 3)])
def test_actnorm_logdet_and_inverse(shape):
    layer = ActNorm(shape[1]).to(DTYPE)
    layer(randn(*shape, seed=3, scale=3) + 1)  # data-dependent initialisation
    with torch.no_grad():
        layer.log_scale.add_(randn(shape[1], seed=4, scale=0.3))  # as after training
    x = randn(*shape, seed=5)
    assert_logdet_matches_brute_force(layer, x)
    assert_inverts(layer, x)


def test_actnorm_logdet_gets_a_gradient():
    layer = ActNorm(3).to(DTYPE)
    x = randn(4, 2, 3, 3, seed=6).transpose(1, 2)  # (4, 3, 2, 3)
    layer(x)
    layer(x)[1].sum().backward()
    # Each row's log-det is (H * W) * sum(log_scale): 4 rows x 6 positions.
    torch.testing.assert_close(layer.log_scale.grad,
                               torch.full((3,), 24.0, dtype=DTYPE), rtol=0, atol=0)


# ----------------------------------------------------------------------------- Squeeze
def test_squeeze_shapes_logdet_and_exact_inverse():
    x = randn(2, 3, 4, 6, seed=7)
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(logdet, torch.zeros(2, dtype=DTYPE))
    assert torch.equal(Squeeze().inverse(y), x)


def test_squeeze_moves_each_2x2_patch_into_channels():
    x = randn(2, 3, 4, 6, seed=8)
    y, _ = Squeeze()(x)
    for b in range(2):
        for h in range(2):
            for w in range(3):
                patch = x[b, :, 2 * h:2 * h + 2, 2 * w:2 * w + 2].flatten()
                assert torch.equal(y[b, :, h, w].sort().values, patch.sort().values)


def test_squeeze_is_volume_preserving():
    x = randn(1, 1, 2, 4, seed=9)
    jac = torch.autograd.functional.jacobian(output(Squeeze()), x).reshape(8, 8)
    assert torch.equal(jac.sum(0), torch.ones(8, dtype=DTYPE))  # a permutation
    assert torch.equal(jac.sum(1), torch.ones(8, dtype=DTYPE))


@pytest.mark.parametrize("h, w", [(3, 4), (4, 5)])
def test_squeeze_odd_size_raises(h, w):
    with pytest.raises(ValueError, match=f"Squeeze needs even height and width; got "
                                         f"{h}x{w} instead"):
        Squeeze()(torch.zeros(1, 1, h, w))


# ---------------------------------------------------------------------- LogitTransform
def unit_interval(*shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
@pytest.mark.parametrize("shape", [(5, 3), (2, 1, 2, 3)])
def test_logit_values_logdet_and_inverse(alpha, shape):
    layer = LogitTransform(alpha)
    x = 0.01 + 0.98 * unit_interval(*shape, seed=10)
    y, _ = layer(x)
    torch.testing.assert_close(y, torch.logit(alpha + (1 - 2 * alpha) * x), rtol=1e-12,
                               atol=1e-12)
    assert_logdet_matches_brute_force(layer, x)
    assert_inverts(layer, x, atol=1e-14)


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 0.7])
def test_logit_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match=rf"alpha must be in \[0, 0.5\); got {alpha}"):
        LogitTransform(alpha)


# ------------------------------------------------------------------------- FixedAffine
@pytest.mark.parametrize("shape, stats_shape", [
    ((5, 3), (3,)),
    ((2, 3, 2, 2), (3, 1, 1)),  # per channel, broadcast over pixels
    ((2, 3, 2, 2), (3, 2, 2)),  # per pixel
])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_fixed_affine_logdet_and_inverse(shape, stats_shape, as_numpy):
    shift = randn(*stats_shape, seed=13)
    scale = 0.2 + randn(*stats_shape, seed=14).abs()
    if as_numpy:
        shift, scale = shift.numpy(), scale.numpy()
    layer = FixedAffine(shift, scale)
    x = randn(*shape, seed=11, scale=3)
    y, _ = layer(x)
    expected = (x - torch.as_tensor(shift)) / torch.as_tensor(scale)
    torch.testing.assert_close(y, expected, rtol=1e-15, atol=0)
    assert_logdet_matches_brute_force(layer, x)
    assert_inverts(layer, x)


def test_fixed_affine_has_no_trainable_parameters():
    layer = FixedAffine(torch.zeros(2), torch.ones(2))
    assert list(layer.parameters()) == []
    assert set(layer.state_dict()) == {"shift", "scale"}


# ----------------------------------------------------------------------------- Reshape
def test_reshape_round_trip_and_zero_logdet():
    layer = Reshape((2, 3, 4), (24,))
    x = randn(5, 2, 3, 4, seed=12)
    y, logdet = layer(x)
    assert y.shape == (5, 24) and torch.equal(y, x.flatten(1))
    assert torch.equal(logdet, torch.zeros(5, dtype=DTYPE))
    assert torch.equal(layer.inverse(y), x)


def test_reshape_size_mismatch_raises():
    with pytest.raises(ValueError, match=r"cannot reshape \(2, 3\) into \(5,\)"):
        Reshape((2, 3), (5,))
