"""Helpers for tests: run a real sweep, then read what W&B would receive."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from tests.raycompat import Checkpoint, RunConfig, get_checkpoint, report
from wandbtune.testing import RunFile, find_run_files, read_run


@dataclass
class SweepOutcome:
    results: Any  # tune.ResultGrid
    runs: dict[str, RunFile]  # by W&B run id (= Tune trial id)
    storage: Path
    #: files of runs whose start W&B aborted (no run record, no id)
    aborted: list[RunFile]
    #: every attempt's file of each run, oldest first (a retried or restored
    #: trial writes one offline file per attempt, all with the same id)
    attempts: dict[str, list[RunFile]]
    #: the experiment's own run (WandbLoggerCallback, ExperimentRun), if any
    experiment: list[RunFile] = field(default_factory=list)

    def run_for(self, result: Any) -> RunFile:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        return self.runs[trial_id]

    def only_run(self) -> RunFile:
        assert len(self.runs) == 1, sorted(self.runs)
        return next(iter(self.runs.values()))


def run_sweep(
    trainable: Any,
    param_space: dict[str, Any],
    tmp_path: Path,
    *,
    name: str = "exp",
    tune_config: tune.TuneConfig | None = None,
    callbacks: list[Any] | None = None,
    stop: Any = None,
    failure_config: Any = None,
    checkpoint_config: Any = None,
    allow_attempts: bool = False,
) -> SweepOutcome:
    storage = tmp_path / "results"
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=callbacks,
            stop=stop,
            failure_config=failure_config,
            checkpoint_config=checkpoint_config,
            verbose=0,
        ),
    )
    results = tuner.fit()
    return read_sweep(results, storage, name, allow_attempts=allow_attempts)


def read_sweep(
    results: Any, storage: Path, name: str, *, allow_attempts: bool = False
) -> SweepOutcome:
    """Read every offline run file of a finished sweep."""
    runs: dict[str, RunFile] = {}
    attempts: dict[str, list[RunFile]] = {}
    aborted: list[RunFile] = []
    experiment: list[RunFile] = []
    # W&B names each attempt's directory by its start time, but not in an
    # order that sorts chronologically (a same-second restart gets "-1"):
    # order by when each file was last written.
    paths = sorted(
        find_run_files(storage / name), key=lambda p: Path(p).stat().st_mtime
    )
    for path in paths:
        run = read_run(path)
        if not run.run_id:
            aborted.append(run)
            continue
        if run.job_type == "tune-experiment":
            experiment.append(run)
            continue
        assert allow_attempts or run.run_id not in runs, (
            f"two run files for {run.run_id}"
        )
        runs[run.run_id] = run
        attempts.setdefault(run.run_id, []).append(run)
    return SweepOutcome(
        results=results,
        runs=runs,
        storage=storage,
        aborted=aborted,
        attempts=attempts,
        experiment=experiment,
    )


def tune_iterations(result: Any) -> list[int]:
    """The training_iteration of every result Tune recorded for a trial."""
    df = result.metrics_dataframe
    return [] if df is None else [int(x) for x in df["training_iteration"]]


def user_columns(row: dict[str, Any]) -> dict[str, Any]:
    """A row without W&B's own ``_`` columns and Tune's timing bookkeeping."""
    bookkeeping = {
        "timestamp",
        "time_this_iter_s",
        "time_total_s",
        "time_since_restore",
        "iterations_since_restore",
    }
    return {
        k: v for k, v in row.items() if not k.startswith("_") and k not in bookkeeping
    }


def restored_state(default: Any) -> Any:
    """In a trial: the state (``state.json``) of the checkpoint Tune goes on
    from, or ``default`` on a first start."""
    checkpoint = get_checkpoint()
    if not checkpoint:
        return default
    with checkpoint.as_directory() as path:
        return json.loads(Path(path, "state.json").read_text())


def report_with_state(metrics: dict[str, Any], state: Any) -> None:
    """In a trial: report ``metrics`` with a checkpoint holding ``state``."""
    with tempfile.TemporaryDirectory() as path:
        Path(path, "state.json").write_text(json.dumps(state))
        report(metrics, checkpoint=Checkpoint.from_directory(path))
