import copy
import math

import pytest
import torch
from oracles import DTYPE, brute_logdet, fill_parameters_, randn, seeded

from skresflow.core import (
    GRAD_MODES,
    ActNorm,
    Flow,
    LipschitzError,
    ResidualBlock,
    mlp_branch,
)

COEFF = 0.9
N_LAYERS = 3  # linear layers per branch: (2 -> 32 -> 32 -> 2)


def bimodal_data(n, seed):
    """Two elongated Gaussian clusters: something a few flow steps must bend towards."""
    gen = seeded(seed)
    centers = torch.tensor([[-1.5, -0.5], [1.5, 1.0]], dtype=DTYPE)
    which = torch.randint(0, 2, (n,), generator=gen)
    noise = torch.randn(n, 2, generator=gen, dtype=DTYPE)
    return centers[which] + noise * torch.tensor([0.4, 0.8], dtype=DTYPE)


def build_flow(seed):
    branches = [fill_parameters_(mlp_branch(2, (32, 32), coeff=COEFF).to(DTYPE),
                                 seed + i) for i in range(3)]
    blocks = [ResidualBlock(g, estimator="exact") for g in branches]
    return Flow([ActNorm(2).to(DTYPE), *blocks], (2,))


@pytest.fixture(scope="module")
def trained():
    """A 2-D flow after 30 Adam steps of maximum likelihood, with its loss history."""
    flow, x = build_flow(0), bimodal_data(512, seed=1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return flow, losses


def test_training_moved_the_flow(trained):
    _, losses = trained
    assert losses[-1] < losses[0] - 1.0


def test_density_integrates_to_one(trained):
    flow, _ = trained
    axis = torch.linspace(-8, 8, 201, dtype=DTYPE)  # data lie within about +-4
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        z, logdet = flow(grid)
    base = flow.base_log_prob(z)
    cell = (axis[1] - axis[0]).item() ** 2
    # Riemann sum of a smooth, fast-decaying density: its error is far below 1e-3.
    assert (base + logdet).exp().sum().item() * cell == pytest.approx(1.0, abs=1e-3)
    # ... and the log-det terms matter: without them the mass is far from 1.
    assert abs(base.exp().sum().item() * cell - 1.0) > 0.05


def test_log_prob_matches_brute_force_change_of_variables(trained):
    flow, _ = trained
    x = bimodal_data(5, seed=2)
    z, _ = flow(x)
    expected = flow.base_log_prob(z) + brute_logdet(lambda t: flow(t)[0], x)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=0, atol=1e-10)
    normal = torch.distributions.Normal(torch.zeros(2, dtype=DTYPE), 1.0)
    torch.testing.assert_close(flow.base_log_prob(z), normal.log_prob(z).sum(1),
                               rtol=1e-14, atol=1e-14)


def test_inverse_of_forward_is_identity(trained):
    flow, _ = trained
    x = bimodal_data(50, seed=3)
    with torch.no_grad():
        z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-8)


def test_inverse_of_forward_is_identity_for_a_freshly_estimated_flow():
    flow = build_flow(20)
    x = bimodal_data(50, seed=3)
    with torch.no_grad():
        z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-8)


def test_sample_shape_and_determinism(trained):
    flow, _ = trained
    samples = flow.sample(7, generator=seeded(4))
    assert samples.shape == (7, 2) and samples.dtype == DTYPE
    assert torch.equal(flow.sample(7, generator=seeded(4)), samples)
    assert not torch.allclose(flow.sample(7, generator=seeded(5)), samples)


