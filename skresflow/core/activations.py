"""1-Lipschitz activation functions for residual branches."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LipSwish", "make_activation", "ACTIVATIONS"]


class LipSwish(nn.Module):
    r"""Swish rescaled to be 1-Lipschitz: ``x * sigmoid(beta * x) / 1.1``.

    ``beta = softplus(b)`` keeps the slope parameter positive; ``b`` is learnable
    and starts at 0.5 as in the reference code.

    Parameters
    ----------
    beta_init : float, default=0.5
        Initial value of the raw parameter ``b``.

    Notes
    -----
    :math:`\sup_z |\frac{d}{dz} z\sigma(\beta z)| \approx 1.0998` for every
    :math:`\beta > 0`, so dividing by 1.1 makes the function 1-Lipschitz. Unlike
    ELU or softplus, its second derivative does not vanish where the first
    derivative is close to 1 (no *derivative saturation*), which matters because
    the gradient of a log-density involves second derivatives (Chen et al. 2019).

    Examples
    --------
    >>> import torch
    >>> act = LipSwish()
    >>> act(torch.zeros(2)).tolist()
    [0.0, 0.0]
    """

    def __init__(self, beta_init=0.5):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def forward(self, x):
        beta = F.softplus(self.beta)
        if torch.is_grad_enabled() and (x.requires_grad or self.beta.requires_grad):
            # Autograd keeps x and sigmoid(beta x) here; the silu form below would
            # keep three tensors, and twice as much under a double backward.
            return x * torch.sigmoid(beta * x) / 1.1
        # Without a graph (sampling, scoring): x sigmoid(beta x) = silu(beta x) /
        # beta, one fused kernel instead of three. The floor only matters where
        # softplus underflows (b < -46), which would divide by zero.
        beta = beta.clamp_min(1e-20)
        return F.silu(beta * x) / (1.1 * beta)


ACTIVATIONS = ("lipswish", "elu", "softplus", "tanh", "relu")


def make_activation(name):
    """Build a 1-Lipschitz activation module from its name.

    Parameters
    ----------
    name : {"lipswish", "elu", "softplus", "tanh", "relu"}
        LipSwish is the default of Residual Flows; ``"relu"`` is offered for
        ablations only: its Jacobian is discontinuous, so the log-det is not smooth.

    Returns
    -------
    torch.nn.Module
    """
    if name == "lipswish":
        return LipSwish()
    builders = {
        "elu": lambda: nn.ELU(alpha=1.0),
        "softplus": lambda: nn.Softplus(),
        "tanh": lambda: nn.Tanh(),
        "relu": lambda: nn.ReLU(),
    }
    if name not in builders:
        raise ValueError(
            f"activation must be one of {ACTIVATIONS}; got {name!r} instead."
        )
    return builders[name]()
