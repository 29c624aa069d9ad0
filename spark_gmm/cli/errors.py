"""The two failures of a job and their exit codes: a bad argument (2), a job that cannot run (1).

Also the one-line form of an error from Spark, whose messages carry JVM stack traces.
"""

from __future__ import annotations


class UsageError(Exception):
    """A bad flag or config setting (exit code 2): retrying will not help."""


class JobError(Exception):
    """The job cannot run as asked: a missing input or column, an existing output (exit code 1)."""


def short_message(error: BaseException) -> str:
    """The first meaningful line of an exception message (Spark's carry JVM stack traces)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("An error occurred while calling"):
        lines = [lines[1].lstrip(": ")]  # py4j: the Java exception is on the next line
    return " ".join(lines[0].split()) if lines else type(error).__name__
