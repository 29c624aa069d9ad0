"""The jobs on a real Spark standalone cluster (scripts/cluster.sh: a master and two workers on
127.0.0.1), with spark_gmm *shipped* to the driver and the executors as a --py-files zip rather
than installed: both run a throwaway interpreter that has numpy/pyarrow/pandas/pyspark but cannot
import spark_gmm on its own.

Slow (~1 min: the cluster, then a spark-submit starting a driver and two executor JVMs). The fit
job's --predictions-out applies the model on the cluster as the score job would (the score job
itself runs under spark-submit in test_job.py).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from spark_gmm import GaussianMixtureModel

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)  # the .venv pytest runs from, with spark_gmm installed (editable)
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
TIMEOUT = 300  # seconds per spark-submit
ROWS_PER_BLOB = 1000
CENTERS = np.array([[0.0, 0.0], [10.0, 10.0]])


def _tail(text, n=3000):
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def _run(cmd, *, env=None, cwd=None, timeout=TIMEOUT):
    """Run cmd in its own process group (a timeout kills the JVM *and* its Python children)."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n"
                    f"--- stdout tail\n{_tail(out)}\n--- stderr tail\n{_tail(err)}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check(result, what):
    if result.returncode != 0:
        pytest.fail(f"{what} exited with {result.returncode}\n"
                    f"--- stdout tail\n{_tail(result.stdout)}\n--- stderr tail\n{_tail(result.stderr)}")
    return result


def _summary(result, what):
    lines = result.stdout.strip().splitlines()
    assert lines, f"{what}: no stdout\n--- stderr tail\n{_tail(result.stderr)}"
    summary = json.loads(lines[-1])
    assert summary.get("status") == "ok", f"{what}: {summary}\n--- stderr tail\n{_tail(result.stderr)}"
    return summary


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra):
    """The environment without anything that could put the source tree on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """scripts/cluster.sh on a free (non-default) master port, state under tmp; always stopped."""
    state = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    env = _clean_env(SPARK_GMM_CLUSTER_DIR=str(state), SPARK_GMM_MASTER_PORT=str(port),
                     SPARK_GMM_START_TIMEOUT="120")
    t0 = time.monotonic()
    try:
        start = _check(_run(["bash", CLUSTER_SH, "start"], env=env, timeout=180), "cluster.sh start")
        url = start.stdout.strip().splitlines()[-1]
        assert url == f"spark://127.0.0.1:{port}", start.stdout
        print(f"\ncluster up in {time.monotonic() - t0:.1f}s at {url}")
        yield url, state
    finally:
        t1 = time.monotonic()
        stop = _run(["bash", CLUSTER_SH, "stop"], env=env, timeout=120)
        status = _run(["bash", CLUSTER_SH, "status"], env=env, timeout=60)
        print(f"cluster stopped in {time.monotonic() - t1:.1f}s")
        assert stop.returncode == 0, _tail(stop.stdout) + _tail(stop.stderr)
        assert status.returncode != 0 and "not running" in status.stdout, status.stdout + status.stderr


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv of the .venv's base interpreter that sees .venv's site-packages through a .pth line,
    so numpy/pyarrow/pandas/pyspark import but spark_gmm does not: .pth files inside a directory
    added by a .pth are not processed, so the editable install's import hook stays inactive.
    Every start of it also leaves a probe file (pid -> cwd) so the test sees where it ran."""
    assert sys.prefix != sys.base_prefix, "run the tests from the project's virtualenv (.venv)"
    base = getattr(sys, "_base_executable", None)
    if not base or not Path(base).is_file():  # the interpreter .venv was made from, per pyvenv.cfg
        cfg = {k.strip(): v.strip() for k, _, v in
               (line.partition("=") for line in (VENV / "pyvenv.cfg").read_text().splitlines())}
        base = str(Path(cfg["home"]) / f"python{sys.version_info.major}.{sys.version_info.minor}")
    where = tmp_path_factory.mktemp("bare")
    venv, probes, cwd = where / "venv", where / "probes", where / "cwd"
    probes.mkdir()
    cwd.mkdir()
    _check(_run([base, "-m", "venv", "--without-pip", venv], env=_clean_env(), timeout=120), "python -m venv")
    python = venv / "bin" / "python"
    site = _check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       env=_clean_env(), cwd=cwd, timeout=60), "sysconfig").stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "spark_gmm_test_venv.pth").write_text("".join(f"{p}\n" for p in ours))
    (Path(site) / "spark_gmm_test_probe.pth").write_text(
        f"import os; open(os.path.join({str(probes)!r}, str(os.getpid())), 'w').write(os.getcwd())\n")

    env = _clean_env()
    deps = _run([python, "-c", "import numpy, pyarrow, pandas, pyspark"], env=env, cwd=cwd, timeout=120)
    assert deps.returncode == 0, deps.stderr
    own = _run([python, "-c", "import spark_gmm; print(spark_gmm.__file__)"], env=env, cwd=cwd, timeout=60)
    assert own.returncode != 0 and "No module named 'spark_gmm'" in own.stderr, (
        "the throwaway interpreter must not import spark_gmm (is it installed non-editable in .venv?): "
        + own.stdout + own.stderr)
    for p in probes.iterdir():
        p.unlink()
    return python, probes, cwd


