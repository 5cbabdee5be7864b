"""One W&B run for the whole experiment: the trials table, the best trial as
Tune picks it, PBT's exploits, how each trial ended, and all of it on disk
when ``fit()`` returns, after Ctrl-C too.

The experiment run is offline here, in ``<storage>/<experiment>/wandb``; its
tables are W&B media: the run's history and summary name a ``table-file``
whose JSON is in the run's ``files`` directory.
"""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tests.conftest import child_process, interrupt_when
from tests.raycompat import report
from wandbtune import wandb_trainable
from wandbtune._experiment import ExperimentRun
from wandbtune._settings import ConfigError
from wandbtune.testing import RunFile, find_run_files, read_records, read_run

# --- reading the experiment run -------------------------------------------------------


def experiment_run(storage: Path, name: str) -> RunFile:
    """The experiment's own run: the one run file in ``<storage>/<name>/wandb``
    (the trials' are in their trial directories)."""
    paths = find_run_files(storage / name / "wandb")
    assert len(paths) == 1, paths
    return read_run(paths[0])


def job_type(run: RunFile) -> str:
    for record in read_records(run.path):
        if record.WhichOneof("record_type") == "run":
            return str(record.run.job_type)
    raise AssertionError(f"no run record in {run.path}")


def table(run: RunFile, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged W&B table's rows, as dicts by column."""
    assert entry["_type"] == "table-file", entry
    data = json.loads((Path(run.path).parent / "files" / entry["path"]).read_text())
    return [dict(zip(data["columns"], row, strict=True)) for row in data["data"]]


def last_table(run: RunFile, key: str) -> list[dict[str, Any]]:
    return table(run, run.summary[key])


def by_trial(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["trial_id"]: row for row in rows}


# --- trials that end every way --------------------------------------------------------


@wandb_trainable(project="experiment")
def ends_by_kind(config):
    """Scores chosen so that Tune's default best (each trial's last score)
    differs from the best over all results: "returns" peaks at 9 first."""
    kind = config["kind"]
    if kind == "returns":
        for score in (9, 1, 1):
            report({"score": score})
        return
    if kind == "errors":
        report({"score": 2})
        report({"score": 2})
        raise ValueError("boom")
    for i in range(1, 500):  # until a stop criterion or the scheduler stops it
        report({"score": 4 if kind == "criterion" else 3, "enough": int(i >= 3)})
        time.sleep(0.01)


class StopsAtTwo(FIFOScheduler):
    """Stops the trials of kind "scheduler" at their second result."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config["kind"] == "scheduler" and result["training_iteration"] >= 2:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


@pytest.fixture(scope="module")
def ended(ray_session, tmp_path_factory):
    from tests.helpers import run_sweep

    tmp_path = tmp_path_factory.mktemp("ended")
    kinds = ["returns", "criterion", "errors", "scheduler"]
    out = run_sweep(
        ends_by_kind,
        {"kind": tune.grid_search(kinds), "wandb": {"notes": "not a column"}},
        tmp_path,
        tune_config=tune.TuneConfig(
            metric="score", mode="max", scheduler=StopsAtTwo(), reuse_actors=True
        ),
        # "criterion" reaches it; "scheduler" would, but is stopped before
        stop={"enough": 1},
        callbacks=[ExperimentRun(project="experiment", table_interval_s=0)],
    )
    return out, experiment_run(out.storage, "exp")


def test_the_experiment_run_sits_beside_its_trials_named_after_the_experiment(ended):
    out, run = ended
    assert run.name == "exp" and run.group == "exp" and run.project == "experiment"
    assert job_type(run) == "tune-experiment"
    assert run.run_id.startswith("tune-") and run.run_id not in {
        r.metrics["trial_id"] for r in out.results
    }
    assert run.finished and run.exit_code == 0
    trial_runs = [r for r in out.runs.values() if r.run_id != run.run_id]
    assert len(trial_runs) == 4
    assert {r.group for r in trial_runs} == {run.group}
    assert run.config["metric"] == "score" and run.config["mode"] == "max"


def test_the_trials_table_has_one_row_per_trial_with_how_it_ended(ended):
    out, run = ended
    rows = by_trial(last_table(run, "trials"))
    assert len(rows) == 4
    kinds = {r.metrics["trial_id"]: r.config["kind"] for r in out.results}
    assert sorted(rows) == sorted(kinds)
    outcome = {kinds[tid]: row["outcome"] for tid, row in rows.items()}
    assert outcome == {
        "returns": "completed",
        "criterion": "completed",  # a stop= criterion was met
        "errors": "error",
        "scheduler": "early_stopped",
    }
    iterations = {kinds[tid]: row["iterations"] for tid, row in rows.items()}
    assert iterations == {"returns": 3, "criterion": 3, "errors": 2, "scheduler": 2}
    for trial_id, row in rows.items():
        assert row["run_id"] == trial_id == out.runs[trial_id].run_id
        assert row["config/kind"] == kinds[trial_id]
        assert "config/wandb/notes" not in row and "config/wandb" not in row
    returns = next(row for tid, row in rows.items() if kinds[tid] == "returns")
    assert (returns["last_score"], returns["best_score"]) == (1, 9)
    assert run.summary["tune/trials"] == 4
    assert run.summary["tune/completed"] == 2
    assert run.summary["tune/early_stopped"] == run.summary["tune/error"] == 1
    assert run.summary["tune/interrupted"] == 0
    assert run.summary["tune/results"] == 3 + 3 + 2 + 2  # each one Tune got


def test_the_trials_table_is_logged_while_trials_run(ended):
    _, run = ended
    versions = [row["trials"] for row in run.rows if "trials" in row]
    assert len(versions) > 1
    first = table(run, versions[0])
    assert [row["outcome"] for row in first].count(None) >= 1  # still running
    assert len(table(run, versions[-1])) == 4


def test_the_best_trial_is_the_one_tune_picks_and_its_curve_is_logged(ended):
    out, run = ended
    best = out.results.get_best_result()  # TuneConfig's metric and mode
    assert best.config["kind"] == "criterion"  # Tune's default scope: "last"
    overall = out.results.get_best_result(scope="all")
    assert overall.config["kind"] == "returns"  # so the scope is what decides
    assert run.summary["best/trial_id"] == best.metrics["trial_id"]
    assert run.summary["best/score"] == 4
    assert run.summary["best/config/kind"] == "criterion"
    assert run.summary["best/iteration"] == 3
    curve = [row for row in run.rows if "best/score" in row]
    assert len(curve) >= 2
    assert curve[-1]["best/score"] == 4
    steps = [row["_step"] for row in curve]
    results = [row["tune/results"] for row in curve]
    assert steps == sorted(set(steps)) and results == sorted(set(results))


# --- the experiment ends first --------------------------------------------------------


@wandb_trainable(project="experiment", group="budget")
def forever(config):
    for i in range(100_000):
        report({"score": i})
        time.sleep(0.02)


def test_trials_still_running_when_the_time_budget_ends_are_interrupted(sweep):
    out = sweep(
        forever,
        {"n": tune.grid_search([0, 1, 2])},  # on 2 CPUs, one waits
        tune_config=tune.TuneConfig(metric="score", mode="max", time_budget_s=3),
        callbacks=[ExperimentRun()],
    )
    run = experiment_run(out.storage, "exp")
    # Not given to ExperimentRun: where the trials' runs go, the decorator's.
    assert (run.project, run.group) == ("experiment", "budget")
    rows = last_table(run, "trials")
    assert len(rows) == 3
    assert [row["outcome"] for row in rows] == ["interrupted"] * 3
    # Shorter than table_interval_s (30 s): one table, the end's (each table
    # is an artifact; checked to fail when the first was logged at once).
    assert len([row for row in run.rows if "trials" in row]) == 1
    assert run.summary["tune/interrupted"] == 3 and run.exit_code == 0


# --- Ctrl-C ---------------------------------------------------------------------------

INTERRUPTED = """
import json, sys, time
from pathlib import Path
from ray import tune
from tests.raycompat import RunConfig, report
from wandbtune import wandb_trainable
from wandbtune._experiment import ExperimentRun

@wandb_trainable(project="sigint")
def slow(config):
    for i in range(10_000):
        time.sleep(0.02)
        report({"score": i})

try:
    tune.Tuner(
        slow,
        param_space={"n": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(metric="score", mode="max"),
        run_config=RunConfig(name="sigint", storage_path=sys.argv[1], verbose=0,
                             callbacks=[ExperimentRun(project="sigint")]),
    ).fit()
finally:
    # The experiment run as fit() leaves it, before W&B's own exit hooks run.
    from tests.test_experiment import experiment_run, last_table
    run = experiment_run(Path(sys.argv[1]), "sigint")
    print("EXPERIMENT", json.dumps({
        "exit_code": run.exit_code,
        "trials": last_table(run, "trials"),
        "best": run.summary.get("best/trial_id"),
    }), flush=True)
"""


def test_after_ctrl_c_the_experiment_run_is_complete_when_fit_returns(tmp_path):
    storage = tmp_path / "results"
    with child_process(
        "-c", INTERRUPTED, str(storage), stderr=subprocess.DEVNULL
    ) as proc:

        def both_trials_have_results() -> bool:
            recorded = [
                p.read_text().count("\n") - 1 for p in storage.glob("*/*/progress.csv")
            ]
            return len(recorded) == 2 and min(recorded) >= 2

        out = interrupt_when(proc, both_trials_have_results, "two trials' results")
    (line,) = [line for line in out.splitlines() if line.startswith("EXPERIMENT ")]
    seen = json.loads(line.split(" ", 1)[1])
    assert seen["exit_code"] == 0  # finished before fit() returned
    assert len(seen["trials"]) == 2
    assert [row["outcome"] for row in seen["trials"]] == ["interrupted"] * 2
    assert all(row["iterations"] >= 2 for row in seen["trials"])
    assert seen["best"] in {row["trial_id"] for row in seen["trials"]}


# --- never in Tune's way --------------------------------------------------------------


def three_scores(config):
    for i in range(3):
        report({"score": i})


def _sweep_with(sweep, trainable, callbacks, caplog):
    """One trial of three scores with these callbacks; wandbtune's warnings
    in ``caplog``."""
    with caplog.at_level(logging.WARNING, logger="wandbtune"):
        return sweep(
            trainable,
            tune_config=tune.TuneConfig(metric="score", mode="max"),
            callbacks=callbacks,
        )


def test_when_w_and_b_is_unreachable_the_sweep_goes_on_with_one_warning(sweep, caplog):
    from tests.test_lifecycle import UNREACHABLE

    out = _sweep_with(
        sweep,
        wandb_trainable(project="experiment")(three_scores),
        [ExperimentRun(project="outage", **UNREACHABLE)],
        caplog,
    )
    assert len(out.results) == 1 and not out.results.errors
    warnings = [r for r in caplog.records if "experiment's W&B run" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    # The trials' own (offline) runs are complete; W&B may leave a file of
    # the experiment run's aborted start (0.31), with nothing in it.
    trial_runs = [r for r in out.runs.values() if not r.run_id.startswith("tune-")]
    assert len(trial_runs) == 1 and len(trial_runs[0].rows) == 3
    aborted = [r for r in out.runs.values() if r.run_id.startswith("tune-")]
    assert [row for r in aborted for row in r.rows] == []


def test_bad_arguments_are_named_and_the_key_is_never_pickled():
    with pytest.raises(ConfigError, match="metric_mode"):
        ExperimentRun(project="p", metric="score")
    with pytest.raises(ConfigError, match="metric_mode"):
        ExperimentRun(project="p", metric="score", metric_mode="up")
    with pytest.raises(ConfigError, match="table_interval_s"):
        ExperimentRun(project="p", table_interval_s=-1)
    with pytest.raises(TypeError, match="projekt"):
        ExperimentRun(projekt="p")
    callback = ExperimentRun(project="p", api_key="k" * 40)
    assert b"k" * 40 not in pickle.dumps(callback)


@pytest.mark.parametrize("callback_first", [True, False])
def test_the_callback_beside_an_experiment_run_leaves_the_experiment_run_to_it(
    sweep, caplog, callback_first
):
    # Both log the experiment's run by default: one run, not a second start
    # of the same id ("run ID ... is in use", a warning, offline too).
    from wandbtune import WandbLoggerCallback

    both = [WandbLoggerCallback(project="both"), ExperimentRun(project="both")]
    out = _sweep_with(sweep, three_scores, both[:: 1 if callback_first else -1], caplog)
    assert len(out.results) == 1 and not out.results.errors
    assert [r.getMessage() for r in caplog.records] == []
    assert len(out.experiment) == 1 and out.experiment[0].exit_code == 0
    assert out.experiment[0].summary["tune/completed"] == 1
    trials = list(out.runs.values())
    assert len(trials) == 1 and len(trials[0].rows) == 3
