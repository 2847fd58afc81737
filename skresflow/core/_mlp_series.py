r"""Vector-Jacobian products of MLP and convolutional branches in closed form,
for the log-det series.

For a branch ``g = L_K o a o ... o a o L_1`` of linear layers (:class:`LipschitzLinear`,
or stride-1 "same" :class:`LipschitzConv2d`) and element-wise activations, the
forward pass gives the factors of

.. math:: J_g(x) = W_K \, D_{K-1} \, W_{K-1} \cdots D_1 \, W_1, \qquad
          D_k = \operatorname{diag}\bigl(a'(h_k)\bigr)

(:func:`~skresflow.core.jacobian._forward_factors`), where a convolution's
``W_k`` is the linear map ``conv2d(., weight)`` (its adjoint is
``conv_transpose2d``, its weight gradient ``conv2d_weight``). A vector-Jacobian
product ``u^T J`` is then a chain of matrix products (transposed convolutions)
and element-wise products with the saved factors, instead of an autograd
backward pass through ``g``: about one operation per layer instead of several,
and none of autograd's bookkeeping. The factors are differentiable functions of
``x`` and of the parameters (the slopes carry the activation's second
derivative), so the terms that carry a gradient (the whole series with
``grad="naive"``, ``w^T J v`` for the Neumann gradient) are ordinary
differentiable expressions: plain back-propagation replaces the double backward
of the autograd path, with the same value and gradient to rounding.

Two autograd Functions with hand-written backward passes keep autograd's graph
small: :class:`_BranchFactors` (``g(x)`` and the slopes, for the ``naive``,
``neumann`` and ``backward_in_forward`` modes, whose series terms are then
differentiated as products of the factors) and :class:`_DeferredNeumann` (the
whole block in ``memory_efficient`` mode: the series without a graph, the
gradient of ``w^T J v`` formed in the backward pass). Both keep only the
layers' inputs that are not activation outputs (one tensor per hidden layer),
recompute the activations' values and slopes in the backward pass
(:func:`~skresflow.core.jacobian._restore`), and back-propagate through the
branch once, the slopes' gradients joining the output's through the
activations' second derivatives (:func:`_branch_backward`).
"""

import torch
from torch.autograd.function import once_differentiable

from .activations import LipSwish
from .jacobian import (
    _LAYERS,
    _branch_backward,
    _conv,
    _conv_vjp,
    _conv_weight_grad,
    _forward_factors,
    _grads_with_graph,
    _kept_inputs,
    _layer_kind,
    _restore,
    _run,
    _supported,
    _tensors,
)

__all__ = ["mlp_series_branch", "MLPSeries", "deferred_neumann"]


def mlp_series_branch(g, x, n_probes, needs_grad):
    """The closed-form series of an MLP or conv branch, or ``None`` for others.

    Parameters
    ----------
    g : torch.nn.Module
        The residual branch; anything but an MLP branch (on ``(batch, d)`` rows)
        or a conv branch (on ``(batch, c, h, w)`` images) returns ``None``.
    x : torch.Tensor of shape ``(batch, *event)``
    n_probes : int
        :meth:`MLPSeries.vjp` takes ``(n_probes * batch, *event)`` rows, probe-major
        (row ``i`` of every block of ``batch`` rows belongs to ``x[i]``).
    needs_grad : bool
        Build the factors' graph. Without it everything runs without a graph.

    Returns
    -------
    MLPSeries or None
    """
    if not _supported(g, x):
        return None
    if needs_grad:
        gx, factors = _differentiable_factors(list(g), x, _tensors(g, x))
    else:
        with torch.no_grad():
            gx, factors = _forward_factors(g, x)
    return MLPSeries(gx, _repeat_slopes(factors, n_probes), needs_grad)


class MLPSeries:
    """``g(x)`` and the factors of ``J_g(x)``, with the products the series needs.

    Attributes
    ----------
    gx : torch.Tensor of shape ``(batch, *event)``
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
    """Rows of ``u^T J`` for ``J = F_n ... F_1`` given as ``(kind, tensor)``:
    ``"w"`` a dense weight, ``"c"`` a convolution's weight, ``"d"`` a diagonal."""
    for kind, f in reversed(factors):
        u = u @ f if kind == "w" else _conv_vjp(u, f) if kind == "c" else u * f
    return u


def deferred_neumann(g, x, v, series):
    """``g(x)`` and the series per probe row, with the Neumann gradient formed in
    a hand-written backward pass; ``None`` for branches without a closed form.

    Parameters
    ----------
    g : torch.nn.Module
    x : torch.Tensor of shape ``(batch, *event)``
    v : torch.Tensor of shape ``(n_probes * batch, *event)``
        The probes, probe-major.
    series : callable
        ``series(vjp)`` returns the estimate per probe row and the Neumann
        vector ``w`` (``logdet._power_series`` with ``want_w=True``).

    Returns
    -------
    (gx, est) or None
        ``est`` has one entry per probe row; its gradient is that of
        ``w^T J v`` (Neumann), formed only in the backward pass.
    """
    if not _supported(g, x):
        return None
    return _DeferredNeumann.apply(list(g), series, v, x, *_tensors(g, x))


