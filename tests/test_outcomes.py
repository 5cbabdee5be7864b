"""How each trial ended, in its run's summary: ``tune/outcome`` (and, for an
error, ``tune/error`` and the traceback in a file of the run)."""

from __future__ import annotations

from pathlib import Path

from ray import tune

from tests.raycompat import report
from wandbtune import wandb_trainable
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
