"""Faults a trial survives: retries, Tuner.restore, a killed worker. Nothing
Tune received is lost from W&B, and no row is sent twice (W&B would drop it).

Offline, each attempt of a trial writes its own ``offline-run-*-<id>`` file with
the trial's id; ``wandb sync`` joins them into one run. So "the same run,
continued" reads here as: every attempt has the trial's id, and the attempts'
rows, in order, are strictly increasing in ``training_iteration``.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
from ray import tune

from tests.conftest import start_ray
from tests.helpers import read_sweep, tune_iterations
from tests.raycompat import Checkpoint, FailureConfig, RunConfig, get_checkpoint, report
from wandbtune import wandb_trainable


def _flaky(marker: Path, fail_at: int, iterations: int = 6):
    """Checkpoints every 2 iterations; raises at ``fail_at`` once (marker)."""

    @wandb_trainable(project="faults")
    def flaky(config):
        start = 0
        checkpoint = get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as path:
                start = json.loads(Path(path, "state.json").read_text())["i"]
        for i in range(start + 1, iterations + 1):
            if i == fail_at and not marker.exists():
                marker.touch()
                raise RuntimeError(f"flaky at {i}")
            if i % 2:
                report({"score": i * 10})
                continue
            with tempfile.TemporaryDirectory() as path:
                Path(path, "state.json").write_text(json.dumps({"i": i}))
                report({"score": i * 10}, checkpoint=Checkpoint.from_directory(path))

    return flaky


def _joined(attempts):
    """The rows of every attempt of one run, in order, as (iteration, score)."""
    return [
        (row["training_iteration"], row["score"])
        for run in attempts
        for row in run.rows
    ]


def test_a_retried_trial_continues_its_run_and_sends_no_row_twice(
    ray_session, tmp_path
):
    # Fails before reporting iteration 4; its last checkpoint is iteration 2,
    # so Tune hears iteration 3 again from the retried attempt.
    storage = tmp_path / "results"
    results = tune.Tuner(
        _flaky(tmp_path / "failed-once", fail_at=4),
        run_config=RunConfig(
            name="retry",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=1),
            verbose=0,
        ),
    ).fit()
    (result,) = results
    assert result.error is None
    assert tune_iterations(result) == [1, 2, 3, 3, 4, 5, 6]  # Tune got 3 twice

    out = read_sweep(results, storage, "retry", allow_attempts=True)
    ((trial_id, attempts),) = out.attempts.items()
    assert trial_id == result.metrics["trial_id"]
    assert len(attempts) == 2
    assert [run.exit_code for run in attempts] == [1, 0]  # failed, then finished
    assert _joined(attempts) == [(i, i * 10) for i in range(1, 7)]


def test_tuner_restore_of_an_errored_experiment_continues_the_run(
    ray_session, tmp_path
):
    storage = tmp_path / "results"
    trainable = _flaky(tmp_path / "failed-once", fail_at=5)
    first = tune.Tuner(
        trainable,
        run_config=RunConfig(name="restore", storage_path=str(storage), verbose=0),
    ).fit()
    assert first[0].error is not None  # no retries: the experiment ends errored

    restored = tune.Tuner.restore(
        str(storage / "restore"), trainable, resume_errored=True
    ).fit()
    (result,) = restored
    assert result.error is None

    out = read_sweep(restored, storage, "restore", allow_attempts=True)
    ((_, attempts),) = out.attempts.items()
    assert [run.exit_code for run in attempts] == [1, 0]
    assert _joined(attempts) == [(i, i * 10) for i in range(1, 7)]


class _KillAt(tune.Callback):
    """Kills the trial's worker process with SIGKILL at one iteration, once."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration
        self.killed: int | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result["training_iteration"] == self.iteration:
            self.killed = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)


@pytest.fixture(params=["", "driver-run"])
def driver_service(request, ray_session, tmp_path):
    """With "driver-run": the user has a W&B run open in the driver when Ray
    starts, so every Ray worker inherits that W&B service's token."""
    if not request.param:
        yield
        return
    import wandb

    mine = wandb.init(project="mine", dir=str(tmp_path), mode="offline")
    assert os.environ.get("WANDB_SERVICE")
    start_ray()
    try:
        yield
    finally:
        mine.finish()


def test_a_killed_worker_loses_only_what_w_and_b_had_not_written(
    driver_service, tmp_path
):
    # W&B's service is a child of the trial's process and dies with it; it
    # writes the run file in 32 KiB blocks, so what it still held is lost (for
    # a small run, everything). What it wrote stays readable, the retried
    # attempt continues the run, and nothing is sent twice.
    @wandb_trainable(project="faults")
    def steady(config):
        import wandb

        # The run starts in the background; touching it waits until it has
        # started, so the worker is killed with a run open.
        assert wandb.run is not None
        for i in range(1, 31):
            report({"score": i * 10})

    storage = tmp_path / "results"
    killer = _KillAt(iteration=5)
    results = tune.Tuner(
        steady,
        run_config=RunConfig(
            name="killed",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=1),
            callbacks=[killer],
            verbose=0,
        ),
    ).fit()
    (result,) = results
    assert killer.killed is not None and result.error is None

    out = read_sweep(results, storage, "killed", allow_attempts=True)
    files = {p.name: p.stat().st_size for p in storage.rglob("run-*.wandb")}
    assert len(out.attempts) == 1, (files, [len(r.rows) for r in out.aborted])
    ((_, attempts),) = out.attempts.items()
    killed_files = [run for run in out.aborted] + attempts[:-1]
    assert killed_files, "the killed attempt left no run file"
    assert all(run.exit_code is None for run in killed_files)  # never finished
    last = attempts[-1]
    assert last.exit_code == 0
    iterations = [i for run in attempts for i in run.column("training_iteration")]
    assert iterations == sorted(set(iterations))  # strictly increasing
    assert iterations[-1] == 30
    # The retried attempt restarted from scratch (no checkpoint): it logs
    # every iteration the killed attempt's file does not already hold.
    written = len(iterations) - len(last.rows)
    assert last.column("training_iteration") == list(range(written + 1, 31))