class _DeferredNeumann(torch.autograd.Function):
    """``g(x)`` and the log-det series of an MLP or conv branch; backward by hand.

    Forward: one pass through the branch (its output, the Jacobian's factors and
    each module's input), then the series and the Neumann vector ``w`` without
    a graph. Backward: the gradient of ``sum_i a_i w_i^T J_i v_i`` with respect
    to each factor ``F_j`` of ``J = F_n ... F_1`` is ``s_j t_{j-1}^T`` (for a
    diagonal factor its diagonal), with ``t_j = F_j ... F_1 v`` and
    ``s_j = (F_n ... F_{j+1})^T (a w)``; the slopes' gradients then join the
    output's on the way back through the branch, via the activations' second
    derivatives. Nothing but ``x``, the layers' outputs (the activations'
    inputs), ``v`` and ``w`` is kept between the passes; the activations' values
    and slopes are recomputed, and the branch is traversed backward once.
    First-order only: the backward pass is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, modules, series, v, x, *tensors):
        n_probes = v.shape[0] // x.shape[0]
        h, factors, inputs = _run(modules, x, tensors)
        repeated = _repeat_slopes(factors, n_probes)
        est, w = series(lambda u, _: vector_jacobian(repeated, u))
        ctx.save_for_backward(x, *tensors)  # x saved: in-place changes are caught
        ctx.modules, ctx.n_probes = modules, n_probes
        ctx.kept, ctx.v, ctx.w = _kept_inputs(modules, inputs)[1:], v, w
        return h, est

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_est):
        x, *tensors = ctx.saved_tensors
        kept = [x, *ctx.kept]
        restored = _restore(ctx.modules, kept, tensors)
        g_factor = {}
        if g_est is not None:
            s = ctx.w * g_est.view(-1, *([1] * (ctx.w.dim() - 1)))
            repeated = _repeat_slopes(restored[0], ctx.n_probes)
            g_factor = _factor_grads(repeated, ctx.v, s, ctx.n_probes)
        if g_out is None:
            g_out = torch.zeros_like(x)
        g_x, grads = _branch_backward(ctx.modules, restored, tensors, g_out, g_factor)
        return None, None, None, g_x, *grads


def _differentiable_factors(modules, x, tensors):
    """``g(x)`` and the factors of ``J_g(x)``, differentiable through one node:
    the weights are ``tensors`` themselves, the slopes outputs of
    :class:`_BranchFactors`."""
    gx, *slopes = _BranchFactors.apply(modules, x, *tensors)
    it, slopes, factors = iter(tensors), iter(slopes), []
    for module in modules:  # tensors: per layer weight and bias, LipSwish b
        if isinstance(module, _LAYERS):
            factors.append((_layer_kind(module), next(it)))
            next(it)
        else:
            if isinstance(module, LipSwish):
                next(it)
            factors.append(("d", next(slopes)))
    return gx, factors


class _BranchFactors(torch.autograd.Function):
    """``g(x)`` and the slopes ``a'(h_k)`` of an MLP or conv branch, with a
    hand-written backward pass: the slopes' gradients join the output's on the
    way back through the branch, via the activations' second derivatives. Keeps
    ``x`` and the layers' outputs (the activations' inputs) and recomputes the
    activations' values and slopes; no graph of the activations' formulas."""

    @staticmethod
    def forward(ctx, modules, x, *tensors):
        h, factors, inputs = _run(modules, x, tensors)
        ctx.save_for_backward(x, *tensors)
        ctx.modules, ctx.kept = modules, _kept_inputs(modules, inputs)[1:]
        return (h, *[f for kind, f in factors if kind == "d"])

    @staticmethod
    def backward(ctx, g_out, *g_slopes):
        x, *tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            h, factors, _ = _run(ctx.modules, x, tensors)
            outputs = [h, *[f for kind, f in factors if kind == "d"]]
            grads = _grads_with_graph(
                outputs, (g_out, *g_slopes), (x, *tensors), ctx.needs_input_grad[1:]
            )
            return None, *grads
        restored = _restore(ctx.modules, [x, *ctx.kept], tensors)
        diagonal = [i for i, (kind, _) in enumerate(restored[0]) if kind == "d"]
        g_factor = {
            i: g for i, g in zip(diagonal, g_slopes, strict=True) if g is not None
        }
        if g_out is None:
            g_out = torch.zeros_like(x)
        g_x, grads = _branch_backward(ctx.modules, restored, tensors, g_out, g_factor)
        return None, g_x, *grads


def _repeat_slopes(factors, n_probes):
    """The factors for probe-major rows: the diagonals are per row."""
    if n_probes == 1:
        return factors
    return [
        (k, f.repeat(n_probes, *[1] * (f.dim() - 1)) if k == "d" else f)
        for k, f in factors
    ]


def _factor_grads(factors, v, s, n_probes):
    """Gradient of ``sum_rows s^T J v`` with respect to each factor of ``J``:
    ``{index: grad}``, slopes' gradients summed over the probes."""
    ts = [v]
    for kind, f in factors[:-1]:
        t = ts[-1]
        ts.append(t @ f.T if kind == "w" else _conv(t, f) if kind == "c" else t * f)
    grads = {}
    for i in reversed(range(len(factors))):
        kind, f = factors[i]
        if kind == "w":
            grads[i] = s.T @ ts[i]
        elif kind == "c":
            grads[i] = _conv_weight_grad(ts[i], f, s)
        else:
            grads[i] = s * ts[i]
            if n_probes > 1:
                grads[i] = grads[i].view(n_probes, -1, *f.shape[1:]).sum(0)
        if i:
            s = s @ f if kind == "w" else _conv_vjp(s, f) if kind == "c" else s * f
    return grads
