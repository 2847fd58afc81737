r"""Log-determinant of ``I + J_g(x)`` for a contractive residual branch ``g``.

One entry point, :func:`logdet_estimate`, with string options:

``estimator``
    ``"exact"``: the full Jacobian, then ``slogdet`` (closed form for one or two
    dimensions). MLP branches get it in closed form from the forward pass, with
    the determinant taken in the branch's narrowest layer
    (:func:`~skresflow.core.jacobian.branch_logdet`); other branches in one
    batched autograd pass (the batch is repeated once per input dimension and
    one vector-Jacobian product gives every row). Exact; cost grows with the
    dimension.
    ``"unbiased"``: ``n_exact_terms`` terms of the power series
    :math:`\sum_k (-1)^{k+1}\operatorname{tr}(J^k)/k` plus a Russian-roulette tail,
    traces by Hutchinson probes. Unbiased in expectation over the draws.
    ``"truncated"``: the first ``n_exact_terms`` terms only (i-ResNet); biased.

``grad`` (series estimators only; ``"exact"`` always back-propagates exactly)
    ``"naive"``: back-propagate through every term of the series.
    ``"neumann"``: the Neumann gradient series (Chen et al. 2019, Theorem 2): the
    terms are computed without a graph and only one vector-Jacobian product
    ``w^T J v`` is differentiated.
    ``"backward_in_forward"``: the series graph is not kept between forward and
    backward: each block keeps only its probes and draws, and its gradient is
    formed in the backward pass for the actual per-sample upstream gradients.
    ``"memory_efficient"``: both; the default.
    The two deferred modes give first-order gradients only (their backward
    passes are not differentiable); for higher derivatives of a loss
    (``create_graph=True``) use ``"naive"`` or ``"neumann"``.

MLP and convolutional branches (:class:`torch.nn.Sequential` of element-wise
activations and either :class:`~skresflow.core.LipschitzLinear` layers or
stride-1 :class:`~skresflow.core.LipschitzConv2d` layers, as built by
:func:`~skresflow.core.mlp_branch` and :func:`~skresflow.core.conv_branch`) get
the series' vector-Jacobian products in closed form from the factors of their
Jacobian (``skresflow.core._mlp_series``): a chain of matrix products (or
transposed convolutions) and element-wise products per term instead of an
autograd pass through ``g``, and plain back-propagation through those products
instead of a double backward. Same draws, same value and gradient to rounding;
any other branch uses autograd.

The value returned is always the honest estimate of the chosen estimator; only
the gradient depends on ``grad``. All random draws (roulette length first, then
the probes) come from ``generator``, in the same order in every mode.
``generator`` may also be a pair ``(shared, local)``: the roulette length is then
drawn from ``shared`` and the probes from ``local``. Data-parallel training
passes a pair whose first generator has the same state in every process, so all
processes compute the same number of series terms (none waits on another) while
their probes stay independent.
"""

import contextlib
import contextvars
import math

import torch
from torch.autograd.function import once_differentiable

from ._mlp_series import deferred_neumann, mlp_series_branch
from .jacobian import branch_logdet, conv_branch_logdet, logabsdet_identity_plus

__all__ = [
    "logdet_estimate",
    "residual_logdet",
    "row_hash",
    "hash_rows_by",
    "ESTIMATORS",
    "GRAD_MODES",
]

ESTIMATORS = ("exact", "unbiased", "truncated")
GRAD_MODES = ("memory_efficient", "neumann", "backward_in_forward", "naive")
_DEFAULT_OPTIONS = {
    "n_probes": 1,
    "probe": "gaussian",
    "probe_sharing": "per_sample",
    "roulette": "geometric",
    "p": 0.5,
    "lam": 2.0,
}


