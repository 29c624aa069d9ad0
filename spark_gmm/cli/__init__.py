"""The `spark-gmm` command line: batch jobs that fit, score, select and report.

Also `spark-submit jobs/*_gmm.py`. Modules, in the order a job uses them: `arguments` (flags and
TOML config), `logs` (console output), `storage` (input, output checks, staged writes), `columns`
(the columns a job reads and writes, a saved model set on them), `mixed` (a fit over typed columns:
`MixedMixture`), `commands` (the four commands and `main`); `errors` holds the two failures and
their exit codes.
docs/jobs.md is the manual.
"""

from .arguments import parse_args
from .commands import main
from .errors import JobError, UsageError

__all__ = ["JobError", "UsageError", "main", "parse_args"]
