"""Inverse of ``y = x + g(x)`` by (accelerated) fixed-point iteration, with implicit
gradients.

Three solvers share one stopping rule (each row's own residual), one warning and
one implicit gradient:

``"fixed_point"``
    ``x <- y - g(x)``: one evaluation of ``g`` per step, the error shrinks by
    ``Lip(g)`` per step.
``"anderson"``
    Anderson acceleration (type II, memory ``m``) of the same map, batched with a
    separate history per row.
``"newton"``
    Newton steps ``x <- x - (I + J_g(x))^{-1} (x + g(x) - y)`` with the exact
    Jacobian, built in one batched pass (``D`` vector-Jacobian products per row):
    for low dimension. ``I + J_g`` is always invertible since ``Lip(g) < 1``.

The accelerated solvers are safeguarded: a step that does not lower a row's
residual is rejected, the row's history is cleared and it takes a plain step
next, so they converge wherever plain iteration does.
"""

import math
import warnings

import torch
from torch.autograd.function import once_differentiable

__all__ = ["fixed_point_inverse", "InverseNotConvergedWarning", "INVERSE_METHODS"]

INVERSE_METHODS = ("auto", "fixed_point", "anderson", "newton")
# "auto": plain steps up to AUTO_PLAIN_STEPS, then Newton (up to AUTO_NEWTON_MAX_DIM
# dimensions) or Anderson for the rows left. Chosen from the measurements of
# benchmarks/bench_inverse.py (docs/benchmarks/performance.md).
AUTO_PLAIN_STEPS = 30
AUTO_NEWTON_MAX_DIM = 8


class InverseNotConvergedWarning(RuntimeWarning):
    """The fixed-point inverse stopped before every row reached its tolerance."""


def _default_tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _row_norm(t):
    return t.flatten(1).abs().amax(1)


def _solve(g, y, atol, rtol, max_iter):
    """Iterate x <- y - g(x) row by row until ||x + g(x) - y||_inf <= tol.

    A row's answer is recorded when it first meets its tolerance (so it does not
    depend on the other rows); finished rows are dropped from the work in
    batches (when a tenth of the rows have finished), so that most iterations
    run on whole tensors without gathers, and an iteration in which no row
    finishes costs one host sync and no indexing."""
    tol = atol + rtol * _row_norm(y)
    x = y - g(y)
    out, residual = x.clone(), torch.full_like(tol, float("inf"))
    idx, y_l, tol_l = torch.arange(y.shape[0], device=y.device), y, tol
    live = torch.ones_like(tol, dtype=torch.bool)
    n_live, n_iter, res = y.shape[0], 0, None
    while n_live and n_iter < max_iter:
        n_iter += 1
        x_new = y_l - g(x)
        res = _row_norm(x - x_new)  # = ||x + g(x) - y||
        x = x_new  # the new iterate's residual is at most Lip(g) * res
        done = live & (res <= tol_l)
        if not bool(done.any()):
            continue
        out[idx[done]], residual[idx[done]] = x[done], res[done]
        live = live & ~done
        n_live = int(live.sum())
        if n_live < 0.9 * live.numel():
            idx, y_l, tol_l, x, live, res = (
                t[live] for t in (idx, y_l, tol_l, x, live, res)
            )
    if n_live and res is not None:
        out[idx[live]], residual[idx[live]] = x[live], res[live]
    return out, residual, tol, n_iter


