"""spark_gmm: Gaussian-mixture clustering by distributed EM for Spark DataFrames."""

__version__ = "0.1.0"

from .clustering import GaussianMixture, GaussianMixtureModel, GaussianMixtureSummary  # noqa: E402
from .inputs import InvalidInputError  # noqa: E402

__all__ = [
    "GaussianMixture",
    "GaussianMixtureModel",
    "GaussianMixtureSummary",
    "InvalidInputError",
    "__version__",
]
