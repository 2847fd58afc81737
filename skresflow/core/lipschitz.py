"""Linear and convolutional layers whose Lipschitz constant is bounded.

Each layer divides its weight by ``max(1, sigma / coeff)`` where ``sigma`` is the
operator norm of the weight: for small dense weights a value certified to be
within ``rtol`` of the exact norm (a Cholesky factorisation checks the stored or
the Rayleigh-quotient value; an eigendecomposition when it fails), power
iteration otherwise. The estimate is kept fresh automatically: whenever the
weight has changed since the last estimate (an optimizer step,
``load_state_dict``, a device or dtype move, an in-place edit), the next forward
pass recomputes it (power iteration is warm-started from the stored vectors and
runs until ``sigma`` and its singular vector settle to ``rtol``).
:func:`refresh_layers` refreshes many layers at once and batches the dense
computations of equal-shape layers (a :class:`~skresflow.core.Flow` does this
once per forward pass).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "LipschitzLinear",
    "LipschitzConv2d",
    "refresh_layers",
    "shared_normalization",
]

_OPTIMIZER_STEPS = [0]

# Dense layers with m * n * min(m, n) at most this get a certified sigma (see
# _refresh_exact): on one CPU thread it costs less than the power iteration it
# replaces (a 64 x 32 weight: ~0.1 ms, against ~3 ms for the ~130 warm-started
# iterations that the vector tolerance needs during training). A 128 x 128
# Cholesky factorisation costs ~0.13 ms in float32, an eigendecomposition of the
# Gram matrix ~0.7 ms (only when the check fails), the SVD used before ~1.3 ms;
# equal-shape layers share one batched call.
EXACT_MAX_COST = 2**21
POWER_CHECK_EVERY = 4  # power-iteration steps between stopping tests (after the first)


def _count_step(optimizer, args, kwargs):
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


def _normalize(t, eps=1e-12):
    return t / t.norm().clamp_min(eps)


def _normalize_rows(t, eps=1e-12):
    return t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


# PyTorch's CPU convolutions are slow in one direction: conv2d from many
# channels to few, conv_transpose2d from few to many (32 -> 1 channels on 16,384
# 8x8 images: 1.98 s by conv2d, 0.08 s by the transposed form; 1 -> 32: 0.14 s
# against 1.57 s). Each is the other with the kernel flipped and its channel
# axes swapped, so these pick the fast one; on other devices they are the plain
# calls.
def conv2d(t, weight, bias=None, padding=0):
    """``F.conv2d(t, weight, bias, padding=padding)``: stride 1, square kernel."""
    if t.device.type == "cpu" and weight.shape[1] > weight.shape[0]:
        flipped = weight.transpose(0, 1).flip(-1, -2)
        return F.conv_transpose2d(
            t, flipped, bias, padding=weight.shape[-1] - 1 - padding
        )
    return F.conv2d(t, weight, bias, padding=padding)


def conv_transpose2d(u, weight, padding=0):
    """``F.conv_transpose2d(u, weight, padding=padding)``: stride 1, square kernel."""
    if u.device.type == "cpu" and weight.shape[0] < weight.shape[1]:
        flipped = weight.transpose(0, 1).flip(-1, -2)
        return F.conv2d(u, flipped, padding=weight.shape[-1] - 1 - padding)
    return F.conv_transpose2d(u, weight, padding=padding)


def refresh_layers(layers):
    """Refresh every stale layer in ``layers``; batch the exact dense ones.

    Dense layers with ``m * n * min(m, n) <= EXACT_MAX_COST`` that share shape,
    dtype, device and ``rtol`` are refreshed together (one batched Cholesky
    factorisation, one host sync), with the same result as refreshing each on its
    own; the others call their own :meth:`~LipschitzLinear.refresh`.

    Notes
    -----
    For such a dense layer the Rayleigh quotient ``s = u^T W v`` of its stored
    unit vectors is a lower bound on the norm. The new ``sigma`` is the stored
    one if it lies in ``[(1 - rtol / 2) s, (1 + rtol) s]``, else ``s``; a
    Cholesky factorisation of ``(sigma / (1 - rtol))**2 I - W^T W`` (the smaller
    Gram matrix) certifies, to rounding, that the norm is at most
    ``sigma / (1 - rtol)``. So ``sigma`` is within ``rtol`` of the norm and the
    normalised weight's norm is at most ``coeff / (1 - rtol)``. Where the
    factorisation fails (a cold start, vectors that fell behind the weight), the
    vectors are replaced by the exact top singular vectors (eigendecomposition of
    the Gram matrix), whose ``s`` is the norm to rounding. The vectors, with
    ``u^T W v >= sigma / (1 + rtol)``, give the gradient of ``sigma`` in
    training.

    Parameters
    ----------
    layers : iterable of LipschitzLinear or LipschitzConv2d
    """
    groups = {}
    for layer in layers:
        if layer._key == layer._weight_key():
            continue
        if layer._use_exact():
            w = layer.weight
            key = (tuple(layer._matrix(w).shape), w.dtype, w.device, layer.rtol)
            groups.setdefault(key, []).append(layer)
        else:
            layer.refresh()
    for group in groups.values():
        _refresh_exact(group)


def _refresh_exact(layers):
    """Certified ``sigma`` for equal-shape dense layers (see :func:`refresh_layers`)."""
    rtol = layers[0].rtol
    with torch.no_grad():
        w = torch.stack([layer._matrix(layer.weight.detach()) for layer in layers])
        stored = torch.stack([layer.sigma for layer in layers]).to(w)
        u = torch.stack([layer._u for layer in layers]).to(w)
        v = torch.stack([layer._v for layer in layers]).to(w)
        s = _rayleigh(w, u, v)
        sigma = _keep_if_near(stored, s, rtol)
        gram, right = _gram(w)
        bound = (sigma / (1 - rtol)).square()
        eye = torch.eye(gram.shape[-1], dtype=w.dtype, device=w.device)
        info = torch.linalg.cholesky_ex(bound[:, None, None] * eye - gram).info
        fail = (info != 0) | ~(s > 0)
        if bool(fail.any()):
            u[fail], v[fail] = _top_singular_vectors(w[fail], gram[fail], right)
            s = _rayleigh(w[fail], u[fail], v[fail])
            sigma[fail] = _keep_if_near(stored[fail], s, rtol)
        # One dispatch per kind of buffer instead of three copies per layer.
        torch._foreach_copy_([layer.sigma for layer in layers], list(sigma))
        torch._foreach_copy_([layer._u for layer in layers], list(u))
        torch._foreach_copy_([layer._v for layer in layers], list(v))
        for layer in layers:
            layer._key = layer._weight_key()
            layer.last_power_iter = 0


@contextlib.contextmanager
def shared_normalization(layers):
    """Normalise the weights of many dense layers once, for a whole pass.

    Inside the ``with`` block, every :class:`LipschitzLinear` in ``layers``
    returns from :meth:`~LipschitzLinear.normalized_weight` a weight computed on
    entry, with the same value and gradient as its own computation:

    - in training mode with gradients enabled (a training forward pass), computed
      together with its equal-shape peers, with the differentiable ``sigma``: one
      stacked set of tensor operations per shape instead of a dozen small ones per
      layer, and as many in backward;
    - with gradients disabled (scoring, inversion), computed once without a
      graph instead of at every call (the fixed-point inverse calls each branch
      many times); calls made with gradients enabled inside the block compute
      their own.

    Layers must be refreshed first (:func:`refresh_layers`). A
    :class:`~skresflow.core.Flow` uses this in its forward and inverse passes.
    """
    layers = [m for m in layers if type(m) is LipschitzLinear]
    try:
        if torch.is_grad_enabled():
            groups = {}
            for layer in (m for m in layers if m.training):
                w = layer.weight
                key = (tuple(w.shape), w.dtype, w.device)
                groups.setdefault(key, []).append(layer)
            for group in groups.values():
                for layer, w in zip(group, _normalized_together(group), strict=True):
                    layer._shared_weight = w
        else:
            for layer in layers:
                layer._shared_weight = layer.normalized_weight()
        yield
    finally:
        for layer in layers:
            layer._shared_weight = None


def _normalized_together(layers):
    """``W / max(1, sigma / coeff)`` for equal-shape layers, with the
    differentiable ``sigma = stored + (u^T W v - stop_gradient(u^T W v))`` of
    :meth:`LipschitzLinear._current_sigma`."""
    w = torch.stack([layer.weight for layer in layers])
    with torch.no_grad():
        u = torch.stack([layer._u for layer in layers]).to(w)
        v = torch.stack([layer._v for layer in layers]).to(w)
        sigma = torch.stack([layer.sigma for layer in layers]).to(w)
        coeffs = {layer.coeff for layer in layers}  # a tensor only if they differ
        coeff = (
            coeffs.pop()
            if len(coeffs) == 1
            else w.new_tensor([layer.coeff for layer in layers])
        )
    return _NormalizedTogether.apply(w, u, v, sigma, coeff).unbind(0)


def _normalized_reference(w, u, v, sigma, coeff):
    """The autograd form of :class:`_NormalizedTogether`: its oracle, and its
    backward pass when that is differentiated."""
    s = _rayleigh(w, u, v)
    scale = torch.clamp((sigma + (s - s.detach())) / coeff, min=1.0)
    return w / scale[:, None, None]


class _NormalizedTogether(torch.autograd.Function):
    """``W / max(1, sigma / coeff)`` of stacked weights, with ``sigma``'s
    gradient ``u v^T`` (:func:`_normalized_reference`), backward in closed form.

    With ``k = max(1, sigma / coeff)``, the gradient of ``<G, W / k>`` is
    ``G / k - [sigma >= coeff] <G, W> / (k^2 coeff) u v^T``: one product and one
    batched rank-one update, instead of autograd's dozen small operations on
    the division, the clamp and the Rayleigh quotient.
    """

    @staticmethod
    def forward(ctx, w, u, v, sigma, coeff):
        ratio = sigma / coeff
        scale = ratio.clamp(min=1.0)
        ctx.save_for_backward(w, u, v, sigma, scale.reciprocal(), ratio >= 1.0)
        ctx.coeff = coeff
        # Bit for bit the per-layer weight (on CUDA only with one coeff for all:
        # a division by a tensor there may differ from one by a float in the
        # last bit).
        return w / scale[:, None, None]

    @staticmethod
    def backward(ctx, g):
        w, u, v, sigma, inv, active = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference
            out = _normalized_reference(w, u, v, sigma, ctx.coeff)
            (gw,) = torch.autograd.grad(out, w, g, create_graph=True)
            return gw, None, None, None, None
        c = (g * w).sum((-2, -1)) * inv.square() * active / ctx.coeff
        gw = torch.baddbmm(
            g * inv[:, None, None],
            (u * c[:, None]).unsqueeze(-1),
            v.unsqueeze(-2),
            alpha=-1.0,
        )
        return gw, None, None, None, None


def _keep_if_near(stored, s, rtol):
    # Half the tolerance below s leaves the certificate a margin when s is the
    # norm; NaN, the unset value, is never near.
    near = (stored >= (1 - rtol / 2) * s) & (stored <= (1 + rtol) * s)
    return torch.where(near, stored, s)


def _rayleigh(w, u, v):
    return (u * (w @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)


def _gram(w):
    """The smaller of ``W^T W`` and ``W W^T`` (batched) and whether it is ``W^T W``."""
    m, n = w.shape[-2:]
    return (w.mT @ w, True) if n <= m else (w @ w.mT, False)


def _top_singular_vectors(w, gram, right):
    """Top singular vectors ``(u, v)`` of each matrix in ``w``, from the top
    eigenvector of its smaller Gram matrix ``gram`` (``W^T W`` if ``right``)."""
    top = torch.linalg.eigh(gram).eigenvectors[..., -1]
    if right:
        return _normalize_rows((w @ top.unsqueeze(-1)).squeeze(-1)), top
    return top, _normalize_rows((w.mT @ top.unsqueeze(-1)).squeeze(-1))


class _LipschitzMixin:
    """Power-iteration bookkeeping shared by the linear and the conv layer."""

    def _init_lipschitz(self, coeff, rtol, max_power_iter):
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive; got {coeff!r} instead.")
        self.coeff, self.rtol, self.max_power_iter = coeff, rtol, max_power_iter
        self.register_buffer("sigma", torch.tensor(float("nan")))
        self._key = None  # identifies the weight the stored sigma belongs to
        self.last_power_iter = 0

    def _weight_key(self):
        w = self.weight
        return (
            w._version,
            w.data_ptr(),
            w.dtype,
            w.device,
            self._operator_shape(),
            _OPTIMIZER_STEPS[0],
        )

    def refresh(self, *, force=False):
        """Bring ``sigma`` back to tolerance if the weight changed (or if ``force``).

        Small dense weights get a ``sigma`` certified to be within ``rtol`` of
        the exact norm (see :func:`refresh_layers`); otherwise power iteration
        starts from the stored vectors. When the stored estimate is still valid
        for this weight (dense: within the certified window; power iteration:
        its first step's value within ``rtol``), it is kept as it is, so that
        copying, moving, pickling or reloading a model never changes it.
        Returns the number of power iterations run (0 for small dense weights).
        """
        if not force and self._key == self._weight_key():
            return 0
        if self._use_exact():
            _refresh_exact([self])
            return 0
        with torch.no_grad():
            w = self.weight.detach()
            stored = self.sigma.to(w)
            stored_ok = bool(torch.isfinite(stored))
            u, v = self._vectors(w)
            u, v, sigma, n_iter = self._power_iteration(
                w,
                u,
                v,
                stored if stored_ok else None,
                self.rtol,
                self.max_power_iter,
                self.rtol,
            )
            if not (stored_ok and n_iter == 1):
                self._u.copy_(u)
                self._v.copy_(v)
                self.sigma.copy_(sigma)
        self._key = self._weight_key()
        self.last_power_iter = n_iter
        return n_iter

    def _register_vectors(self, m, n):
        """Seeded unit start vectors ``_u`` (``m``) and ``_v`` (``n``)."""
        g = torch.Generator().manual_seed(0)
        self.register_buffer("_u", _normalize(torch.randn(m, generator=g)))
        self.register_buffer("_v", _normalize(torch.randn(n, generator=g)))

    def _use_exact(self):
        return False

    @staticmethod
    def _matrix(w):
        """The matrix whose norm :func:`refresh_layers` certifies (exact layers)."""
        return w

    def _exact_norm(self):
        """Exact spectral norm of the normalised weight's matrix (SVD, float64)."""
        # Cached per weight and sigma: every inversion (sampling) checks the bound.
        self.refresh()
        key = (self._weight_key(), self.sigma._version, self.coeff)  # no host sync
        cached = getattr(self, "_norm_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            w = self._matrix(self.normalized_weight()).double()
            norm = torch.linalg.matrix_norm(w, ord=2).item()
        self._norm_cache = (key, norm)
        return norm

    def _power_iteration(self, w, u, v, sigma, rtol, max_iter, v_tol):
        """Iterate until sigma changes by at most ``rtol`` and v by ``v_tol``.

        sigma's own change does not bound its error when the top singular values
        are close or the start vector is nearly orthogonal to the top one; the
        singular vector's change does (sigma's relative error is of the order of
        the squared vector error). Starts from ``(u, v)``; ``sigma`` (or None) is
        the value the first step is compared with.
        """
        for n_iter in range(1, max_iter + 1):  # noqa: B007
            v_old, sigma_old = v, sigma
            v = _normalize(self._op_adjoint(u, w))
            wv = self._op(v, w)
            sigma = wv.norm()
            u = wv / sigma.clamp_min(1e-12)
            # The test reads two values back to the host (a GPU stall) and costs
            # about as many operations as a step: after the first step, which
            # tells whether a stored estimate is still valid, it runs every
            # POWER_CHECK_EVERY steps, so the rule stops at most that many
            # steps minus one later (each further step only improves sigma).
            if n_iter > 1 and n_iter % POWER_CHECK_EVERY:
                continue
            if (
                sigma_old is not None
                and abs(sigma - sigma_old) <= rtol * sigma
                and (v - v_old).norm() <= v_tol
            ):
                break
        return u, v, sigma, n_iter

    def _current_sigma(self, w):
        if self.training and torch.is_grad_enabled():
            # sigma = u^T W v with u, v fixed: differentiable, as in spectral norm.
            # The clones keep later in-place refreshes from corrupting this graph.
            u, v = self._u.clone(), self._v.clone()
            s = (u * self._op(v, w)).sum()
            return self.sigma.clone() + (s - s.detach())
        return self.sigma

    def normalized_weight(self):
        """The weight divided by ``max(1, sigma / coeff)``."""
        shared = getattr(self, "_shared_weight", None)  # see shared_normalization
        if shared is not None and (shared.requires_grad or not torch.is_grad_enabled()):
            return shared
        self.refresh()
        w = self.weight
        return w / torch.clamp(self._current_sigma(w) / self.coeff, min=1.0)

    def extra_repr(self):
        return super().extra_repr() + f", coeff={self.coeff}"


class LipschitzLinear(_LipschitzMixin, nn.Linear):
    """Linear layer with spectral norm at most ``coeff``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes as in :class:`torch.nn.Linear`.
    bias : bool, default=True
    coeff : float, default=0.97
        Target bound on the spectral norm of the normalised weight.
    rtol : float, default=1e-3
        Relative tolerance of the power iteration, and how far the stored
        ``sigma`` may be from a fresh value before it is replaced.
    max_power_iter : int, default=200
        Cap on power iterations per refresh.

    Attributes
    ----------
    sigma : torch.Tensor
        Current estimate of the spectral norm of ``weight``: certified within
        ``rtol`` of it when ``m * n * min(m, n) <= EXACT_MAX_COST`` for an
        ``m x n`` weight (see :func:`refresh_layers`), else power iteration to
        ``rtol``.

    Examples
    --------
    >>> import torch
    >>> layer = LipschitzLinear(3, 4, coeff=0.5)
    >>> bool(layer.lipschitz_bound() <= 0.5 + 1e-3)
    True
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        *,
        coeff=0.97,
        rtol=1e-3,
        max_power_iter=200,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self._init_lipschitz(coeff, rtol, max_power_iter)
        self._register_vectors(out_features, in_features)

    def _operator_shape(self):
        return ()

    def _use_exact(self):
        m, n = self.weight.shape
        return m * n * min(m, n) <= EXACT_MAX_COST

    def _vectors(self, w):
        return self._u.to(w), self._v.to(w)

    @staticmethod
    def _op(v, w):
        return w @ v

    @staticmethod
    def _op_adjoint(u, w):
        return w.t() @ u

    def forward(self, x):
        return F.linear(x, self.normalized_weight(), self.bias)

    def lipschitz_bound(self):
        """Exact spectral norm of the normalised weight (SVD, float64)."""
        return self._exact_norm()

    def estimated_norm(self):
        """Same as :meth:`lipschitz_bound`: dense layers are cheap to certify."""
        return self._exact_norm()


class LipschitzConv2d(_LipschitzMixin, nn.Conv2d):
    """Stride-1 "same" convolution whose *operator* norm is at most ``coeff``.

    ``sigma`` is the norm of the convolution as a linear map on inputs of the
    size actually seen (power iteration with ``conv2d`` and
    ``conv_transpose2d``), not the norm of the flattened kernel, which does not
    bound the Lipschitz constant. The operator vectors are re-initialised when the
    input size changes.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        Odd; padding is ``kernel_size // 2``.
    bias : bool, default=True
    coeff, rtol, max_power_iter
        As in :class:`LipschitzLinear`.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        bias=True,
        *,
        coeff=0.97,
        rtol=1e-3,
        max_power_iter=200,
    ):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd; got {kernel_size} instead.")
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self._init_lipschitz(coeff, rtol, max_power_iter)
        if self._use_exact():  # the channel matrix's singular vectors
            self._register_vectors(out_channels, in_channels)
        else:  # the operator's, shaped like one output and one input image
            self.register_buffer("_u", torch.zeros(0))
            self.register_buffer("_v", torch.zeros(0))
        self._spatial = None

    def _use_exact(self):
        # A 1x1 convolution applies its (out, in) channel matrix at every pixel:
        # its operator norm is that matrix's, whatever the input size.
        m, n = self.out_channels, self.in_channels
        return self.kernel_size == (1, 1) and m * n * min(m, n) <= EXACT_MAX_COST

    @staticmethod
    def _matrix(w):
        return w.flatten(1)

    def _operator_shape(self):
        return () if self._use_exact() else self._spatial

    def _vectors(self, w):
        if self._spatial is None:
            raise RuntimeError(
                "the operator norm of a convolution depends on the input size: "
                "run a forward pass (e.g. fit or log_prob) before normalising, "
                "sampling or inverting."
            )
        h, wd = self._spatial
        if self._v.shape != (1, self.in_channels, h, wd):
            g = torch.Generator().manual_seed(0)
            self._v = _normalize(torch.randn(1, self.in_channels, h, wd, generator=g))
            self._u = _normalize(torch.randn(1, self.out_channels, h, wd, generator=g))
        self._u, self._v = self._u.to(w), self._v.to(w)
        return self._u, self._v

    def _op(self, v, w):
        if self._use_exact():  # v: a vector of the channel matrix
            return w.flatten(1) @ v
        return conv2d(v, w, padding=self.padding[0])

    def _op_adjoint(self, u, w):
        return conv_transpose2d(u, w, padding=self.padding[0])

    @staticmethod
    def _channel_vector(t):
        """A 1x1 layer's channel vector from an operator-shaped one (files and
        pickles from before 1x1 convolutions were exact): its sum over pixels.
        It only starts the exact refresh, which keeps the stored sigma wherever
        it is within the certified window."""
        return _normalize(t.sum((0, 2, 3))) if t is not None and t.dim() == 4 else t

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._use_exact():
            for name in ("_u", "_v"):
                self._buffers[name] = self._channel_vector(self._buffers.get(name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._use_exact():
            for name in ("_u", "_v"):
                if prefix + name in state_dict:
                    t = self._channel_vector(state_dict[prefix + name])
                    state_dict[prefix + name] = t
            self._spatial = None
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            return
        # The operator vectors' shape depends on the input size seen in training.
        for name in ("_u", "_v"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        v = state_dict.get(prefix + "_v")
        self._spatial = tuple(v.shape[-2:]) if v is not None and v.dim() == 4 else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        self._spatial = tuple(x.shape[-2:])
        return conv2d(x, self.normalized_weight(), self.bias, self.padding[0])

    def _operator_matrix_size(self, spatial):
        return self.in_channels * self.out_channels * (spatial[0] * spatial[1]) ** 2

    def lipschitz_bound(self, spatial=None):
        """Certified upper bound on the operator norm of the normalised conv.

        Small operators (at most 2**22 matrix entries) are built as a matrix and
        their exact norm is returned. Larger ones use the fact that a zero-padded
        convolution on an ``H x W`` input is a restriction of the circular
        convolution on the ``(H + k - 1) x (W + k - 1)`` torus, whose singular
        values are those of the kernel's 2-D DFT at each frequency (Sedghi et al.,
        2019): the maximum over frequencies is an upper bound, loose by a few
        per cent on inputs of a few dozen pixels a side.
        """
        if self._use_exact():
            return self._exact_norm()
        spatial = spatial or self._spatial
        if spatial is None:
            raise RuntimeError(
                "lipschitz_bound needs the input size: call forward first."
            )
        with torch.no_grad():
            w = self.normalized_weight().double()
            if self._operator_matrix_size(spatial) <= 2**22:
                n_in = self.in_channels * spatial[0] * spatial[1]
                basis = torch.eye(n_in, dtype=w.dtype, device=w.device)
                basis = basis.view(n_in, self.in_channels, *spatial)
                matrix = F.conv2d(basis, w, padding=self.padding).flatten(1)
                return torch.linalg.matrix_norm(matrix, ord=2).item()
            k = self.kernel_size[0]
            size = (spatial[0] + k - 1, spatial[1] + k - 1)
            spectrum = torch.fft.fft2(w, s=size).permute(2, 3, 0, 1)
            return torch.linalg.matrix_norm(spectrum, ord=2).max().item()

    def estimated_norm(self):
        """Operator norm of the normalised conv by power iteration (not certified).

        Exact when the operator is small enough for :meth:`lipschitz_bound` to
        build it. Runs from the stored vectors to a tolerance ten times tighter
        than the layer's and changes no state.
        """
        if self._use_exact() or self._operator_matrix_size(self._spatial) <= 2**22:
            return self.lipschitz_bound()
        with torch.no_grad():
            w = self.normalized_weight()
            rtol = 0.1 * self.rtol
            _, _, sigma, _ = self._power_iteration(
                w, self._u, self._v, None, rtol, 10 * self.max_power_iter, rtol
            )
            return sigma.item()
