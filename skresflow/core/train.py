"""A torch-only optimisation step: Adam, warm-up, cosine decay, clipping, EMA.

The estimator layer owns the epoch loop; this module owns what happens to the
weights in one step, and refuses to let a non-finite loss or gradient reach them.
"""

import math

import torch

__all__ = ["Trainer", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses or gradients too many times in a row."""


class Trainer:
    """Optimise a module's parameters one mini-batch at a time.

    Parameters
    ----------
    module : torch.nn.Module
    lr : float
        Peak learning rate of Adam (betas 0.9, 0.99 as in the reference code).
    total_steps : int or None
        Planned number of steps; the learning rate decays along a half cosine to
        ``final_lr_fraction * lr`` at that step (:meth:`anneal` can bring that
        step forward). None: no decay (open-ended training, e.g.
        ``partial_fit``).
    warmup_steps : int, default=0
        Linear warm-up from ``lr / warmup_steps``.
    max_grad_norm : float or None, default=1.0
        Gradient-norm clipping.
    ema_decay : float or None, default=0.999
        Exponential moving average of the weights (bias-corrected early on, so a
        short run is not dominated by the initial weights).
    weight_decay : float, default=0.0
        Decoupled weight decay (AdamW).
    max_bad_steps : int, default=5
        Consecutive non-finite steps tolerated; each one is skipped (the weights
        are untouched) and halves the learning rate. One more raises
        :class:`NonFiniteLossError`.
    grad_sync : callable or None, default=None
        Data-parallel training: ``grad_sync(params, finite, weight)`` is called
        every step between back-propagation and clipping (also after a
        non-finite loss, so that no process waits on another); it replaces each
        ``p.grad`` by the average over processes (weighted by ``weight``) and
        returns whether every process's loss was finite. Gradients are final
        once ``backward`` returns, however they were formed (the
        memory-efficient log-det forms them inside its own backward), so
        averaging them here is exact.
    """

    def __init__(
        self,
        module,
        *,
        lr,
        total_steps,
        warmup_steps=0,
        max_grad_norm=1.0,
        ema_decay=0.999,
        weight_decay=0.0,
        final_lr_fraction=0.05,
        max_bad_steps=5,
        grad_sync=None,
    ):
        self.module = module
        self.grad_sync = grad_sync
        self.params = [p for p in module.parameters() if p.requires_grad]
        # One fused kernel for all parameters: on a CPU the per-tensor loop of
        # plain Adam cost more than the forward pass of a small flow.
        self._fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=lr,
            betas=(0.9, 0.99),
            weight_decay=weight_decay,
            fused=self._fused or None,
        )
        self.lr, self.warmup_steps = lr, warmup_steps
        self.total_steps = None if total_steps is None else max(total_steps, 1)
        self.final_lr_fraction = final_lr_fraction
        self.max_grad_norm, self.ema_decay, self.max_bad_steps = (
            max_grad_norm,
            ema_decay,
            max_bad_steps,
        )
        self.n_steps = 0
        self.lr_scale = 1.0  # lowered after non-finite steps
        self.bad_steps = 0
        self.ema = [p.detach().clone() for p in self.params] if ema_decay else None
        self._anneal = None  # (first step, length, factor at the start, at the end)

    def _factor(self, t):
        """The learning rate at step ``t`` over ``lr * lr_scale``: warm-up, then
        the cosine (or, after :meth:`anneal`, its shortened decay)."""
        if self._anneal is not None:
            start, length, top, end = self._anneal
            return _half_cosine(top, end, (t - start) / length)
        warm = min(1.0, (t + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.total_steps is None:
            return warm
        return warm * _half_cosine(1.0, self.final_lr_fraction, t / self.total_steps)

    def learning_rate(self):
        return self.lr * self.lr_scale * self._factor(self.n_steps)

    def anneal(self, steps):
        """End the schedule early: from the current step, decay the learning rate
        along a half cosine from its present value to the final one in ``steps``
        steps (a rate still below that, early in the warm-up, is held). Returns
        False, changing nothing, where that would not shorten the schedule (none
        planned, or it ends within ``steps`` anyway) and on a second call."""
        steps = max(int(steps), 1)
        if self._anneal is not None or self.total_steps is None:
            return False
        if self.total_steps - self.n_steps <= steps:
            return False
        top = self._factor(self.n_steps)
        self._anneal = (self.n_steps, steps, top, min(top, self.final_lr_fraction))
        return True

    def step(self, loss_fn, *, weight=1.0):
        """Run ``loss_fn()``, back-propagate and update; return the loss (float).

        A non-finite loss or gradient skips the update and returns ``nan``.
        ``weight``: this process's share of the averaged gradient (``grad_sync``).
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        value = loss.item()
        if math.isfinite(value):
            loss.backward()
        if self.grad_sync is not None:
            if not self.grad_sync(self.params, math.isfinite(value), weight):
                value = float("nan")  # some process had a non-finite loss
        if math.isfinite(value):
            norm = torch.nn.utils.clip_grad_norm_(
                self.params,
                self.max_grad_norm or float("inf"),
                foreach=self._fused or None,
            )
            if torch.isfinite(norm):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.learning_rate()
                self.optimizer.step()
                self.n_steps += 1
                self.bad_steps = 0
                self._update_ema()
                return value
            value = float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.lr_scale *= 0.5
        if self.bad_steps > self.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive training steps gave a non-finite "
                "loss or "
                f"gradient (learning rate lowered to {self.learning_rate():.3g}); the "
                "weights were left at their last finite values."
            )
        return value

    def _update_ema(self):
        if self.ema is None:
            return
        decay = min(self.ema_decay, (1 + self.n_steps) / (10 + self.n_steps))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1 - decay)

    def state_dict(self):
        """Optimiser moments, EMA weights and step count (CPU copies), to resume
        training with :meth:`load_state_dict` on a trainer of the same module."""
        optimizer = self.optimizer.state_dict()
        return {
            "optimizer": _to_cpu(optimizer),
            "ema": None if self.ema is None else [e.cpu().clone() for e in self.ema],
            "n_steps": self.n_steps,
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state):
        """Resume from :meth:`state_dict` (the module's weights are set apart)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            with torch.no_grad():
                for e, saved in zip(self.ema, state["ema"], strict=True):
                    e.copy_(saved)
        self.n_steps, self.lr_scale = state["n_steps"], state["lr_scale"]

    def averaged_state(self):
        """The module's state dict with the EMA weights in place of the live ones."""
        state = {k: v.clone() for k, v in self.module.state_dict().items()}
        if self.ema is not None:
            names = {id(p): n for n, p in self.module.named_parameters()}
            for p, e in zip(self.params, self.ema, strict=True):
                state[names[id(p)]] = e.clone()
        return state


def _half_cosine(start, end, progress):
    """From ``start`` at progress 0 to ``end`` at 1 (and after) on a half cosine."""
    progress = min(1.0, progress)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_cpu(obj):
    """Deep copy of a (nested) optimiser state with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
