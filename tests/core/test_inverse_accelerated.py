"""Accelerated inverses (Anderson, Newton) against plain fixed-point iteration."""

import math
import warnings

import pytest
import torch
from oracles import DTYPE, SmoothBranch, contractive_mlp, fill_parameters_, randn
from torch import nn

from skresflow.core import (
    ActNorm,
    Flow,
    InverseNotConvergedWarning,
    ResidualBlock,
    conv_branch,
    fixed_point_inverse,
)

METHODS = ["fixed_point", "anderson", "newton", "auto"]
ACCELERATED = ["anderson", "newton"]


class Counted(nn.Module):
    """Wraps ``g`` and counts the rows it is evaluated on (the solver's work)."""

    def __init__(self, g):
        super().__init__()
        self.g, self.rows = g, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.g(x)


class RotatedTanh(nn.Module):
    """``g(x) = c Q2 tanh(Q1 x)``: Lip(g) = c, reached at x = 0, where the
    Jacobian ``c Q2 Q1`` has every singular value c: plain iteration contracts by
    about c per step there."""

    def __init__(self, d, c, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q1, q2 = (torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))[0]
                  for _ in range(2))
        self.register_buffer("q1", q1)
        self.register_buffer("q2", q2)
        self.c = c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.q1.t()) @ self.q2.t()


class SymmetricTanh(nn.Module):
    """``g(x) = c W^T tanh(W x)``, ``||W|| = 1``: symmetric Jacobian, eigenvalues in
    [0, c)."""

    def __init__(self, d, c, seed):
        super().__init__()
        w = randn(d, d, seed=seed)
        self.register_buffer("w", w / torch.linalg.matrix_norm(w, ord=2))
        self.c = c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.w.t()) @ self.w


