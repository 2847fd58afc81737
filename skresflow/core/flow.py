"""A normalizing flow: invertible layers on top of a standard normal base."""

import math

import torch
from torch import nn

from .blocks import ResidualBlock
from .lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    refresh_layers,
    shared_normalization,
)
from .logdet import hash_rows_by

__all__ = ["Flow", "LipschitzError"]


class LipschitzError(ValueError):
    """A residual block's certified Lipschitz bound is not below 1."""


class Flow(nn.Module):
    """Composition of invertible layers with a standard normal base density.

    Parameters
    ----------
    layers : sequence of torch.nn.Module
        Each maps ``x -> (y, logdet)`` and has ``inverse``; applied in order from
        data to latent.
    event_shape : tuple of int
        Shape of one sample (without the batch dimension).
    latent_shape : tuple of int, optional
        Shape of one latent code, when the layers reshape (default: event_shape).

    Examples
    --------
    >>> import torch
    >>> from skresflow.core import ActNorm, ResidualBlock, mlp_branch
    >>> flow = Flow([ActNorm(2), ResidualBlock(mlp_branch(2, (16,)),
    ...                                        estimator="exact")], (2,))
    >>> flow.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
    """

    def __init__(self, layers, event_shape, latent_shape=None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.event_shape = tuple(event_shape)
        self.latent_shape = tuple(latent_shape or event_shape)

    @property
    def blocks(self):
        """Every residual block, in data-to-latent order (also those nested in
        layers such as :class:`~skresflow.core.FactorOut`)."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def _refresh_certified(self):
        """Refresh the layers whose norm is certified exactly (dense ones, 1x1
        convolutions), batched by shape; return the dense ones."""
        dense, pointwise = [], []
        for m in self.modules():
            if isinstance(m, LipschitzLinear):
                dense.append(m)
            elif isinstance(m, LipschitzConv2d) and m._use_exact():
                pointwise.append(m)
        refresh_layers(dense + pointwise)
        return dense

    def forward(self, x, generator=None):
        """Map data to latent: returns ``(z, logdet)`` with the summed log-det."""
        # One batched refresh of the dense layers instead of one per layer (after
        # an optimizer step every layer is stale), then their normalised weights
        # computed together. Other convolutions refresh when their weight is
        # normalised for an input (their own forward, or the closed-form series
        # of their branch): their norm depends on the input size.
        dense = self._refresh_certified()
        logdet = x.new_zeros(x.shape[0])
        with shared_normalization(dense), hash_rows_by(x):
            for layer in self.layers:
                x, ld = layer(x, generator)
                logdet = logdet + ld
        return x, logdet

    def base_log_prob(self, z):
        d = math.prod(self.latent_shape)
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)

    def log_prob(self, x, generator=None):
        """Log-density of ``x`` (per row), with the blocks' configured estimator."""
        z, logdet = self(x, generator)
        return self.base_log_prob(z) + logdet

    def inverse(self, z, *, check=True):
        """Map latent to data; with ``check``, verify every block is invertible."""
        if check:
            self.check_invertible()
        dense = self._refresh_certified()
        with shared_normalization(dense):
            for layer in reversed(self.layers):
                z = layer.inverse(z)
        return z

    def sample(self, n_samples, generator=None, *, dtype=None, device=None):
        """Draw ``n_samples`` by inverting standard normal draws."""
        ref = next(self.parameters(), torch.zeros(()))
        dtype, device = dtype or ref.dtype, device or ref.device
        gen_device = generator.device if generator is not None else device
        z = torch.randn(
            (n_samples, *self.latent_shape),
            generator=generator,
            device=gen_device,
            dtype=dtype,
        ).to(device)
        with torch.no_grad():
            return self.inverse(z)

    def configure_logdet(self, **config):
        """Set log-det options (``estimator``, ``n_exact_terms``, ...) on all blocks."""
        for block in self.blocks:
            block.configure(**config)
        return self

    def configure_inverse(self, **config):
        """Set every block's inverse options (``method``, ``atol``, ``rtol``,
        ``max_iter``, ``memory``; see :func:`~skresflow.core.fixed_point_inverse`)."""
        for block in self.blocks:
            block.inverse_config = dict(config)
        return self

    def refresh_lipschitz(self):
        """Bring every stale Lipschitz estimate back to tolerance (batched where
        possible, see :func:`~skresflow.core.lipschitz.refresh_layers`)."""
        kinds = LipschitzLinear | LipschitzConv2d
        refresh_layers(m for m in self.modules() if isinstance(m, kinds))

    def lipschitz_bounds(self):
        """Certified ``Lip(g)`` upper bound of every residual block."""
        return [block.lipschitz_bound() for block in self.blocks]

    def check_invertible(self):
        """Refresh the constraint; raise :class:`LipschitzError` if a block's
        Lipschitz constant (:meth:`ResidualBlock.estimated_lipschitz`) is >= 1."""
        self.refresh_lipschitz()
        for i, block in enumerate(self.blocks):
            lip = block.estimated_lipschitz()
            if not lip < 1:
                raise LipschitzError(
                    f"residual block {i} has Lipschitz constant {lip:.4f} >= 1, so it "
                    "may not be invertible; its weights were changed outside the "
                    "Lipschitz constraint or evaluated at an input size it was not "
                    "normalised for."
                )
