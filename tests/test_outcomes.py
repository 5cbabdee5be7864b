"""How each trial ended, in its run's summary: ``tune/outcome`` (and, for an
error, ``tune/error`` and the traceback in a file of the run)."""

from __future__ import annotations

from pathlib import Path

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tests.raycompat import report
from wandbtune import WandbLoggerCallback, wandb_trainable
from wandbtune._run import TRACEBACK_FILE


@wandb_trainable(project="outcomes")
def _ends(config):
    for i in range(3):
        report({"score": i})
        if config["how"] == "raises" and i == 1:
            raise ValueError("boom at 1\nsecond line")


def test_a_decorated_trial_records_completed_or_error(sweep):
    out = sweep(_ends, {"how": tune.grid_search(["returns", "raises"])})
    assert len(out.runs) == 2
    by_how = {result.config["how"]: out.run_for(result) for result in out.results}

    returned = by_how["returns"]
    assert returned.summary["tune/outcome"] == "completed"
    assert "tune/error" not in returned.summary
    assert returned.exit_code == 0

    raised = by_how["raises"]
    assert raised.summary["tune/outcome"] == "error"
    assert raised.summary["tune/error"] == "ValueError: boom at 1"
    assert raised.exit_code == 1  # W&B's state: failed, only for an error
    traceback = Path(raised.path).parent / "files" / TRACEBACK_FILE
    text = traceback.read_text()
    assert "Traceback" in text and "ValueError: boom at 1" in text


class _StopAtTwo(FIFOScheduler):
    """A scheduler that stops every trial at its second result."""

    def on_trial_result(self, tune_controller, trial, result):
        if result["training_iteration"] >= 2:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def _plain(config):
    for i in range(5):
        report({"score": i})
        if config["how"] == "raises" and i == 1:
            raise ValueError("boom at 1")


def test_the_callback_records_every_outcome_in_the_trials_runs(sweep):
    callback = WandbLoggerCallback(project="outcomes")
    out = sweep(
        _plain,
        {"how": tune.grid_search(["returns", "raises"])},
        callbacks=[callback],
    )
    by_how = {r.config["how"]: out.run_for(r) for r in out.results}
    assert len(by_how) == 2
    assert by_how["returns"].summary["tune/outcome"] == "completed"
    assert by_how["raises"].summary["tune/outcome"] == "error"
    assert by_how["raises"].summary["tune/error"].startswith("ValueError: boom at 1")
    assert by_how["raises"].exit_code == 1 and by_how["returns"].exit_code == 0

    stopped = sweep(
        _plain,
        {"how": tune.grid_search(["stopped"])},
        name="stopped",
        callbacks=[WandbLoggerCallback(project="outcomes")],
        tune_config=tune.TuneConfig(scheduler=_StopAtTwo()),
    ).only_run()
    assert stopped.summary["tune/outcome"] == "early_stopped"
    assert stopped.exit_code == 0

    criterion = sweep(
        _plain,
        {"how": tune.grid_search(["stop"])},
        name="criterion",
        callbacks=[WandbLoggerCallback(project="outcomes")],
        stop={"training_iteration": 3},
    ).only_run()
    assert criterion.summary["tune/outcome"] == "completed"