def logdet_estimate(
    g,
    x,
    *,
    estimator="unbiased",
    n_exact_terms=2,
    grad="memory_efficient",
    generator=None,
    **options,
):
    r"""Estimate :math:`\log\det(I + J_g(x))` row by row.

    Parameters
    ----------
    g : torch.nn.Module
        Maps ``(batch, *event)`` to the same shape, with ``Lip(g) < 1``.
    x : torch.Tensor of shape ``(batch, *event)``
    estimator : {"exact", "unbiased", "truncated"}, default="unbiased"
    n_exact_terms : int, default=2
        Series terms always computed; with ``"truncated"`` the series length, with
        ``"unbiased"`` the Russian-roulette tail follows them.
    grad : {"memory_efficient", "neumann", "backward_in_forward", "naive"}
        How the gradient is formed (see the module docstring); default
        ``"memory_efficient"``.
    generator : torch.Generator or pair of them, optional
        Source of every random draw. ``None`` uses torch's global generator; a
        pair ``(shared, local)`` draws the roulette length from ``shared`` and
        the probes from ``local``.
    **options : dict
        Series options:

        - ``n_probes`` (int, default 1): Hutchinson probes per row, averaged.
        - ``probe`` ({"gaussian", "rademacher"}, default "gaussian").
        - ``probe_sharing`` ({"per_sample", "shared", "row_hash"}, default
          "per_sample"): fresh probes for every row; the same probes for every
          row; or probes picked from a table of 256 draws by a hash of the row's
          values (of the flow's input inside :func:`hash_rows_by`, as a
          :class:`~skresflow.core.Flow` does). With the last two a row's estimate
          does not depend on the other rows of the batch; ``"row_hash"`` also
          keeps the errors of distinct rows nearly independent, so averages over
          rows are accurate.
        - ``roulette`` ({"geometric", "poisson"}, default "geometric").
        - ``p`` (float, default 0.5): success probability of the geometric
          distribution.
        - ``lam`` (float, default 2.0): Poisson rate.

    Returns
    -------
    logdet : torch.Tensor of shape (batch,)

    Notes
    -----
    Unbiased estimator: with :math:`N` drawn from the roulette distribution and
    :math:`n = n_{exact} + N` terms,

    .. math:: \widehat{\log\det} = \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}
              \frac{v^T J^k v}{P(N \ge k - n_{exact})},

    where the probability is 1 for :math:`k \le n_{exact}`. Its expected cost is
    :math:`n_{exact} + E[N]` vector-Jacobian products (4 at the defaults). The
    Neumann gradient uses
    :math:`w^T = \sum_{k=1}^{n} (-1)^{k+1} v^T J^{k-1} / P(N \ge k - n_{exact})`
    and differentiates :math:`w^T J v` only; it equals the naive gradient in
    expectation, not draw by draw.

    References
    ----------
    R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for
    Invertible Generative Modeling. NeurIPS 2019.
    J. Behrmann et al. Invertible Residual Networks. ICML 2019.

    Examples
    --------
    >>> import torch
    >>> g = torch.nn.Linear(3, 3, bias=False)
    >>> with torch.no_grad():
    ...     _ = g.weight.mul_(0.3 / torch.linalg.matrix_norm(g.weight, ord=2))
    >>> x = torch.randn(5, 3)
    >>> exact = logdet_estimate(g, x, estimator="exact")
    >>> brute = torch.linalg.slogdet(torch.eye(3) + g.weight).logabsdet
    >>> bool(torch.allclose(exact, brute.expand(5), atol=1e-5))
    True
    """
    return residual_logdet(
        g,
        x,
        estimator=estimator,
        n_exact_terms=n_exact_terms,
        grad=grad,
        generator=generator,
        **options,
    )[1]


