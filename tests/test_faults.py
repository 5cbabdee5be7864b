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
from tests.helpers import read_sweep
from tests.raycompat import Checkpoint, FailureConfig, RunConfig, get_checkpoint, report
from wandbtune import setup_wandb, wandb_trainable


def _flaky(tmp_path: Path, fail_at: int, iterations: int = 6):
    """Checkpoints every 2 iterations; its first attempt raises before
    reporting ``fail_at``. Each attempt reports ``score = iteration * 10 +
    attempt`` (attempts 1, 2, ... counted in a file), so a row says which
    attempt logged it."""
    attempts = tmp_path / "attempts"

    @wandb_trainable(project="faults")
    def flaky(config):
        attempt = int(attempts.read_text()) + 1 if attempts.exists() else 1
        attempts.write_text(str(attempt))
        start = 0
        checkpoint = get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as path:
                start = json.loads(Path(path, "state.json").read_text())["i"]
        for i in range(start + 1, iterations + 1):
            if i == fail_at and attempt == 1:
                raise RuntimeError(f"flaky at {i}")
            score = i * 10 + attempt
            if i % 2:
                report({"score": score})
                continue
            with tempfile.TemporaryDirectory() as path:
                Path(path, "state.json").write_text(json.dumps({"i": i}))
                report({"score": score}, checkpoint=Checkpoint.from_directory(path))

    return flaky


def _rows(run):
    """A run file's rows as (training_iteration, score)."""
    return [(row["training_iteration"], row["score"]) for row in run.rows]


def _tune_rows(result):
    """Every result Tune recorded for a trial, as (training_iteration, score)."""
    df = result.metrics_dataframe
    return [
        (int(i), int(s))
        for i, s in df[["training_iteration", "score"]].itertuples(index=False)
    ]


def test_a_retried_trial_continues_its_run_and_sends_no_row_twice(
    ray_session, tmp_path
):
    # The first attempt checkpoints at 2, reports 3, fails before 4; the
    # retry goes on from the checkpoint, so Tune hears iteration 3 again.
    storage = tmp_path / "results"
    results = tune.Tuner(
        _flaky(tmp_path, fail_at=4),
        run_config=RunConfig(
            name="retry",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=1),
            verbose=0,
        ),
    ).fit()
    (result,) = results
    assert result.error is None
    # score = iteration * 10 + attempt: Tune got 3 from both attempts
    assert _tune_rows(result) == [
        (1, 11), (2, 21), (3, 31), (3, 32), (4, 42), (5, 52), (6, 62)
    ]  # fmt: skip

    out = read_sweep(results, storage, "retry", allow_attempts=True)
    ((trial_id, attempts),) = out.attempts.items()
    assert trial_id == result.metrics["trial_id"]
    assert len(attempts) == 2
    assert [run.exit_code for run in attempts] == [1, 0]  # failed, then finished
    # W&B keeps the first attempt's iteration 3; the retry logs only after it.
    assert [_rows(run) for run in attempts] == [
        [(1, 11), (2, 21), (3, 31)],
        [(4, 42), (5, 52), (6, 62)],
    ]


def test_tuner_restore_of_an_errored_experiment_continues_the_run(
    ray_session, tmp_path
):
    # The first attempt checkpoints at 2 and 4, reports 5, fails before 6;
    # the restored experiment goes on from 4, so Tune hears 5 again.
    storage = tmp_path / "results"
    trainable = _flaky(tmp_path, fail_at=6)
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
    assert _tune_rows(result)[-2:] == [(5, 52), (6, 62)]  # 5 again, from attempt 2

    out = read_sweep(restored, storage, "restore", allow_attempts=True)
    ((_, attempts),) = out.attempts.items()
    assert [run.exit_code for run in attempts] == [1, 0]
    # W&B keeps the first attempt's iteration 5; the restored one logs only 6.
    assert [_rows(run) for run in attempts] == [
        [(1, 11), (2, 21), (3, 31), (4, 41), (5, 51)],
        [(6, 62)],
    ]


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
    starts, so every Ray worker inherits that W&B service's token. Without:
    no token anywhere (the baseline)."""
    if not request.param:
        assert "WANDB_SERVICE" not in os.environ  # Ray started without one too
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
        # Leave no token for what runs after: the driver's W&B is shut down
        # and Ray restarted without it.
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
        start_ray()


#: Rows of the killed-worker test: enough, and wide enough, that W&B's
#: service has written more than one 32 KiB block of the run file when the
#: worker is killed (an attempt's first rows then survive the kill).
ROWS, KILL_AT, TEXT = 60, 30, "x" * 4096


def test_a_killed_worker_loses_only_what_w_and_b_had_not_written(
    driver_service, tmp_path
):
    # W&B's service is a child of the trial's process and dies with it; it
    # writes the run file in 32 KiB blocks, so what it still held is lost.
    # What it wrote stays readable, the retried attempt continues the run
    # after it, and nothing is sent twice.
    @wandb_trainable(project="faults")
    def steady(config):
        # The run starts in the background; holding it waits until it has
        # started, so the worker is killed with a run open.
        setup_wandb()
        for i in range(1, ROWS + 1):
            report({"score": i * 10, "text": TEXT})

    storage = tmp_path / "results"
    killer = _KillAt(iteration=KILL_AT)
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
    files = {
        str(p.relative_to(storage)): p.stat().st_size
        for p in storage.rglob("run-*.wandb")
    }
    # Both attempts' files have the run: the killed one got past its start.
    assert out.aborted == [] and len(out.attempts) == 1, files
    ((_, attempts),) = out.attempts.items()
    assert len(attempts) == 2, files
    killed, retried = attempts
    assert killed.exit_code is None  # never finished
    assert retried.exit_code == 0
    # What the killed attempt's service wrote: its first rows, complete.
    survived = killed.column("training_iteration")
    assert len(survived) > 0, files
    assert survived == list(range(1, len(survived) + 1))
    assert killed.column("text") == [TEXT] * len(survived)
    assert killed.column("score") == [i * 10 for i in survived]
    # The retried attempt restarted from scratch (no checkpoint): it logs
    # every iteration after those, none of them twice, up to the last.
    assert retried.column("training_iteration") == list(
        range(len(survived) + 1, ROWS + 1)
    )
    iterations = survived + retried.column("training_iteration")
    assert iterations == list(range(1, ROWS + 1))