class _Anderson:
    """Per-row Anderson histories of the map ``G(x) = y - g(x)``, on flat rows.

    With ``f = G(x) - x`` (minus the residual) and the last ``m`` differences
    ``dG, dF`` of ``G`` and ``f`` between accepted iterates, the step is
    ``G(x) - dG gamma`` with ``gamma = argmin ||f - dF gamma||``, solved by
    regularised normal equations. Empty history slots hold zeros (a rejected
    row's history is cleared). The Gram matrix ``dF dF^T`` and ``dF f`` are
    updated one slot at a time: one ``(rows, m, D)`` product per step, as batched
    ``m x m`` products cost more than ``g`` itself on a CPU.
    """

    def __init__(self, g, memory):
        self.evaluate, self.m, self.step = g, memory, 0

    def start(self, x, r):
        b, d = x.shape
        self.state = {
            "dg": x.new_zeros(b, self.m, d),
            "df": x.new_zeros(b, self.m, d),
            "gram": x.new_zeros(b, self.m, self.m),
            "dff": x.new_zeros(b, self.m),  # dF f, f of the current iterate
            "gx": x - r,  # G(x) = y - g(x) = x - r
            "f": -r,
        }
        self.reg = 1e-10 if x.dtype == torch.float64 else 1e-5

    def propose(self, x, r):
        s = self.state
        diag = s["gram"].diagonal(dim1=1, dim2=2)
        # Empty slots get a unit diagonal and a zero right-hand side: gamma = 0.
        ridge = torch.where(diag > 0, self.reg * diag.amax(1, keepdim=True), 1.0)
        gram = s["gram"] + torch.diag_embed(ridge)
        gamma = torch.linalg.solve_ex(gram, s["dff"].unsqueeze(-1))[0]
        return (x - r) - (gamma * s["dg"]).sum(1)

    def update(self, ok, x, r):
        """Record the accepted proposals; clear the history of rejected rows."""
        s, f, gx = self.state, -r, x - r
        k, self.step = self.step % self.m, self.step + 1
        keep = ok.unsqueeze(-1).to(x.dtype)
        new_df = (f - s["f"]) * keep
        s["dg"][:, k] = (gx - s["gx"]) * keep
        s["df"][:, k] = new_df
        dots = (s["df"] * new_df.unsqueeze(1)).sum(-1)
        s["gram"][:, k, :] = dots
        s["gram"][:, :, k] = dots
        s["dff"] += dots  # dF_j . f_new = dF_j . f_old + dF_j . (f_new - f_old)
        s["dff"][:, k] = (new_df * f).sum(-1)
        s["gx"] = torch.where(ok[:, None], gx, s["gx"])
        s["f"] = torch.where(ok[:, None], f, s["f"])
        if not bool(ok.all()):
            for key in ("dg", "df", "gram", "dff"):
                s[key][~ok] = 0

    def compact(self, keep):
        self.state = {k: v[keep] for k, v in self.state.items()}


def _jacobian(g, x):
    """``g(x)`` and the ``(b, D, D)`` Jacobians of a row-wise map on flat rows: one
    forward pass and ``D`` vector-Jacobian products batched by ``vmap``."""
    b, d = x.shape
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        gx = g(x)
        basis = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1)
        rows = torch.autograd.grad(gx, x, basis.expand(d, b, d), is_grads_batched=True)[
            0
        ]
    return gx.detach(), rows.transpose(0, 1)


class _Newton:
    """Newton steps with the exact Jacobian, kept from each accepted evaluation."""

    def __init__(self, g):
        self.g = g

    def evaluate(self, x):
        gx, self.pending = _jacobian(self.g, x)
        return gx

    def start(self, x, r):
        self.state = {"jac": self.pending}
        self.eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)

    def propose(self, x, r):
        a = self.eye + self.state["jac"]
        return x - torch.linalg.solve_ex(a, r.unsqueeze(-1))[0].squeeze(-1)

    def update(self, ok, x, r):
        jac = self.state["jac"]
        self.state["jac"] = torch.where(ok[:, None, None], self.pending, jac)

    def compact(self, keep):
        self.state = {k: v[keep] for k, v in self.state.items()}


