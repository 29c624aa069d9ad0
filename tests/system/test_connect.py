"""Fit, transform, save and load through a Spark Connect session (in its own process: a Connect
session cannot share this process with the suite's classic session)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from pyspark.sql import SparkSession
    from spark_gmm import GaussianMixture, GaussianMixtureModel, GaussianMixtureSelection

    spark = SparkSession.builder.remote("local[2]").getOrCreate()
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(c, 1.0, size=(300, 2)) for c in ([0.0, 0.0], [6.0, 6.0])])
    df = spark.createDataFrame([(row.tolist(),) for row in x], ["features"])
    model = GaussianMixture(k=2, seed=1).fit(df)
    predictions = model.transform(df).select("prediction").distinct().count()
    model.save(sys.argv[1])
    loaded = GaussianMixtureModel.load(sys.argv[1])
    selection = GaussianMixtureSelection(GaussianMixture(seed=1), kValues=[1, 2, 3],
                                         covarianceTypes=["full", "diag"]).fit(df)
    print(json.dumps({"means": model.means.tolist(), "loaded": loaded.means.tolist(),
                      "predictions": predictions, "iterations": model.summary.numIter,
                      "bic": model.bic(df), "logLikelihood": model.summary.logLikelihood, "chosen": selection.bestModel.getK(),
                      "candidates": selection.candidates.count(), "sampled": model.sample(50, seed=1).count()}))
    """
)


def test_spark_connect_session(tmp_path):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "model")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    means = sorted(result["means"])
    assert abs(means[0][0]) < 0.3 and abs(means[1][0] - 6.0) < 0.3
    assert result["loaded"] == result["means"]
    assert result["predictions"] == 2
    assert result["chosen"] == 2 and result["candidates"] == 6 and result["sampled"] == 50
    # bic equals -2·LL + p·ln n of the fitted model (p = 2·(2 + 3) + 1 = 11 for k=2, d=2, full).
    assert abs(result["bic"] - (-2 * result["logLikelihood"] + 11 * np.log(600))) < 1e-6 * abs(result["bic"])