def residual_logdet(
    g,
    x,
    *,
    estimator="unbiased",
    n_exact_terms=2,
    grad="memory_efficient",
    generator=None,
    **options,
):
    """Like :func:`logdet_estimate`, but also return ``g(x)`` from the same pass.

    Returns
    -------
    gx, logdet : torch.Tensor
        ``g(x)`` (shaped like ``x``) and the ``(batch,)`` log-det estimate. Both
        carry gradients when autograd needs them.
    """
    opts = _check_args(x, estimator, n_exact_terms, grad, options)
    params = [p for p in g.parameters() if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_()
        if estimator == "exact":
            gx, logdet = _exact(g, xg, create_graph=needs_grad)
        else:
            gx, logdet = _series_estimate(
                g, xg, estimator, n_exact_terms, grad, generator, opts, needs_grad
            )
    if not needs_grad:
        gx, logdet = gx.detach(), logdet.detach()
    return gx, logdet


def _check_args(x, estimator, n_exact_terms, grad, options):
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"estimator must be one of {ESTIMATORS}; got {estimator!r} instead."
        )
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}; got {grad!r} instead.")
    if not isinstance(n_exact_terms, int) or n_exact_terms < 0:
        raise ValueError(
            f"n_exact_terms must be a non-negative int; got {n_exact_terms!r} instead."
        )
    if estimator == "truncated" and n_exact_terms < 1:
        raise ValueError(
            "the truncated estimator needs n_exact_terms >= 1; got 0 instead."
        )
    unknown = set(options) - set(_DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown logdet options {sorted(unknown)}; "
            f"allowed: {sorted(_DEFAULT_OPTIONS)}."
        )
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(
            "x must be a floating-point tensor of shape (batch, *event); "
            f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))} instead."
        )
    opts = {**_DEFAULT_OPTIONS, **options}
    choices = {
        "probe": ("gaussian", "rademacher"),
        "probe_sharing": ("per_sample", "shared", "row_hash"),
        "roulette": ("geometric", "poisson"),
    }
    for name, allowed in choices.items():
        if opts[name] not in allowed:
            raise ValueError(
                f"{name} must be one of {allowed}; got {opts[name]!r} instead."
            )
    if not 0 < opts["p"] < 1:
        raise ValueError(f"p must be in (0, 1); got {opts['p']!r} instead.")
    if not opts["lam"] > 0:
        raise ValueError(f"lam must be positive; got {opts['lam']!r} instead.")
    if not isinstance(opts["n_probes"], int) or opts["n_probes"] < 1:
        raise ValueError(
            f"n_probes must be a positive int; got {opts['n_probes']!r} instead."
        )
    return opts


def split_generator(generator):
    """``(shared, local)`` generators from a generator or such a pair."""
    if isinstance(generator, tuple):
        return generator
    return generator, generator


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


def _vjp(gx, x, u, create_graph):
    return torch.autograd.grad(gx, x, u, retain_graph=True, create_graph=create_graph)[
        0
    ]


# ----------------------------------------------------------------------------- exact
def _exact(g, x, create_graph):
    """``g(x)`` and ``log|det(I + J_g(x))|``.

    MLP branches in closed form (:func:`branch_logdet`), conv branches too when
    no gradient is needed (:func:`conv_branch_logdet`); any other branch by one
    batched autograd pass: the batch is repeated once per input dimension and
    row ``k`` of ``J(x_i)`` is ``e_k^T J(x_i)``.
    """
    result = branch_logdet(g, x)
    if result is None and not create_graph:
        result = conv_branch_logdet(g, x)
    if result is not None:
        return result
    b, event = x.shape[0], x.shape[1:]
    d = math.prod(event)
    x_rep = x.repeat_interleave(d, dim=0)
    gx_rep = g(x_rep)
    basis = (
        torch.eye(d, dtype=x.dtype, device=x.device).repeat(b, 1).view(b * d, *event)
    )
    rows = torch.autograd.grad(
        gx_rep, x_rep, basis, create_graph=create_graph, retain_graph=True
    )[0]
    return gx_rep[::d], logabsdet_identity_plus(rows.reshape(b, d, d))


# ---------------------------------------------------------------------------- series
def _roulette(estimator, n_exact_terms, opts, generator):
    """Draw the series length; return the per-term weights 1 / P(N >= k - n_exact)."""
    if estimator == "truncated":
        return [1.0] * n_exact_terms
    device = generator.device if generator is not None else "cpu"
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).item()
    if opts["roulette"] == "geometric":
        q = 1.0 - opts["p"]
        n = int(math.floor(math.log1p(-u) / math.log(q))) + 1  # support {1, 2, ...}
        tail = [q ** (j - 1) for j in range(1, n + 1)]
    else:
        lam, n, cdf, pmf = (
            opts["lam"],
            0,
            math.exp(-opts["lam"]),
            math.exp(-opts["lam"]),
        )
        while u >= cdf and pmf > 0:  # inverse CDF on support {0, 1, ...}
            n += 1
            pmf *= lam / n
            cdf += pmf
        tail, survival, pmf = [], 1.0, math.exp(-lam)
        for j in range(1, n + 1):  # P(N >= j) = 1 - P(N <= j - 1)
            survival -= pmf
            pmf *= lam / j
            tail.append(survival)
    return [1.0] * n_exact_terms + [1.0 / s for s in tail]


