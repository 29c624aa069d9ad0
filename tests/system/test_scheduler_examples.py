"""The scheduler examples: conf/gmm.toml, the Airflow DAG (conf/airflow/) and the Databricks job
(conf/databricks/). Fast, with no Spark session and no Airflow. The DAG is read with `ast`, plus one
run against stub airflow modules. Every command line the schedulers would pass goes through
`spark_gmm.cli.parse_args`, with Jinja / Databricks `{{ ... }}` templates replaced by a date and the
config path replaced by this checkout's conf/gmm.toml."""

from __future__ import annotations

import ast
import json
import re
import runpy
import sys
import types
from pathlib import Path

import pytest

from spark_gmm.cli import UsageError, parse_args

pytestmark = pytest.mark.slow

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf" / "gmm.toml"
DAG_FILE = ROOT / "conf" / "airflow" / "spark_gmm_dag.py"
DATABRICKS_JOB = ROOT / "conf" / "databricks" / "job.json"
JOB_FILES = {"fit": "jobs/fit_gmm.py", "score": "jobs/score_gmm.py"}
RUN_DATE = "2025-01-15"
TEMPLATE = re.compile(r"\{\{.*?\}\}")


def render(text: str) -> str:
    """A scheduler template (`{{ ds }}`, `{{job.start_time.iso_date}}`) as rendered for RUN_DATE."""
    return TEMPLATE.sub(RUN_DATE, text)


def local_argv(argv: list[str]) -> list[str]:
    """The scheduler's arguments, rendered, with --config pointing at this checkout's config."""
    argv = [render(arg) for arg in argv]
    assert argv.count("--config") == 1, argv
    at = argv.index("--config") + 1
    assert Path(argv[at]).name == CONFIG.name, f"--config {argv[at]} is not a copy of conf/gmm.toml"
    return argv[:at] + [str(CONFIG)] + argv[at + 1 :]


def config_only(command: str):
    return parse_args(command, ["--config", str(CONFIG)])


# -- conf/gmm.toml ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["fit", "score", "select", "report"])
def test_config_parses_and_every_setting_reaches_its_flag(command):
    with open(CONFIG, "rb") as handle:
        raw = tomllib.load(handle)
    tables = ("fit", "score", "select", "report")
    settings = {k: v for k, v in raw.items() if k not in tables} | raw[command]
    args = config_only(command)
    for key, value in settings.items():
        if hasattr(args, key.replace("-", "_")):  # top-level keys reach the commands that have the flag
            expected = value if key != "k-values" else list(range(4, 13))
            assert getattr(args, key.replace("-", "_")) == expected, key
    assert set(raw[command]) <= {k for k in settings if hasattr(args, k.replace("-", "_"))}


def test_config_select_says_it_does_not_read_fit():
    assert config_only("select").notes == [
        f"config file '{CONFIG}': select reads the top-level keys and [select] only; it does not use [fit] "
        "(k, max-iter, tol, seed, model-out, checkpoint-interval, mode)"
    ]


def test_config_select_and_report_do_not_touch_the_scheduled_model():
    fit, select, report = config_only("fit"), config_only("select"), config_only("report")
    assert select.model_out != fit.model_out and select.mode == "errorifexists"
    assert report.model == fit.model_out


def test_config_fit_and_score_share_input_and_model():
    fit, score = config_only("fit"), config_only("score")
    assert (fit.input, fit.features, fit.format) == (score.input, score.features, score.format)
    assert score.model == fit.model_out
    # fit keeps to the model; the predictions are score's. No shared checkpoint directory: each
    # scheduled run passes its own (a fixed one would hold other days' fits).
    assert fit.checkpoint_dir is None and fit.predictions_out is None
    assert score.predictions_out and score.mode == "overwrite"


def test_command_line_overrides_config():
    args = parse_args("fit", ["--config", str(CONFIG), "--k", "3", "--model-out", "/tmp/m"])
    assert (args.k, args.model_out) == (3, "/tmp/m")
    with pytest.raises(UsageError):
        parse_args("fit", ["--config", str(CONFIG), "--k", "0"])


# -- conf/airflow/spark_gmm_dag.py (ast) ------------------------------------------------------------


class Unresolved(Exception):
    pass


