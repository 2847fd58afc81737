"""Exact dense refresh: batched across layers, vectors for the gradient of sigma."""

import copy

import pytest
import torch
from oracles import DTYPE, randn

from skresflow.core import (
    ActNorm,
    Flow,
    LipschitzConv2d,
    LipschitzLinear,
    ResidualBlock,
    lipschitz,
    mlp_branch,
)
from skresflow.core.lipschitz import refresh_layers


def seeded_linear(n_out, n_in, seed, dtype=DTYPE):
    layer = LipschitzLinear(n_in, n_out).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(randn(n_out, n_in, seed=seed, dtype=dtype))
    return layer


def top_triplet(weight):
    u, s, vh = torch.linalg.svd(weight.detach(), full_matrices=False)
    return u[:, 0], vh[0], s[0]


def rayleigh(layer):
    return (layer._u @ layer.weight.detach() @ layer._v).item()


def assert_same_state(a, b):
    other = b.state_dict()
    for name, x in a.state_dict().items():
        assert torch.equal(x, other[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_refresh_equals_one_layer_at_a_time(dtype):
    shapes = [(8, 3), (8, 3), (8, 3), (5, 8), (5, 8), (3, 3)]
    layers = [seeded_linear(m, n, seed, dtype) for seed, (m, n) in enumerate(shapes)]
    conv = LipschitzConv2d(2, 3, 3).to(dtype)
    conv(torch.zeros(1, 2, 4, 4, dtype=dtype))
    with torch.no_grad():
        conv.weight.mul_(3.0)  # stale: refreshed by its own power iteration
    alone = copy.deepcopy([*layers, conv])
    refresh_layers([*layers, conv])
    for layer in alone:
        layer.refresh()
    for batched, single in zip([*layers, conv], alone, strict=True):
        assert batched._key == batched._weight_key()
        torch.testing.assert_close(batched.sigma, single.sigma, rtol=0, atol=0)
        torch.testing.assert_close(batched._u, single._u, rtol=1e-12, atol=1e-6)
        torch.testing.assert_close(batched._v, single._v, rtol=1e-12, atol=1e-6)


def test_exact_sigma_and_vectors_on_a_cold_start():
    layer = seeded_linear(7, 4, seed=0)
    layer.refresh()
    u, v, sigma = top_triplet(layer.weight)
    assert layer.last_power_iter == 0
    torch.testing.assert_close(layer.sigma, sigma, rtol=1e-14, atol=0)
    # Random start vectors are far off: the exact top vectors replace them.
    assert abs(layer._u @ u) == pytest.approx(1, abs=1e-10)
    assert abs(layer._v @ v) == pytest.approx(1, abs=1e-10)
    assert rayleigh(layer) == pytest.approx(sigma.item(), rel=1e-12)


@pytest.mark.parametrize("n_out, n_in", [(6, 4), (4, 6)])
def test_vectors_stuck_at_another_singular_vector_are_replaced(n_out, n_in):
    layer = seeded_linear(n_out, n_in, seed=1)
    layer.refresh()
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    with torch.no_grad():
        # The second singular pair is a fixed point of power iteration.
        layer._u.copy_(u[:, 1])
        layer._v.copy_(vh[1])
        layer.weight.mul_(1.5)
    layer.refresh()
    assert rayleigh(layer) >= (1 - layer.rtol) * layer.sigma.item()
    assert abs(layer._v @ vh[0]) == pytest.approx(1, abs=1e-10)


def test_gradient_vectors_after_many_small_steps():
    layer = seeded_linear(16, 8, seed=2)
    layer.refresh()
    for seed in range(20):  # a random walk: the vectors must follow the weight
        with torch.no_grad():
            layer.weight.add_(randn(16, 8, seed=100 + seed, scale=0.05))
        layer.refresh()
        sigma = top_triplet(layer.weight)[2].item()
        assert abs(layer.sigma.item() - sigma) <= layer.rtol * sigma
        assert rayleigh(layer) >= (1 - layer.rtol) * layer.sigma.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-5, 1e-3, 3e-2, 1.0])
