"""Invertible layers without a Lipschitz constraint: ActNorm, squeeze, logit, affine.

Every layer maps ``x -> (y, logdet)`` with ``logdet`` of shape ``(batch,)`` and has
an exact ``inverse``. The ``generator`` argument of ``forward`` is accepted (and
ignored) so that a flow can call all of its layers the same way.
"""

import math

import torch
from torch import nn

__all__ = [
    "ActNorm",
    "FactorOut",
    "FixedAffine",
    "LogitTransform",
    "Reshape",
    "Squeeze",
]


def _per_feature(t, x):
    """View a per-feature/per-channel vector so that it broadcasts against ``x``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _n_positions(x):
    return math.prod(x.shape[2:])


class ActNorm(nn.Module):
    """Per-feature (or per-channel) affine map with data-dependent initialisation.

    On the first forward pass, ``bias = -mean`` and
    ``log_scale = -0.5 * log(max(var, 0.2))`` of that batch (Kingma & Dhariwal
    2018, as in the Residual Flows code); both are trained afterwards.

    Parameters
    ----------
    num_features : int
        Features of a ``(batch, d)`` input or channels of a ``(batch, C, H, W)``.
    """

    def __init__(self, num_features):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    def initialize(self, x):
        """Set the parameters from the statistics of ``x``."""
        with torch.no_grad():
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            self.bias.copy_(-flat.mean(1))
            self.log_scale.copy_(
                -0.5 * flat.var(1, unbiased=False).clamp_min(0.2).log()
            )
            self.initialized.fill_(True)

    def forward(self, x, generator=None):
        if not self.initialized:
            self.initialize(x)
        y = (x + _per_feature(self.bias, x)) * _per_feature(self.log_scale, x).exp()
        logdet = self.log_scale.sum() * _n_positions(x)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return y * _per_feature(-self.log_scale, y).exp() - _per_feature(self.bias, y)


class FixedAffine(nn.Module):
    """``y = (x - shift) / scale`` with fixed (non-trained) statistics.

    ``shift`` and ``scale`` have the event shape (or broadcast to it). Used for
    the internal standardisation of data; its log-det keeps densities in the
    user's units.
    """

    def __init__(self, shift, scale):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift).clone())
        self.register_buffer("scale", torch.as_tensor(scale).clone())

    def forward(self, x, generator=None):
        y = (x - self.shift) / self.scale
        logdet = -self.scale.log().expand(x.shape[1:]).sum()
        return y, logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, y):
        return y * self.scale + self.shift


class Squeeze(nn.Module):
    """Space-to-depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; volume preserving."""

    def forward(self, x, generator=None):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(
                f"Squeeze needs even height and width; got {h}x{w} instead."
            )
        y = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y):
        b, c4, h, w = y.shape
        x = y.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)


class LogitTransform(nn.Module):
    r"""Map data in ``[0, 1]`` to the real line: ``s = a + (1 - 2a) x``,
    ``y = log s - log(1 - s)``.

    Parameters
    ----------
    alpha : float, default=0.05
        Keeps ``s`` away from 0 and 1 (reference: 0.05 for CIFAR-10, 1e-6 for
        MNIST).

    Notes
    -----
    :math:`\log|dy/dx| = \log(1 - 2a) - \log s - \log(1 - s)` per dimension.
    """

    def __init__(self, alpha=0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5); got {alpha!r} instead.")
        self.alpha = alpha

    def forward(self, x, generator=None):
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = s.log() - (-s).log1p()
        logdet = math.log1p(-2 * self.alpha) - s.log() - (-s).log1p()
        return y, logdet.flatten(1).sum(1)

    def inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def extra_repr(self):
        return f"alpha={self.alpha}"


class Reshape(nn.Module):
    """Reshape the event (not the batch) dimensions; volume preserving."""

    def __init__(self, in_shape, out_shape):
        super().__init__()
        if math.prod(in_shape) != math.prod(out_shape):
            raise ValueError(f"cannot reshape {in_shape} into {out_shape}.")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x, generator=None):
        return x.reshape(x.shape[0], *self.out_shape), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y.reshape(y.shape[0], *self.in_shape)

    def extra_repr(self):
        return f"{self.in_shape} -> {self.out_shape}"


class FactorOut(nn.Module):
    """Send half of the channels to the latent code, the other half on through
    ``layers`` (the remaining scales of a multiscale flow).

    ``(B, C, H, W) -> (B, C * H * W)``: the last ``C - C // 2`` channels pass
    through a per-channel :class:`ActNorm` and leave the flow (under a standard
    normal base they are modelled as independent Gaussians per channel); the
    first ``C // 2`` go through ``layers``. The output is the concatenation of
    the flattened factored-out channels and the flattened output of ``layers``.

    Parameters
    ----------
    in_shape : tuple (C, H, W)
        Shape of one input; ``C >= 2``.
    layers : sequence of torch.nn.Module
        Invertible layers (``x -> (y, logdet)``, ``inverse``) applied to the
        kept ``(C // 2, H, W)`` channels.
    latent_shape : tuple of int
        Shape of one output of ``layers`` (what :meth:`inverse` hands them back).

    Notes
    -----
    The split itself is a permutation of coordinates: its log-det is 0, so the
    log-det of this layer is that of the factored-out ActNorm plus that of
    ``layers``, and the factored-out channels add their standard normal
    log-density through the flow's base density. Cost: the later scales work on
    half the channels (Dinh et al. 2017; Chen et al. 2019, "factor out").
    """

    def __init__(self, in_shape, layers, latent_shape):
        super().__init__()
        c, h, w = in_shape
        if c < 2:
            raise ValueError(
                f"FactorOut needs at least 2 channels to split; got in_shape="
                f"{tuple(in_shape)} instead."
            )
        self.in_shape, self.latent_shape = tuple(in_shape), tuple(latent_shape)
        self.kept_channels, self.out_channels = c // 2, c - c // 2
        self.norm = ActNorm(self.out_channels)
        self.layers = nn.ModuleList(layers)

    def split(self, x):
        """``(kept, out, logdet)``: the kept channels, the normalised factored-out
        channels and the log-det of their ActNorm."""
        kept, out = x.split([self.kept_channels, self.out_channels], dim=1)
        out, logdet = self.norm(out)
        return kept, out, logdet

    def join(self, out, kept):
        """The layer's output from the factored-out part and the kept part's code."""
        return torch.cat([out.flatten(1), kept.flatten(1)], dim=1)

    def forward(self, x, generator=None):
        kept, out, logdet = self.split(x)
        for layer in self.layers:
            kept, ld = layer(kept, generator)
            logdet = logdet + ld
        return self.join(out, kept), logdet

    def inverse(self, y):
        _, h, w = self.in_shape
        n_out = self.out_channels * h * w
        out = y[:, :n_out].reshape(y.shape[0], self.out_channels, h, w)
        kept = y[:, n_out:].reshape(y.shape[0], *self.latent_shape)
        for layer in reversed(self.layers):
            kept = layer.inverse(kept)
        return torch.cat([kept, self.norm.inverse(out)], dim=1)

    def extra_repr(self):
        return (
            f"{self.in_shape}: {self.out_channels} channels out, "
            f"{self.kept_channels} kept"
        )