def _solve_accelerated(g, y, atol, rtol, max_iter, method, memory, x0=None):
    """Safeguarded Anderson or Newton iteration, each row until its own tolerance.

    Every iteration evaluates ``g`` once at each live row's proposal: the
    accelerated step, or the plain step ``y - g(x)`` right after a rejection. A
    proposal is kept only if it lowers the row's residual (2-norm); plain steps
    are always kept (they shrink the error by ``Lip(g)``). A row's answer is
    recorded when it first meets its tolerance; finished rows are dropped from
    the work in batches (when a tenth of the rows have finished), so that the
    bookkeeping does not cost a gather per iteration.
    """
    event = y.shape[1:]

    def gf(x):
        return g(x.view(-1, *event)).flatten(1)

    solver = _Newton(gf) if method == "newton" else _Anderson(gf, memory)
    yf = y.flatten(1)
    tol = atol + rtol * yf.abs().amax(1)
    x = yf - gf(yf) if x0 is None else x0.flatten(1)
    r = x + solver.evaluate(x) - yf
    res = r.abs().amax(1)
    # y - g(x) = x - r: one free plain step, with at most Lip(g) times the residual.
    out, out_res = x - r, res.clone()
    solver.start(x, r)
    idx = torch.arange(y.shape[0], device=y.device)
    s = {"idx": idx, "y": yf, "tol": tol, "x": x, "r": r, "res": res}
    s["plain"] = torch.zeros_like(res, dtype=torch.bool)
    live = res > tol
    n_iter = 0
    while True:
        n_live = int(live.sum())
        if n_live < 0.9 * live.numel():
            s = {k: v[live] for k, v in s.items()}
            solver.compact(live)
            live = live[live]
        if not n_live or n_iter >= max_iter:
            break
        n_iter += 1
        x, r = s["x"], s["r"]
        proposal = torch.where(s["plain"][:, None], x - r, solver.propose(x, r))
        rp = proposal + solver.evaluate(proposal) - s["y"]
        ok = s["plain"] | (rp.norm(dim=1) < r.norm(dim=1))
        solver.update(ok, proposal, rp)
        s["x"] = torch.where(ok[:, None], proposal, x)
        s["r"] = torch.where(ok[:, None], rp, r)
        s["res"] = s["r"].abs().amax(1)
        s["plain"] = ~ok
        done = live & (s["res"] <= s["tol"])
        rows = s["idx"][done]
        out[rows], out_res[rows] = (s["x"] - s["r"])[done], s["res"][done]
        live = live & ~done
    rows = s["idx"][live]
    out[rows], out_res[rows] = (s["x"] - s["r"])[live], s["res"][live]
    return out.view(y.shape), out_res, tol, n_iter


def _resolve_method(method):
    if method not in INVERSE_METHODS:
        raise ValueError(
            f"method must be one of {INVERSE_METHODS}; got {method!r} instead."
        )
    return method


def _solve_auto(g, y, atol, rtol, max_iter, memory):
    """Plain steps first; rows still above tolerance after ``AUTO_PLAIN_STEPS`` of
    them continue with Newton (up to ``AUTO_NEWTON_MAX_DIM`` dimensions) or
    Anderson. In trained flows nearly every row converges within a few plain steps,
    which cost less than either accelerator's extra work."""
    n_plain = min(max_iter, AUTO_PLAIN_STEPS)
    x, residual, tol, n_iter = _solve(g, y, atol, rtol, n_plain)
    slow = (residual > tol).nonzero().squeeze(1)
    if not slow.numel() or n_iter >= max_iter:
        return x, residual, tol, n_iter
    small = math.prod(y.shape[1:]) <= AUTO_NEWTON_MAX_DIM
    x_slow, res_slow, _, more = _solve_accelerated(
        g,
        y[slow],
        atol,
        rtol,
        max_iter - n_iter,
        "newton" if small else "anderson",
        memory,
        x0=x[slow],
    )
    x[slow], residual[slow] = x_slow, res_slow
    return x, residual, tol, n_iter + more