def test_sigma_within_rtol_after_changes_of_any_size(dtype, scale):
    layer = seeded_linear(32, 16, seed=8, dtype=dtype)
    layer.refresh()
    for seed in range(10):
        with torch.no_grad():
            step = randn(32, 16, seed=200 + seed, scale=scale, dtype=dtype)
            layer.weight.add_(step)
        layer.refresh()
        exact = torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2)
        assert abs(layer.sigma.item() / exact.item() - 1) <= layer.rtol * (1 + 1e-4)
        norm = spectral_norm_of(layer.normalized_weight())
        assert norm <= layer.coeff / (1 - layer.rtol) * (1 + 1e-5)


def spectral_norm_of(weight):
    return torch.linalg.matrix_norm(weight.detach().double(), ord=2).item()


def test_zero_weight_is_left_unchanged():
    layer = seeded_linear(4, 3, seed=9)
    with torch.no_grad():
        layer.weight.zero_()
    layer.refresh()
    assert layer.sigma.item() == 0
    assert torch.equal(layer.normalized_weight(), layer.weight)


def test_stored_estimate_kept_when_within_rtol():
    layer = seeded_linear(6, 6, seed=3)
    layer.refresh()
    before = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight.mul_(1 + 1e-4)  # sigma moves by 1e-4 < rtol
    layer.refresh()
    for name in ("sigma", "_u", "_v"):
        assert torch.equal(getattr(layer, name), getattr(before, name)), name


def test_copy_and_reload_change_no_state():
    layer = seeded_linear(5, 9, seed=4)
    layer(randn(2, 9, seed=5))
    twin = copy.deepcopy(layer)
    fresh = LipschitzLinear(9, 5).to(DTYPE)
    fresh.load_state_dict(layer.state_dict())
    x = randn(3, 9, seed=6)
    for other in (twin, fresh):
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        assert_same_state(other, layer)


def test_flow_forward_refreshes_every_dense_layer_after_a_step(monkeypatch):
    torch.manual_seed(0)
    blocks = [ResidualBlock(mlp_branch(3, (8, 8)), estimator="exact") for _ in range(3)]
    flow = Flow([ActNorm(3), *blocks], (3,)).to(DTYPE)
    twin = copy.deepcopy(flow)
    x = randn(16, 3, seed=7)
    optimizer = torch.optim.SGD(flow.parameters(), lr=0.5)
    flow.log_prob(x).mean().backward()
    optimizer.step()
    twin.load_state_dict(flow.state_dict())
    # The flow refreshes all its layers before the first one runs ...
    layers = [m for m in flow.modules() if isinstance(m, LipschitzLinear)]
    flow.layers[0](x)  # (an ActNorm: refreshes nothing)
    assert all(layer._key != layer._weight_key() for layer in layers)
    groups = []
    batched = lipschitz._refresh_exact
    monkeypatch.setattr(
        lipschitz, "_refresh_exact", lambda g: batched(groups.append(g) or g)
    )
    loss = flow.log_prob(x).sum()
    assert sorted(len(group) for group in groups) == [3, 3, 3]  # one per shape
    assert all(layer._key == layer._weight_key() for layer in layers)
    # ... with the values and gradients each layer gets refreshing on its own.
    z, logdet = _forward_layer_by_layer(twin, x)
    twin_loss = (twin.base_log_prob(z) + logdet).sum()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss, list(flow.parameters()))
    twin_grads = torch.autograd.grad(twin_loss, list(twin.parameters()))
    for g, h in zip(grads, twin_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def _forward_layer_by_layer(flow, x):
    """Flow.forward without its batched refresh: each layer refreshes itself."""
    logdet = x.new_zeros(x.shape[0])
    for layer in flow.layers:
        x, ld = layer(x)
        logdet = logdet + ld
    return x, logdet


def test_training_forward_survives_a_refresh_before_backward():
    layer = seeded_linear(4, 4, seed=15)
    x = randn(3, 4, seed=16)
    loss = layer(x).sum()  # saves the vectors for the backward pass
    u_before, v_before = layer._u.clone(), layer._v.clone()
    with torch.no_grad():
        layer._u.copy_(randn(4, seed=17))  # an in-place change of the buffers
    loss.backward()
    fresh = seeded_linear(4, 4, seed=15)
    fresh._u.copy_(u_before), fresh._v.copy_(v_before)
    fresh.refresh()
    fresh(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, fresh.weight.grad)
