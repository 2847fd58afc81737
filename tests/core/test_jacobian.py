"""Closed-form Jacobians of MLP branches against one-row-at-a-time autograd, and
the exact log-det built on them (value, gradients, gradcheck)."""

import pytest
import torch
from oracles import (
    DTYPE,
    brute_residual_logdet,
    contractive_mlp,
    fill_parameters_,
    randn,
    row_jacobians,
    small_conv,
)
from torch import nn

from skresflow.core import LipschitzLinear, logdet_estimate, mlp_branch
from skresflow.core.activations import ACTIVATIONS
from skresflow.core.jacobian import branch_jacobian, branch_logdet


class Opaque(nn.Module):
    """The same branch behind a wrapper that the closed form does not recognise,
    so that the log-det takes the autograd path."""

    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d, hidden", [(1, (5,)), (2, (4, 6)), (7, (3,)), (3, ())])
@pytest.mark.parametrize("preactivation", [False, True])
def test_jacobian_matches_autograd(activation, d, hidden, preactivation):
    g = mlp_branch(d, hidden, activation=activation, coeff=0.9,
                   preactivation=preactivation).to(DTYPE)
    fill_parameters_(g, seed=d)
    x = randn(6, d, seed=10 + d, scale=2)
    gx, jac = branch_jacobian(g, x)
    torch.testing.assert_close(gx, g(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(jac, row_jacobians(g, x), rtol=0, atol=1e-12)
    assert jac.abs().max() > 1e-2


@pytest.mark.parametrize("activation", [nn.ELU(alpha=0.5), nn.Softplus(beta=2.0),
                                        nn.Softplus(beta=1.0, threshold=0.5)])
def test_jacobian_honours_activation_parameters(activation):
    g = nn.Sequential(LipschitzLinear(3, 4), activation, LipschitzLinear(4, 3))
    g = g.to(DTYPE)
    fill_parameters_(g, seed=1)
    x = randn(8, 3, seed=2, scale=3)
    gx, jac = branch_jacobian(g, x)
    torch.testing.assert_close(gx, g(x), rtol=0, atol=1e-13)
    torch.testing.assert_close(jac, row_jacobians(g, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("g, x", [
    (nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2)),  # unconstrained layer
    (nn.Sequential(LipschitzLinear(2, 2), nn.Sigmoid()), torch.zeros(1, 2)),
    (Opaque(mlp_branch(2, (3,))), torch.zeros(1, 2)),
    (small_conv(seed=0), torch.zeros(1, 2, 3, 3)),
    (mlp_branch(4, (3,)), torch.zeros(1, 2, 2)),  # not (batch, d)
])
def test_other_branches_are_left_to_autograd(g, x):
    assert branch_jacobian(g, x) is None


@pytest.mark.parametrize("d", [1, 2, 3, 6])
def test_closed_form_and_autograd_log_dets_agree_with_gradients(d):
    g = contractive_mlp(d, seed=d, hidden=(5, 4), coeff=0.9)
    leaf = randn(5, d, seed=20 + d, scale=2).requires_grad_()
    a = randn(5, seed=30 + d)

    def value_and_grads(branch):
        logdet = logdet_estimate(branch, 1.5 * leaf - 0.2, estimator="exact")
        wrt = [leaf, *g.parameters()]
        grads = torch.autograd.grad((a * logdet).sum(), wrt, allow_unused=True)
        return logdet.detach(), [torch.zeros_like(w) if q is None else q
                                 for q, w in zip(grads, wrt, strict=True)]

    closed, closed_grads = value_and_grads(g)
    brute, brute_grads = value_and_grads(Opaque(g))
    torch.testing.assert_close(closed, brute, rtol=0, atol=1e-12)
    torch.testing.assert_close(closed, brute_residual_logdet(g, 1.5 * leaf - 0.2),
                               rtol=0, atol=1e-12)
    for c, b in zip(closed_grads, brute_grads, strict=True):
        torch.testing.assert_close(c, b, rtol=0, atol=1e-11)


def test_gradcheck_closed_form_log_det():
    # eval(): sigma is the stored buffer in value and gradient alike (gradcheck
    # perturbs weights through .data, which by design triggers no refresh).
    g = contractive_mlp(3, seed=4, hidden=(4,), coeff=0.9).eval()
    x = randn(3, 3, seed=5).requires_grad_()

    def fn(x, *params):
        return logdet_estimate(g, x, estimator="exact")

    assert torch.autograd.gradcheck(fn, (x, *g.parameters()))
    assert torch.autograd.gradgradcheck(fn, (x, *g.parameters()))


@pytest.mark.parametrize("d, hidden, preactivation", [
    (7, (3,), False),      # determinant in the 3-wide hidden layer
    (6, (8, 2), False),    # in the 2-wide second hidden layer (closed-form 2 x 2)
    (5, (1, 4), True),     # a 1-wide layer, after a leading activation
    (2, (16, 16), False),  # in the input space
])
def test_log_det_in_the_narrowest_layer_matches_brute_force(d, hidden, preactivation):
    g = mlp_branch(d, hidden, coeff=0.9, preactivation=preactivation).to(DTYPE)
    fill_parameters_(g, seed=d)
    leaf = randn(6, d, seed=40 + d, scale=2).requires_grad_()
    gx, logdet = branch_logdet(g, leaf)
    torch.testing.assert_close(gx, g(leaf), rtol=0, atol=1e-13)
    expected = brute_residual_logdet(g, leaf, create_graph=True)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(logdet, expected, rtol=0, atol=1e-12)
    a = randn(6, seed=1)
    wrt = [leaf, *g.parameters()]
    for ours, brute in zip(
        torch.autograd.grad((a * logdet).sum(), wrt, allow_unused=True),
        torch.autograd.grad((a * expected).sum(), wrt, allow_unused=True),
        strict=True,
    ):
        if brute is None:
            assert ours is None or not ours.abs().max() > 0
        else:
            torch.testing.assert_close(ours, brute, rtol=0, atol=1e-11)


def test_empty_branch_is_the_identity():
    x = randn(3, 4, seed=0)
    gx, logdet = branch_logdet(nn.Sequential(), x)
    torch.testing.assert_close(gx, x)
    assert not logdet.abs().max() > 0
    torch.testing.assert_close(branch_jacobian(nn.Sequential(), x)[1],
                               torch.eye(4, dtype=DTYPE).expand(3, 4, 4))


def _branch_with_bias_free_layer(d):
    return nn.Sequential(LipschitzLinear(d, 5, bias=False, coeff=0.9), nn.Tanh(),
                         LipschitzLinear(5, d, coeff=0.9))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d, hidden, preactivation", [
    (2, (6, 5), False), (2, (6, 5), True), (4, (3,), False), (3, (2, 7), True),
    (1, (4,), False),
])
def test_hand_written_backward_matches_autograd(activation, d, hidden, preactivation):
    """The closed-form log-det's own backward pass against autograd through the
    same formulas: value and output gradients of every input and parameter."""
    from skresflow.core.jacobian import _narrowest_cut, _reference_logdet, _tensors

    g = mlp_branch(d, hidden, activation=activation, coeff=0.9,
                   preactivation=preactivation).to(DTYPE)
    fill_parameters_(g, seed=3 * d + len(hidden))
    x = randn(7, d, seed=50 + d, scale=2).requires_grad_()
    a, c = randn(7, seed=1), randn(7, d, seed=2)
    wrt = [x, *g.parameters()]

    def grads(gx, logdet):
        loss = (a * logdet).sum() + (c * gx).sum()
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    gx, logdet = branch_logdet(g, x)
    ours = grads(gx, logdet)
    ref_gx, ref_logdet = _reference_logdet(list(g), _narrowest_cut(list(g), d), x,
                                           _tensors(g, x))
    ref = grads(ref_gx, ref_logdet)
    torch.testing.assert_close(logdet, ref_logdet, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-13)
    for o, r, w in zip(ours, ref, wrt, strict=True):
        o = torch.zeros_like(w) if o is None else o
        r = torch.zeros_like(w) if r is None else r
        torch.testing.assert_close(o, r, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_written_backward_bias_free_layers_and_dtypes(dtype):
    g = _branch_with_bias_free_layer(3).to(dtype)
    fill_parameters_(g, seed=0)
    x = randn(5, 3, seed=3).to(dtype).requires_grad_()
    gx, logdet = branch_logdet(g, x)
    ours = torch.autograd.grad(logdet.sum() + gx.sum(), [x, *g.parameters()])
    ref_logdet = brute_residual_logdet(g, x, create_graph=True)
    ref = torch.autograd.grad(ref_logdet.sum() + g(x).sum(), [x, *g.parameters()])
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    assert g[0].bias is None and logdet.dtype == dtype
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=tol, atol=tol)
