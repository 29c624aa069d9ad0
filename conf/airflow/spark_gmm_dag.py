"""Airflow 2.x DAG: fit a spark-gmm model on the feature table every day, then score the table.

    fit    spark-submit jobs/fit_gmm.py --config gmm.toml \
               --model-out MODELS/<ds> --checkpoint-dir CHECKPOINTS/<ds> \
               --warm-start-from MODELS --label-changes --max-drift ... --mlflow-experiment ...
    score  spark-submit jobs/score_gmm.py --config gmm.toml --model MODELS/<ds>

Needs apache-airflow-providers-apache-spark >= 4.6 (the `deploy_mode` argument; with provider 6.x
install the `[pyspark]` extra, which brings spark-submit) and a `spark_default` connection to a YARN
or Kubernetes master. (On Airflow >= 3.3 the provider's durable mode refuses YARN cluster mode unless
the tasks also set yarn_track_via_rm_api=True or durable=False.) Copy this file into the DAGs
folder. Everything else comes from the spark-gmm checkout at SPARK_GMM_HOME on the Airflow workers,
where spark-submit runs.

The shared settings (input table, features, k, predictions table) are in conf/gmm.toml. This file
only adds what changes per run: `{{ ds }}` (the run's logical date) makes the model and checkpoint
directories dated. Airflow renders `application_args`, so score reads the model that the same run's
fit wrote, and a retried or cleared run writes to the same directories again. The fit resumes from
its checkpoint, and --mode overwrite in gmm.toml lets it replace a saved model.

Each day's fit is a warm refit: --warm-start-from starts EM from the latest model saved under
MODELS before the run's date (yesterday's, or the last day that succeeded; a cold fit on the very
first run) and aligns the new model to it, so component ids stay stable from day to day
(docs/recurring.md). The run is logged to MLflow: parameters, the log-likelihood per iteration, the
drift, the model and the report; the tracking URI reaches the driver through MLFLOW_TRACKING_URI
(SPARK_CONF below), and the cluster's Python needs mlflow (pip install 'spark-gmm[mlflow]').

The job exits with code 0 on success, 2 on a bad flag or config, 1 when it cannot run and 3 when
the drift exceeds --max-drift (after the model is saved). The task fails on any non-zero code: a
drift alarm stops the run before score publishes the new segments, and the failure e-mail or
callback is the alert. Check the drift (the JSON line, the MLflow run), then mark the fit task
success to let score run, or clear it after a fix. A retry of a drift alarm fits the same data
again and fails the same way (spark-submit in cluster mode does not pass the exit code on, so
Airflow cannot tell it from a crash). Its last stdout line (a JSON summary) is in the driver log: in cluster
mode that is the YARN / Kubernetes driver log, not the Airflow task log.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

# The spark-gmm repository (jobs/, conf/gmm.toml, dist/) as deployed on the Airflow workers.
SPARK_GMM_HOME = "/opt/spark-gmm"

# The config, shipped with `files=`. In cluster mode spark-submit copies it into the driver's working
# directory, so the jobs read it as plain "gmm.toml". In client mode (the driver runs on the Airflow
# worker) pass CONFIG itself to --config instead.
CONFIG = f"{SPARK_GMM_HOME}/conf/gmm.toml"

# The spark_gmm package for the driver and the executors, shipped with `py_files=`. Build it from
# the checkout with the package at the root of the archive:
#     cd /opt/spark-gmm && rm -f dist/spark_gmm.zip \
#         && zip -r dist/spark_gmm.zip spark_gmm -x '*__pycache__*'
# It must be a .zip (or .egg). PySpark puts only .zip/.egg/.jar py-files on the executors' Python
# path, so a .whl would reach the driver only. A pure-Python wheel renamed to .zip also works. The
# zip carries spark_gmm alone: the cluster's Python needs its dependencies (numpy, pandas, pyarrow;
# pyspark 4 is the cluster's). If the cluster nodes lack them, ship a packed environment instead, e.g.
#     archives=f"{SPARK_GMM_HOME}/dist/spark_gmm_env.tar.gz#environment"   (venv-pack / conda-pack)
#     conf={..., "spark.pyspark.python": "./environment/bin/python"}
PY_FILES = f"{SPARK_GMM_HOME}/dist/spark_gmm.zip"

# One model and one checkpoint directory per logical date (`{{ ds }}` is rendered by Airflow).
MODELS = "s3a://lake/models/events_gmm"
MODEL_DIR = MODELS + "/{{ ds }}"
CHECKPOINT_DIR = "s3a://lake/checkpoints/events_gmm/{{ ds }}"

# spark-submit settings shared by both tasks.
SPARK_CONF = {
    # Airflow owns the retries: one YARN application attempt per task try.
    "spark.yarn.maxAppAttempts": "1",
    # The MLflow tracking server, for the driver (YARN cluster mode; on Kubernetes use
    # spark.kubernetes.driverEnv.MLFLOW_TRACKING_URI).
    "spark.yarn.appMasterEnv.MLFLOW_TRACKING_URI": "https://mlflow.example.com",
    # On Kubernetes, spark-submit uploads the local application, files and py_files here:
    # "spark.kubernetes.file.upload.path": "s3a://lake/tmp/spark-uploads",
}

default_args = {
    "owner": "data-platform",
    "retries": 2,  # a retried fit resumes from its checkpoint
    "retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=4),
}

with DAG(
    dag_id="spark_gmm_daily",
    description="Fit a Gaussian mixture on lake.events_features, then score it (spark-gmm)",
    schedule="@daily",  # Airflow >= 2.4; `schedule_interval` on older versions
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # the predictions table is overwritten: one run at a time
    default_args=default_args,
    tags=["spark-gmm"],
) as dag:
    fit = SparkSubmitOperator(
        task_id="fit",
        conn_id="spark_default",
        deploy_mode="cluster",  # YARN or Kubernetes; Spark standalone cannot run Python in cluster mode
        application=f"{SPARK_GMM_HOME}/jobs/fit_gmm.py",
        files=CONFIG,
        py_files=PY_FILES,
        conf=SPARK_CONF,
        name="spark-gmm-fit-{{ ds }}",
        application_args=[
            "--config", "gmm.toml",
            "--model-out", MODEL_DIR,
            "--checkpoint-dir", CHECKPOINT_DIR,
            # Start from and align to the latest earlier model under MODELS; cold on the first day.
            "--warm-start-from", MODELS,
            "--label-changes",  # one more pass: the share of rows whose segment id changed
            "--max-drift", "meanShift=1,weightChange=0.05,labelChange=0.1",
            "--mlflow-experiment", "events_gmm",
        ],
    )

    score = SparkSubmitOperator(
        task_id="score",
        conn_id="spark_default",
        deploy_mode="cluster",
        application=f"{SPARK_GMM_HOME}/jobs/score_gmm.py",
        files=CONFIG,
        py_files=PY_FILES,
        conf=SPARK_CONF,
        name="spark-gmm-score-{{ ds }}",
        application_args=[
            "--config", "gmm.toml",
            "--model", MODEL_DIR,  # the model this run's fit saved
        ],
    )

    fit >> score
