"""EM checkpoints: the state after an M-step, saved so a killed fit resumes to the same model.

Checkpoints go into one of two slots, alternately, so a fit killed while writing one slot still has
the other. A slot holds ``arrays/`` (the current and the previous model, in the fit's shifted
coordinates, as the exact float64 arrays of its family's `to_arrays`, payloads of `codec`) and
``state/`` (one JSON line: the iteration, the objective history, the arrays' shapes, the fingerprint
and the write's id), written last. A slot whose arrays were not written by the write its state
names — a kill between the two writes — is skipped. Any model family checkpoints this way
(`families.ModelFamily.to_arrays`, `from_arrays`): Gaussian mixtures and latent class models.

The fingerprint names the data (row count, total weight and the packing pass's content digest, which
ignores row order and partitioning) and every setting that changes the model (for a Gaussian fit k,
regCovar, tol, seed, initMode, the initial model's digest, dtype, covarianceType; the estimator
chooses the keys). A checkpoint whose fingerprint
differs is refused, naming the differing keys. `maxIter` only says where EM stops, not where it
goes: a checkpoint at iteration i lies on the path of any fit with maxIter ≥ i, so a larger maxIter
continues a finished fit; a maxIter below the checkpoint's iteration is refused.
"""

from __future__ import annotations

import json
import logging
import uuid

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

from . import codec
from .em import EMState, FitSettings

log = logging.getLogger("spark_gmm")

SLOTS = ("slot-0", "slot-1")
_MODELS = ("mixture.", "previous.")
_STATE_KEYS = {
    "writeId", "fingerprint", "iteration", "shapes", "hasPrevious", "history", "seconds", "empty", "reseeded",
    "finishing",
}


class CheckpointMismatchError(ValueError):
    """The checkpoint directory holds a fit of other data or other settings."""


class Checkpointer:
    """Saves every `interval`-th EM state of the fit `settings` describes under `directory`;
    `latest()` reads the newest back."""

    def __init__(self, spark: SparkSession, directory: str, interval: int, fingerprint: dict, settings: FitSettings):
        self.spark, self.directory, self.interval = spark, directory.rstrip("/"), interval
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back
        self.settings, self.max_iter = settings, settings.max_iter

    def save(self, state: EMState) -> None:
        if self.interval < 1 or state.iteration % self.interval:
            return
        slot = f"{self.directory}/{SLOTS[(state.iteration // self.interval) % 2]}"
        write_id = uuid.uuid4().hex
        arrays = {}
        for prefix, model in zip(_MODELS, (state.mixture, state.previous)):
            if model is not None:
                arrays.update({prefix + name: a for name, a in self.settings.family.to_arrays(model).items()})
        codec.write(self.spark, f"{slot}/arrays", arrays, write_id, overwrite=True)
        record = {
            "writeId": write_id,
            "fingerprint": self.fingerprint,
            "maxIter": self.max_iter,
            "iteration": state.iteration,
            "shapes": {name: list(a.shape) for name, a in arrays.items()},
            "hasPrevious": state.previous is not None,
            "history": state.history,
            "seconds": state.seconds,
            "empty": state.empty,
            "reseeded": state.reseeded,
            "finishing": state.finishing,
            "floor": None if state.floor is None else state.floor.tolist(),
            "flooredUntil": state.floored_until,
        }
        self.spark.createDataFrame([(json.dumps(record),)], "value string").coalesce(1).write.mode(
            "overwrite"
        ).text(f"{slot}/state")

    def _record(self, slot: str) -> dict | None:
        """The slot's state, or None when it is absent or cut short by a kill."""
        path = f"{self.directory}/{slot}/state"
        try:
            if not codec.exists(self.spark, path):
                return None
            lines = [row[0] for row in self.spark.read.text(path).collect()]
            record = json.loads(lines[0])
            complete = isinstance(record, dict) and _STATE_KEYS <= set(record)
            return {**record, "slot": slot} if complete else None
        except (AnalysisException, IndexError, ValueError):
            return None

    def _check(self, record: dict) -> None:
        found = record.get("fingerprint") or {}
        changed = sorted(
            key for key in set(found) | set(self.fingerprint) if found.get(key) != self.fingerprint.get(key)
        )
        if changed:
            raise CheckpointMismatchError(
                f"checkpoint directory {self.directory} holds a fit of other data or settings "
                f"(differs in: {', '.join(changed)}); use another directory or remove it to start afresh"
            )
        if record["iteration"] > self.max_iter:
            raise CheckpointMismatchError(
                f"checkpoint directory {self.directory} holds a fit at iteration {record['iteration']}, "
                f"beyond maxIter={self.max_iter} (differs in: maxIter); raise maxIter to continue it, or "
                "use another directory"
            )

    def latest(self) -> EMState | None:
        """The newest complete checkpoint, or None; refuses one of other data or settings."""
        records = [r for r in (self._record(slot) for slot in SLOTS) if r is not None]
        for record in sorted(records, key=lambda r: r["iteration"], reverse=True):
            self._check(record)
            prefixes = _MODELS if record["hasPrevious"] else _MODELS[:1]
            shapes = {name: tuple(shape) for name, shape in record["shapes"].items()}
            path = f"{self.directory}/{record['slot']}/arrays"
            try:
                arrays = codec.read(self.spark, path, shapes, record["writeId"], f"{record['slot']}/state")
            except Exception as why:  # noqa: BLE001 — any unreadable slot: the other one may do
                first = (str(why).strip().splitlines() or [type(why).__name__])[0]
                log.warning("checkpoint %s is incomplete (%s); trying the other slot", path, first)
                continue
            if record.get("maxIter") != self.max_iter:
                log.info("checkpoint written with maxIter=%s; continuing to maxIter=%d",
                         record.get("maxIter"), self.max_iter)
            models = [self._model(arrays, prefix) for prefix in prefixes]
            return EMState(
                iteration=record["iteration"],
                mixture=models[0],
                previous=models[1] if record["hasPrevious"] else None,
                history=record["history"],
                seconds=record["seconds"],
                empty=record["empty"],
                reseeded=[tuple(item) for item in record["reseeded"]],
                finishing=record["finishing"],
                floor=None if record.get("floor") is None else np.array(record["floor"], dtype=np.float64),
                floored_until=record.get("flooredUntil", 0),
            )
        return None

    def _model(self, arrays: dict[str, np.ndarray], prefix: str):
        own = {name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}
        return self.settings.family.from_arrays(own, self.settings)