def test_samples_are_inverse_images_of_the_generator_draws(trained):
    flow, _ = trained
    samples = flow.sample(7, generator=seeded(4))
    z = torch.randn(7, 2, generator=seeded(4), dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(flow(samples)[0], z, rtol=0, atol=1e-8)


def test_lipschitz_bounds_hold_after_training(trained):
    flow, _ = trained
    bounds = flow.lipschitz_bounds()
    assert len(bounds) == 3
    # Certified (exact layer norms); power iteration may leave a small excess.
    assert all(b <= COEFF**N_LAYERS * 1.03 for b in bounds)
    assert all(b < 1 for b in bounds)
    flow.check_invertible()


def test_bounds_hold_after_large_steps_without_manual_refresh():
    flow, x = build_flow(10), bimodal_data(256, seed=6)
    optimizer = torch.optim.Adam(flow.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        optimizer.step()
        # Norms of the weights the next forward pass really uses, read back through
        # the layers themselves (their forward refreshes sigma, nothing else does).
        for block in flow.blocks:
            norms = [effective_norm(layer) for layer in block.g
                     if isinstance(layer, torch.nn.Linear)]
            assert math.prod(norms) < 1


def effective_norm(layer):
    eye = torch.eye(layer.in_features, dtype=DTYPE)
    with torch.no_grad():
        weight = (layer(eye) - layer.bias).t()
    return torch.linalg.matrix_norm(weight, ord=2).item()


def test_hand_edited_weight_fails_the_invertibility_check(trained):
    flow = copy.deepcopy(trained[0])
    flow.refresh_lipschitz()  # the copy's weights live elsewhere: settle that first
    # .data edits are invisible to the version counter, so no refresh sees them.
    flow.blocks[1].g[0].weight.data.mul_(10)
    match = r"residual block 1 has .*\d+\.\d+ >= 1, so it may not be invertible"
    with pytest.raises(LipschitzError, match=match):
        flow.check_invertible()
    with pytest.raises(LipschitzError, match=match):
        flow.sample(3, generator=seeded(0))
    assert issubclass(LipschitzError, ValueError)


@pytest.mark.parametrize("deferred, plain", [("backward_in_forward", "naive"),
                                             ("memory_efficient", "neumann")])
def test_flow_gradients_in_deferred_modes_equal_plain_ones(trained, deferred, plain):
    """Whole-flow loss with per-sample weights: the deferred log-det gradients must
    interleave correctly with the path-wise gradients of every block."""
    x, a = bimodal_data(6, seed=7), randn(6, seed=8)

    def gradients(mode):
        flow = copy.deepcopy(trained[0]).configure_logdet(estimator="unbiased",
                                                          grad=mode)
        loss = (a * flow.log_prob(x, generator=seeded(9))).sum()
        return torch.cat([p.flatten() for p in torch.autograd.grad(
            loss, list(flow.parameters()))])

    torch.testing.assert_close(gradients(deferred), gradients(plain), rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize("grad", GRAD_MODES)
def test_configure_logdet_reaches_every_block(trained, grad):
    flow = copy.deepcopy(trained[0]).configure_logdet(grad=grad, n_probes=2)
    assert all(b.logdet_config["grad"] == grad and b.logdet_config["n_probes"] == 2
               for b in flow.blocks)


class _BatchDependentRounding(torch.nn.Module):
    """Changes the last bits of every value with the batch size, as a GPU's
    matrix kernels (chosen by batch size) can."""

    def forward(self, x, generator=None):
        return x * (1 + 4e-16 * (x.shape[0] % 3)), x.new_zeros(x.shape[0])


def _row_hashed_block(seed):
    block = ResidualBlock(
        mlp_branch(2, (16,), coeff=COEFF),
        estimator="unbiased",
        n_exact_terms=1,
        probe_sharing="row_hash",
    )
    return fill_parameters_(block, seed=seed)


@pytest.mark.parametrize("hybrid", [False, True])
def test_row_hashed_probes_follow_the_flow_input_not_the_block_input(hybrid):
    from skresflow.core.heads import HybridFlow, LinearHead

    block = _row_hashed_block(seed=0)
    flow = Flow([_BatchDependentRounding(), block], (2,)).to(DTYPE).eval()
    if hybrid:
        flow = HybridFlow(flow, LinearHead(2, 3)).to(DTYPE)
    x = randn(12, 2, seed=1)

    def score(rows):
        with torch.no_grad():  # the same draws for every call
            if hybrid:
                return flow.classify(rows, torch.Generator().manual_seed(0))[0]
            return flow.log_prob(rows, torch.Generator().manual_seed(0))

    full, part = score(x), score(x[:10])
    assert not torch.equal(flow.layers[0](x)[0][:10], flow.layers[0](x[:10])[0])
    torch.testing.assert_close(part, full[:10], rtol=1e-12, atol=1e-12)
    # Outside a flow a block still hashes its own input: a direct call changes.
    with torch.no_grad():
        direct = block(flow.layers[0](x)[0], torch.Generator().manual_seed(0))[1]
        y_part = flow.layers[0](x[:10])[0]
        direct_part = block(y_part, torch.Generator().manual_seed(0))[1]
    assert (direct[:10] - direct_part).abs().max() > 1e-6


def test_a_flow_nested_in_a_flow_keeps_the_outer_row_hash():
    block = _row_hashed_block(seed=2)
    inner = Flow([block], (2,))
    flow = Flow([_BatchDependentRounding(), inner], (2,)).to(DTYPE).eval()
    x = randn(12, 2, seed=3)
    with torch.no_grad():
        full = flow.log_prob(x, torch.Generator().manual_seed(0))
        part = flow.log_prob(x[:10], torch.Generator().manual_seed(0))
    torch.testing.assert_close(part, full[:10], rtol=1e-12, atol=1e-12)
