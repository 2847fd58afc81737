import pytest
import torch
import torch.nn.functional as F
from oracles import DTYPE, randn

from skresflow.core import LipschitzConv2d, LipschitzLinear, lipschitz

COEFF = 0.9
# Refresh tests tell "re-estimated" from "stale" (a stale sigma overshoots coeff by
# 50% or more there), so they allow the power iteration's own error, which reaches
# 10-25% when a weight has no spectral gap (see test_power_iteration_accurate_...).
REFRESH_SLACK = 0.25


def spectral_norm(matrix):
    return torch.linalg.matrix_norm(matrix.detach(), ord=2).item()


def linear_with_spectrum(n_out, n_in, top, seed, coeff=COEFF):
    """A layer whose weight has singular values ``top, top/2, ..., top/10``: a clear
    spectral gap, so power iteration to rtol must land within about rtol of ``top``."""
    layer = LipschitzLinear(n_in, n_out, coeff=coeff).to(DTYPE)
    rank = min(n_in, n_out)
    q_out = torch.linalg.qr(randn(n_out, n_out, seed=seed)).Q[:, :rank]
    q_in = torch.linalg.qr(randn(n_in, n_in, seed=seed + 1)).Q[:, :rank]
    s = torch.cat(
        [
            torch.tensor([top], dtype=DTYPE),
            torch.linspace(top / 2, top / 10, rank - 1, dtype=DTYPE),
        ]
    )
    with torch.no_grad():
        layer.weight.copy_(q_out @ torch.diag(s) @ q_in.t())
        layer.bias.copy_(randn(n_out, seed=seed + 2))  # not torch's global generator
    return layer


def effective_weight(layer):
    """The weight the forward pass really uses, read back from the layer's output."""
    eye = torch.eye(layer.in_features, dtype=layer.weight.dtype)
    return (layer(eye) - layer.bias).detach().t()


# ----------------------------------------------------------------------------- linear
@pytest.fixture(params=["exact", "power"])
def sigma_path(request, monkeypatch):
    """Run a dense-layer test with the certified dense path and with forced power
    iteration."""
    if request.param == "power":
        monkeypatch.setattr(lipschitz, "EXACT_MAX_COST", 0)
    return request.param


def test_small_linear_sigma_is_exact_and_large_uses_power_iteration():
    small = LipschitzLinear(64, 32).to(DTYPE)
    small(torch.zeros(1, 64, dtype=DTYPE))
    assert small.last_power_iter == 0
    torch.testing.assert_close(
        small.sigma.item(), spectral_norm(small.weight), rtol=1e-14, atol=0
    )
    large = LipschitzLinear(256, 256).to(DTYPE)
    large(torch.zeros(1, 256, dtype=DTYPE))
    assert large.last_power_iter > 1


@pytest.mark.usefixtures("sigma_path")
@pytest.mark.parametrize("n_out, n_in", [(3, 5), (8, 8), (16, 4), (1, 6)])
def test_linear_sigma_matches_exact_spectral_norm(n_out, n_in):
    layer = linear_with_spectrum(n_out, n_in, top=3.0, seed=n_out)
    layer(torch.zeros(1, n_in, dtype=DTYPE))
    exact = spectral_norm(layer.weight)
    # Power iteration gives a Rayleigh quotient: never above the true norm.
    assert layer.sigma.item() <= exact * (1 + 1e-12)
    assert layer.sigma.item() >= exact * (1 - 1e-2)


@pytest.mark.usefixtures("sigma_path")
@pytest.mark.parametrize("n_out, n_in", [(3, 5), (8, 8), (16, 4)])
def test_linear_normalized_weight_norm_is_at_most_coeff(n_out, n_in):
    layer = linear_with_spectrum(n_out, n_in, top=3.0, seed=n_out)
    norm = spectral_norm(effective_weight(layer))
    # sigma underestimates, so the normalised norm sits just above coeff, never below.
    assert COEFF * (1 - 1e-12) <= norm <= COEFF * (1 + 1e-2)


