"""EM checkpoints: the state after an M-step, saved so a killed fit resumes to the same model.

A checkpoint is one JSON text file written with Spark's DataFrame writer (any file system, Spark
Connect too) into one of two slots, alternately, so a fit killed while writing one slot still has the
other. It holds the parameters in the fit's shifted coordinates, exactly (JSON floats round-trip), and
a fingerprint of the data and the settings; a resumed fit continues with the very numbers an
unbroken fit would have had, so it ends with the same model.
"""

from __future__ import annotations

import json

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

from .em import EMState
from .mixture import Mixture, precision_cholesky

SLOTS = ("slot-0", "slot-1")


class CheckpointMismatchError(ValueError):
    """The checkpoint directory holds a fit of other data or other settings."""


def _mixture_json(mixture: Mixture | None):
    if mixture is None:
        return None
    return {
        "weights": mixture.weights.tolist(),
        "means": mixture.means.tolist(),
        "covariances": mixture.covariances.tolist(),
    }


def _mixture(record, reg_covar: float) -> Mixture | None:
    if record is None:
        return None
    covariances = np.array(record["covariances"], dtype=np.float64)
    return Mixture(
        weights=np.array(record["weights"], dtype=np.float64),
        means=np.array(record["means"], dtype=np.float64),
        covariances=covariances,
        precisions_cholesky=precision_cholesky(covariances),
    )


class Checkpointer:
    """Saves every `interval`-th EM state under `directory`; `latest()` reads the newest back."""

    def __init__(self, spark: SparkSession, directory: str, interval: int, fingerprint: dict, reg_covar: float):
        self.spark, self.directory, self.interval = spark, directory.rstrip("/"), interval
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back
        self.reg_covar = reg_covar

    def save(self, state: EMState) -> None:
        if self.interval < 1 or state.iteration % self.interval:
            return
        record = {
            "fingerprint": self.fingerprint,
            "iteration": state.iteration,
            "mixture": _mixture_json(state.mixture),
            "previous": _mixture_json(state.previous),
            "history": state.history,
            "seconds": state.seconds,
            "empty": state.empty,
            "reseeded": state.reseeded,
            "finishing": state.finishing,
        }
        slot = SLOTS[(state.iteration // self.interval) % 2]
        self.spark.createDataFrame([(json.dumps(record),)], "value string").coalesce(1).write.mode(
            "overwrite"
        ).text(f"{self.directory}/{slot}")

    def latest(self) -> EMState | None:
        """The newest complete checkpoint, or None; refuses one of other data or settings."""
        records = []
        for slot in SLOTS:
            try:
                lines = [row[0] for row in self.spark.read.text(f"{self.directory}/{slot}").collect()]
                records.append(json.loads(lines[0]))
            except (AnalysisException, IndexError, ValueError):
                continue  # absent, or cut short by a kill: the other slot holds the previous one
        if not records:
            return None
        record = max(records, key=lambda r: r["iteration"])
        if record["fingerprint"] != self.fingerprint:
            changed = sorted(
                key for key in set(record["fingerprint"]) | set(self.fingerprint)
                if record["fingerprint"].get(key) != self.fingerprint.get(key)
            )
            raise CheckpointMismatchError(
                f"checkpoint directory {self.directory} holds a fit of other data or settings "
                f"(differs in: {', '.join(changed)}); use another directory or remove it to start afresh"
            )
        return EMState(
            iteration=record["iteration"],
            mixture=_mixture(record["mixture"], self.reg_covar),
            previous=_mixture(record["previous"], self.reg_covar),
            history=record["history"],
            seconds=record["seconds"],
            empty=record["empty"],
            reseeded=[tuple(item) for item in record["reseeded"]],
            finishing=record["finishing"],
        )
