"""Every error and warning spark_gmm raises, in one module (exported from the package)."""

import inspect
import re
import sys
import warnings

#: Packages whose frames a warning passes over to reach the code that called the library.
_LIBRARIES = ("spark_gmm", "pyspark", "py4j")


def warn(message: str, category: type[Warning]) -> None:
    """Warn at the first frame outside spark_gmm and pyspark: the user's line that called the
    library, however deep the call (a fixed stacklevel breaks when the path or Python changes:
    3.11 gives a comprehension a frame of its own, 3.12 does not)."""
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


class InvalidInputError(ValueError):
    """The input data cannot be clustered as given; the message says which column and why."""


class InputWarning(UserWarning):
    """The input can be clustered, but something about it shapes the result (e.g. a constant feature)."""


class ComponentWarning(UserWarning):
    """Something happened to a component during the fit (it emptied, or was repaired)."""


class SpectralRepairWarning(UserWarning):
    """A covariance was not numerically positive definite and had its spectrum clipped."""


class ExecutorEnvironmentError(RuntimeError):
    """The executors' Python cannot run spark_gmm's code (a module it needs is missing there)."""


#: Modules the executors' Python must import to run spark_gmm's passes.
EXECUTOR_MODULES = ("numpy", "pandas", "pyarrow", "spark_gmm")


def missing_executor_module(error: BaseException | None) -> ExecutorEnvironmentError | None:
    """The one-line error for a Spark failure caused by the executors' Python lacking a module
    spark_gmm needs, or None for any other failure."""
    missing = re.search(r"No module named '([\w.]+)'", str(error))
    if error is None or not missing or missing.group(1).split(".")[0] not in EXECUTOR_MODULES:
        return None
    return executor_module_error(missing.group(1), "the executors' Python")


def executor_module_error(module: str, interpreter: str) -> ExecutorEnvironmentError:
    """The error for executors whose `interpreter` cannot import `module`."""
    return ExecutorEnvironmentError(
        f"{interpreter} cannot import '{module}': point PYSPARK_PYTHON (or "
        f"spark.pyspark.python) at an interpreter that has numpy, pandas, pyarrow and spark_gmm "
        f"(this driver runs {sys.executable}), or ship spark_gmm with --py-files"
    )


class InvalidMixtureError(ValueError):
    """Mixture parameters that are not a Gaussian mixture (the message names the component)."""
