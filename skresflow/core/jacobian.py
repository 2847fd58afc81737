r"""Closed-form Jacobians of MLP residual branches.

For a branch ``g = L_K o a o ... o a o L_1`` of linear layers ``L_k(h) = W_k h + b_k``
and element-wise activations ``a``, the chain rule gives

.. math:: J_g(x) = W_K \, D_{K-1} \, W_{K-1} \cdots D_1 \, W_1, \qquad
          D_k = \operatorname{diag}\bigl(a'(h_k)\bigr),

with ``h_k`` the pre-activations of the forward pass. Building it with batched
matrix products alongside ``g(x)`` costs one forward pass and a few small
matrix products (:func:`branch_jacobian`, differentiable by ordinary
back-propagation). For the log-determinant alone, the product is rotated to the
narrowest layer first, and the gradient comes from a hand-written backward pass
(see :func:`branch_logdet`). The autograd alternative (one vector-Jacobian
product per input dimension, and a double backward when training) costs several
times more. Branches with other modules return ``None`` and callers fall back on
autograd.

The factors, the branch's forward pass (:func:`_run`) and the hand-written
back-propagation through it (:func:`_branch_backward`) also serve branches of
stride-1 "same" convolutions (a convolution is a linear map: product
``conv2d``, adjoint ``conv_transpose2d``), for the log-det power series of
``skresflow.core._mlp_series``. The exact log-det and Jacobian here take dense
branches only (their ``x.dim() == 2`` checks keep convolutions out).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .activations import LipSwish
from .lipschitz import LipschitzConv2d, LipschitzLinear, conv2d, conv_transpose2d

__all__ = ["branch_jacobian", "branch_logdet", "logabsdet_identity_plus"]


# g * s * (1 - s) in one kernel, for s = sigmoid(z): the element-wise work of
# LipSwish dominates the closed-form passes, each operation a full-size tensor.
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default


def _lipswish_parts(h, raw_beta):
    """``beta = softplus(b)``, ``z = beta h`` and ``s = sigmoid(z)``."""
    beta = F.softplus(raw_beta)
    z = beta * h
    return beta, z, torch.sigmoid(z)


def _lipswish(module, h, raw_beta, parts=None):
    """Value ``h s / 1.1`` and slope ``(s + z s (1 - s)) / 1.1``."""
    _, z, s = _lipswish_parts(h, raw_beta) if parts is None else parts
    s_scaled = s * (1 / 1.1)  # a product: division is about twice as slow on CPUs
    return h * s_scaled, torch.add(s_scaled, _sigmoid_backward(z, s), alpha=1 / 1.1)


def _elu(module, h, _):
    slope = torch.where(h > 0, 1.0, module.alpha * torch.exp(h.clamp_max(0)))
    return F.elu(h, module.alpha), slope


def _softplus(module, h, _):
    z = module.beta * h  # torch's softplus is linear where z > threshold
    slope = torch.where(z > module.threshold, 1.0, torch.sigmoid(z))
    return F.softplus(h, module.beta, module.threshold), slope


def _tanh(module, h, _):
    t = torch.tanh(h)
    return t, 1 - t * t


def _relu(module, h, _):
    return F.relu(h), (h > 0).to(h.dtype)


# Element-wise activations: value and derivative at the pre-activation, given the
# module and its parameter tensor (LipSwish's raw beta; None for the others).
_ACTIVATIONS = {
    LipSwish: _lipswish,
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.Tanh: _tanh,
    nn.ReLU: _relu,
}


def _second_derivative(module, h):
    """``a''(h)`` of the parameter-free activations (their value is not needed)."""
    if isinstance(module, nn.ELU):
        return torch.where(h > 0, 0.0, module.alpha * torch.exp(h.clamp_max(0)))
    if isinstance(module, nn.Softplus):
        z = module.beta * h
        s = torch.sigmoid(z)
        return torch.where(z > module.threshold, 0.0, module.beta * s * (1 - s))
    if isinstance(module, nn.Tanh):
        t = torch.tanh(h)
        return -2 * t * (1 - t * t)
    return torch.zeros_like(h)  # ReLU


def _branch_backward(modules, restored, tensors, g_h, g_factor):
    """Back-propagate ``g_h`` (on ``g(x)``) through the branch, the factors'
    gradients ``g_factor`` joining in; the gradients of ``x`` and ``tensors``.
    ``restored`` is what :func:`_restore` returns."""
    factors, inputs, parts = restored
    grads, t = [None] * len(tensors), len(tensors)
    for index in reversed(range(len(modules))):
        module, inp, extra = modules[index], inputs[index], g_factor.get(index)
        if isinstance(module, LipschitzLinear):
            t -= 2
            grads[t] = g_h.T @ inp if extra is None else torch.addmm(extra, g_h.T, inp)
            if tensors[t + 1] is not None:
                grads[t + 1] = g_h.sum(0)
            g_h = g_h @ tensors[t]
        elif isinstance(module, LipschitzConv2d):
            t -= 2
            grads[t] = _conv_weight_grad(inp, tensors[t], g_h)
            if extra is not None:
                grads[t] = grads[t] + extra
            if tensors[t + 1] is not None:
                grads[t + 1] = g_h.sum((0, 2, 3))
            g_h = _conv_vjp(g_h, tensors[t])
        elif isinstance(module, LipSwish):
            t -= 1
            extra = torch.zeros_like(inp) if extra is None else extra
            slope = factors[index][1]
            g_h, grads[t] = _lipswish_backward(
                inp, tensors[t], parts[index], slope, g_h, extra
            )
        else:
            g_h = g_h * factors[index][1]
            if extra is not None:
                g_h = g_h + extra * _second_derivative(module, inp)
    return g_h, grads


def _lipswish_backward(h, raw_beta, parts, slope, g_value, g_slope):
    """Gradients of ``h`` and of the raw ``b`` from those of LipSwish's value and
    slope (its derivative ``slope``), given :func:`_lipswish_parts` of ``h``.

    With ``beta = softplus(b)``, ``z = beta h``, ``s = sigmoid(z)``,
    ``q = s (1 - s)`` and ``c = q (2 + z (1 - 2 s))``: the second derivative is
    ``beta c / 1.1``, ``d value / d beta = h^2 q / 1.1`` and
    ``d slope / d beta = h c / 1.1``.
    """
    beta, z, s = parts
    two_plus = torch.addcmul(z + 2, z, s, value=-2)  # 2 + z (1 - 2 s)
    g_slope_c = _sigmoid_backward(g_slope * two_plus, s)
    g_h = torch.addcmul(g_value * slope, g_slope_c, beta, value=1 / 1.1)
    inner = g_slope_c + _sigmoid_backward(g_value * h, s)
    g_beta = torch.dot(inner.flatten(), h.flatten())
    return g_h, g_beta * (torch.sigmoid(raw_beta) / 1.1)


def _conv(t, weight):
    """The linear part of a stride-1 "same" convolution (no bias)."""
    return conv2d(t, weight, padding=weight.shape[-1] // 2)


def _conv_vjp(u, weight):
    """``u^T C`` for the convolution ``C`` of :func:`_conv`: its adjoint."""
    return conv_transpose2d(u, weight, padding=weight.shape[-1] // 2)


def _conv_weight_grad(t, weight, s):
    """Gradient of ``sum s * conv(t, weight)`` with respect to ``weight``."""
    return torch.nn.grad.conv2d_weight(
        t, weight.shape, s, padding=weight.shape[-1] // 2
    )


def _supported(g, x):
    """Whether the factored Jacobian applies: a :class:`~torch.nn.Sequential` of
    element-wise activations and either dense layers on ``(batch, d)`` rows or
    stride-1 "same" convolutions on ``(batch, c, h, w)`` images. (The exact
    log-det and Jacobian take only the dense kind.)"""
    layer = {2: LipschitzLinear, 4: LipschitzConv2d}.get(x.dim())
    return (
        layer is not None
        and isinstance(g, nn.Sequential)
        and all(type(m) is layer or type(m) in _ACTIVATIONS for m in g)
    )


def _tensors(g, x):
    """The tensors a branch's forward pass reads, in module order: per linear
    layer or convolution its normalised weight and bias, per LipSwish its raw
    ``beta``. A convolution's norm depends on the input size, which is recorded
    first, as its own forward pass would."""
    out = []
    for module in g:
        if isinstance(module, LipschitzConv2d):
            module._spatial = tuple(x.shape[-2:])
        if isinstance(module, LipschitzLinear | LipschitzConv2d):
            out += [module.normalized_weight(), module.bias]
        elif isinstance(module, LipSwish):
            out.append(module.beta)
    return out


def _run(modules, x, tensors):
    """``g(x)``, the factors of ``J_g(x)`` and each module's input, from ``tensors``
    (see :func:`_tensors`); differentiable when called with grad enabled."""
    h, factors, inputs, it = x, [], [], iter(tensors)
    for module in modules:
        inputs.append(h)
        if isinstance(module, LipschitzLinear):
            w, b = next(it), next(it)
            h = F.linear(h, w, b)
            factors.append(("w", w))
        elif isinstance(module, LipschitzConv2d):
            w, b = next(it), next(it)
            h = conv2d(h, w, b, padding=w.shape[-1] // 2)
            factors.append(("c", w))
        else:
            param = next(it) if isinstance(module, LipSwish) else None
            h, slope = _ACTIVATIONS[type(module)](module, h, param)
            factors.append(("d", slope))
    return h, factors, inputs


_LAYERS = (LipschitzLinear, LipschitzConv2d)


def _layer_kind(module):
    """Factor kind of a layer: ``"w"`` (dense weight) or ``"c"`` (convolution)."""
    return "w" if isinstance(module, LipschitzLinear) else "c"


def _kept_inputs(modules, inputs):
    """The module inputs a hand-written backward pass keeps: all but the
    activations' outputs (``None`` in their place), which :func:`_restore`
    recomputes element-wise from their inputs (saving them, and the slopes,
    would keep three tensors per hidden layer instead of one). The first entry
    is the branch's input ``x``, which the Functions save with
    ``save_for_backward`` instead, so that in-place changes to it are caught."""
    return [
        None if i and not isinstance(modules[i - 1], _LAYERS) else inp
        for i, inp in enumerate(inputs)
    ]


def _restore(modules, kept, tensors):
    """The factors of ``J_g(x)``, every module's input and LipSwish's
    intermediate values (:func:`_lipswish_parts`, by module index), from
    :func:`_kept_inputs`, without a graph: for hand-written backward passes."""
    inputs, factors, parts, it = list(kept), [], {}, iter(tensors)
    with torch.no_grad():
        for i, module in enumerate(modules):
            if isinstance(module, _LAYERS):
                factors.append((_layer_kind(module), next(it)))
                next(it)
                continue
            if isinstance(module, LipSwish):
                parts[i] = _lipswish_parts(inputs[i], next(it))
                value, slope = _lipswish(module, inputs[i], None, parts[i])
            else:
                value, slope = _ACTIVATIONS[type(module)](module, inputs[i], None)
            factors.append(("d", slope))
            if i + 1 < len(modules):
                inputs[i + 1] = value
    return factors, inputs, parts


def _forward_factors(g, x):
    """``g(x)`` and the factors of ``J_g(x)`` in the order they apply.

    Each factor is ``("w", W)`` (a dense weight, shared by the batch),
    ``("c", weight)`` (a convolution's weight, see :func:`_conv`) or
    ``("d", slope)`` (a diagonal, one value per element of the activation), so
    that ``J = F_n ... F_1``. ``None`` for branches without a closed form.
    """
    if not _supported(g, x):
        return None
    h, factors, _ = _run(list(g), x, _tensors(g, x))
    return h, factors


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
    result = _forward_factors(g, x) if x.dim() == 2 else None
    if result is None:
        return None
    h, factors = result
    jac_t = _transposed_prefixes(factors)[-1]
    if jac_t is None:
        jac_t = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return h, jac_t.mT.expand(x.shape[0], -1, -1)


def _narrowest_cut(modules, d):
    """Boundary (between modules) of least width; among equals, one followed by a
    weight, so that the rotated product starts without a batch dimension."""
    widths, width = [d], d
    for module in modules:
        width = module.out_features if isinstance(module, LipschitzLinear) else width
        widths.append(width)
    return min(
        range(len(modules)),
        key=lambda i: (widths[i], not isinstance(modules[i], LipschitzLinear)),
        default=0,
    )


def _rotated(factors, cut):
    """Factors from the cut on, then those before it, tagged with their module."""
    order = list(range(cut, len(factors))) + list(range(cut))
    return [(i, *factors[i]) for i in order]


def _reference_logdet(modules, cut, x, tensors):
    """The closed-form log-det through autograd: the oracle of
    :class:`_ClosedFormLogdet` and its double-backward path."""
    h, factors, _ = _run(modules, x, tensors)
    m_t = _transposed_prefixes([f[1:] for f in _rotated(factors, cut)])[-1]
    return h, logabsdet_identity_plus(m_t.expand(x.shape[0], -1, -1))


def _transposed_prefixes(factors):
    """Transposed partial products of factors ``F_1, F_2, ...``: ``P_0 = None``
    (the identity), ``P_i^T = (F_i P_{i-1})^T`` as ``(batch, k, m)``, or
    ``(k, m)`` while no diagonal came in. Transposed, every product with a
    weight is one matrix product on a ``(batch * k, m)`` view."""
    prefixes = [None]
    for kind, f in factors:
        p = prefixes[-1]
        if kind == "w":
            # Contiguous: a transposed view would make the next products take
            # its layout, on which PyTorch's CPU matmul copies (up to 20x slower).
            p = f.T.contiguous() if p is None else p @ f.T
        else:
            p = torch.diag_embed(f) if p is None else p * f.unsqueeze(-2)
        prefixes.append(p)
    return prefixes


class _ClosedFormLogdet(torch.autograd.Function):
    """``g(x)`` and ``log|det(I + J_g(x))|`` of an MLP branch with a hand-written
    backward pass.

    Forward: one pass through the branch and the rotated product ``M`` of the
    Jacobian's factors (see :func:`branch_logdet`), kept transposed. Backward:
    with ``G = dL/dlogdet (I + M)^{-T}``, the gradient of factor ``F_i`` of
    ``M = F_n ... F_1`` is ``(F_n ... F_{i+1})^T G (F_{i-1} ... F_1)^T`` (for a
    diagonal factor, the diagonal of it); the slopes' gradients then join the
    value's on the way back through the branch, via the activations' second
    derivatives. A second differentiation (``create_graph=True``)
    differentiates :func:`_reference_logdet` instead.
    """

    @staticmethod
    def forward(ctx, modules, cut, x, *tensors):
        h, factors, inputs = _run(modules, x, tensors)
        prefixes = _transposed_prefixes([f[1:] for f in _rotated(factors, cut)])
        ctx.save_for_backward(x, *tensors)
        ctx.modules, ctx.cut = modules, cut
        ctx.kept, ctx.prefixes = _kept_inputs(modules, inputs)[1:], prefixes
        return h, logabsdet_identity_plus(prefixes[-1].expand(x.shape[0], -1, -1))

    @staticmethod
    def backward(ctx, g_out, g_logdet):
        x, *tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            outputs = _reference_logdet(ctx.modules, ctx.cut, x, tensors)
            grads = _grads_with_graph(
                outputs, (g_out, g_logdet), (x, *tensors), ctx.needs_input_grad[2:]
            )
            return None, None, *grads
        modules, b = ctx.modules, x.shape[0]
        restored = _restore(modules, [x, *ctx.kept], tensors)
        rotated = _rotated(restored[0], ctx.cut)
        # Gradients of the factors of M, all transposed: q = Q_i^T, (batch, k, m).
        n = ctx.prefixes[-1].expand(b, -1, -1)  # M^T
        inverse_t = _inverse_identity_plus(n).transpose(1, 2).contiguous()
        q = g_logdet[:, None, None] * inverse_t  # contiguous: see _transposed_prefixes
        k = q.shape[1]
        g_weight, g_slope = {}, {}
        for i in reversed(range(len(rotated))):
            index, kind, f = rotated[i]
            p = ctx.prefixes[i]
            if kind == "w":
                if p is None:
                    g_weight[index] = q.sum(0).T
                elif p.dim() == 2:
                    g_weight[index] = q.sum(0).T @ p
                else:
                    g_weight[index] = q.reshape(b * k, -1).T @ p.reshape(b * k, -1)
                if i:
                    q = q @ f
            else:
                g_slope[index] = (
                    q.diagonal(dim1=1, dim2=2) if p is None else (q * p).sum(1)
                )
                if i:
                    q = q * f.unsqueeze(-2)
        g_x, grads = _branch_backward(
            modules, restored, tensors, g_out, g_weight | g_slope
        )
        return None, None, g_x, *grads


def _grads_with_graph(outputs, grad_outputs, inputs, needs_input_grad):
    """``autograd.grad`` with ``create_graph=True`` of ``outputs`` (those with a
    gradient) with respect to the ``inputs`` that need one, ``None`` for the
    rest: the backward pass of a hand-written Function when it is itself
    differentiated."""
    wanted = [i for i, t in enumerate(inputs) if t is not None and needs_input_grad[i]]
    pairs = [
        (o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None
    ]
    found = torch.autograd.grad(
        [o for o, _ in pairs],
        [inputs[i] for i in wanted],
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
    )
    grads = [None] * len(inputs)
    for i, grad in zip(wanted, found, strict=True):
        grads[i] = grad
    return grads


def _inverse_identity_plus(m):
    """``(I + m)^{-1}`` of a ``(batch, k, k)`` stack; closed form for k <= 2."""
    k = m.shape[-1]
    if k == 1:
        return 1 / (1 + m)
    if k == 2:
        a, b, c, e = 1 + m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], 1 + m[:, 1, 1]
        inv = torch.stack([e, -b, -c, a], dim=1) / (a * e - b * c).unsqueeze(1)
        return inv.view(-1, 2, 2)
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    return torch.linalg.inv(eye + m)


def branch_logdet(g, x):
    r"""``g(x)`` and ``log|det(I + J_g(x))|`` for an MLP branch, or ``None``.

    The determinant is taken in the narrowest layer of the branch: with
    ``J = A B`` split at any layer boundary, ``det(I + A B) = det(I + B A)``
    (Sylvester's identity), so a branch ``d -> h -> ... -> d`` with a hidden
    width ``m < d`` needs an ``m x m`` determinant of the cyclically rotated
    product instead of the ``d x d`` one. Gradients come from a hand-written
    backward pass (:class:`_ClosedFormLogdet`), several times cheaper than
    autograd on this chain of small operations. Same arguments as
    :func:`branch_jacobian`.
    """
    if x.dim() != 2 or not _supported(g, x):
        return None
    modules = list(g)
    if not modules:  # an empty branch: g(x) = x, log det I = 0
        return x, x.new_zeros(x.shape[0])
    cut = _narrowest_cut(modules, x.shape[1])
    return _ClosedFormLogdet.apply(modules, cut, x, *_tensors(g, x))


def conv_branch_logdet(g, x):
    """``g(x)`` and ``log|det(I + J_g(x))|`` for a conv branch, without a graph.

    Values only, for scoring: the result carries no graph. ``None`` when ``g``
    is not a conv branch (see :func:`_supported`). The Jacobian's columns
    ``J e_k`` are carried forward through the factors of ``J`` for the ``d``
    basis images at once (``d = c h w``): diagonals multiply, convolutions
    convolve, with no backward pass. While the running product is still a
    diagonal, a convolution's image of the basis is the same for every row and
    is computed once. Half the convolutions of the autograd form (a forward
    pass of the batch repeated ``d`` times, then its backward pass).
    """
    if x.dim() != 4 or not _supported(g, x):
        return None
    with torch.no_grad():
        return _conv_logdet(*_run(list(g), x, _tensors(g, x))[:2], x)


def _local_columns(factors, x):
    """``J^T`` from the columns ``J e_k`` computed on a window around ``e_k``'s
    pixel only, or ``None`` when the windows would not be much smaller than the
    image.

    A convolution of radius ``q`` spreads a column by ``q`` pixels each way, so
    after the branch ``J e_k`` is zero outside a window of radius ``R``, the sum
    of the radii, around ``e_k``'s pixel. Each layer works on ``(2r + 1)^2``
    pixels per column instead of ``h w``: diagonals are gathered on the window
    (zero outside the image), convolutions are full convolutions of the window
    (radius ``r + q``) with the positions outside the image set to zero, as the
    zero padding of the "same" convolution has them.
    """
    b, c, height, width = x.shape
    radius = sum((f.shape[-1] - 1) // 2 for kind, f in factors if kind == "c")
    if 2 * (2 * radius + 1) ** 2 > height * width:
        return None
    d, pixels = x[0].numel(), height * width
    dev = x.device
    channel = torch.arange(c, device=dev).repeat_interleave(pixels)
    pixel = torch.arange(pixels, device=dev).repeat(c)
    row, col = pixel // width, pixel % width
    t = torch.zeros(1, d, c, 1, 1, dtype=x.dtype, device=dev)
    t[0, torch.arange(d, device=dev), channel] = 1.0
    r = 0
    for kind, f in factors:
        size = 2 * r + 1
        if kind == "d":  # the slopes on each column's window
            windows = F.unfold(F.pad(f, (r, r, r, r)), size)  # (b, C size^2, hw)
            windows = windows.view(b, f.shape[1], size, size, pixels)
            t = t * windows.permute(0, 4, 1, 2, 3)[:, pixel]
            continue
        q = (f.shape[-1] - 1) // 2
        out = conv2d(t.flatten(0, 1), f, padding=2 * q)  # the full convolution
        r, size = r + q, size + 2 * q
        offset = torch.arange(-r, r + 1, device=dev)
        inside_r = (row[:, None] + offset >= 0) & (row[:, None] + offset < height)
        inside_c = (col[:, None] + offset >= 0) & (col[:, None] + offset < width)
        inside = (inside_r[:, :, None] & inside_c[:, None, :]).to(x.dtype)
        t = out.view(t.shape[0], d, *out.shape[1:]) * inside[None, :, None]
    # Scatter the windows into full rows: J^T[i, k, (c', p')] is the window's
    # value at p' - p_k + R when that offset lies in the window, else 0.
    size = 2 * r + 1
    out_row = torch.arange(height, device=dev).repeat_interleave(width)
    out_col = torch.arange(width, device=dev).repeat(height)
    di = out_row[None, :] - row[:, None] + r  # (d, hw)
    dj = out_col[None, :] - col[:, None] + r
    valid = (di >= 0) & (di < size) & (dj >= 0) & (dj < size)
    index = di.clamp(0, size - 1) * size + dj.clamp(0, size - 1)
    flat = t.flatten(3)  # (b', d, c, size^2)
    index = index[None, :, None, :].expand(flat.shape[0], d, flat.shape[2], pixels)
    rows = torch.gather(flat, 3, index) * valid[None, :, None, :].to(x.dtype)
    return rows.expand(b, -1, -1, -1).reshape(b, d, d)


def _conv_logdet(h, factors, x):
    b, d = x.shape[0], x[0].numel()
    local = _local_columns(factors, x)
    if local is not None:
        return h, logabsdet_identity_plus(local)
    cols, scale = None, None  # cols[i, k] = (running product) e_k, for row i
    for kind, f in factors:
        if kind == "d":
            if cols is None:
                scale = f.flatten(1) if scale is None else scale * f.flatten(1)
            else:
                cols = cols * f.unsqueeze(1)
        elif cols is None:
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            basis = _conv(eye.view(d, *x.shape[1:]), f)  # the same for every row
            if scale is None:
                cols = basis.expand(b, *basis.shape)
            else:
                cols = basis * scale.view(b, d, 1, 1, 1)
        else:
            out = _conv(cols.flatten(0, 1), f)
            cols = out.view(b, d, *out.shape[1:])
    if cols is None:  # no convolution: J is diagonal (or empty: J = 0)
        logdet = x.new_zeros(b) if scale is None else scale.add(1).abs().log().sum(1)
        return h, logdet
    return h, logabsdet_identity_plus(cols.reshape(b, d, d))  # rows J e_k: J^T


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
