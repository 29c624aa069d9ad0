"""spark_gmm: Gaussian-mixture clustering by distributed EM for Spark DataFrames.

The public names are imported on first use (PEP 562): executors' Python workers import the modules
they run (blocks, kernels, scoring) without the estimators, and so without `pyspark.ml`, whose import
costs about half a second in every new worker process.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "GaussianMixture": "clustering",
    "GaussianMixtureModel": "model",
    "GaussianMixtureSelection": "selection",
    "GaussianMixtureSelectionModel": "selection",
    "GaussianMixtureSummary": "summary",
    "MixedMixture": "mixed",
    "MixedMixtureModel": "mixed_model",
    "MixedMixtureSummary": "mixed_model",
    "ComponentWarning": "exceptions",
    "ExecutorEnvironmentError": "exceptions",
    "InputWarning": "exceptions",
    "InvalidInputError": "exceptions",
    "InvalidMixtureError": "exceptions",
    "ModelFormatError": "persistence",
    "SpectralRepairWarning": "exceptions",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    """A public name on first use; `spark_gmm.report` too, so that `import spark_gmm` is enough for it."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name == "report":
        value = importlib.import_module(".report", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "report"])
