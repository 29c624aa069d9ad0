# Sourced by the scripts: a project virtualenv with spark-gmm installed, and Spark using it.
VENV="${SPARK_GMM_VENV:-$PWD/.venv}"

ensure_venv() {  # ensure_venv EXTRA  — create/refresh .venv with spark-gmm[EXTRA]
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "error: Python >= 3.10 is required (set PYTHON=/path/to/python3)" >&2; exit 1
    fi
    if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
        echo "error: Java 17 is required by Spark (install a JDK 17 or set JAVA_HOME)" >&2; exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
    local stamp="$VENV/.spark-gmm-$1" ; local want
    want=$(cat pyproject.toml | cksum)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet -e ".[$1]"
        echo "$want" > "$stamp"
    fi
    export PYSPARK_PYTHON="$VENV/bin/python" PYSPARK_DRIVER_PYTHON="$VENV/bin/python"
}
