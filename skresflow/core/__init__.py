"""Pure-torch engine of skresflow: Lipschitz layers, log-det estimators, flows.

Nothing here imports scikit-learn or joblib; tensors in, tensors out.
"""

from .activations import ACTIVATIONS, LipSwish, make_activation
from .architectures import image_flow, initialize_actnorm, standardizer, tabular_flow
from .blocks import ResidualBlock, conv_branch, mlp_branch
from .dequantize import dequantize, quantize
from .flow import Flow, LipschitzError
from .inverse import InverseNotConvergedWarning, fixed_point_inverse
from .layers import (
    ActNorm,
    FactorOut,
    FixedAffine,
    LogitTransform,
    Reshape,
    Squeeze,
)
from .lipschitz import LipschitzConv2d, LipschitzLinear
from .logdet import (
    ESTIMATORS,
    GRAD_MODES,
    hash_rows_by,
    logdet_estimate,
    residual_logdet,
    row_hash,
)

__all__ = [
    "ACTIVATIONS",
    "ESTIMATORS",
    "GRAD_MODES",
    "ActNorm",
    "FactorOut",
    "FixedAffine",
    "Flow",
    "InverseNotConvergedWarning",
    "LipSwish",
    "LipschitzConv2d",
    "LipschitzError",
    "LipschitzLinear",
    "LogitTransform",
    "Reshape",
    "ResidualBlock",
    "Squeeze",
    "conv_branch",
    "dequantize",
    "fixed_point_inverse",
    "image_flow",
    "initialize_actnorm",
    "logdet_estimate",
    "make_activation",
    "mlp_branch",
    "quantize",
    "residual_logdet",
    "row_hash",
    "hash_rows_by",
    "standardizer",
    "tabular_flow",
]
