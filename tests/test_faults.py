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
import time
from pathlib import Path

import pytest
from ray import tune

from tests.conftest import child_process, start_ray
from tests.helpers import read_sweep, report_with_state, restored_state
from tests.raycompat import FailureConfig, RunConfig, report
from wandbtune import setup_wandb, wandb_trainable
from wandbtune._compat import wandb_can_hand_over


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
        start = restored_state({"i": 0})["i"]
        for i in range(start + 1, iterations + 1):
            if i == fail_at and attempt == 1:
                raise RuntimeError(f"flaky at {i}")
            score = i * 10 + attempt
            if i % 2:
                report({"score": score})
                continue
            report_with_state({"score": score}, {"i": i})

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
    # With one W&B service per node (wandbtune._node_service), the service
    # outlives the killed trial: every row the trial had sent to it is kept,
    # and the run is finished as failed (exit code 1) when the trial's
    # process is gone. Without it (wandb 0.19), W&B's service is a child of
    # the trial's process and dies with it; it writes the run file in 32 KiB
    # blocks, so what it still held is lost. Either way what was written
    # stays readable, the retried attempt continues the run after it, and
    # nothing is sent twice.
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
    if wandb_can_hand_over():
        assert killed.exit_code == 1  # finished as failed by the node's service
    else:
        assert killed.exit_code is None  # never finished
    assert retried.exit_code == 0
    # What the killed attempt's service wrote: its first rows, complete.
    survived = killed.column("training_iteration")
    assert len(survived) > 0, files
    if wandb_can_hand_over():
        # Every row the trial had logged before Tune saw iteration KILL_AT
        # (the trial waits until a row is logged before it goes on; the last
        # one or two may not have left its process).
        assert len(survived) >= KILL_AT - 2, survived
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


# --- a killed driver ---------------------------------------------------------------

#: Iterations of the trial the driver is killed in; each row carries 2 KiB, so
#: W&B writes its run log in blocks as it goes, and a tail is always unwritten.
CRASH_ITERATIONS = 120


@wandb_trainable(project="faults")
def steady_checkpointed(config):
    """A checkpoint at every report; goes on from the last one."""
    start = restored_state({"i": 0})["i"]
    for i in range(start + 1, CRASH_ITERATIONS + 1):
        time.sleep(0.1)  # killed well before the end
        report_with_state({"score": i * 10, "pad": "x" * 2048}, {"i": i})


CRASHING_DRIVER = """
import sys
import ray
from ray import tune
from tests.raycompat import RunConfig
from tests.test_faults import steady_checkpointed
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
tune.Tuner(steady_checkpointed,
           run_config=RunConfig(name="crash", storage_path=sys.argv[1],
                                verbose=0)).fit()
"""


def test_after_a_killed_driver_w_and_b_holds_every_result_tune_kept(
    ray_session, tmp_path
):
    # The driver is killed (SIGKILL of it and every process under it)
    # mid-sweep: W&B's service dies before it wrote its last rows,
    # which Tune had received and checkpointed. Tuner.restore goes on from the
    # last checkpoint; wandbtune fills in those rows from Tune's result.json.
    storage = tmp_path / "results"
    with child_process("-c", CRASHING_DRIVER, str(storage)) as proc:
        deadline = time.monotonic() + 120
        while _results_recorded(storage) < 40:
            if proc.poll() is not None:
                pytest.fail("the sweep ended before the driver was killed")
            if time.monotonic() > deadline:
                pytest.fail("no 40 results after 120 s")
            time.sleep(0.1)
        _kill_tree(proc.pid)  # the driver, its Ray, the trial, W&B's service
        proc.wait(timeout=30)
    # W&B's service writes its run log in 32 KiB blocks; how much of the tail
    # a kill loses is chance (often nothing, with rows this slow). To make
    # the loss certain, the test drops the file's last written block, as a
    # kill a moment earlier would have: the one part here that is not real.
    (log,) = storage.glob("crash/*/wandb/offline-run-*/run-*.wandb")
    blocks = log.stat().st_size // (32 * 1024)
    assert blocks >= 2, log.stat().st_size
    with open(log, "r+b") as fh:
        fh.truncate((blocks - 1) * 32 * 1024)
    kept_by_tune = _results_in_json(storage / "crash")  # as the kill left it

    restored = tune.Tuner.restore(
        str(storage / "crash"), steady_checkpointed, resume_unfinished=True
    ).fit()
    (result,) = restored
    assert result.error is None

    out = read_sweep(restored, storage, "crash", allow_attempts=True)
    ((_, attempts),) = out.attempts.items()
    assert len(attempts) == 2
    killed, _ = attempts
    # Never finished: its W&B service (the node's, or the trial process's
    # own with wandb 0.19) was killed with the driver's processes.
    assert killed.exit_code is None
    # The killed attempt's W&B data lacks results Tune had kept (else this
    # test proves nothing) ...
    written = killed.column("training_iteration")
    assert written and max(written) < max(kept_by_tune), (written, kept_by_tune)
    # ... and now W&B holds every one, once.
    iterations = [i for run in attempts for i in run.column("training_iteration")]
    assert iterations == sorted(set(iterations))
    assert set(kept_by_tune) <= set(iterations)
    assert iterations == list(range(1, CRASH_ITERATIONS + 1))


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (Ray's processes
    start sessions of their own: a process group does not hold them)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [parent, *parent.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _results_recorded(storage: Path) -> int:
    return sum(
        max(0, path.read_text().count("\n") - 1)
        for path in storage.glob("*/*/progress.csv")
    )


def _results_in_json(experiment: Path) -> list[int]:
    (path,) = experiment.glob("*/result.json")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["training_iteration"])
        except ValueError:
            continue
    return out