@pytest.mark.usefixtures("sigma_path")
def test_linear_small_weight_is_left_unchanged():
    layer = linear_with_spectrum(4, 3, top=0.5, seed=0)
    torch.testing.assert_close(layer.normalized_weight(), layer.weight, rtol=0, atol=0)


@pytest.mark.usefixtures("sigma_path")
def test_linear_lipschitz_bound_is_exact_norm_of_normalized_weight():
    layer = linear_with_spectrum(5, 7, top=2.0, seed=3)
    expected = spectral_norm(layer.normalized_weight())
    assert layer.lipschitz_bound() == pytest.approx(expected, rel=1e-12)


@pytest.mark.usefixtures("sigma_path")
def test_linear_train_and_eval_outputs_agree():
    layer = linear_with_spectrum(4, 4, top=2.0, seed=5)
    x = randn(6, 4, seed=6)
    train_out = layer(x)  # differentiable sigma = u^T W v
    layer.eval()
    torch.testing.assert_close(layer(x), train_out, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("sigma_path")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_power_iteration_accurate_for_random_weights(kind):
    errors = []
    for seed in range(40 if kind == "linear" else 10):
        if kind == "linear":
            layer = LipschitzLinear(2, 32, coeff=COEFF).to(DTYPE)
            shape, x = (32, 2), torch.zeros(1, 2, dtype=DTYPE)
        else:
            layer = LipschitzConv2d(2, 3, 3, coeff=COEFF).to(DTYPE)
            shape, x = (3, 2, 3, 3), torch.zeros(1, 2, 5, 5, dtype=DTYPE)
        with torch.no_grad():
            layer.weight.copy_(randn(*shape, seed=seed))
        layer(x)
        exact = (
            spectral_norm(layer.weight)
            if kind == "linear"
            else spectral_norm(conv_operator(layer.weight, (2, 5, 5)))
        )
        errors.append(1 - layer.sigma.item() / exact)
    assert max(errors) <= 1e-2


def grow_weight_with_adam(layer, n_steps, **adam_options):
    """Large Adam steps on a loss that pushes the output up; yields after each step."""
    x = randn(32, layer.in_features, seed=11)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1.0, **adam_options)
    for _ in range(n_steps):
        optimizer.zero_grad()
        (-layer(x).pow(2).sum()).backward()
        optimizer.step()
        yield


@pytest.mark.usefixtures("sigma_path")
@pytest.mark.usefixtures("sigma_path")
@pytest.mark.parametrize(
    "adam_options",
    [
        pytest.param({"foreach": False}, id="for-loop"),
        pytest.param({"foreach": True}, id="foreach"),
        pytest.param({"fused": True}, id="fused"),
    ],
)
def test_linear_bound_holds_after_every_optimizer_step(adam_options):
    layer = linear_with_spectrum(6, 6, top=3.0, seed=2)
    layer(torch.zeros(1, 6, dtype=DTYPE))
    sigma_before = layer.sigma.item()
    norms, raw_growth = [], []
    for _ in grow_weight_with_adam(layer, 5, **adam_options):
        raw_growth.append(spectral_norm(layer.weight) / sigma_before)
        norms.append(spectral_norm(effective_weight(layer)))  # no manual refresh
    # The steps moved the weight enough that a stale sigma would break the bound ...
    assert max(raw_growth) > 1.5
    # ... yet the forward pass kept re-normalising.
    assert max(norms) <= COEFF * (1 + REFRESH_SLACK)


