"""Every error and warning spark_gmm raises, in one module (exported from the package)."""


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


class InvalidMixtureError(ValueError):
    """Mixture parameters that are not a Gaussian mixture (the message names the component)."""
