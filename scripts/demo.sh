#!/usr/bin/env bash
# End-to-end demo on one machine: make a sample data set from a known mixture whose clusters
# overlap (so EM has work to do: the log shows the log-likelihood climbing over several
# iterations), fit it with `spark-submit jobs/fit_gmm.py` on local[2], compare the fitted mixture
# with the truth, and write an HTML report with pictures (out/demo/report.html).
# Needs only Python >= 3.10 and Java 17; creates/reuses .venv (the same one as scripts/test.sh).
# Rerunnable: everything under out/demo/ is replaced.
#   ./scripts/demo.sh                 # 200000 rows, k=4, 5 features
#   DEMO_ROWS=1000000 ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
source scripts/env.sh
ensure_venv test

OUT="$ROOT/out/demo"
ROWS="${DEMO_ROWS:-200000}"
K="${DEMO_K:-4}"
DIMS="${DEMO_DIMS:-5}"
mkdir -p "$OUT"

echo "== 1/3 sample data: $ROWS rows from a known $K-component mixture in $DIMS dimensions, clusters overlapping"
"$VENV/bin/python" scripts/make_data.py --rows "$ROWS" --k "$K" --dims "$DIMS" --out "$OUT/data.parquet"

FEATURES="f0"
for ((i = 1; i < DIMS; i++)); do FEATURES="$FEATURES,f$i"; done

echo "== 2/3 fit: spark-submit --master local[2] jobs/fit_gmm.py (log on stderr, JSON summary on stdout)"
if ! "$VENV/bin/spark-submit" \
    --master 'local[2]' \
    --properties-file "$ROOT/conf/spark-defaults.conf" \
    --driver-java-options "-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties" \
    jobs/fit_gmm.py \
    --input "$OUT/data.parquet" \
    --features "$FEATURES" \
    --k "$K" \
    --model-out "$OUT/model" \
    --predictions-out "$OUT/predictions.parquet" \
    --mode overwrite \
    --report "$OUT/report.html" \
    > "$OUT/job.out"; then
    echo "demo: the job failed; its last stdout line was:" >&2
    tail -n 1 "$OUT/job.out" >&2
    exit 1
fi
echo "job summary line: $(tail -n 1 "$OUT/job.out")"

echo "== 3/3 result: the fit beside the truth"
"$VENV/bin/python" - "$OUT" <<'PY'
"""Fitted mixture (from the saved model, read without Spark) against the true one."""
import itertools
import json
import sys

import numpy as np
import pyarrow.parquet as pq

out = sys.argv[1]
with open(f"{out}/job.out") as f:
    job = json.loads(f.read().strip().splitlines()[-1])
with open(f"{out}/data.truth.json") as f:
    truth = json.load(f)
from spark_gmm.persistence import read_arrays

saved = read_arrays(f"{out}/model")  # the model's files, read with pyarrow alone (no Spark)
trained = saved.metadata["summary"]
weights, means, covariances = saved.weights, saved.means, saved.covariances
k, d = means.shape
true_weights, true_means = np.array(truth["weights"]), np.array(truth["means"])
true_covariances = np.array(truth["covariances"]).reshape(-1, d, d)

# Which true component each fitted one is: the pairing with the smallest total mean distance.
distance = np.linalg.norm(means[:, None, :] - true_means[None, :, :], axis=2)
if k <= 8 and len(true_means) == k:
    match = np.array(min(itertools.permutations(range(k)), key=lambda p: distance[range(k), p].sum()))
else:
    match = distance.argmin(axis=1)

predictions = pq.read_table(f"{out}/predictions.parquet", columns=["component", "prediction"])
predicted = predictions.column("prediction").to_numpy(zero_copy_only=False)
drawn_from = predictions.column("component").to_numpy()
scored = ~np.isnan(predicted.astype(np.float64))
predicted = predicted[scored].astype(np.int64)
sizes = np.bincount(predicted, minlength=k)
agreement = np.mean(match[predicted] == drawn_from[scored])

rows = job["rows"]
history = np.array(trained["logLikelihoodHistory"]) / trained["totalWeight"]
print(f"k = {job['k']}, {rows} rows, features {', '.join(job['features'])}")
print(
    f"EM: {job['iterations']} iterations, converged: {job['converged']}; log-likelihood per row "
    f"{history[0]:.5f} at the start (k-means||) -> {history[-1]:.5f} ({history[-1] - history[0]:+.5f})"
)
print(f"time: fit {job['fitSeconds']:.1f} s, whole job {job['seconds']:.1f} s (Spark start-up, writes)")
print()
print("fitted component (matched to the true one by mean), and its error:")
print("  comp  weight  (true)  |mean - true|  cov error  rows predicted  (drawn from it)")
for j in range(k):
    t = match[j]
    cov_error = np.linalg.norm(covariances[j] - true_covariances[t]) / np.linalg.norm(true_covariances[t])
    print(
        f"  {j:>4}  {weights[j]:.4f}  ({true_weights[t]:.4f})  {distance[j, t]:>12.4f}  {cov_error:>8.1%}  "
        f"{sizes[j]:>14}  ({truth['counts'][t]})"
    )
fmt = lambda v: "[" + " ".join(f"{x:7.3f}" for x in v) + "]"
print()
for j in range(k):
    print(f"  mean {j}: {fmt(means[j])}   true: {fmt(true_means[match[j]])}")
print()
print(
    f"the predicted cluster is the generating component for {agreement:.1%} of rows; the true mixture "
    f"itself gets {1 - truth['bayesError']:.1%} right (the clusters overlap: Bayes error {truth['bayesError']:.1%})"
)
if not scored.all():
    print(f"{(~scored).sum()} rows had no prediction (invalid features)")
print(f"model: {out}/model   predictions: {out}/predictions.parquet")
PY
echo "report (open it in a browser; pictures embedded): $OUT/report.html"