@pytest.mark.usefixtures("sigma_path")
def test_linear_refreshes_after_load_state_dict():
    source = linear_with_spectrum(5, 4, top=3.0, seed=7)
    target = linear_with_spectrum(5, 4, top=3.0, seed=8)
    source(torch.zeros(1, 4, dtype=DTYPE))
    target(torch.zeros(1, 4, dtype=DTYPE))
    state = source.state_dict()
    state["weight"] = 10 * state["weight"]  # the saved sigma is now 10x too small
    target.load_state_dict(state)
    norm = spectral_norm(effective_weight(target))
    assert COEFF * (1 - 1e-12) <= norm <= COEFF * (1 + 1e-2)  # 10x keeps the gap


@pytest.mark.usefixtures("sigma_path")
def test_linear_refreshes_after_double():
    layer = linear_with_spectrum(5, 4, top=3.0, seed=9).float()
    layer(torch.zeros(1, 4))
    layer.double()
    weight = effective_weight(layer)
    assert weight.dtype == torch.float64 and layer.sigma.dtype == torch.float64
    assert spectral_norm(weight) <= COEFF * (1 + 1e-2)  # this weight has a gap
    torch.testing.assert_close(
        layer.sigma, torch.tensor(3.0, dtype=DTYPE), rtol=1e-2, atol=0
    )


