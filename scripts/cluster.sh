#!/usr/bin/env bash
# A small Spark standalone cluster on this machine, for trying spark-gmm jobs against a real
# master/worker setup: one master and two workers on 127.0.0.1, run from the pyspark installed
# in .venv (pip's pyspark has no start-master.sh, so the daemons are started with spark-class).
# Executors run .venv/bin/python unless the submitter sets PYSPARK_PYTHON. State (pids, logs, worker dirs) goes to
# $SPARK_GMM_CLUSTER_DIR (default out/cluster/).
#   scripts/cluster.sh start     # waits for 2 ALIVE workers; last stdout line is the master URL
#   source scripts/env.sh && ensure_venv test   # sets PYSPARK_PYTHON, which spark-submit needs
#   SPARK_LOCAL_IP=127.0.0.1 "$VENV/bin/spark-submit" --master spark://127.0.0.1:7077 jobs/fit_gmm.py ...
#   scripts/cluster.sh status    # exit status 0 only if master and both workers are running
#   scripts/cluster.sh stop
# Settings (env): SPARK_GMM_MASTER_PORT (7077), SPARK_GMM_MASTER_WEBUI_PORT (a free port),
#   SPARK_GMM_WORKER_CORES (1), SPARK_GMM_WORKER_MEMORY (2g; an app's spark.executor.memory,
#   default 1g, must fit in it or the app waits forever for executors), SPARK_GMM_START_TIMEOUT (60 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="${SPARK_GMM_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
DIR="${SPARK_GMM_CLUSTER_DIR:-$ROOT/out/cluster}"
WORKERS=(worker1 worker2)

[ -x "$PY" ] || { echo "error: no $PY; run: source scripts/env.sh && ensure_venv test" >&2; exit 1; }

alive() {  # alive NAME — the daemon from NAME.pid is running (and is still a Spark daemon)
    local pid
    pid=$(cat "$DIR/$1.pid" 2>/dev/null) || return 1
    ps -p "$pid" -o args= 2>/dev/null | grep -q 'org\.apache\.spark\.deploy\.'
}

load_state() {  # ports of the running cluster, else of the one to start
    MASTER_PORT="${SPARK_GMM_MASTER_PORT:-7077}" WEBUI_PORT="${SPARK_GMM_MASTER_WEBUI_PORT:-}"
    if [ -f "$DIR/ports" ]; then source "$DIR/ports"; fi
}

master_url() { echo "spark://127.0.0.1:$MASTER_PORT"; }

alive_workers() {  # number of ALIVE workers the master reports ("none" if it does not answer)
    "$PY" - "$WEBUI_PORT" <<'EOF' 2>/dev/null || echo none
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/json/", timeout=2) as r:
    print(json.load(r).get("aliveworkers", 0))
EOF
}

wait_for() {  # wait_for N NAME... — until the master reports N ALIVE workers; fail if a NAME dies
    local want=$1 name dead; shift
    until [ "$(alive_workers)" = "$want" ]; do
        dead=""
        for name in "$@"; do alive "$name" || dead="$dead $name"; done
        if [ -n "$dead" ] || [ "$SECONDS" -ge "$DEADLINE" ]; then
            echo "error: the master did not report $want ALIVE workers within ${TIMEOUT}s${dead:+ (exited:$dead)}" >&2
            for name in master "${WORKERS[@]}"; do
                echo "--- tail of $DIR/$name.log" >&2; tail -n 15 "$DIR/$name.log" >&2 || true
            done
            do_stop; exit 1
        fi
        sleep 0.5
    done
}

launch() {  # launch NAME CLASS ARGS... — run a Spark daemon in the background
    setsid nohup "$SPARK_HOME/bin/spark-class" "$2" "${@:3}" >"$DIR/$1.log" 2>&1 </dev/null &
    echo $! >"$DIR/$1.pid"
}

