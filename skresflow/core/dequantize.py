"""Uniform dequantisation of discrete data (pixels with values 0..K-1)."""

import math

import torch

from .logdet import row_hash, split_generator

__all__ = ["dequantize", "quantize"]

_TABLE_SIZE = 256


def dequantize(x, n_bins, generator=None, *, noise="random"):
    r"""Map integers in ``0..n_bins-1`` to ``(x + u) / n_bins`` in ``[0, 1)``.

    Parameters
    ----------
    x : torch.Tensor of shape ``(batch, *event)``
        Integer values (any floating dtype).
    n_bins : int
    generator : torch.Generator, optional
        Or a ``(shared, local)`` pair (see :mod:`skresflow.core.logdet`): the
        noise is drawn from ``local``.
    noise : {"random", "row_hash"}, default="random"
        ``"random"``: fresh ``u ~ U(0, 1)`` per value (training).
        ``"row_hash"``: ``u`` taken from a table of 256 draws by a hash of the
        row, so a row always gets the same noise whatever else is in the batch
        (deterministic scoring).

    Returns
    -------
    y : torch.Tensor shaped like ``x``
    log_jacobian : float
        ``-D log(n_bins)``: adding it to ``log p(y)`` gives, in expectation over
        ``u``, a lower bound on ``log P(x)`` (Theis et al. 2016).
    """
    event = x.shape[1:]
    generator = split_generator(generator)[1]
    gen_device = generator.device if generator is not None else x.device
    if noise == "random":
        u = torch.rand(x.shape, generator=generator, device=gen_device, dtype=x.dtype)
    elif noise == "row_hash":
        table = torch.rand(
            (_TABLE_SIZE, *event), generator=generator, device=gen_device, dtype=x.dtype
        )
        u = table.to(x.device)[row_hash(x, _TABLE_SIZE)]
    else:
        raise ValueError(
            f"noise must be 'random' or 'row_hash'; got {noise!r} instead."
        )
    y = (x + u.to(x.device)) / n_bins
    return y, -math.prod(event) * math.log(n_bins)


def quantize(y, n_bins):
    """Inverse of :func:`dequantize` up to the noise: ``floor(y * K)`` in ``0..K-1``."""
    return torch.clamp(torch.floor(y * n_bins), 0, n_bins - 1)
