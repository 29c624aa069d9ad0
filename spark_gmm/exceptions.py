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


def executor_environment_error(error: BaseException | None) -> ExecutorEnvironmentError | None:
    """The one-line error for a Spark failure caused by the executors' Python (it lacks a module
    spark_gmm needs, does not start, or is another minor version than the driver's), or None for
    any other failure."""
    if error is None:
        return None
    text = str(error)
    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing and missing.group(1).split(".")[0] in EXECUTOR_MODULES:
        return executor_module_error(missing.group(1), "the executors' Python")
    if mismatch := re.search(r"different version:? (\d+\.\d+) than that in driver:? (\d+\.\d+)", text):
        return ExecutorEnvironmentError(
            f"the executors run Python {mismatch.group(1)}, this driver {mismatch.group(2)}: point "
            "PYSPARK_PYTHON (or spark.pyspark.python) at an interpreter of the driver's version"
        )
    if unstartable := re.search(r'Cannot run program "([^"]+)"', text):
        return ExecutorEnvironmentError(
            f"the executors cannot start Python '{unstartable.group(1)}': point PYSPARK_PYTHON (or "
            "spark.pyspark.python) at an interpreter installed on every executor"
        )
    return None


def executor_module_error(module: str, interpreter: str) -> ExecutorEnvironmentError:
    """The error for executors whose `interpreter` cannot import `module`."""
    return ExecutorEnvironmentError(
        f"{interpreter} cannot import '{module}': point PYSPARK_PYTHON (or "
        f"spark.pyspark.python) at an interpreter that has numpy, pandas, pyarrow and spark_gmm "
        f"(this driver runs {sys.executable}), or ship spark_gmm with --py-files"
    )


class InvalidMixtureError(ValueError):
    """Mixture parameters that are not a Gaussian mixture (the message names the component)."""