do_stop() {
    local name pid pids=()
    for name in "${WORKERS[@]}" master; do
        if alive "$name"; then pid=$(cat "$DIR/$name.pid"); kill "$pid" 2>/dev/null || true; pids+=("$pid"); fi
        rm -f "$DIR/$name.pid"
    done
    for _ in $(seq 1 40); do  # up to 20 s for a clean exit, then SIGKILL
        local left=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=("${left[@]}")
        [ ${#pids[@]} -eq 0 ] && break
        sleep 0.5
    done
    [ ${#pids[@]} -eq 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
    rm -f "$DIR/ports"
}

do_start() {
    load_state
    local name n=0 all=1
    for name in master "${WORKERS[@]}"; do alive "$name" && n=$((n + 1)) || all=0; done
    if [ "$all" = 1 ]; then
        echo "cluster already running (master UI http://127.0.0.1:$WEBUI_PORT)"; master_url; return
    fi
    if [ "$n" -gt 0 ]; then echo "cluster partly running; restarting it" >&2; do_stop; fi

    MASTER_PORT="${SPARK_GMM_MASTER_PORT:-7077}"
    WEBUI_PORT="${SPARK_GMM_MASTER_WEBUI_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
    if "$PY" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$MASTER_PORT" 2>/dev/null; then
        echo "error: port $MASTER_PORT is in use; set SPARK_GMM_MASTER_PORT to a free port" >&2; exit 1
    fi
    mkdir -p "$DIR"
    printf 'MASTER_PORT=%s\nWEBUI_PORT=%s\n' "$MASTER_PORT" "$WEBUI_PORT" >"$DIR/ports"

    SPARK_HOME="$("$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
    # Executors run the Python the driver names (its PYSPARK_PYTHON, else "python3" looked up on
    # the workers' PATH), so put the venv first on PATH too: a driver without PYSPARK_PYTHON works.
    export SPARK_HOME SPARK_LOCAL_IP=127.0.0.1 PYSPARK_PYTHON="$PY" PATH="$VENV/bin:$PATH"
    export SPARK_DAEMON_MEMORY="${SPARK_DAEMON_MEMORY:-512m}"  # the daemons' own heap, not the executors'
    TIMEOUT="${SPARK_GMM_START_TIMEOUT:-60}"; DEADLINE=$((SECONDS + TIMEOUT))
    launch master org.apache.spark.deploy.master.Master \
        --host 127.0.0.1 --port "$MASTER_PORT" --webui-port "$WEBUI_PORT"
    wait_for 0 master  # workers started before the master is up retry only after several seconds
    for name in "${WORKERS[@]}"; do
        rm -rf "${DIR:?}/$name"; mkdir -p "$DIR/$name"  # executor dirs and logs of earlier runs
        launch "$name" org.apache.spark.deploy.worker.Worker \
            --host 127.0.0.1 --webui-port 0 --work-dir "$DIR/$name" \
            --cores "${SPARK_GMM_WORKER_CORES:-1}" --memory "${SPARK_GMM_WORKER_MEMORY:-2g}" \
            "$(master_url)"
    done
    wait_for "${#WORKERS[@]}" master "${WORKERS[@]}"
    echo "cluster up in $((SECONDS + TIMEOUT - DEADLINE))s: ${#WORKERS[@]} workers, master UI http://127.0.0.1:$WEBUI_PORT, logs in $DIR"
    master_url
}

do_status() {
    load_state
    local name up=() down=()
    for name in master "${WORKERS[@]}"; do
        if alive "$name"; then up+=("$name"); else down+=("$name"); fi
    done
    if [ ${#down[@]} -eq 0 ]; then
        echo "running: $(master_url) ($(alive_workers) ALIVE workers, master UI http://127.0.0.1:$WEBUI_PORT)"
    elif [ ${#up[@]} -eq 0 ]; then
        echo "not running (start would use $(master_url))"; exit 1
    else
        echo "partly running (${up[*]} up, ${down[*]} down): $(master_url); run: scripts/cluster.sh stop" ; exit 1
    fi
}

case "${1:-}" in
    start) do_start ;;
    stop) do_stop; echo "cluster stopped" ;;
    status) do_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
