"""Inverse of ``y = x + g(x)`` by fixed-point iteration, with implicit gradients."""

import warnings

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fixed_point_inverse", "InverseNotConvergedWarning"]


class InverseNotConvergedWarning(RuntimeWarning):
    """The fixed-point inverse stopped before every row reached its tolerance."""


def _default_tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _row_norm(t):
    return t.flatten(1).abs().amax(1)


def _solve(g, y, atol, rtol, max_iter):
    """Iterate x <- y - g(x) row by row until ||x + g(x) - y||_inf <= tol."""
    tol = atol + rtol * _row_norm(y)
    x = y - g(y)
    active = torch.arange(y.shape[0], device=y.device)
    residual = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    n_iter = 0
    while active.numel() and n_iter < max_iter:
        n_iter += 1
        x_a = x[active]
        x_new = y[active] - g(x_a)
        res = _row_norm(x_a - x_new)  # = ||x_a + g(x_a) - y_a||
        x[active] = x_new  # the new iterate's residual is at most Lip(g) * res
        residual[active] = res
        active = active[res > tol[active]]
    return x, residual, tol, n_iter


def fixed_point_inverse(g, y, *, atol=None, rtol=None, max_iter=1000):
    r"""Solve :math:`x + g(x) = y` for ``x`` when ``Lip(g) < 1``.

    Iterates :math:`x \leftarrow y - g(x)` from :math:`x_0 = y - g(y)`, each row
    until its own residual :math:`\|x + g(x) - y\|_\infty` is at most
    ``atol + rtol * ||y||_inf``; converged rows stop costing work. The error
    shrinks by a factor ``Lip(g)`` per iteration.

    Parameters
    ----------
    g : torch.nn.Module
    y : torch.Tensor of shape ``(batch, *event)``
    atol, rtol : float, optional
        Tolerances; default 1e-10 in float64, 1e-5 otherwise.
    max_iter : int, default=1000

    Returns
    -------
    x : torch.Tensor shaped like ``y``
        Differentiable by implicit differentiation: ``dx/dy = (I + J_g(x))^{-1}``
        and ``dx/dtheta = -(I + J_g(x))^{-1} dg/dtheta``, each solved by the
        same fixed-point iteration on the adjoint.

    Warns
    -----
    InverseNotConvergedWarning
        When rows remain above tolerance after ``max_iter`` iterations; the
        message gives how many and the largest residual.

    Examples
    --------
    >>> import torch
    >>> g = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = g.weight.mul_(0.5 / torch.linalg.matrix_norm(g.weight, ord=2))
    >>> x = torch.randn(4, 2)
    >>> bool(torch.allclose(fixed_point_inverse(g, x + g(x)), x, atol=1e-4))
    True
    """
    atol = _default_tol(y.dtype) if atol is None else atol
    rtol = _default_tol(y.dtype) if rtol is None else rtol
    params = [p for p in g.parameters() if p.requires_grad]
    return _FixedPointInverse.apply(g, atol, rtol, max_iter, y, *params)


class _FixedPointInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, atol, rtol, max_iter, y, *params):
        x, residual, tol, n_iter = _solve(g, y, atol, rtol, max_iter)
        failed = residual > tol
        n_failed = int(failed.sum())
        if n_failed:
            warnings.warn(
                f"fixed-point inverse did not converge for {n_failed} of {y.shape[0]} "
                f"rows in {n_iter} iterations: largest residual ||x + g(x) - y||_inf = "
                f"{residual.max().item():.3g} "
                f"(tolerance {tol[failed].min().item():.3g}). "
                "Increase max_iter, loosen atol/rtol, or lower the Lipschitz "
                "coefficient (the error shrinks by Lip(g) per iteration).",
                InverseNotConvergedWarning,
                stacklevel=4,
            )
        ctx.g, ctx.tol, ctx.max_iter = g, (atol, rtol), max_iter
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        x, *params = ctx.saved_tensors
        atol, rtol = ctx.tol
        tol = atol + rtol * _row_norm(grad_x)
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            gx = ctx.g(x)
            # Adjoint fixed point u = grad_x - J^T u, i.e. u = (I + J)^{-T} grad_x.
            u = grad_x
            for _ in range(ctx.max_iter):
                u_new = grad_x - torch.autograd.grad(gx, x, u, retain_graph=True)[0]
                done = bool((_row_norm(u_new - u) <= tol).all())
                u = u_new
                if done:
                    break
            grads = (
                torch.autograd.grad(gx, params, -u, allow_unused=True) if params else ()
            )
        return (None, None, None, None, u, *grads)