def fixed_point_inverse(
    g, y, *, method="auto", atol=None, rtol=None, max_iter=1000, memory=5
):
    r"""Solve :math:`x + g(x) = y` for ``x`` when ``Lip(g) < 1``.

    Starts from :math:`x_0 = y - g(y)` and iterates each row until its own
    residual :math:`\|x + g(x) - y\|_\infty` is at most
    ``atol + rtol * ||y||_inf``; converged rows stop costing work.

    Parameters
    ----------
    g : torch.nn.Module
        Row-wise map with ``Lip(g) < 1``.
    y : torch.Tensor of shape ``(batch, *event)``
    method : {"auto", "fixed_point", "anderson", "newton"}, default="auto"
        ``"fixed_point"``: plain iteration :math:`x \leftarrow y - g(x)`, whose
        error shrinks by ``Lip(g)`` per step. ``"anderson"``: Anderson
        acceleration of it (history of ``memory`` steps per row).
        ``"newton"``: Newton steps with the exact Jacobian (``D`` batched
        vector-Jacobian products per step for ``D`` dimensions per row).
        Both accelerated solvers are safeguarded: a step that does not lower a
        row's residual is replaced by a plain step. ``"auto"``: up to 30 plain
        steps, then, for the rows still above tolerance, Newton (up to 8
        dimensions per row) or Anderson: as fast as plain iteration on trained
        flows, where rows converge in a few steps, and many times faster on
        nearly non-contractive blocks (``benchmarks/bench_inverse.py``).
    atol, rtol : float, optional
        Tolerances; default 1e-10 in float64, 1e-5 otherwise.
    max_iter : int, default=1000
        Maximum number of iterations (evaluations of ``g`` after the first two).
    memory : int, default=5
        Anderson history length.

    Returns
    -------
    x : torch.Tensor shaped like ``y``
        Differentiable by implicit differentiation: ``dx/dy = (I + J_g(x))^{-1}``
        and ``dx/dtheta = -(I + J_g(x))^{-1} dg/dtheta``, the same for every
        solver (the adjoint system is solved exactly with ``"newton"``, by
        fixed-point iteration otherwise).

    Warns
    -----
    InverseNotConvergedWarning
        When rows remain above tolerance after ``max_iter`` iterations; the
        message gives how many and the largest residual.

    Notes
    -----
    Plain iteration needs about ``log(tol / r0) / log(Lip(g))`` steps, many when
    ``Lip(g)`` is close to 1. Anderson acceleration reuses the last steps to
    extrapolate and, on smooth maps, needs far fewer; Newton converges
    quadratically near the solution but each step costs ``D`` times more.

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
    method = _resolve_method(method)
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1; got {max_iter!r} instead.")
    atol = _default_tol(y.dtype) if atol is None else atol
    rtol = _default_tol(y.dtype) if rtol is None else rtol
    params = [p for p in g.parameters() if p.requires_grad]
    config = (method, atol, rtol, max_iter, memory)
    return _FixedPointInverse.apply(g, config, y, *params)


def _warn_not_converged(residual, tol, n_iter, n_rows):
    failed = residual > tol
    n_failed = int(failed.sum())
    if n_failed:
        warnings.warn(
            f"fixed-point inverse did not converge for {n_failed} of {n_rows} "
            f"rows in {n_iter} iterations: largest residual ||x + g(x) - y||_inf = "
            f"{residual.max().item():.3g} "
            f"(tolerance {tol[failed].min().item():.3g}). "
            "Increase max_iter, loosen atol/rtol, or lower the Lipschitz "
            "coefficient (the error shrinks by Lip(g) per iteration).",
            InverseNotConvergedWarning,
            stacklevel=5,
        )


class _FixedPointInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, config, y, *params):
        method, atol, rtol, max_iter, memory = config
        if method == "fixed_point":
            x, residual, tol, n_iter = _solve(g, y, atol, rtol, max_iter)
        elif method == "auto":
            x, residual, tol, n_iter = _solve_auto(g, y, atol, rtol, max_iter, memory)
        else:
            x, residual, tol, n_iter = _solve_accelerated(
                g, y, atol, rtol, max_iter, method, memory
            )
        _warn_not_converged(residual, tol, n_iter, y.shape[0])
        ctx.g, ctx.config = g, config
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        x, *params = ctx.saved_tensors
        method, atol, rtol, max_iter, _ = ctx.config
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            gx = ctx.g(x)
            if method == "newton":
                u = _adjoint_direct(ctx.g, x, grad_x)
            else:
                u = _adjoint_fixed_point(gx, x, grad_x, atol, rtol, max_iter)
            grads = (
                torch.autograd.grad(gx, params, -u, allow_unused=True) if params else ()
            )
        return (None, None, u, *grads)


def _adjoint_fixed_point(gx, x, grad_x, atol, rtol, max_iter):
    """``u = (I + J)^{-T} grad_x`` by the fixed point ``u = grad_x - J^T u``."""
    tol = atol + rtol * _row_norm(grad_x)
    u = grad_x
    for _ in range(max_iter):
        u_new = grad_x - torch.autograd.grad(gx, x, u, retain_graph=True)[0]
        done = bool((_row_norm(u_new - u) <= tol).all())
        u = u_new
        if done:
            break
    return u


def _adjoint_direct(g, x, grad_x):
    """``u = (I + J)^{-T} grad_x`` with the exact Jacobian (low dimension)."""
    event = x.shape[1:]
    _, jac = _jacobian(lambda t: g(t.view(-1, *event)).flatten(1), x.flatten(1))
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    u = torch.linalg.solve((eye + jac).transpose(1, 2), grad_x.flatten(1).unsqueeze(-1))
    return u.view_as(grad_x)
