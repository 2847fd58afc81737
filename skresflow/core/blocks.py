"""Residual blocks ``f(x) = x + g(x)`` with a Lipschitz-constrained branch ``g``."""

import math

import torch
from torch import nn

from .activations import make_activation
from .inverse import fixed_point_inverse
from .lipschitz import LipschitzConv2d, LipschitzLinear
from .logdet import _check_args, residual_logdet

__all__ = ["ResidualBlock", "mlp_branch", "conv_branch"]


def mlp_branch(
    n_features,
    hidden_dims=(128, 128),
    *,
    activation="lipswish",
    coeff=0.97,
    preactivation=False,
):
    """Residual branch ``Linear -> act -> ... -> Linear`` with ``Lip <= coeff^layers``.

    Parameters
    ----------
    n_features : int
    hidden_dims : sequence of int, default=(128, 128)
    activation : str, default="lipswish"
        See :func:`make_activation`.
    coeff : float, default=0.97
        Spectral-norm bound of every linear layer.
    preactivation : bool, default=False
        Start with an activation (as the reference does between stacked blocks).
    """
    dims = (n_features, *hidden_dims, n_features)
    layers = [make_activation(activation)] if preactivation else []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i:
            layers.append(make_activation(activation))
        layers.append(LipschitzLinear(d_in, d_out, coeff=coeff))
    return nn.Sequential(*layers)


def conv_branch(channels, hidden_channels=512, *, activation="lipswish", coeff=0.98):
    """The reference image branch: act, 3x3 conv, act, 1x1 conv, act, 3x3 conv.

    Every convolution's *operator* norm is at most ``coeff``.
    """
    return nn.Sequential(
        make_activation(activation),
        LipschitzConv2d(channels, hidden_channels, 3, coeff=coeff),
        make_activation(activation),
        LipschitzConv2d(hidden_channels, hidden_channels, 1, coeff=coeff),
        make_activation(activation),
        LipschitzConv2d(hidden_channels, channels, 3, coeff=coeff),
    )


def _lipschitz_layers(module):
    return [
        m for m in module.modules() if isinstance(m, LipschitzLinear | LipschitzConv2d)
    ]


class ResidualBlock(nn.Module):
    """Invertible residual block ``y = x + g(x)`` returning ``(y, logdet)``.

    Parameters
    ----------
    g : torch.nn.Module
        Residual branch with ``Lip(g) < 1`` (build it with :func:`mlp_branch`,
        :func:`conv_branch` or from Lipschitz layers).
    estimator, n_exact_terms, grad, **logdet_options
        Passed to :func:`~skresflow.core.logdet_estimate`; change them later with
        :meth:`configure`.

    See Also
    --------
    skresflow.core.logdet_estimate, skresflow.core.fixed_point_inverse
    """

    def __init__(
        self,
        g,
        *,
        estimator="unbiased",
        n_exact_terms=2,
        grad="memory_efficient",
        **logdet_options,
    ):
        super().__init__()
        self.g = g
        self.logdet_config = {}
        self.inverse_config = {}
        self.configure(
            estimator=estimator,
            n_exact_terms=n_exact_terms,
            grad=grad,
            **logdet_options,
        )

    def configure(self, **logdet_config):
        """Update the log-det settings (``estimator``, ``n_exact_terms``, ...)."""
        config = {**self.logdet_config, **logdet_config}
        options = {
            k: v
            for k, v in config.items()
            if k not in ("estimator", "n_exact_terms", "grad")
        }
        _check_args(
            torch.zeros(1, 1),
            config["estimator"],
            config["n_exact_terms"],
            config["grad"],
            options,
        )
        self.logdet_config = config
        return self

    def forward(self, x, generator=None):
        gx, logdet = residual_logdet(
            self.g, x, generator=generator, **self.logdet_config
        )
        return x + gx, logdet

    def inverse(self, y):
        return fixed_point_inverse(self.g, y, **self.inverse_config)

    def refresh_lipschitz(self):
        """Re-estimate, to tolerance, every layer whose weight changed since its last
        estimate (a no-op otherwise, so checking never moves the model)."""
        for layer in _lipschitz_layers(self.g):
            layer.refresh()

    def lipschitz_bound(self):
        """Certified upper bound on ``Lip(g)``: product of the layers' exact norms.

        Activations are 1-Lipschitz. Convolutions need one forward pass first (the
        bound depends on the input size).
        """
        return math.prod(layer.lipschitz_bound() for layer in _lipschitz_layers(self.g))

    def estimated_lipschitz(self):
        """``Lip(g)`` from the layers' exact (dense, small conv) or power-iteration
        (large conv) operator norms: tight, but only certified for dense layers."""
        return math.prod(layer.estimated_norm() for layer in _lipschitz_layers(self.g))

    def sigmas(self):
        """Current power-iteration estimates of each layer's unnormalised norm."""
        return [layer.sigma.item() for layer in _lipschitz_layers(self.g)]