def resolve(node: ast.AST, names: dict):
    """The value of a literal expression, module-level constants and f-strings of them included."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise Unresolved(node.id)
        return names[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [resolve(item, names) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {resolve(k, names): resolve(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                if part.conversion != -1 or part.format_spec is not None:
                    raise Unresolved(ast.unparse(part))
                parts.append(str(resolve(part.value, names)))
            else:
                parts.append(resolve(part, names))
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return resolve(node.left, names) + resolve(node.right, names)
    raise Unresolved(ast.unparse(node))


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")


@pytest.fixture(scope="module")
def dag_source():
    """(module constants, {task_id: operator kwargs}, {variable: task_id}, parsed module)."""
    tree = ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))
    names = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name):
                try:
                    names[target.id] = resolve(statement.value, names)
                except Unresolved:
                    pass
    tasks, variables = {}, {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) == "SparkSubmitOperator":
            kwargs = {}
            for keyword in node.keywords:
                try:
                    kwargs[keyword.arg] = resolve(keyword.value, names)
                except Unresolved:
                    kwargs[keyword.arg] = Unresolved
            tasks[kwargs["task_id"]] = kwargs
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and _callee(node.value) == "SparkSubmitOperator"
        ):
            task_id = next(k.value.value for k in node.value.keywords if k.arg == "task_id")
            variables[node.targets[0].id] = task_id
    return names, tasks, variables, tree


def test_dag_has_a_fit_and_a_score_task(dag_source):
    _, tasks, _, _ = dag_source
    assert set(tasks) == {"fit", "score"}
    for kwargs in tasks.values():
        for key in ("application", "application_args", "files", "py_files", "conn_id"):
            assert kwargs.get(key, Unresolved) is not Unresolved, f"{key} is not a literal"


@pytest.mark.parametrize("task", ["fit", "score"])
def test_dag_task_runs_the_job_file(dag_source, task):
    _, tasks, _, _ = dag_source
    application = tasks[task]["application"]
    assert application.endswith("/" + JOB_FILES[task])
    assert (ROOT / JOB_FILES[task]).is_file()


@pytest.mark.parametrize("task", ["fit", "score"])
def test_dag_task_ships_config_and_package(dag_source, task):
    _, tasks, _, _ = dag_source
    kwargs = tasks[task]
    argv = kwargs["application_args"]
    config_arg = argv[argv.index("--config") + 1]
    shipped = [Path(f).name for f in kwargs["files"].split(",")]
    assert config_arg in shipped  # read from the driver's working directory (cluster mode)
    assert kwargs["files"].endswith("conf/gmm.toml")
    # PySpark puts only .zip/.egg/.jar py-files on the executors' path.
    assert all(p.endswith((".zip", ".egg")) for p in kwargs["py_files"].split(","))
    assert kwargs["conn_id"] == "spark_default"


def test_dag_application_args_parse(dag_source):
    _, tasks, _, _ = dag_source
    fit = parse_args("fit", local_argv(tasks["fit"]["application_args"]))
    score = parse_args("score", local_argv(tasks["score"]["application_args"]))
    # The run's date makes the model and checkpoint directories; score reads the same model.
    assert RUN_DATE in fit.model_out and RUN_DATE in fit.checkpoint_dir
    assert score.model == fit.model_out
    # Everything else comes from conf/gmm.toml.
    from_config = config_only("fit")
    assert (fit.input, fit.features, fit.k) == (from_config.input, from_config.features, from_config.k)
    assert score.predictions_out == config_only("score").predictions_out


def test_dag_templates_are_jinja_ds(dag_source):
    _, tasks, _, _ = dag_source
    args = [arg for kwargs in tasks.values() for arg in kwargs["application_args"]]
    templates = {template for arg in args for template in TEMPLATE.findall(arg)}
    assert templates == {"{{ ds }}"}


def test_dag_runs_score_after_fit(dag_source):
    _, _, variables, tree = dag_source
    edges = [
        (variables.get(n.left.id), variables.get(n.right.id))
        for n in ast.walk(tree)
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.RShift)
        and isinstance(n.left, ast.Name) and isinstance(n.right, ast.Name)
    ]
    assert ("fit", "score") in edges


def test_dag_schedule_and_retries(dag_source):
    names, _, _, tree = dag_source
    dag_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _callee(n) == "DAG"]
    assert len(dag_calls) == 1
    keywords = {k.arg: k.value for k in dag_calls[0].keywords}
    assert resolve(keywords["schedule"], names) == "@daily"
    default_args = next(
        s.value for s in tree.body
        if isinstance(s, ast.Assign) and getattr(s.targets[0], "id", None) == "default_args"
    )
    retries = dict(zip([resolve(k, {}) for k in default_args.keys], default_args.values))["retries"]
    assert resolve(retries, {}) >= 1


def test_dag_runs_against_stub_airflow(dag_source, monkeypatch):
    """Executing the file (with stand-ins for airflow and pendulum) builds the same two operators."""
    created, edges = {}, []

    class Operator:
        def __init__(self, **kwargs):
            self.task_id, self.kwargs = kwargs["task_id"], kwargs
            created[self.task_id] = kwargs

        def __rshift__(self, other):
            edges.append((self.task_id, other.task_id))
            return other

    class DAG:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    operators = "airflow.providers.apache.spark.operators.spark_submit"
    stubs = {name: types.ModuleType(name) for name in ("airflow", operators, "pendulum")}
    stubs["airflow"].DAG = DAG
    stubs[operators].SparkSubmitOperator = Operator
    stubs["pendulum"].datetime = lambda *args, **kwargs: (args, kwargs)
    for package in ("airflow.providers", "airflow.providers.apache", "airflow.providers.apache.spark",
                    "airflow.providers.apache.spark.operators"):
        stubs[package] = types.ModuleType(package)
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)

    namespace = runpy.run_path(str(DAG_FILE))
    _, tasks, _, _ = dag_source
    assert created == tasks  # the ast reading above saw what Airflow would get
    assert edges == [("fit", "score")]
    assert namespace["dag"].kwargs["default_args"]["retries"] >= 1


# -- conf/databricks/job.json -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def databricks_job():
    job = json.loads(DATABRICKS_JOB.read_text())
    return job, {task["task_key"]: task for task in job["tasks"]}


def test_databricks_job_has_fit_then_score(databricks_job):
    _, tasks = databricks_job
    assert set(tasks) == {"fit", "score"}
    assert not tasks["fit"].get("depends_on")
    assert tasks["score"]["depends_on"] == [{"task_key": "fit"}]


@pytest.mark.parametrize("task", ["fit", "score"])
def test_databricks_task_runs_the_job_file(databricks_job, task):
    _, tasks = databricks_job
    python_file = tasks[task]["spark_python_task"]["python_file"]
    assert python_file.endswith("/" + JOB_FILES[task])
    assert (ROOT / JOB_FILES[task]).is_file()


def test_databricks_parameters_parse(databricks_job):
    _, tasks = databricks_job
    fit = parse_args("fit", local_argv(tasks["fit"]["spark_python_task"]["parameters"]))
    score = parse_args("score", local_argv(tasks["score"]["spark_python_task"]["parameters"]))
    assert RUN_DATE in fit.model_out and RUN_DATE in fit.checkpoint_dir
    assert score.model == fit.model_out
    assert fit.input == config_only("fit").input
    assert score.predictions_out == config_only("score").predictions_out


def test_databricks_tasks_install_the_wheel_and_retry(databricks_job):
    _, tasks = databricks_job
    for task in tasks.values():
        wheels = [library["whl"] for library in task["libraries"] if "whl" in library]
        assert len(wheels) == 1 and re.search(r"/spark_gmm-[^-/]+-py3-none-any\.whl$", wheels[0])
        assert task["max_retries"] >= 1


def test_databricks_cluster_runs_spark_4(databricks_job):
    job, tasks = databricks_job
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    for task in tasks.values():
        assert task["job_cluster_key"] in clusters
    for cluster in clusters.values():
        # PySpark 4 needs Databricks Runtime 17.x or later (Spark 4.0, Scala 2.13 only).
        match = re.fullmatch(r"(\d+)\.(\d+)\.x-scala2\.13", cluster["spark_version"])
        assert match and int(match.group(1)) >= 17, cluster["spark_version"]
    assert len(job["schedule"]["quartz_cron_expression"].split()) in (6, 7)
