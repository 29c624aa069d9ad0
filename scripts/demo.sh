#!/usr/bin/env bash
# End-to-end demo on one machine: make a sample data set from a known mixture, fit it with
# `spark-submit jobs/fit_gmm.py` on local[2], compare the fitted mixture with the truth, and write
# an HTML report with pictures (out/demo/report.html).
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

echo "== 1/3 sample data: $ROWS rows from a known $K-component mixture in $DIMS dimensions"
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

echo "== 3/3 result"
"$VENV/bin/python" - "$OUT" <<'PY'
"""Fitted mixture (from the saved model, read without Spark) against the true one."""
import itertools
import json
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

out = sys.argv[1]
with open(f"{out}/job.out") as f:
    job = json.loads(f.read().strip().splitlines()[-1])
with open(f"{out}/data.truth.json") as f:
    truth = json.load(f)
model = pq.read_table(f"{out}/model/data").sort_by("component")
weights = model.column("weight").to_numpy()
means = np.array(model.column("mean").to_pylist())
k, d = means.shape
true_weights, true_means = np.array(truth["weights"]), np.array(truth["means"])

# Which true component each fitted one is: the pairing with the smallest total mean distance.
distance = np.linalg.norm(means[:, None, :] - true_means[None, :, :], axis=2)
if k <= 8 and len(true_means) == k:
    match = min(itertools.permutations(range(k)), key=lambda p: distance[range(k), p].sum())
else:
    match = distance.argmin(axis=1)

predictions = pq.read_table(f"{out}/predictions.parquet", columns=["prediction"]).column("prediction")
sizes = {row["values"]: row["counts"] for row in pc.value_counts(predictions).to_pylist()}

rows = job["rows"]
print(f"k = {job['k']}, {rows} rows, features {', '.join(job['features'])}")
print(
    f"log-likelihood = {job['logLikelihood']:.6g} ({job['logLikelihood'] / rows:.5f} per row); "
    f"EM iterations: {job['iterations']}, converged: {job['converged']}"
)
print(f"time: fit {job['fitSeconds']:.1f} s, whole job {job['seconds']:.1f} s (Spark start-up, writes)")
print()
fmt = lambda v: "[" + " ".join(f"{x:8.3f}" for x in v) + "]"
for j in range(k):
    t = match[j]
    print(
        f"component {j}: weight {weights[j]:.4f} (true {true_weights[t]:.4f}, "
        f"{truth['counts'][t] / truth['rows']:.4f} in the sample), "
        f"{sizes.get(j, 0)} rows predicted (drawn from it: {truth['counts'][t]})"
    )
    print(f"  mean       {fmt(means[j])}")
    print(f"  true mean  {fmt(true_means[t])}   distance {distance[j, t]:.4f}")
unassigned = sizes.get(None, 0)
if unassigned:
    print(f"{unassigned} rows had no prediction (invalid features)")
worst = max(distance[j, match[j]] for j in range(k))
print()
print(f"largest distance between a fitted and its true mean: {worst:.4f}")
print(f"model: {out}/model   predictions: {out}/predictions.parquet")
PY
echo "report (open it in a browser; pictures embedded): $OUT/report.html"
