"""``@wandb_trainable`` on a Ray Train training loop (``DataParallelTrainer``
with 2 CPU workers; Train V2 on current Ray, V1 on Ray 2.30): one W&B run per
training run, logged by rank 0."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import ray.train
from ray import tune

from tests.raycompat import (
    TRAIN_V2,
    Checkpoint,
    DataParallelTrainer,
    TrainFailureConfig,
    TrainRunConfig,
    scaling,
)
from tests.test_key_hygiene import KEY
from wandbtune import wandb_trainable
from wandbtune._train import ERROR_KEY
from wandbtune.testing import read_runs


def _loop(config):
    """Reports ``epochs`` times; rank r reports loss = epoch + 100 r, and the
    attempt (1 once the marker exists). Goes on from its checkpoint, saved
    every ``checkpoint_every`` epochs; raises once at ``fail_at`` on rank
    ``fail_rank`` (marker file), or always with ``fail_always``."""
    rank = ray.train.get_context().get_world_rank()
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as path:
            start = json.loads(Path(path, "state.json").read_text())["epoch"]
    marker = Path(config.get("marker", "/nonexistent/marker"))
    attempt = int(marker.exists())
    for epoch in range(start + 1, config["epochs"] + 1):
        if rank == config.get("fail_rank", 0) and epoch == config.get("fail_at"):
            if config.get("fail_always"):
                raise RuntimeError(f"rank {rank} fails at epoch {epoch}")
            if not marker.exists():
                marker.touch()
                raise RuntimeError(f"rank {rank} fails at epoch {epoch}")
        metrics = {"loss": float(epoch + 100 * rank), "epoch": epoch}
        metrics["attempt"] = attempt
        if epoch % config.get("checkpoint_every", 1):
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as path:
            Path(path, "state.json").write_text(json.dumps({"epoch": epoch}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(path))


def _fit(tmp_path, loop, config, name="train-run", max_failures=0):
    trainer = DataParallelTrainer(
        loop,
        train_loop_config=config,
        scaling_config=scaling(2),
        run_config=TrainRunConfig(
            name=name,
            storage_path=str(tmp_path / "storage"),
            failure_config=TrainFailureConfig(max_failures=max_failures),
        ),
    )
    return trainer.fit()


def _runs(tmp_path):
    return read_runs(tmp_path / "storage")


def test_rank_zero_logs_every_report_as_one_run(ray_session, tmp_path):
    loop = wandb_trainable(project="train", excludes=["epoch"])(_loop)
    _fit(tmp_path, loop, {"epochs": 4, "lr": 0.1, "wandb": {"group": "g"}})

    runs = _runs(tmp_path)
    assert len(runs) == 1, sorted(runs)  # no run from rank 1
    ((run_id, attempts),) = runs.items()
    (run,) = attempts
    assert run_id.startswith("train-") or not TRAIN_V2
    assert run.name == "train-run" and run.group == "g"
    assert run.config["lr"] == 0.1 and "wandb" not in run.config
    assert run.column("loss") == [1.0, 2.0, 3.0, 4.0]  # rank 0's values
    assert run.column("training_iteration") == [1, 2, 3, 4]
    assert run.column("epoch") == []  # excludes apply
    assert run.exit_code == 0


def _fails_once_at_epoch_four(tmp_path):
    """A config: checkpoints every 2 epochs, fails once at epoch 4; the next
    attempt goes on from epoch 2's checkpoint and reports epoch 3 again."""
    return {
        "epochs": 5,
        "fail_at": 4,
        "checkpoint_every": 2,
        "marker": str(tmp_path / "failed"),
    }


def _one_run_that_kept_the_first_epoch_three(tmp_path):
    """The attempts of the one run: failed, then finished; each epoch logged
    once, epoch 3 with the first attempt's values; the step increasing."""
    runs = _runs(tmp_path)
    assert len(runs) == 1, sorted(runs)  # the same run, continued
    ((_, attempts),) = runs.items()
    assert [run.exit_code for run in attempts] == [1, 0]  # failed, then finished
    rows = [row for run in attempts for row in run.rows]
    assert len(rows) == 5
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]  # none twice
    assert [row["attempt"] for row in rows] == [0, 0, 0, 1, 1]
    steps = [row["training_iteration"] for row in rows]
    assert steps == sorted(set(steps))
    return attempts


