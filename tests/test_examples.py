"""The examples run as scripts: their trainables live in ``__main__`` and
travel to Tune's workers by value. Each starts its own Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.raycompat import HAS_TUNE_REPORT
from tests.test_experiment import last_table
from wandbtune._run import EXPLOITS_KEY
from wandbtune.testing import find_run_files, read_run

# quickstart.py and asha.py use tune.report and tune.RunConfig (recent Ray);
# docs_style.py is written to run on every supported Ray.
needs_tune_report = pytest.mark.skipif(
    not HAS_TUNE_REPORT, reason="this example uses tune.report, which this Ray has not"
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, storage: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), str(storage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Quiet by default: none of W&B's own lines from the trials reach the
    # user's terminal (through Ray's log forwarding), during fit() or after.
    chatter = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "wandb: " in line
    ]
    assert chatter == []
    return proc.stdout


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """A user with no W&B credentials and no WANDB_MODE set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no ~/.wandb_key
    (tmp_path / "home").mkdir()
    return env


@needs_tune_report
def test_quickstart_needs_no_account_and_says_how_to_sync(tmp_path, clean_env):
    out = run_example("quickstart.py", tmp_path / "results", clean_env)
    assert "logging offline" in out
    assert "wandb sync" in out and "offline-run-*" in out
    runs = [read_run(p) for p in find_run_files(tmp_path / "results")]
    assert len(runs) == 3
    for run in runs:
        assert run.project == "wandbtune-quickstart" and run.group == "quickstart"
        assert run.column("training_iteration") == list(range(1, 11))
        assert run.exit_code == 0
        assert "debug/step_seconds" not in run.rows[0]
        assert run.column("config/alpha")[0] == run.config["alpha"]


def test_docs_style_example_runs_offline_without_a_key_file(tmp_path, clean_env):
    run_example("docs_style.py", tmp_path / "results", clean_env)
    (path,) = find_run_files(tmp_path / "results")
    run = read_run(path)
    assert run.project == "Optimization_Project" and "wandb" not in run.config
    assert run.column("loss") == [run.config["a"] + run.config["b"]] * 10
    assert run.exit_code == 0


@needs_tune_report
def test_asha_example_finishes_every_run_including_stopped_ones(tmp_path, clean_env):
    run_example("asha.py", tmp_path / "results", clean_env)
    runs = [read_run(p) for p in find_run_files(tmp_path / "results")]
    assert len(runs) == 4
    assert all(run.exit_code == 0 for run in runs)
    lengths = sorted(len(run.rows) for run in runs)
    assert lengths[-1] == 20 and lengths[0] < 20  # some were stopped early


@needs_tune_report
def test_pbt_example_logs_every_trial_and_the_experiment(tmp_path, clean_env):
    out = run_example("pbt.py", tmp_path / "results", clean_env)
    assert "Best trial:" in out and "wandb sync" in out
    runs = [read_run(p) for p in find_run_files(tmp_path / "results" / "pbt")]
    trials = [r for r in runs if r.job_type != "tune-experiment"]
    experiment = [r for r in runs if r.job_type == "tune-experiment"]
    assert len({r.run_id for r in trials}) == 4
    assert len(experiment) == 1 and experiment[0].exit_code == 0
    assert "best/trial_id" in experiment[0].summary
    assert [r.exit_code for r in trials] == [0] * len(trials)
    # The experiment's exploits table and the trials' own records agree on
    # where each exploiting trial was (asynchronous PBT logs the trial's
    # iteration before the result that set the exploit off).
    recorded = {
        (r.run_id, e["iteration"], e["source_trial"], e["source_iteration"])
        for r in trials
        for e in r.summary.get(EXPLOITS_KEY, [])
    }
    table = {
        (
            row["trial_id"],
            row["iteration"],
            row["source_trial_id"],
            row["source_iteration"],
        )
        for row in last_table(experiment[0], "exploits")
    }
    assert len(table) == experiment[0].summary["tune/exploits"]
    assert table == recorded


def test_ray_train_example_logs_one_run_from_rank_zero(tmp_path, clean_env):
    out = run_example("ray_train.py", tmp_path / "results", clean_env)
    assert "wandb sync" in out and "offline-run-*" in out
    runs = [read_run(p) for p in find_run_files(tmp_path / "results")]
    assert len(runs) == 1
    (run,) = runs
    assert run.name == "ray-train" and run.group == "ray-train"
    assert run.column("epoch") == [1, 2, 3, 4, 5]
    assert run.column("rank") == [0] * 5
    assert run.exit_code == 0