_HASH_TABLE_SIZE = 256


def row_hash(x, n_buckets):
    """Deterministic integer in ``[0, n_buckets)`` per row, from the row's bits."""
    bits = x.detach().flatten(1).to(torch.float64).contiguous().view(torch.int64)
    weights = torch.arange(1, bits.shape[1] + 1, device=x.device) * 0x9E3779B1
    h = (bits ^ (bits >> 31)) * weights  # int64 arithmetic wraps around
    h = h.sum(1)
    return (h ^ (h >> 29)).remainder(n_buckets)


# The rows whose hash picks "row_hash" probes: the flow's input, set by Flow.
_HASHED_ROWS = contextvars.ContextVar("skresflow_hashed_rows", default=None)


@contextlib.contextmanager
def hash_rows_by(x):
    """Pick ``"row_hash"`` probes by a hash of ``x`` (a batch of the same rows).

    A block's input is the output of floating-point arithmetic whose last bits
    may depend on the rest of the batch (GPU matrix kernels are chosen by batch
    size), and any change of bits changes a hash. A flow therefore hashes its
    own input, the user's data, once, and every block inside this context uses
    that hash; outside it a block hashes its own input. The hash is computed on
    first use. Inside an outer context over as many rows (a flow used as a
    layer of another), the outer input's hash stays in force.
    """
    outer = _HASHED_ROWS.get()
    if outer is not None and outer[0].shape[0] == x.shape[0]:
        yield
        return
    token = _HASHED_ROWS.set([x, None])
    try:
        yield
    finally:
        _HASHED_ROWS.reset(token)


def _row_keys(x):
    """Table index of each row of ``x``: see :func:`hash_rows_by`."""
    hashed = _HASHED_ROWS.get()
    if hashed is None or hashed[0].shape[0] != x.shape[0]:
        return row_hash(x, _HASH_TABLE_SIZE)
    if hashed[1] is None:
        hashed[1] = row_hash(hashed[0], _HASH_TABLE_SIZE)
    return hashed[1].to(x.device)


def _probes(x, opts, generator):
    n_probes, b, event = opts["n_probes"], x.shape[0], x.shape[1:]
    sharing = opts["probe_sharing"]
    rows = {"per_sample": b, "shared": 1, "row_hash": _HASH_TABLE_SIZE}[sharing]
    device = generator.device if generator is not None else x.device
    shape = (n_probes, rows, *event)
    if opts["probe"] == "gaussian":
        v = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    else:
        v = (
            torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype)
            * 2
            - 1
        )
    v = v.to(x.device)
    v = v[:, _row_keys(x)] if sharing == "row_hash" else v.expand(n_probes, b, *event)
    return v.reshape(n_probes * b, *event)


def _power_series(vjp, v, coeffs, *, create_graph, want_w):
    """Series value per row and, if asked, the Neumann vector w (no graph).

    The terms ``(-1)^(k+1) c_k / k * v^T J^k v`` are summed as vectors and
    dotted with ``v`` once: fewer operations than one dot product per term.
    """
    u, total, w = v, None, None
    for k, c in enumerate(coeffs, start=1):
        sign = 1.0 if k % 2 else -1.0
        if want_w:
            w = sign * c * u if w is None else torch.add(w, u, alpha=sign * c)
        u = vjp(u, create_graph)
        a = sign * c / k
        total = a * u if total is None else torch.add(total, u, alpha=a)
    if total is None:
        return torch.zeros(v.shape[0], dtype=v.dtype, device=v.device), w
    return _dot(total, v), w