@pytest.fixture(scope="module")
def points(spark, tmp_path_factory):
    """Two well separated blobs, 4 Parquet files (so both executors get tasks); id < 1000: blob 0."""
    rng = np.random.default_rng(11)
    x = np.vstack([rng.normal(c, 1.0, size=(ROWS_PER_BLOB, 2)) for c in CENTERS])
    rows = [(i, float(a), float(b)) for i, (a, b) in enumerate(x)]
    path = str(tmp_path_factory.mktemp("points") / "points.parquet")
    spark.createDataFrame(rows, "id long, x double, y double").repartition(4).write.parquet(path)
    return path


def _zip_package(dest: Path) -> Path:
    """spark_gmm/ -> spark_gmm.zip with spark_gmm/ at the zip's root (no __pycache__)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for dirpath, dirnames, filenames in os.walk(ROOT / "spark_gmm"):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith((".pyc", ".pyo")):
                    path = Path(dirpath) / name
                    z.write(path, path.relative_to(ROOT).as_posix())
    with zipfile.ZipFile(dest) as z:
        assert "spark_gmm/__init__.py" in z.namelist() and "spark_gmm/cli/commands.py" in z.namelist()
    return dest


def _probes(probes: Path) -> list[Path]:
    return [Path(p.read_text()) for p in probes.iterdir()]


def test_jobs_on_standalone_cluster_with_shipped_package(cluster, bare_python, points, spark, tmp_path):
    url, state = cluster
    python, probes, cwd = bare_python
    package = _zip_package(tmp_path / "spark_gmm.zip")
    model, predictions = tmp_path / "model", tmp_path / "predictions"
    env = _clean_env(PYSPARK_PYTHON=str(python), PYSPARK_DRIVER_PYTHON=str(python), SPARK_LOCAL_IP="127.0.0.1")
    submit = [VENV / "bin" / "spark-submit", "--master", url, "--py-files", package,
              "--conf", "spark.executor.memory=1g", "--conf", "spark.ui.enabled=false"]

    t0 = time.monotonic()
    fit = _check(_run(submit + [ROOT / "jobs" / "fit_gmm.py", "--input", points, "--features", "x,y", "--k", "2",
                                "--seed", "1", "--model-out", model, "--predictions-out", predictions],
                      env=env, cwd=cwd), "fit job")
    t1 = time.monotonic()
    fit_summary = _summary(fit, "fit job")
    assert fit_summary["command"] == "fit" and fit_summary["k"] == 2 and fit_summary["rows"] == 2 * ROWS_PER_BLOB
    assert sorted(fit_summary["clusterSizes"]) == [ROWS_PER_BLOB, ROWS_PER_BLOB]

    # the driver and the executors ran the interpreter that cannot import spark_gmm by itself
    ran_in = _probes(probes)
    assert cwd in ran_in, f"the driver did not run the throwaway interpreter: {ran_in}"
    executors = [p for p in ran_in if p.is_relative_to(state)]
    assert executors, f"no executor ran the throwaway interpreter: {ran_in}"
    assert all((p / "spark_gmm.zip").is_file() for p in executors)  # fetched into the executor's dir

    workers = sorted({p.relative_to(state).parts[0] for p in _probes(probes) if p.is_relative_to(state)})
    print(f"fit job {t1 - t0:.1f}s; executor Python ran on {workers}")

    loaded = GaussianMixtureModel.load(str(model))
    means = np.asarray(loaded.means)
    np.testing.assert_allclose(means[np.argsort(means[:, 0])], CENTERS, atol=0.3)

    rows = spark.read.parquet(str(predictions)).select("id", "x", "y", "prediction").collect()
    assert sorted(r.id for r in rows) == list(range(2 * ROWS_PER_BLOB))
    # each blob is one component, and the two blobs are different components
    by_blob = [{r.prediction for r in rows if (r.id >= ROWS_PER_BLOB) == blob} for blob in (False, True)]
    assert all(len(s) == 1 for s in by_blob) and by_blob[0] != by_blob[1], by_blob