class Sine(nn.Module):
    """``g(x) = c sin(x)``: near x = pi, ``1 + g'`` is nearly 0, so a Newton step
    from a point a little off overshoots: the safeguard must catch it."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * torch.sin(x)


def row_residual(g, x, y):
    return (x + g(x) - y).flatten(1).abs().amax(1)


def branch(kind, dtype):
    if kind == "mlp":
        return contractive_mlp(3, seed=0, coeff=0.95).to(dtype), (3,)
    g = fill_parameters_(conv_branch(2, 4, coeff=0.95).to(DTYPE), seed=1)
    return g.to(dtype), (2, 4, 4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_round_trip_every_method(method, kind, dtype, atol):
    g, event = branch(kind, dtype)
    x = randn(6, *event, seed=2, scale=3, dtype=dtype)
    with torch.no_grad():
        y = x + g(x)
        x_hat = fixed_point_inverse(g, y, method=method)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, x, rtol=0, atol=atol)
    bound = 1e-10 + 1e-10 * y.flatten(1).abs().amax(1)
    if dtype == torch.float64:
        assert (row_residual(g, x_hat, y) <= bound).all()


@pytest.mark.parametrize("method", ACCELERATED)
@pytest.mark.parametrize("g", [RotatedTanh(6, 0.99, seed=3), SymmetricTanh(6, 0.99, 4),
                               SmoothBranch(4, 8, seed=5, scale=0.95)],
                         ids=["rotated", "symmetric", "smooth"])
def test_same_answer_as_plain_iteration(method, g):
    d = g.q1.shape[0] if hasattr(g, "q1") else (g.w.shape[0] if hasattr(g, "w") else 4)
    y = randn(20, d, seed=6, scale=0.5)
    plain = fixed_point_inverse(g, y, method="fixed_point", atol=1e-12, rtol=0,
                                max_iter=20000)
    fast = fixed_point_inverse(g, y, method=method, atol=1e-12, rtol=0)
    # Both meet 1e-12 in residual; the error is at most residual / (1 - Lip).
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-10)


@pytest.mark.parametrize("method", [*ACCELERATED, "auto"])
@pytest.mark.parametrize("make", [lambda: RotatedTanh(4, 0.99, seed=7),
                                  lambda: SymmetricTanh(8, 0.99, seed=8),
                                  lambda: SymmetricTanh(12, 0.99, seed=8)],
                         ids=["rotated", "symmetric", "symmetric-12d"])
def test_fewer_iterations_than_plain_near_lip_one(method, make):
    """Lip(g) = 0.99: plain iteration needs hundreds of steps to 1e-10."""
    g = Counted(make())
    d = g.g.q1.shape[0] if hasattr(g.g, "q1") else g.g.w.shape[0]
    y = randn(50, d, seed=9, scale=0.3)
    fixed_point_inverse(g, y, method="fixed_point", max_iter=20000)
    plain_rows, g.rows = g.rows, 0
    x = fixed_point_inverse(g, y, method=method)
    # Newton's evaluations also build the Jacobian: count d rows per row.
    work = g.rows
    assert work < plain_rows / 3, (work, plain_rows)
    assert (row_residual(g, x, y) <= 1e-10 + 1e-10 * y.abs().amax(1)).all()


def test_newton_safeguard_recovers_from_overshooting_steps():
    g = Sine(0.999)
    x_true = torch.tensor([[math.pi - 0.05], [math.pi + 0.02], [3.0], [0.5]],
                          dtype=DTYPE)
    y = x_true + g(x_true)
    for method in ACCELERATED:
        x = fixed_point_inverse(g, y, method=method, atol=1e-13, rtol=0,
                                max_iter=20000)
        assert (row_residual(g, x, y) <= 1e-13).all()
        # error <= residual / (1 - Lip(g))
        torch.testing.assert_close(x, x_true, rtol=0, atol=1e-10 + 1e-13 / 1e-3)


@pytest.mark.parametrize("method", ACCELERATED)
def test_not_converged_warns(method):
    g, y = RotatedTanh(6, 0.99, seed=10), randn(4, 6, seed=11, scale=0.3)
    pattern = (r"did not converge for \d+ of 4 rows in 1 iterations: largest "
               r"residual \|\|x \+ g\(x\) - y\|\|_inf = \S+ \(tolerance \S+\)\.")
    with pytest.warns(InverseNotConvergedWarning, match=pattern) as record:
        fixed_point_inverse(g, y, method=method, max_iter=1)
    assert record[0].filename == __file__


@pytest.mark.parametrize("method", ACCELERATED)
def test_converged_accelerated_inverse_does_not_warn(method):
    g, x = contractive_mlp(3, seed=4, coeff=0.95), randn(5, 3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point_inverse(g, (x + g(x)).detach(), method=method)


@pytest.mark.parametrize("method", ACCELERATED)
def test_each_row_stops_on_its_own(method):
    g = RotatedTanh(3, 0.95, seed=12)
    y = randn(7, 3, seed=13, scale=0.7)
    together = fixed_point_inverse(g, y, method=method)
    alone = torch.cat([fixed_point_inverse(g, row[None], method=method) for row in y])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ACCELERATED)
def test_gradcheck_implicit_gradient(method):
    g = SmoothBranch(3, 6, seed=6, scale=0.8)
    y = randn(3, 3, seed=7, scale=2).requires_grad_()

    def fn(y, *params):
        return fixed_point_inverse(g, y, method=method, atol=1e-14, rtol=0)

    assert torch.autograd.gradcheck(fn, (y, *g.parameters()))


def test_unknown_method_is_rejected():
    g = SmoothBranch(2, 4, seed=0)
    with pytest.raises(ValueError, match=r"method must be one of \('auto', "
                       r"'fixed_point', 'anderson', 'newton'\); got 'broyden' instead"):
        fixed_point_inverse(g, randn(2, 2, seed=1), method="broyden")


@pytest.mark.parametrize("method", METHODS)
def test_flow_configure_inverse_selects_the_solver(method):
    torch.manual_seed(0)
    blocks = [ResidualBlock(contractive_mlp(4, seed=s, coeff=0.9)) for s in (1, 2)]
    flow = Flow([ActNorm(4).double(), blocks[0], ActNorm(4).double(), blocks[1]], (4,))
    flow.configure_inverse(method=method, atol=1e-12, rtol=0)
    assert all(b.inverse_config["method"] == method for b in flow.blocks)
    x = randn(5, 4, seed=3)
    with torch.no_grad():
        z, _ = flow(x)
        torch.testing.assert_close(flow.inverse(z), x, rtol=0, atol=1e-9)