def _branch(g, x, n_probes, needs_grad):
    """``g(x)`` and the vector-Jacobian products of the series, on the
    probe-repeated rows.

    MLP and convolutional branches get closed-form products of their Jacobian
    factors (:func:`~skresflow.core._mlp_series.mlp_series_branch`): no autograd
    pass per term, and plain back-propagation instead of a double backward. Any
    other branch uses autograd's vector-Jacobian products through ``g``.
    """
    closed_form = mlp_series_branch(g, x, n_probes, needs_grad)
    return closed_form if closed_form is not None else _AutogradBranch(g, x, n_probes)


class _AutogradBranch:
    """Vector-Jacobian products by autograd through ``g``; the deferred gradient
    goes to ``x`` and the parameters directly, through ``g``'s retained graph.
    ``gx`` is among :attr:`inputs` so that the deferred node runs before the
    path-wise graph of ``g(x)`` is released; its graph is reused, not recomputed.
    """

    def __init__(self, g, x, n_probes):
        self.x_in = x.repeat(n_probes, *([1] * (x.dim() - 1))) if n_probes > 1 else x
        self.gx_in = g(self.x_in)
        self.gx = self.gx_in[: x.shape[0]]
        self.params = [p for p in g.parameters() if p.requires_grad]
        self.inputs = (x, self.gx_in, *self.params)

    def vjp(self, u, create_graph):
        return _vjp(self.gx_in, self.x_in, u, create_graph)

    def gradients(self, objective, upstream):
        with torch.enable_grad():
            scalar = objective(upstream, self.vjp)
            wrt = (self.inputs[0], *self.params)
            grads = torch.autograd.grad(
                scalar, wrt, retain_graph=True, allow_unused=True
            )
        return (grads[0], None, *grads[1:])


def _series_estimate(g, x, estimator, n_exact_terms, grad, generator, opts, needs_grad):
    shared, local = split_generator(generator)
    coeffs = _roulette(estimator, n_exact_terms, opts, shared)
    v = _probes(x, opts, local)
    n_probes, b = opts["n_probes"], x.shape[0]

    def average(rows):
        return rows.view(n_probes, b).mean(0)

    if coeffs and needs_grad and grad == "memory_efficient":
        fused = deferred_neumann(
            g,
            x,
            v,
            lambda vjp: _power_series(vjp, v, coeffs, create_graph=False, want_w=True),
        )
        if fused is not None:
            return fused[0], average(fused[1])
    branch = _branch(g, x, n_probes, needs_grad)
    gx, vjp = branch.gx, branch.vjp
    if not coeffs:
        return gx, torch.zeros(b, dtype=x.dtype, device=x.device)
    if not needs_grad or grad == "naive":
        est, _ = _power_series(vjp, v, coeffs, create_graph=needs_grad, want_w=False)
        return gx, average(est)
    neumann = grad in ("neumann", "memory_efficient")
    with torch.no_grad():
        est, w = _power_series(vjp, v, coeffs, create_graph=False, want_w=neumann)
    value = average(est)
    if grad == "neumann":
        surrogate = average(_dot(vjp(w, True), v))
        return gx, value + (surrogate - surrogate.detach())

    def weighted_objective(upstream, vjp):
        # upstream: dL/dlogdet per row; each probe row carries 1/n_probes of it.
        a = upstream.repeat(n_probes) / n_probes
        if neumann:
            a_w = w * a.view(-1, *([1] * (w.dim() - 1)))
            return _dot(vjp(a_w, True), v).sum()
        series, _ = _power_series(vjp, v, coeffs, create_graph=True, want_w=False)
        return (a * series).sum()

    def gradients(upstream):
        return branch.gradients(weighted_objective, upstream)

    return gx, _DeferredLogdet.apply(value, gradients, *branch.inputs)


class _DeferredLogdet(torch.autograd.Function):
    """Log-det value whose gradient is formed in the backward pass, per block.

    Nothing but the probes and draws (captured by ``gradients``) is kept between
    forward and backward. ``gradients(upstream)`` returns the gradient of
    ``sum_i a_i logdet_i`` with respect to ``inputs`` for the actual upstream
    gradients ``a_i``, so per-sample weights are honoured exactly (the reference
    implementation scales every sample by the first sample's upstream gradient).
    """

    @staticmethod
    def forward(ctx, value, gradients, *inputs):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, upstream):
        return (None, None, *ctx.gradients(upstream))