def test_a_restarted_worker_group_continues_the_run_with_no_row_twice(
    ray_session, tmp_path
):
    loop = wandb_trainable(project="train")(_loop)
    _fit(tmp_path, loop, _fails_once_at_epoch_four(tmp_path), max_failures=1)

    attempts = _one_run_that_kept_the_first_epoch_three(tmp_path)
    assert attempts[0].summary[ERROR_KEY] == "RuntimeError: rank 0 fails at epoch 4"


def test_a_training_run_that_fails_is_a_failed_run_with_its_error(
    ray_session, tmp_path
):
    loop = wandb_trainable(project="train")(_loop)
    with pytest.raises(Exception):  # noqa: B017 - V1 and V2 raise their own
        _fit(tmp_path, loop, {"epochs": 3, "fail_at": 2, "fail_always": True})

    runs = _runs(tmp_path)
    assert len(runs) == 1
    ((_, (run,)),) = runs.items()
    assert run.column("loss") == [1.0]
    assert run.exit_code == 1
    assert run.summary[ERROR_KEY] == "RuntimeError: rank 0 fails at epoch 2"


def test_another_rank_failing_finishes_rank_zeros_run(ray_session, tmp_path):
    # V2: Ray's worker-shutdown hook; V1: rank 1 holds its error until rank 0
    # has finished the run.
    loop = wandb_trainable(project="train")(_loop)
    with pytest.raises(Exception):  # noqa: B017 - V1 and V2 raise their own
        _fit(
            tmp_path,
            loop,
            {"epochs": 3, "fail_at": 2, "fail_rank": 1, "fail_always": True},
        )
    runs = _runs(tmp_path)
    assert len(runs) == 1
    ((_, (run,)),) = runs.items()
    assert run.exit_code == 1
    assert "stopped by Ray Train" in run.summary[ERROR_KEY]
    if not TRAIN_V2:
        assert (
            "rank 1 failed: RuntimeError: rank 1 fails at epoch 2"
            in (run.summary[ERROR_KEY])
        )


@pytest.mark.xfail(
    not TRAIN_V2,
    strict=True,
    reason="on Ray 2.30 the trainer kills the worker group, rank 0 with it, the "
    "moment it finds a worker lost, with no hook in rank 0 and before Tune "
    "stops the trial: the run is left unfinished (no run log at all)",
)
def test_a_lost_worker_finishes_rank_zeros_run_as_failed(ray_session, tmp_path):
    # Rank 1's process dies: no Python error there to tell rank 0. V2: Ray's
    # worker-shutdown hook.
    @wandb_trainable(project="train")
    def loop(config):
        import os
        import time

        rank = ray.train.get_context().get_world_rank()
        for epoch in range(1, 6):
            if rank == 1 and epoch == 3:
                os._exit(1)
            ray.train.report({"loss": float(epoch)})
            time.sleep(0.2)

    with pytest.raises(Exception):  # noqa: B017 - V1 and V2 raise their own
        _fit(tmp_path, loop, {})
    runs = _runs(tmp_path)
    assert len(runs) == 1
    ((_, (run,)),) = runs.items()
    assert run.exit_code == 1
    assert (
        "stopped by Ray Train before the training loop returned"
        in (run.summary[ERROR_KEY])
    )
    assert run.column("loss")[:2] == [1.0, 2.0]


def test_a_key_given_to_a_decorated_training_loop_is_in_no_file(
    ray_session, tmp_path, monkeypatch
):
    from tests.test_lifecycle import UNREACHABLE

    online = {k: v for k, v in UNREACHABLE.items() if k != "api_key"}
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    loop = wandb_trainable(project="train", api_key=KEY, **online)(_loop)
    _fit(tmp_path, loop, {"epochs": 2})
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "debug-internal.log" for p in written)  # W&B ran
    assert [str(p) for p in written if KEY.encode() in p.read_bytes()] == []


