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
from .layers import ActNorm, Reshape, Squeeze

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
        Channels of the feature map at the end of each scale (see
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


def _is_scale_end(layer):
    """A scale of a multiscale flow ends where its feature map is squeezed or
    flattened: the head reads the map just before that layer."""
    return isinstance(layer, Squeeze) or (
        isinstance(layer, Reshape) and len(layer.in_shape) == 3
    )


def scale_channels(flow):
    """Channels of the feature map at the end of each scale of an image flow."""
    c, channels = flow.event_shape[0], []
    for layer in flow.layers:
        if _is_scale_end(layer):
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
        feature maps at the end of each scale (empty for flows without scales);
        returns ``(batch, n_classes)`` logits.

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
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            if _is_scale_end(layer):
                taps.append(x)
            if not density and isinstance(layer, ResidualBlock):
                x = x + layer.g(x)
                continue
            x, ld = layer(x, generator)
            logdet = logdet + ld
        logits = self.head(x, taps)
        return (self.base_log_prob(x) + logdet if density else None), logits

    def class_log_prob(self, x):
        """``log p(y | x)`` for every class: ``(batch, n_classes)``."""
        _, logits = self.classify(x, density=False)
        return F.log_softmax(logits, dim=1)


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
