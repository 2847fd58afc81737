r"""Closed-form Jacobians of MLP residual branches.

For a branch ``g = L_K o a o ... o a o L_1`` of linear layers ``L_k(h) = W_k h + b_k``
and element-wise activations ``a``, the chain rule gives

.. math:: J_g(x) = W_K \, D_{K-1} \, W_{K-1} \cdots D_1 \, W_1, \qquad
          D_k = \operatorname{diag}\bigl(a'(h_k)\bigr),

with ``h_k`` the pre-activations of the forward pass. Building it with batched
matrix products alongside ``g(x)`` costs one forward pass and a few small
``bmm``; its gradient is ordinary back-propagation. For the log-determinant
alone, the product is rotated to the narrowest layer first (see
:func:`branch_logdet`). The autograd alternative
(one vector-Jacobian product per input dimension, and a double backward when
training) costs several times more. Branches with other modules return ``None``
and callers fall back on autograd.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .activations import LipSwish
from .lipschitz import LipschitzLinear

__all__ = ["branch_jacobian", "branch_logdet", "logabsdet_identity_plus"]


def _lipswish(module, h):
    beta = F.softplus(module.beta)
    s = torch.sigmoid(beta * h)
    return h * s / 1.1, (s + beta * h * s * (1 - s)) / 1.1


def _elu(module, h):
    slope = torch.where(h > 0, 1.0, module.alpha * torch.exp(h.clamp_max(0)))
    return F.elu(h, module.alpha), slope


def _softplus(module, h):
    z = module.beta * h  # torch's softplus is linear where z > threshold
    slope = torch.where(z > module.threshold, 1.0, torch.sigmoid(z))
    return F.softplus(h, module.beta, module.threshold), slope


def _tanh(module, h):
    t = torch.tanh(h)
    return t, 1 - t * t


def _relu(module, h):
    return F.relu(h), (h > 0).to(h.dtype)


# Element-wise activations: value and derivative at the pre-activation.
_ACTIVATIONS = {
    LipSwish: _lipswish,
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.Tanh: _tanh,
    nn.ReLU: _relu,
}


def _supported(g):
    return isinstance(g, nn.Sequential) and all(
        type(m) is LipschitzLinear or type(m) in _ACTIVATIONS for m in g
    )


def _forward_factors(g, x):
    """``g(x)`` and the factors of ``J_g(x)`` in the order they apply.

    Each factor is ``("w", W)`` (a weight, shared by the batch) or
    ``("d", slope)`` (a ``(batch, k)`` diagonal), so that
    ``J = F_n ... F_1``. ``None`` for branches without a closed form.
    """
    if x.dim() != 2 or not _supported(g):
        return None
    h, factors = x, []
    for module in g:
        if isinstance(module, LipschitzLinear):
            w = module.normalized_weight()
            h = F.linear(h, w, module.bias)
            factors.append(("w", w))
        else:
            h, slope = _ACTIVATIONS[type(module)](module, h)
            factors.append(("d", slope))
    return h, factors


def _product(factors):
    """``F_n ... F_1`` as ``(batch, m, k)``, or ``(m, k)`` while no diagonal came
    in, or ``None`` for an empty list (the identity). Adjacent weights are
    multiplied together first, without the batch dimension."""
    merged = []
    for kind, f in factors:
        if kind == "w" and merged and merged[-1][0] == "w":
            merged[-1] = ("w", f @ merged[-1][1])
        else:
            merged.append((kind, f))
    m = None
    for kind, f in merged:
        if kind == "w":
            m = f if m is None else f @ m
        else:
            m = torch.diag_embed(f) if m is None else f.unsqueeze(-1) * m
    return m


def branch_jacobian(g, x):
    """``g(x)`` and its batched Jacobian for an MLP branch, or ``None``.

    Parameters
    ----------
    g : torch.nn.Module
        A :class:`torch.nn.Sequential` of :class:`LipschitzLinear` layers and
        element-wise activations (LipSwish, ELU, softplus, tanh, ReLU), as built
        by :func:`~skresflow.core.mlp_branch`. Anything else returns ``None``.
    x : torch.Tensor of shape ``(batch, d)``

    Returns
    -------
    (gx, jacobian) or None
        ``g(x)`` of shape ``(batch, d)`` and ``J_g(x)`` of shape
        ``(batch, d, d)``; both differentiable by ordinary back-propagation.
    """
    result = _forward_factors(g, x)
    if result is None:
        return None
    h, factors = result
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    jac = _product(factors)
    jac = eye if jac is None else jac
    return h, jac.expand(x.shape[0], -1, -1)


def branch_logdet(g, x):
    r"""``g(x)`` and ``log|det(I + J_g(x))|`` for an MLP branch, or ``None``.

    The determinant is taken in the narrowest layer of the branch: with
    ``J = A B`` split at any layer boundary, ``det(I + A B) = det(I + B A)``
    (Sylvester's identity), so a branch ``d -> h -> ... -> d`` with a hidden
    width ``m < d`` needs an ``m x m`` determinant of the cyclically rotated
    product instead of the ``d x d`` one. Same arguments as
    :func:`branch_jacobian`.
    """
    result = _forward_factors(g, x)
    if result is None:
        return None
    h, factors = result
    # Width of the space after each factor; boundary 0 is the input (width d).
    widths, width = [x.shape[1]], x.shape[1]
    for kind, f in factors:
        width = f.shape[0] if kind == "w" else width
        widths.append(width)
    # Narrowest boundary; among equals, one followed by a weight, so that the
    # product starts without a batch dimension.
    cut = min(
        range(len(factors)),
        key=lambda i: (widths[i], factors[i][0] != "w"),
        default=0,
    )
    m = _product(factors[cut:] + factors[:cut])
    if m is None:  # an empty branch: g(x) = x, log det I = 0
        return h, x.new_zeros(x.shape[0])
    return h, logabsdet_identity_plus(m.expand(x.shape[0], -1, -1))


def logabsdet_identity_plus(m):
    """``log|det(I + m)|`` for a ``(batch, k, k)`` stack; closed form for k <= 2."""
    k = m.shape[-1]
    if k == 1:
        return torch.log(torch.abs(1 + m[:, 0, 0]))
    if k == 2:
        a, b, c, e = 1 + m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], 1 + m[:, 1, 1]
        return torch.log(torch.abs(a * e - b * c))
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    return torch.linalg.slogdet(eye + m).logabsdet
