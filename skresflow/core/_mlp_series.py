r"""Vector-Jacobian products of MLP branches in closed form, for the log-det series.

For a branch ``g = L_K o a o ... o a o L_1`` of :class:`LipschitzLinear` layers and
element-wise activations, the forward pass gives the factors of

.. math:: J_g(x) = W_K \, D_{K-1} \, W_{K-1} \cdots D_1 \, W_1, \qquad
          D_k = \operatorname{diag}\bigl(a'(h_k)\bigr)

(:func:`~skresflow.core.jacobian._forward_factors`). A vector-Jacobian product
``u^T J`` is then a chain of small matrix products and element-wise products
with the saved factors, instead of an autograd backward pass through ``g``:
about one operation per layer instead of several, and none of autograd's
bookkeeping. The factors are differentiable functions of ``x`` and of the
parameters (the slopes carry the activation's second derivative), so the terms
that carry a gradient (the whole series with ``grad="naive"``, ``w^T J v`` for
the Neumann gradient) are ordinary differentiable expressions: plain
back-propagation replaces the double backward of the autograd path, with the
same value and gradient to rounding.
"""

import torch

from .jacobian import _forward_factors

__all__ = ["mlp_series_branch", "MLPSeries"]


def mlp_series_branch(g, x, n_probes, needs_grad):
    """The closed-form series of an MLP branch, or ``None`` for other branches.

    Parameters
    ----------
    g : torch.nn.Module
        The residual branch; anything but an MLP branch returns ``None``.
    x : torch.Tensor of shape ``(batch, d)``
    n_probes : int
        :meth:`MLPSeries.vjp` takes ``(n_probes * batch, d)`` rows, probe-major
        (row ``i`` of every block of ``batch`` rows belongs to ``x[i]``).
    needs_grad : bool
        Build the factors' graph. Without it everything runs without a graph.

    Returns
    -------
    MLPSeries or None
    """
    with torch.set_grad_enabled(needs_grad):
        result = _forward_factors(g, x)
    if result is None:
        return None
    gx, factors = result
    if n_probes > 1:  # the diagonals are per row: one copy per probe
        factors = [(k, f.repeat(n_probes, 1) if k == "d" else f) for k, f in factors]
    return MLPSeries(gx, factors, needs_grad)


class MLPSeries:
    """``g(x)`` and the factors of ``J_g(x)``, with the products the series needs.

    Attributes
    ----------
    gx : torch.Tensor of shape ``(batch, d)``
    inputs : tuple of torch.Tensor
        The factors (weights and slopes): the tensors a deferred gradient is
        returned for (:meth:`gradients`); autograd carries it on to ``x`` and to
        the parameters together with the gradient of ``gx``, in one pass.
    """

    def __init__(self, gx, factors, needs_grad):
        self.gx, self.factors, self.needs_grad = gx, factors, needs_grad
        self.inputs = tuple(f for _, f in factors)

    def vjp(self, u, create_graph):
        """Rows of ``u^T J``; differentiable with ``create_graph``."""
        with torch.set_grad_enabled(create_graph and self.needs_grad):
            return vector_jacobian(self.factors, u)

    def gradients(self, objective, upstream):
        """Gradients of ``objective(upstream, vjp)`` with respect to :attr:`inputs`.

        ``objective`` builds its graph on detached copies of the factors, so the
        branch's own graph is neither traversed nor kept here.
        """
        leaves = [f.detach().requires_grad_(f.requires_grad) for f in self.inputs]
        factors = [(k, f) for (k, _), f in zip(self.factors, leaves, strict=True)]
        wrt = [f for f in leaves if f.requires_grad]
        if not wrt:
            return (None,) * len(leaves)
        with torch.enable_grad():
            scalar = objective(upstream, lambda u, _: vector_jacobian(factors, u))
            grads = iter(torch.autograd.grad(scalar, wrt, allow_unused=True))
        return tuple(next(grads) if f.requires_grad else None for f in leaves)


def vector_jacobian(factors, u):
    """Rows of ``u^T J`` for ``J = F_n ... F_1`` given as ``[("w", W) | ("d", s)]``."""
    for kind, f in reversed(factors):
        u = u @ f if kind == "w" else u * f
    return u
