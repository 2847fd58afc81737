"""skresflow: Residual Flows (Chen et al., NeurIPS 2019) as scikit-learn estimators."""

from ._classifier import ResidualFlowClassifier
from ._density import ResidualFlowDensity
from ._outlier import ResidualFlowOutlierDetector
from ._persistence import load

__version__ = "0.1.0.dev0"
__all__ = [
    "ResidualFlowClassifier",
    "ResidualFlowDensity",
    "ResidualFlowOutlierDetector",
    "load",
    "__version__",
]