@pytest.mark.skipif(not TRAIN_V2, reason="Ray 2.30 has no TuneReportCallback")
def test_a_decorated_training_loop_in_a_decorated_tune_trial_is_one_run(
    ray_session, tmp_path
):
    from ray.tune.integration.ray_train import TuneReportCallback

    @wandb_trainable(project="train")
    def loop(config):
        import wandb

        if ray.train.get_context().get_world_rank() == 0:
            wandb.log({"own": 1})  # dropped: the trial's run is elsewhere
        _loop(config)

    @wandb_trainable(project="train")
    def trial(config):
        trial_id = tune.get_context().get_trial_id()
        DataParallelTrainer(
            loop,
            train_loop_config={"epochs": 3},
            scaling_config=scaling(2, cpus_per_worker=0.5),
            run_config=TrainRunConfig(
                name=f"train-{trial_id}",
                storage_path=str(tmp_path / "train-storage"),
                callbacks=[TuneReportCallback()],
            ),
        ).fit()

    results = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.5}),
        param_space={"x": tune.grid_search([1, 2])},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "storage"), verbose=0),
    ).fit()
    assert not results.errors
    runs = read_runs(tmp_path)
    assert len(runs) == 2, sorted(runs)  # the trials' runs, none from the loops
    for result in results:
        ((run,),) = [runs[result.metrics["trial_id"]]]
        assert run.column("loss") == [1.0, 2.0, 3.0]
        assert run.column("own") == []
        assert run.exit_code == 0


@pytest.mark.skipif(
    TRAIN_V2,
    reason="a Train V2 trainer is not a Tune trainable: Tune over Train V2 is "
    "the TuneReportCallback test above",
)
def test_a_tuner_over_a_trainer_makes_one_run_per_trial(ray_session, tmp_path):
    # Ray 2.30: Tuner(trainer) makes each trial a training run.
    loop = wandb_trainable(project="train")(_loop)
    trainer = DataParallelTrainer(loop, scaling_config=scaling(2))
    results = tune.Tuner(
        trainer,
        param_space={
            "train_loop_config": {"epochs": 2, "lr": tune.grid_search([0.1, 0.2])}
        },
        run_config=TrainRunConfig(name="tuned", storage_path=str(tmp_path / "storage")),
    ).fit()
    assert results.errors == []
    runs = _runs(tmp_path)
    assert len(runs) == 2, sorted(runs)  # one per trial, none from rank 1
    by_lr = {attempts[0].config["lr"]: attempts for attempts in runs.values()}
    assert sorted(by_lr) == [0.1, 0.2]
    for attempts in by_lr.values():
        (run,) = attempts
        assert run.column("loss") == [1.0, 2.0]
        assert run.exit_code == 0


def test_rank_zeros_own_logging_and_checkpoints_reach_the_run(ray_session, tmp_path):
    @wandb_trainable(project="train", upload_checkpoints=True)
    def loop(config):
        import wandb

        if ray.train.get_context().get_world_rank() == 0:
            assert wandb.run is not None
            same = wandb.init(project="elsewhere")  # the run, not a second one
            assert same.id == wandb.run.id
        _loop(config)
        if ray.train.get_context().get_world_rank() == 0:
            wandb.log({"own": 1}, commit=False)  # joins the last report's row

    _fit(tmp_path, loop, {"epochs": 2})
    runs = _runs(tmp_path)
    assert len(runs) == 1
    ((_, (run,)),) = runs.items()
    assert run.column("loss") == [1.0, 2.0]
    assert run.column("own") == [1]
    assert run.rows[-1]["own"] == 1 and run.rows[-1]["training_iteration"] == 2
    assert len(run.artifacts) == 2  # one version per reported checkpoint


