"""Every setting of a fit in one table: its default, allowed values or range, and what it means.

The estimator's Params, its validation, the command-line flags (`choices=`, defaults, help) and
the docs all read this table, so a value is allowed, defaulted and described in one place
(scikit-learn's `_parameter_constraints` is the model). No Spark here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .latent import SMOOTHING
from .mixture import COVARIANCE_TYPES

#: Default seed: fixed across processes (pyspark's hash-of-class-name default is not).
DEFAULT_SEED = zlib.crc32(b"spark_gmm.GaussianMixture")
INIT_MODES = ("k-means||", "k-means++", "random")
ENGINES = ("auto", "driver", "barrier")
DTYPES = ("float64", "float32")
HANDLE_INVALID = ("error", "skip", "keep")
CRITERIA = ("bic", "aic")
PROBABILITY_FORMATS = ("vector", "array")


@dataclass(frozen=True)
class Option:
    """One setting: `kind` is int, float, str or bool; `choices` or `minimum` bound its value."""

    default: object
    kind: type
    doc: str
    choices: tuple | None = None
    minimum: float | None = None

    def check(self, name: str, value) -> None:
        """Refuse a value outside the choices or below the minimum, naming the setting."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        if self.minimum is not None and not value >= self.minimum:
            raise ValueError(f"{name} must be at least {self.minimum:g}, got {value!r}")


#: The settings of `GaussianMixture` that are not column names, by their Param name.
OPTIONS: dict[str, Option] = {
    "k": Option(2, int, "Number of components.", minimum=1),
    "maxIter": Option(100, int, "Most EM iterations (M-steps).", minimum=0),
    "tol": Option(
        1e-4, float,
        "Convergence threshold on the change of the mean log-likelihood per row (per unit of "
        "weight), scikit-learn's test; the default is a tenth of scikit-learn's, because EM from a "
        "k-means start often climbs slowly (a 1% cluster is found after ~60 iterations).",
        minimum=0,
    ),
    "seed": Option(DEFAULT_SEED, int, "Random seed of the initialisation."),
    "regCovar": Option(
        1e-6, float,
        "Non-negative value added to each covariance diagonal, so covariances stay positive definite.",
        minimum=0,
    ),
    "covarianceType": Option(
        "full", str,
        "Covariance structure, as in scikit-learn: 'full', 'diag', 'spherical' or 'tied' "
        "(covariances are always returned as k×d×d matrices).",
        choices=COVARIANCE_TYPES,
    ),
    "initMode": Option(
        "k-means||", str,
        "Initialisation: 'k-means||' (k-means|| seeds, then Lloyd's k-means over all rows, as "
        "scikit-learn's default), 'k-means++' (the seeds alone) or 'random' (k distinct random "
        "rows); EM starts from the hard assignment to the centres.",
        choices=INIT_MODES,
    ),
    "nInit": Option(
        1, int,
        "Number of initialisations (seeds seed, seed+1, ...); the fit with the highest "
        "log-likelihood is kept. Restarts share every EM pass over the data.",
        minimum=1,
    ),
    "reseedComponents": Option(
        True, bool,
        "Restart a component that empties or collapses onto one row during the fit, by splitting "
        "the component with the widest spread, and where EM converges try moving the lightest "
        "component or re-splitting the closest pairs (at most k changes per fit, logged and listed in "
        "summary.reseeded); from a start with components singular but for regCovar, run EM under a "
        "covariance floor first (summary.flooredUntilIteration). False keeps plain EM: such a "
        "component stays with weight ≈ 0.",
    ),
    "handleInvalid": Option(
        "error", str,
        "Rows with null, NaN or infinite features, other than the model's feature count, or a bad "
        "weight: 'error' refuses them (fit, transform and score), 'skip' leaves them out (counted "
        "in the fit), 'keep' marginalises each null, NaN or infinite feature out of its row's "
        "likelihood (fit: exact EM over the observed features; transform and score: the marginal "
        "density of the observed part) and leaves out rows with no finite feature (counted; null "
        "outputs in transform).",
        choices=HANDLE_INVALID,
    ),
    "engine": Option(
        "auto", str,
        "'auto' (default): 'barrier' where Spark can run it and the data fit the executors' Python "
        "memory, else 'driver' (the choice is logged). 'driver': one Spark job per pass over cached "
        "blocks. 'barrier': the blocks stay in the tasks of one barrier stage that serve every pass.",
        choices=ENGINES,
    ),
    "dtype": Option(
        "float64", str,
        "'float64', or 'float32': blocks cached as the shifted rows rounded to float32 (half the "
        "bytes per pass); densities and statistics are computed in float64 either way.",
        choices=DTYPES,
    ),
    "probabilityFormat": Option(
        "vector", str,
        "Type of transform's probability column: 'vector' (MLlib's) or 'array' (array<double>, "
        "which SQL and table formats read directly; it also skips a conversion, so scoring is faster).",
        choices=PROBABILITY_FORMATS,
    ),
    "aggregationDepth": Option(2, int, "Depth of the tree that combines large partials (1: no tree).", minimum=1),
    "checkpointInterval": Option(
        10, int, "With checkpointDir: save the EM state every this many iterations (-1: never).",
        minimum=-1,
    ),
}


#: The settings of `MixedMixture` (the latent class model): the shared ones, plus its own.
MIXED_OPTIONS: dict[str, Option] = {
    **{name: OPTIONS[name] for name in
       ("k", "maxIter", "seed", "regCovar", "covarianceType", "nInit", "engine", "probabilityFormat",
        "checkpointInterval")},
    "tol": Option(
        1e-6, float,
        "Convergence threshold on the change of the objective (log-likelihood + log prior of the "
        "smoothing) per unit of row weight.",
        minimum=0,
    ),
    "smoothing": Option(
        SMOOTHING, float,
        "Pseudo-rows (in units of row weight) added to every outcome of every Bernoulli and "
        "categorical column, and to every count column's rate, in every class (a symmetric "
        "Beta/Dirichlet/Gamma prior): no probability is exactly 0 or 1 and no rate 0. 0: maximum "
        "likelihood.",
        minimum=0,
    ),
    "maxLevels": Option(
        1000, int, "Most distinct values a categorical column may have (more is refused).", minimum=2
    ),
    "handleInvalid": Option(
        "error", str,
        "Missing (null or NaN) or unusable values (±inf, a count that is not a whole number ≥ 0, a "
        "level or Bernoulli value not seen in the fit): 'error' refuses them (fit, transform and "
        "score), 'skip' leaves their rows out, 'keep' marginalises them out of the row's "
        "likelihood (rows with nothing usable are left out). A bad weight always leaves its row "
        "out (or, with 'error', refuses the fit).",
        choices=HANDLE_INVALID,
    ),
}


def check_options(values: dict, table: dict[str, Option] = OPTIONS) -> None:
    """Refuse any value in `values` (Param name → value) that its option in `table` does not allow."""
    for name, value in values.items():
        if name in table:
            table[name].check(name, value)