@pytest.mark.usefixtures("sigma_path")
def test_linear_normalization_is_the_same_with_and_without_grad_after_a_small_step():
    layer = linear_with_spectrum(6, 6, top=3.0, seed=2)
    layer(torch.zeros(1, 6, dtype=DTYPE))
    with torch.no_grad():
        layer.weight.mul_(1 + 2e-4)  # a small, version-counted update
    with_grad = layer.normalized_weight().detach()
    with torch.no_grad():
        without_grad = layer.normalized_weight()
    torch.testing.assert_close(with_grad, without_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("coeff", [0.0, -0.5])
def test_non_positive_coeff_raises(coeff):
    with pytest.raises(ValueError, match=f"coeff must be positive; got {coeff}"):
        LipschitzLinear(3, 3, coeff=coeff)


# ------------------------------------------------------------------------------- conv
def conv_operator(weight, in_shape):
    """The matrix of the stride-1 'same' convolution on inputs of ``in_shape``: one
    column per basis image."""
    n_in = in_shape[0] * in_shape[1] * in_shape[2]
    basis = torch.eye(n_in, dtype=weight.dtype).view(n_in, *in_shape)
    out = F.conv2d(basis, weight.detach(), padding=weight.shape[-1] // 2)
    return out.flatten(1).t()


def seeded_conv(c_in, c_out, k, seed, coeff=COEFF):
    layer = LipschitzConv2d(c_in, c_out, k, coeff=coeff).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(randn(c_out, c_in, k, k, seed=seed))
        layer.bias.copy_(randn(c_out, seed=seed + 1))
    return layer


CONV_CASES = [
    (2, 3, 3, (5, 5), 0),
    (2, 3, 3, (5, 5), 1),
    (2, 2, 3, (4, 6), 2),
    (3, 2, 5, (6, 5), 1),
    (2, 3, 1, (4, 4), 0),
]


@pytest.mark.parametrize("c_in, c_out, k, spatial, seed", CONV_CASES)
def test_conv_sigma_matches_exact_operator_norm(c_in, c_out, k, spatial, seed):
    layer = seeded_conv(c_in, c_out, k, seed)
    layer(torch.zeros(1, c_in, *spatial, dtype=DTYPE))
    exact = spectral_norm(conv_operator(layer.weight, (c_in, *spatial)))
    assert exact * (1 - 1e-2) <= layer.sigma.item() <= exact * (1 + 1e-12)
    normalized_op = conv_operator(layer.normalized_weight(), (c_in, *spatial))
    normalized = spectral_norm(normalized_op)
    assert COEFF * (1 - 1e-12) <= normalized <= COEFF * (1 + 1e-2)


def test_conv_sigma_is_not_the_flattened_kernel_norm():
    layer = seeded_conv(2, 3, 3, seed=0)
    layer(torch.zeros(1, 2, 5, 5, dtype=DTYPE))
    kernel_norm = spectral_norm(layer.weight.flatten(1))
    assert layer.sigma.item() > 1.5 * kernel_norm


@pytest.mark.parametrize("c_in, c_out, k, spatial, seed", CONV_CASES)
def test_conv_certificate_bounds_exact_norm(c_in, c_out, k, spatial, seed):
    layer = seeded_conv(c_in, c_out, k, seed)
    layer(torch.zeros(1, c_in, *spatial, dtype=DTYPE))
    exact = spectral_norm(conv_operator(layer.normalized_weight(), (c_in, *spatial)))
    bound = layer.lipschitz_bound()
    assert exact * (1 - 1e-12) <= bound <= 1.5 * exact
    if k == 1:  # a 1x1 conv is the channel matrix at every pixel: the bound is exact
        assert bound == pytest.approx(exact, rel=1e-10)


def rayleigh_norm(layer, spatial, n_iter=2000):
    """A lower bound on the normalised conv's operator norm: many power iterations."""
    w = layer.normalized_weight().detach()
    v = randn(1, layer.in_channels, *spatial, seed=0)
    for _ in range(n_iter):
        v = F.conv_transpose2d(
            F.conv2d(v, w, padding=layer.padding), w, padding=layer.padding
        )
        v = v / v.norm()
    return F.conv2d(v, w, padding=layer.padding).norm().item()


def test_conv_fft_certificate_on_a_large_input():
    layer = seeded_conv(2, 2, 3, seed=0)
    layer(torch.zeros(1, 2, 33, 33, dtype=DTYPE))  # too big to build: the FFT bound
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    lower = rayleigh_norm(layer, (33, 33))  # converged to ~1e-12 here
    assert lower * (1 - 1e-12) <= layer.lipschitz_bound() <= 1.1 * lower
    # Not certified, but tight: a power iteration, so from below.
    assert lower * (1 - 1e-2) <= layer.estimated_norm() <= lower * (1 + 1e-12)
    for key, value in layer.state_dict().items():  # estimating changes nothing
        assert torch.equal(value, state[key])


def test_conv_reestimates_when_input_size_changes():
    layer = seeded_conv(2, 3, 3, seed=0)
    layer(torch.zeros(1, 2, 2, 2, dtype=DTYPE))
    small = spectral_norm(conv_operator(layer.weight, (2, 2, 2)))
    large = spectral_norm(conv_operator(layer.weight, (2, 8, 8)))
    assert large > 1.5 * small  # the test can tell the two estimates apart
    layer(torch.zeros(1, 2, 8, 8, dtype=DTYPE))
    assert large * (1 - 1e-2) <= layer.sigma.item() <= large * (1 + 1e-12)
    normalized = spectral_norm(conv_operator(layer.normalized_weight(), (2, 8, 8)))
    assert layer.lipschitz_bound() >= normalized * (1 - 1e-12)


def test_conv_state_dict_round_trip_into_fresh_layer():
    layer = seeded_conv(2, 3, 3, seed=1)
    x = randn(2, 2, 5, 5, seed=2)
    expected = layer(x)
    fresh = LipschitzConv2d(2, 3, 3, coeff=COEFF).to(DTYPE)
    fresh.load_state_dict(layer.state_dict())
    # The input size travels with the state: the certificate needs no forward pass.
    assert fresh.lipschitz_bound() == pytest.approx(layer.lipschitz_bound(), rel=1e-6)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-6, atol=1e-9)


def test_conv_bound_before_forward_raises():
    with pytest.raises(RuntimeError, match="needs the input size: call forward first"):
        LipschitzConv2d(2, 2, 3).lipschitz_bound()


@pytest.mark.parametrize("k", [2, 4])
def test_conv_even_kernel_raises(k):
    with pytest.raises(ValueError, match=f"kernel_size must be odd; got {k} instead"):
        LipschitzConv2d(2, 2, k)


def test_conv_normalisation_before_any_forward_raises_a_clear_error():
    layer = LipschitzConv2d(2, 3, 3)
    with pytest.raises(RuntimeError, match="run a forward pass"):
        layer.normalized_weight()


def _flow_of_mlp_blocks(estimator, grad, seed=0):
    from skresflow.core import ActNorm, Flow, ResidualBlock, mlp_branch

    torch.manual_seed(seed)
    layers = []
    for _ in range(3):
        branch = mlp_branch(3, (5, 4), coeff=0.9).to(DTYPE)
        layers += [ActNorm(3).to(DTYPE),
                   ResidualBlock(branch, estimator=estimator, grad=grad)]
    return Flow(layers, (3,))


def test_shared_normalization_gives_the_per_layer_weights_and_gradients():
    layers = [LipschitzLinear(4, 3, coeff=c).to(DTYPE) for c in (0.5, 0.9, 2.0)]
    layers.append(LipschitzLinear(3, 3, coeff=0.7).to(DTYPE))
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.weight.mul_(1 + i)  # some normalised, one (coeff 2.0) not
    lipschitz.refresh_layers(layers)
    direct = [layer.normalized_weight() for layer in layers]
    with lipschitz.shared_normalization(layers):
        shared = [layer.normalized_weight() for layer in layers]
        assert all(layer._shared_weight is not None for layer in layers)
    assert all(layer._shared_weight is None for layer in layers)
    weights = [layer.weight for layer in layers]
    for d, s in zip(direct, shared, strict=True):
        assert torch.equal(s, d)
    c = [randn(*w.shape, seed=i) for i, w in enumerate(direct)]

    def grads(normalized):
        loss = sum((a * w).sum() for a, w in zip(c, normalized, strict=True))
        return torch.autograd.grad(loss, weights)

    g_direct, g_shared = grads(direct), grads(shared)
    for d, s in zip(g_direct, g_shared, strict=True):
        assert d.abs().max() > 0
        torch.testing.assert_close(s, d, rtol=0, atol=1e-14)


def test_shared_normalization_second_derivatives_are_the_per_layer_ones():
    """The closed-form backward pass of the shared normalisation is itself
    differentiable (``create_graph=True``), with autograd's second derivatives."""
    layers = [LipschitzLinear(4, 3, coeff=c).to(DTYPE) for c in (0.5, 2.0)]
    with torch.no_grad():
        layers[0].weight.mul_(3)  # normalised; the other one not
    lipschitz.refresh_layers(layers)
    weights = [layer.weight for layer in layers]
    c = [randn(3, 4, seed=i) for i in range(2)]

    def second(normalized):
        loss = sum((a * w.square()).sum() for a, w in zip(c, normalized, strict=True))
        first = torch.autograd.grad(loss, weights, create_graph=True)
        total = sum((f * w).sum() for f, w in zip(first, weights, strict=True))
        return torch.autograd.grad(total, weights)

    direct = second([layer.normalized_weight() for layer in layers])
    with lipschitz.shared_normalization(layers):
        shared = second([layer.normalized_weight() for layer in layers])
    for d, s in zip(direct, shared, strict=True):
        assert d.abs().max() > 0
        torch.testing.assert_close(s, d, rtol=0, atol=1e-13)


def test_shared_normalization_batched_gradients():
    """``is_grads_batched`` (vmap over the backward pass) through the closed-form
    backward gives the gradients of one call per cotangent."""
    layers = [LipschitzLinear(4, 3, coeff=0.5).to(DTYPE) for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3)
    lipschitz.refresh_layers(layers)
    weights = [layer.weight for layer in layers]
    with lipschitz.shared_normalization(layers):
        out = torch.stack([layer.normalized_weight() for layer in layers])
    cotangents = randn(5, *out.shape, seed=7)
    batched = torch.autograd.grad(
        out, weights, cotangents, is_grads_batched=True, retain_graph=True
    )
    for k, c in enumerate(cotangents):
        one = torch.autograd.grad(out, weights, c, retain_graph=True)
        for b, o in zip(batched, one, strict=True):
            torch.testing.assert_close(b[k], o, rtol=0, atol=1e-14)


def test_shared_normalization_without_gradients_and_cleared_on_error():
    layer = LipschitzLinear(3, 3).to(DTYPE)
    with torch.no_grad():
        layer.weight.mul_(3)
    layer.refresh()
    expected = layer.normalized_weight()
    with torch.no_grad(), lipschitz.shared_normalization([layer]):
        stored = layer._shared_weight
        torch.testing.assert_close(stored, expected, rtol=0, atol=0)
        assert layer.normalized_weight() is stored  # computed once for the pass
        with torch.enable_grad():  # a call that needs a graph computes its own
            own = layer.normalized_weight()
            assert own is not stored and own.requires_grad
    with pytest.raises(RuntimeError, match="boom"):
        with lipschitz.shared_normalization([layer]):
            assert layer._shared_weight is not None
            raise RuntimeError("boom")
    assert layer._shared_weight is None


def test_exact_norm_is_cached_until_the_weight_changes():
    layer = LipschitzLinear(4, 3).to(DTYPE)
    first = layer.lipschitz_bound()
    assert layer.lipschitz_bound() == first
    with torch.no_grad():
        layer.weight.mul_(0.1)  # now below coeff: the normalised norm changes
    expected = torch.linalg.matrix_norm(layer.weight.detach(), ord=2).item()
    assert layer.lipschitz_bound() == pytest.approx(expected, rel=1e-12)
    assert layer.lipschitz_bound() != pytest.approx(first)


@pytest.mark.parametrize("estimator, grad", [
    ("exact", "naive"), ("unbiased", "naive"), ("unbiased", "neumann"),
    ("unbiased", "backward_in_forward"), ("unbiased", "memory_efficient"),
])
def test_flow_gradients_are_those_of_per_layer_normalization(
    estimator, grad, monkeypatch
):
    """Flow.forward normalises its dense layers together; every log-det gradient
    mode must give the gradients of the per-layer path."""
    x = randn(6, 3, seed=1)

    def grads(shared):
        if not shared:
            monkeypatch.setattr(lipschitz, "_normalized_together", lambda layers: [
                layer.weight / torch.clamp(layer._current_sigma(layer.weight)
                                           / layer.coeff, min=1.0)
                for layer in layers])
        flow = _flow_of_mlp_blocks(estimator, grad).train()
        gen = torch.Generator().manual_seed(3)
        loss = -flow.log_prob(x, gen).mean()
        out = torch.autograd.grad(loss, list(flow.parameters()), allow_unused=True)
        monkeypatch.undo()
        return loss.detach(), out

    loss_s, g_s = grads(True)
    loss_d, g_d = grads(False)
    torch.testing.assert_close(loss_s, loss_d, rtol=0, atol=1e-12)
    for s, d in zip(g_s, g_d, strict=True):
        if d is None:
            assert s is None or not s.abs().max() > 0
        else:
            torch.testing.assert_close(s, d, rtol=0, atol=1e-11)


def test_pointwise_conv_is_certified_exactly_at_every_input_size():
    """A 1x1 convolution's operator norm is its channel matrix's: it takes the
    dense layers' certified path, with no power iteration, and stays valid when
    the input size changes."""
    layer = seeded_conv(3, 4, 1, seed=2)
    layer(torch.zeros(1, 3, 4, 4, dtype=DTYPE))
    assert layer.last_power_iter == 0 and layer._u.shape == (4,)
    sigma = layer.sigma.clone()
    for spatial in [(4, 4), (7, 5), (1, 1)]:
        layer(torch.zeros(1, 3, *spatial, dtype=DTYPE))
        assert torch.equal(layer.sigma, sigma)  # nothing to refresh
        exact = spectral_norm(conv_operator(layer.weight, (3, *spatial)))
        assert exact * (1 - 1e-3) <= sigma.item() <= exact * (1 + 1e-12)


def test_pointwise_conv_sigma_gradient_is_the_spectral_norm_gradient():
    layer = seeded_conv(3, 4, 1, seed=3).train()
    layer(torch.zeros(1, 3, 2, 2, dtype=DTYPE))
    direction = randn(4, 3, 1, 1, seed=4)
    (layer.normalized_weight() * direction).sum().backward()

    def exact(w):  # W * coeff / ||W||, the function the normalisation stands for
        return w * COEFF / torch.linalg.matrix_norm(w.flatten(1), ord=2)

    w = layer.weight.detach().clone().requires_grad_()
    (exact(w) * direction).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-2, atol=1e-3)


