"""spark_gmm: Gaussian-mixture clustering by distributed EM for Spark DataFrames."""

__version__ = "0.1.0"

from .clustering import GaussianMixture  # noqa: E402
from .model import GaussianMixtureModel  # noqa: E402
from .summary import GaussianMixtureSummary  # noqa: E402
from .mixed import MixedMixture  # noqa: E402
from .mixed_model import MixedMixtureModel, MixedMixtureSummary  # noqa: E402
from .exceptions import (  # noqa: E402
    ComponentWarning,
    ExecutorEnvironmentError,
    InputWarning,
    InvalidInputError,
    InvalidMixtureError,
    SpectralRepairWarning,
)
from .persistence import ModelFormatError  # noqa: E402
from .selection import GaussianMixtureSelection, GaussianMixtureSelectionModel  # noqa: E402
from . import report  # noqa: E402,F401  (spark_gmm.report.write_report works after `import spark_gmm`)

__all__ = [
    "GaussianMixture",
    "GaussianMixtureModel",
    "GaussianMixtureSelection",
    "GaussianMixtureSelectionModel",
    "GaussianMixtureSummary",
    "MixedMixture",
    "MixedMixtureModel",
    "MixedMixtureSummary",
    "ComponentWarning",
    "ExecutorEnvironmentError",
    "InputWarning",
    "InvalidInputError",
    "InvalidMixtureError",
    "ModelFormatError",
    "SpectralRepairWarning",
    "__version__",
]
