import re
import warnings

import pytest
import torch
from oracles import DTYPE, SmoothBranch, contractive_mlp, fill_parameters_, randn
from torch import nn

from skresflow.core import InverseNotConvergedWarning, conv_branch, fixed_point_inverse


class ScaledTanh(nn.Module):
    """Elementwise ``c * tanh(x)``: local contraction c * sech^2(x), so rows near 0 need
    many more iterations than rows far from it."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * torch.tanh(x)


class Scale(nn.Module):
    """``g(x) = c * x``: the fixed-point error shrinks by exactly c per iteration."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def row_residual(g, x, y):
    return (x + g(x) - y).flatten(1).abs().amax(1)


def branch(kind, dtype):
    if kind == "mlp":
        return contractive_mlp(3, seed=0, coeff=0.95).to(dtype), (3,)
    g = fill_parameters_(conv_branch(2, 4, coeff=0.95).to(DTYPE), seed=1)
    return g.to(dtype), (2, 4, 4)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_round_trip(kind, dtype, atol):
    g, event = branch(kind, dtype)
    x = randn(6, *event, seed=2, scale=3, dtype=dtype)
    with torch.no_grad():
        y = x + g(x)
        x_hat = fixed_point_inverse(g, y)
    assert x_hat.dtype == dtype
    torch.testing.assert_close(x_hat, x, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_every_row_meets_its_own_default_tolerance(dtype, tol):
    g = ScaledTanh(0.95)
    y = torch.tensor([[0.0, 0.01], [1.5, -2.0], [40.0, 0.3], [-3.0, 8.0]], dtype=dtype)
    x = fixed_point_inverse(g, y)
    bound = tol + tol * y.abs().amax(1)
    assert (row_residual(g, x, y) <= bound).all()


def test_each_row_stops_on_its_own():
    """Per-row stopping: a row's result does not depend on the slow rows beside it (a
    whole-batch stopping rule would keep iterating the fast rows, moving them by about
    their remaining error, ~1e-11 here)."""
    g = ScaledTanh(0.95)
    y = torch.tensor([[0.0, 0.02], [1.2, -1.5], [2.0, 0.9], [-0.9, 1.6]], dtype=DTYPE)
    together = fixed_point_inverse(g, y, method="fixed_point")
    alone = torch.cat([fixed_point_inverse(g, row[None], method="fixed_point")
                       for row in y])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-15)


def test_not_converged_warns_with_the_residual():
    c = 0.999
    g, y = Scale(c), randn(3, 2, seed=3, scale=5)
    pattern = (r"did not converge for 3 of 3 rows in 5 iterations: largest residual "
               r"\|\|x \+ g\(x\) - y\|\|_inf = (?P<res>\S+) \(tolerance \S+\)\. "
               r"Increase max_iter")
    with pytest.warns(InverseNotConvergedWarning, match=pattern) as record:
        x = fixed_point_inverse(g, y, method="fixed_point", max_iter=5)
    reported = float(re.search(pattern, str(record[0].message))["res"])
    actual = row_residual(g, x, y).max().item()
    # The message reports the residual before the last update, an upper bound on the
    # returned x's residual that is at most 1/Lip(g) larger (3 significant digits).
    assert actual * (1 - 5e-3) <= reported <= actual / c * (1 + 5e-3)
    assert record[0].filename == __file__  # stacklevel points at the caller


def test_converged_inverse_does_not_warn():
    g, x = contractive_mlp(3, seed=4, coeff=0.95), randn(5, 3, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed_point_inverse(g, (x + g(x)).detach())


def test_inverse_without_grad_has_no_graph():
    g, x = contractive_mlp(3, seed=4, coeff=0.95), randn(5, 3, seed=5)
    with torch.no_grad():
        x_hat = fixed_point_inverse(g, (x + g(x)).requires_grad_())
    assert x_hat.grad_fn is None


def test_gradcheck_implicit_gradient():
    g = SmoothBranch(3, 6, seed=6, scale=0.8)
    y = randn(3, 3, seed=7, scale=2).requires_grad_()

    def fn(y, *params):
        # Tight tolerances: finite differences divide the solver's error by eps.
        return fixed_point_inverse(g, y, atol=1e-14, rtol=0)

    # g's parameters are passed so gradcheck perturbs them in place; the inverse
    # reads them from g.
    assert torch.autograd.gradcheck(fn, (y, *g.parameters()))


def test_implicit_gradient_matches_inverse_jacobian():
    g = SmoothBranch(3, 6, seed=8, scale=0.8)
    y = randn(3, seed=9, scale=2)

    def inverse(t):
        return fixed_point_inverse(g, t[None], atol=1e-14, rtol=0)[0]

    jac = torch.autograd.functional.jacobian(inverse, y)
    forward_jac = torch.autograd.functional.jacobian(lambda t: t + g(t), inverse(y))
    torch.testing.assert_close(jac, torch.linalg.inv(forward_jac), rtol=0, atol=1e-12)


def test_max_iter_below_one_raises():
    g = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="max_iter must be at least 1"):
        fixed_point_inverse(g, torch.zeros(1, 2), max_iter=0)