def _as_before_exact_pointwise(layer, spatial, seed):
    """The layer's vectors as a power iteration on the operator had left them
    before 1x1 convolutions were exact: channel vector x a spatial profile, the
    same for u and v (every profile is a top singular vector of a 1x1 conv)."""
    profile = randn(*spatial, seed=seed)
    profile = profile / profile.norm()
    return {
        "_u": layer._u.view(1, -1, 1, 1) * profile,
        "_v": layer._v.view(1, -1, 1, 1) * profile,
    }


@pytest.mark.parametrize("route", ["state_dict", "pickle"])
def test_pointwise_conv_reads_operator_shaped_vectors_of_old_models(route):
    import pickle

    layer = seeded_conv(3, 4, 1, seed=5)
    x = randn(2, 3, 4, 4, seed=6)
    expected = layer(x)
    old = _as_before_exact_pointwise(layer, (4, 4), seed=7)
    if route == "state_dict":
        fresh = LipschitzConv2d(3, 4, 1, coeff=COEFF).to(DTYPE)
        fresh.load_state_dict({**layer.state_dict(), **old})
    else:  # a pickled module restores its buffers without load_state_dict
        for name, t in old.items():
            layer._buffers[name] = t
        fresh = pickle.loads(pickle.dumps(layer))
    assert fresh._u.shape == (4,) and fresh._v.shape == (3,)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-12, atol=1e-12)


