"""The recurring-fit steps of `fit` and `select` (docs/recurring.md): finding the previous model
(given, or the latest under a dated parent directory), aligning the new model to it and checking its
drift against --max-drift."""

from __future__ import annotations

import logging
import os
import re

from .errors import JobError, short_message
from .storage import hadoop_filesystem

log = logging.getLogger("spark_gmm.job")

#: The exit code of a job whose outputs are written but whose drift exceeded --max-drift.
DRIFT_EXIT_CODE = 3


def _saved_models(spark, parent: str) -> list[str]:
    """Names of the sub-directories of `parent` that hold a saved model (their metadata/ is written
    last, so an interrupted save is not among them)."""
    filesystem = hadoop_filesystem(spark)
    if filesystem is not None:
        try:
            fs, path = filesystem(parent)
            if not fs.exists(path):
                return []
            return [
                status.getPath().getName() for status in fs.listStatus(path)
                if status.isDirectory() and fs.exists(filesystem(f"{status.getPath().toString()}/metadata")[1])
            ]
        except Exception as error:  # noqa: BLE001 - an unreachable file system: one clear line
            raise JobError(f"cannot list the models under '{parent}': {short_message(error)}") from None
    local = re.sub(r"^file:(//)?", "", parent)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", parent) and not parent.startswith("file:"):
        raise JobError(f"cannot list '{parent}' without a Hadoop file system (Spark Connect); use --initial-model")
    if not os.path.isdir(local):
        return []
    return [name for name in os.listdir(local) if os.path.isdir(os.path.join(local, name, "metadata"))]


def latest_model(spark, parent: str, model_out: str) -> str | None:
    """The path of the latest (greatest name) model under `parent`; when --model-out is itself under
    `parent`, the latest whose name sorts before it, so a retry or a backfill never starts from its
    own or a later day's model."""
    parent = parent.rstrip("/")
    head, _, own = model_out.rstrip("/").rpartition("/")
    names = sorted(name for name in _saved_models(spark, parent) if head != parent or name < own)
    return f"{parent}/{names[-1]}" if names else None


def _load(path: str, flag: str):
    from spark_gmm import GaussianMixtureModel, ModelFormatError

    try:
        return GaussianMixtureModel.load(path)
    except ModelFormatError as error:
        raise JobError(f"{flag} '{path}': {short_message(error)}") from None


def previous_models(spark, args) -> tuple[object, object, dict]:
    """(model to start EM from or None, model to align to or None, summary fields naming them)."""
    initial_path = getattr(args, "initial_model", None)
    align_path = args.align_to
    warm_parent = getattr(args, "warm_start_from", None)
    if warm_parent:
        initial_path = align_path = latest_model(spark, warm_parent, args.model_out)
        if initial_path is None:
            log.warning("no saved model under %s yet: a cold fit, not aligned", warm_parent)
        else:
            log.info("warm start from, and alignment to, %s", initial_path)
    initial = _load(initial_path, "--initial-model") if initial_path else None
    previous = initial if align_path and align_path == initial_path else (
        _load(align_path, "--align-to") if align_path else None
    )
    k = getattr(args, "k", None)
    if initial is not None and k is not None and k != initial.getK():
        if not warm_parent:
            raise JobError(f"--k {k} but the initial model '{initial_path}' has {initial.getK()} components; "
                           "drop --k (the model sets it) or start cold")
        log.warning("--k %d differs from the previous model's %d components: a cold fit, aligned to it",
                    k, initial.getK())
        initial = None
    if initial is None and k is None and getattr(args, "command", None) == "fit":
        raise JobError(f"no previous model under '{warm_parent}' to take k from: give --k for the first fit")
    return initial, previous, {"initialModelPath": initial_path if initial else None, "alignedTo": align_path}


def align(model, previous, df, args) -> tuple[object, dict]:
    """(the model aligned to `previous`, summary fields: the alignment with its drift, and what
    exceeded --max-drift)."""
    from spark_gmm.alignment import exceeded

    model = model.alignTo(previous, args.max_divergence, df if args.label_changes else None)
    figures = model.alignment
    alarms = exceeded(figures, args.max_drift or {})
    ids = figures["componentIds"]
    log.info("aligned to the previous model: component ids %s%s", ids, "".join(
        f"; {c['id']} is new" for c in figures["components"] if c["previousId"] is None))
    for alarm in alarms:
        log.warning("drift beyond --max-drift: %s", alarm)
    return model, {"componentIds": ids, "drift": {k: v for k, v in figures.items() if k != "componentIds"},
                   "driftExceeded": alarms}


def log_to_mlflow(args, model, fields: dict) -> str:
    """Log the job's run to --mlflow-experiment; returns the run id. The outputs are written by
    then, so a tracking server that cannot be reached fails the job with one line saying so."""
    from spark_gmm.mlflow import log_run

    skip = {"config", "notes", "log_level", "mlflow_experiment"}
    params = {
        name: ",".join(map(str, value)) if isinstance(value, list) else value
        for name, value in vars(args).items()
        if name not in skip and value is not None and not isinstance(value, dict)
    }
    params.update({f"maxDrift.{name}": limit for name, limit in (args.max_drift or {}).items()})
    try:
        run_id = log_run(args.mlflow_experiment, model, params, fields, args.report, f"spark-gmm {args.command}")
    except Exception as error:  # noqa: BLE001 - MLflow's own errors: one line, not a trace
        raise JobError(f"cannot log to MLflow experiment '{args.mlflow_experiment}': {short_message(error)}") from None
    log.info("logged to MLflow experiment %s, run %s", args.mlflow_experiment, run_id)
    return run_id