def test_a_second_fit_that_resumes_from_the_checkpoint_continues_the_run(
    ray_session, tmp_path
):
    # The first fit() fails (no retries left); the second, with the same
    # config (the failure happens once), goes on from the checkpoint.
    loop = wandb_trainable(project="train")(_loop)
    config = _fails_once_at_epoch_four(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - V1 and V2 raise their own
        _fit(tmp_path, loop, config)
    if TRAIN_V2:
        # V2 goes on from the run's latest checkpoint by itself: the same
        # name and storage path.
        _fit(tmp_path, loop, config)
    else:
        DataParallelTrainer.restore(
            str(tmp_path / "storage" / "train-run"), train_loop_per_worker=loop
        ).fit()

    _one_run_that_kept_the_first_epoch_three(tmp_path)


INTERRUPTED_TRAINING = """
import json, sys, time
from pathlib import Path
import ray.train
from tests.raycompat import DataParallelTrainer, TrainRunConfig, scaling
from wandbtune import wandb_trainable
from wandbtune.testing import read_runs

@wandb_trainable(project="train")
def slow(config):
    for epoch in range(1, 10_000):
        ray.train.report({"loss": float(epoch)})
        if epoch == 2 and ray.train.get_context().get_world_rank() == 0:
            Path(config["marker"]).touch()
        time.sleep(config["epoch_s"] if epoch >= 2 else 0.1)

storage = sys.argv[1]
if sys.argv[3:] == ["after-a-fit"]:
    # A fit that ends normally first: Tune leaves its SIGINT handler in
    # place, and the next fit's Ctrl-C puts that one back.
    @wandb_trainable(project="train")
    def short(config):
        ray.train.report({"loss": 0.0})

    DataParallelTrainer(
        short,
        scaling_config=scaling(2),
        run_config=TrainRunConfig(name="first", storage_path=storage + "/first"),
    ).fit()
try:
    DataParallelTrainer(
        slow,
        train_loop_config={"marker": storage + "/reported",
                           "epoch_s": float(sys.argv[2])},
        scaling_config=scaling(2),
        run_config=TrainRunConfig(name="interrupted", storage_path=storage),
    ).fit()
finally:
    # The run as it is when fit() gives up, before this process exits.
    runs = read_runs(Path(storage) / "interrupted")
    print("RUNS", json.dumps({
        run_id: [
            {"exit_code": run.exit_code, "error": run.summary.get("train/error"),
             "loss": run.column("loss")}
            for run in attempts
        ]
        for run_id, attempts in runs.items()
    }), flush=True)
"""


@pytest.mark.parametrize(
    ("epoch_s", "before"),
    [
        pytest.param(0.1, "", id="epochs-of-0.1s"),
        # Longer than the 10 s Tune gives the trainer to stop before it kills
        # it with no cleanup (Ray 2.30: only the driver's notice reaches rank 0).
        pytest.param(60.0, "", id="epochs-of-60s"),
        pytest.param(0.1, "after-a-fit", id="the-second-fit-of-a-process"),
    ],
)
def test_an_interrupted_training_run_is_finished_when_fit_returns(
    tmp_path, epoch_s, before
):
    import subprocess

    from tests.conftest import child_process, interrupt_when

    storage = tmp_path / "storage"
    storage.mkdir()
    script = INTERRUPTED_TRAINING
    args = [str(storage), str(epoch_s)] + ([before] if before else [])
    with child_process("-c", script, *args, stderr=subprocess.DEVNULL) as proc:
        reported = (storage / "reported").exists
        out = interrupt_when(proc, reported, "rank 0's second report")
    (line,) = [line for line in out.splitlines() if line.startswith("RUNS ")]
    runs = json.loads(line.split(" ", 1)[1])
    assert len(runs) == 1, runs
    ((run,),) = runs.values()
    assert run["exit_code"] == 1  # finished (as failed: see README, "Ray Train")
    assert "stopped by Ray Train before the training loop returned" in run["error"]
    if not TRAIN_V2:  # V1 hears it from the driver, and says so
        assert run["error"].endswith("fit() was interrupted")
    assert run["loss"][:2] == [1.0, 2.0]


@pytest.mark.skipif(TRAIN_V2, reason="Train V2's RunConfig has no stop")
def test_a_training_run_tune_stops_is_finished(ray_session, tmp_path):
    # Ray 2.30: the trainer is a Tune trial; a stop condition ends it and
    # Tune's cleanup removes the placement group, killing rank 0 mid-loop.
    @wandb_trainable(project="train")
    def endless(config):
        for epoch in range(1, 10_000):
            ray.train.report({"loss": float(epoch)})

    DataParallelTrainer(
        endless,
        scaling_config=scaling(2),
        run_config=TrainRunConfig(
            name="stopped",
            storage_path=str(tmp_path / "storage"),
            stop={"training_iteration": 3},
        ),
    ).fit()
    runs = _runs(tmp_path)
    assert len(runs) == 1
    ((_, (run,)),) = runs.items()
    assert run.exit_code == 0  # stopped, as a Tune trial a stopper ends
    assert ERROR_KEY not in run.summary
    assert run.column("loss")[:3] == [1.0, 2.0, 3.0]