def test_power_iteration_tests_for_convergence_every_few_steps():
    """After the first step the stopping test (a host sync on a GPU) runs every
    POWER_CHECK_EVERY steps; stopping later only tightens sigma."""
    every = lipschitz.POWER_CHECK_EVERY
    assert every > 1
    counts = set()
    for seed in range(6):
        layer = seeded_conv(2, 3, 3, seed)
        layer(torch.zeros(1, 2, 5, 5, dtype=DTYPE))
        counts.add(layer.last_power_iter)
        exact = spectral_norm(conv_operator(layer.weight, (2, 5, 5)))
        assert exact * (1 - 1e-3) <= layer.sigma.item() <= exact * (1 + 1e-12)
    assert all(n % every == 0 or n == layer.max_power_iter for n in counts)


@pytest.mark.parametrize("c_in, c_out", [(5, 2), (2, 5), (3, 3)])
@pytest.mark.parametrize("k, padding", [(3, 1), (3, 2), (5, 2), (1, 0)])
def test_fast_convolutions_equal_torchs(c_in, c_out, k, padding):
    """lipschitz.conv2d / conv_transpose2d swap to the other form of the same
    map on CPUs where PyTorch is slow; the numbers must not change."""
    t = randn(3, c_in, 6, 5, seed=0)
    w = randn(c_out, c_in, k, k, seed=1)
    bias = randn(c_out, seed=2)
    torch.testing.assert_close(
        lipschitz.conv2d(t, w, bias, padding), F.conv2d(t, w, bias, padding=padding)
    )
    u = randn(3, c_out, 6, 5, seed=3)
    torch.testing.assert_close(
        lipschitz.conv_transpose2d(u, w, padding),
        F.conv_transpose2d(u, w, padding=padding),
    )
