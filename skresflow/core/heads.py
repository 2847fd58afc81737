"""Classifier heads on a flow's features, and the hybrid flow that carries one.

A hybrid model (Nalisnick et al. 2019; Chen et al. 2019, section 6) shares one
flow between a density ``p(x)`` and a classifier ``p(y | x)`` that reads the
flow's features; it is trained on ``lambda * log p(x) + log p(y | x)``.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import ResidualBlock
from .flow import Flow
from .layers import ActNorm, FactorOut, Reshape, Squeeze
from .logdet import hash_rows_by

__all__ = [
    "HybridFlow",
    "LinearHead",
    "MultiscaleHead",
    "hybrid_loss",
    "scale_channels",
]


class LinearHead(nn.Module):
    """Logits ``W z + b`` from the flattened latent code ``z`` (Nalisnick et al.).

    Parameters
    ----------
    n_features : int
        Size of the flattened latent code.
    n_classes : int
    """

    def __init__(self, n_features, n_classes):
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes)

    def forward(self, z, taps):
        return self.linear(z.flatten(1))


class MultiscaleHead(nn.Module):
    """The paper's image head: per scale 3x3 conv -> ActNorm -> ReLU -> global
    average pool; the pooled features of all scales are concatenated and mapped
    to logits by one linear layer.

    Parameters
    ----------
    channels : sequence of int
        Channels of the feature map read at each scale (see
        :func:`scale_channels`).
    n_classes : int
    hidden_channels : int, default=256
        Output channels of each scale's convolution (256 in the paper).
    """

    def __init__(self, channels, n_classes, hidden_channels=256):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, hidden_channels, 3, padding=1) for c in channels
        )
        self.norms = nn.ModuleList(ActNorm(hidden_channels) for _ in channels)
        self.linear = nn.Linear(hidden_channels * len(channels), n_classes)

    def forward(self, z, taps):
        if len(taps) != len(self.convs):
            raise ValueError(
                f"MultiscaleHead expects {len(self.convs)} feature maps (one per "
                f"scale); got {len(taps)} instead."
            )
        pooled = []
        for h, conv, norm in zip(taps, self.convs, self.norms, strict=True):
            h, _ = norm(conv(h))
            pooled.append(F.relu(h).mean(dim=(2, 3)))
        return self.linear(torch.cat(pooled, 1))


def _is_scale_end(layers, i):
    """A scale of a multiscale flow ends where its feature map is squeezed or
    flattened: the head reads the map just before that layer. Where the squeeze
    is followed by a :class:`FactorOut`, the head reads the factored-out
    channels instead (the scale's part of the latent code, as in the paper's
    hybrid model)."""
    layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
    if isinstance(layer, Squeeze):
        return not isinstance(after, FactorOut)
    return isinstance(layer, Reshape) and len(layer.in_shape) == 3


def scale_channels(flow):
    """Channels of the feature map the head reads at each scale of an image flow."""
    return _scale_channels(flow.layers, flow.event_shape[0])


def _scale_channels(layers, c):
    channels = []
    for i, layer in enumerate(layers):
        if isinstance(layer, FactorOut):
            channels.append(layer.out_channels)
            channels += _scale_channels(layer.layers, layer.kept_channels)
        elif _is_scale_end(layers, i):
            channels.append(c)
        c *= 4 if isinstance(layer, Squeeze) else 1
    return channels


class HybridFlow(Flow):
    """A :class:`Flow` with a classifier head reading its features.

    Parameters
    ----------
    flow : Flow
        Its layers are shared, not copied; the density is that of ``flow``.
    head : torch.nn.Module
        Called as ``head(z, taps)`` with the latent code ``z`` and the list of
        feature maps at the end of each scale (empty for flows without scales;
        with factor-out, the factored-out channels of each scale but the last,
        then the last scale's map); returns ``(batch, n_classes)`` logits.

    Examples
    --------
    >>> import torch
    >>> from skresflow.core import tabular_flow
    >>> flow = HybridFlow(tabular_flow(2, n_blocks=1, hidden_dims=(8,)),
    ...                   LinearHead(2, 3))
    >>> log_p, logits = flow.classify(torch.randn(5, 2))
    >>> log_p.shape, logits.shape
    (torch.Size([5]), torch.Size([5, 3]))
    """

    def __init__(self, flow, head):
        super().__init__(list(flow.layers), flow.event_shape, flow.latent_shape)
        self.head = head

    def classify(self, x, generator=None, *, density=True):
        """Return ``(log_p, logits)`` from one pass through the flow.

        With ``density=False`` the log-determinants are skipped (``log_p`` is
        None): the pass costs one evaluation of every residual branch.
        """
        taps = []
        with hash_rows_by(x):
            z, logdet = _walk(self.layers, x, generator, density, taps)
        logits = self.head(z, taps)
        return (self.base_log_prob(z) + logdet if density else None), logits

    def class_log_prob(self, x):
        """``log p(y | x)`` for every class: ``(batch, n_classes)``."""
        _, logits = self.classify(x, density=False)
        return F.log_softmax(logits, dim=1)


def _walk(layers, x, generator, density, taps):
    """Forward pass through ``layers`` that appends the head's feature maps to
    ``taps``; without ``density`` the residual blocks skip their log-dets."""
    logdet = x.new_zeros(x.shape[0])
    for i, layer in enumerate(layers):
        if isinstance(layer, FactorOut):
            kept, out, ld = layer.split(x)
            taps.append(out)
            kept, ld_kept = _walk(layer.layers, kept, generator, density, taps)
            x, logdet = layer.join(out, kept), logdet + ld + ld_kept
            continue
        if _is_scale_end(layers, i):
            taps.append(x)
        if not density and isinstance(layer, ResidualBlock):
            x = x + layer.g(x)
            continue
        x, ld = layer(x, generator)
        logdet = logdet + ld
    return x, logdet


def hybrid_loss(log_p, logits, y, weight, density_weight):
    r"""Weighted mean of ``-(lambda log p(x) + log p(y | x))`` over a batch.

    Parameters
    ----------
    log_p : torch.Tensor of shape (batch,) or None
        Log-density of the rows (None when ``density_weight`` is 0).
    logits : torch.Tensor of shape (batch, n_classes)
    y : torch.Tensor of shape (batch,), int64
        Class indices; negative values mark unlabelled rows, which contribute
        only the density term.
    weight : torch.Tensor of shape (batch,)
        Row weights; the result is divided by their sum.
    density_weight : float
        ``lambda`` (0: a pure classifier).
    """
    labelled = y >= 0
    nll_y = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
    loss = torch.where(labelled, nll_y, torch.zeros_like(nll_y))
    if density_weight:
        loss = loss - density_weight * log_p
    return (weight * loss).sum() / weight.sum()
