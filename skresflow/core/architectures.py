"""Ready-made flows: an MLP residual flow for tables, a multiscale one for images."""

import torch

from .blocks import ResidualBlock, conv_branch, mlp_branch
from .flow import Flow
from .layers import (
    ActNorm,
    FactorOut,
    FixedAffine,
    LogitTransform,
    Reshape,
    Squeeze,
)

__all__ = ["standardizer", "tabular_flow", "image_flow", "initialize_actnorm"]


def standardizer(X, weights=None, *, noise_var=0.0):
    """Fixed affine layer mapping ``X`` to weighted zero mean and unit variance.

    ``noise_var`` is added to every feature's variance (for dequantised data:
    ``1 / (12 K^2)``, the variance of the uniform noise). Features whose standard
    deviation is below ``1e-6`` of their mean's magnitude (constant up to
    rounding) keep scale 1: dividing by a rounding residual would blow up any
    later variation.
    """
    dtype, X = X.dtype, X.double()  # squares of float32 data beyond 1e19 overflow
    w = torch.ones(X.shape[0], dtype=X.dtype) if weights is None else weights.to(X)
    w = (w / w.sum()).view(-1, *([1] * (X.dim() - 1)))
    mean = (w * X).sum(0)
    var = (w * (X - mean) ** 2).sum(0)
    std = (var + noise_var).sqrt()
    constant = (var.sqrt() <= 1e-6 * mean.abs()) & (noise_var == 0)
    std = torch.where(constant | (std == 0), torch.ones_like(std), std)
    return FixedAffine(mean.to(dtype), std.to(dtype))


def tabular_flow(
    n_features,
    *,
    n_blocks=8,
    hidden_dims=(128, 128),
    activation="lipswish",
    coeff=0.97,
    preprocessing=None,
):
    """``preprocessing -> [ActNorm -> ResidualBlock(MLP)] x n_blocks -> ActNorm``."""
    layers = [preprocessing] if preprocessing is not None else []
    for _ in range(n_blocks):
        branch = mlp_branch(
            n_features, tuple(hidden_dims), activation=activation, coeff=coeff
        )
        layers += [ActNorm(n_features), ResidualBlock(branch)]
    layers.append(ActNorm(n_features))
    return Flow(layers, (n_features,))


def image_flow(
    image_shape,
    *,
    n_scales=3,
    n_blocks=4,
    hidden_channels=64,
    n_fc_blocks=2,
    fc_hidden=128,
    activation="lipswish",
    coeff=0.98,
    preprocessing="logit",
    logit_alpha=1e-5,
    factor_out=False,
):
    """Multiscale convolutional residual flow (Chen et al. 2019, section 5).

    ``[logit] -> ([ActNorm -> conv block] x n_blocks -> squeeze) per scale ->
    flatten -> [ActNorm -> fully connected block] x n_fc_blocks -> ActNorm``.

    Parameters
    ----------
    image_shape : tuple (C, H, W)
        H and W must be divisible by ``2 ** (n_scales - 1)``.
    n_scales : int, default=3
    n_blocks : int, default=4
        Convolutional residual blocks per scale.
    hidden_channels : int, default=64
    n_fc_blocks : int, default=2
    fc_hidden : int, default=128
    activation : str, default="lipswish"
    coeff : float, default=0.98
    preprocessing : "logit" or torch.nn.Module or None, default="logit"
        ``"logit"`` expects data in [0, 1] (dequantised pixels).
    logit_alpha : float, default=1e-5
    factor_out : bool, default=False
        After every squeeze, send half of the channels straight to the latent
        code (through a per-channel ActNorm, see
        :class:`~skresflow.core.FactorOut`); the later scales and the fully
        connected blocks see the other half only. As in the reference code's
        ``factor_out``, every scale but the last factors out (its ImageNet
        configurations add a squeeze before the first scale, which does not).
        No effect with one scale.

    Examples
    --------
    >>> flow = image_flow((1, 8, 8), n_blocks=1, hidden_channels=4, factor_out=True)
    >>> [m.out_channels for m in flow.modules() if isinstance(m, FactorOut)]
    [2, 4]
    >>> flow.latent_shape
    (64,)
    """
    c, h, w = image_shape
    factor = 2 ** (n_scales - 1)
    if h % factor or w % factor:
        raise ValueError(
            f"image height and width must be divisible by {factor} for "
            f"n_scales={n_scales}; got {h}x{w} instead."
        )
    if preprocessing == "logit":
        preprocessing = LogitTransform(logit_alpha)
    layers = [preprocessing] if preprocessing is not None else []

    def scale(c):  # the residual blocks of one scale, on c channels
        layers = []
        for _ in range(n_blocks):
            branch = conv_branch(c, hidden_channels, activation=activation, coeff=coeff)
            layers += [ActNorm(c), ResidualBlock(branch)]
        return layers

    def end(d):  # the fully connected blocks on the flattened d features
        layers = []
        for _ in range(n_fc_blocks):
            hidden = (fc_hidden, fc_hidden)
            branch = mlp_branch(
                d, hidden, activation=activation, coeff=coeff, preactivation=True
            )
            layers += [ActNorm(d), ResidualBlock(branch)]
        return layers + [ActNorm(d)]

    layers += _scales(tuple(image_shape), n_scales, scale, end, factor_out)
    return Flow(layers, tuple(image_shape), latent_shape=(c * h * w,))


def _scales(shape, n_scales, scale, end, factor_out):
    """Layers of the last ``n_scales`` scales on inputs of ``shape``, then the
    flattening and ``end``; with ``factor_out`` the later scales are nested in
    a :class:`FactorOut` that sees half of the squeezed channels."""
    c, h, w = shape
    d = c * h * w
    if n_scales == 1:
        return [*scale(c), Reshape(shape, (d,)), *end(d)]
    squeezed = (4 * c, h // 2, w // 2)
    if not factor_out:
        return [
            *scale(c),
            Squeeze(),
            *_scales(squeezed, n_scales - 1, scale, end, False),
        ]
    kept = (2 * c, h // 2, w // 2)
    inner = _scales(kept, n_scales - 1, scale, end, True)
    return [*scale(c), Squeeze(), FactorOut(squeezed, inner, (d // 2,))]


def initialize_actnorm(flow, X):
    """Data-dependent ActNorm initialisation: one pass of ``X`` through the flow.

    Uses the cheapest log-det (one truncated term; the value is discarded, so
    its probe comes from a private generator, never torch's global one) and
    restores the blocks' configuration afterwards.
    """
    saved = [dict(block.logdet_config) for block in flow.blocks]
    flow.configure_logdet(estimator="truncated", n_exact_terms=1)
    try:
        with torch.no_grad():
            flow(X, torch.Generator(X.device).manual_seed(0))
    finally:
        for block, config in zip(flow.blocks, saved, strict=True):
            block.logdet_config = config
    return flow
