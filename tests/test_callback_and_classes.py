"""WandbLoggerCallback and decorated class trainables: same runs, same rows."""

from __future__ import annotations

import json
import pickle
import subprocess
import tempfile
from pathlib import Path

import pyarrow.fs
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from tests.conftest import child_process, interrupt_when
from tests.helpers import tune_iterations
from tests.raycompat import Checkpoint, CheckpointConfig, RunConfig, report
from tests.trainable_classes import Counter, DecoratedCounter
from wandbtune import WandbLoggerCallback, wandb_trainable
from wandbtune.testing import find_run_files, read_run

#: Values that differ between any two runs of the same trial (timings, clocks).
TIMING = {"time_this_iter_s", "time_total_s", "time_since_restore", "timestamp"}


def _trial_run_files(root: Path) -> list[str]:
    """The trials' run files below ``root``, without the experiment's run
    (which the callback makes beside them)."""
    return [
        p for p in find_run_files(root) if read_run(p).job_type != "tune-experiment"
    ]


def reports_everything(config):
    """One trainable for the parity test: every kind of value."""
    import numpy as np

    for i in range(3):
        report(
            {
                "loss": 1.0 / (i + 1),
                "text": f"epoch {i}",
                "list": [i, i + 1],
                "np": np.float32(i),
                "image": np.full((4, 4, 3), i, dtype=np.uint8),
                "nested": {"deep": {"x": i}},
                "debug": {"grad": i},
            }
        )


def comparable(row):
    out = {k: v for k, v in row.items() if not k.startswith("_") and k not in TIMING}
    if isinstance(out.get("image"), dict):  # same pixels, same file digest
        out["image"] = {k: v for k, v in out["image"].items() if k != "path"}
    return out


def test_decorator_and_callback_give_the_same_rows_and_config(sweep, tmp_path):
    settings = {"excludes": ["debug"], "log_config": True}
    decorated = sweep(
        wandb_trainable(project="parity", **settings)(reports_everything),
        {"lr": 0.1},
        name="by_decorator",
    ).only_run()
    callback = sweep(
        reports_everything,
        {"lr": 0.1},
        name="by_callback",
        callbacks=[WandbLoggerCallback(project="parity", **settings)],
    ).only_run()
    assert [comparable(r) for r in decorated.rows] == [
        comparable(r) for r in callback.rows
    ]
    assert [r["_step"] for r in decorated.rows] == [r["_step"] for r in callback.rows]
    identity = {"trial_id", "pid", "hostname", "node_ip", "_wandb"}
    assert {k: v for k, v in decorated.config.items() if k not in identity} == {
        k: v for k, v in callback.config.items() if k not in identity
    }
    assert decorated.exit_code == callback.exit_code == 0
    # and both keep what Ray's callback would drop
    first = comparable(decorated.rows[0])
    assert first["text"] == "epoch 0" and first["list"] == [0, 1]
    assert first["np"] == 0.0 and first["nested/deep/x"] == 0
    assert first["image"]["_type"] == "image-file" and "debug/grad" not in first


def _class_trainable(how):
    """The Counter class logged by the callback or by the class decorator
    (both with upload_checkpoints=True)."""
    if how == "callback":
        callback = WandbLoggerCallback(project="classes", upload_checkpoints=True)
        return Counter, {"callbacks": [callback]}
    return DecoratedCounter, {}


@pytest.mark.parametrize("how", ["callback", "decorator"])
def test_class_trainable_checkpoints_become_artifacts(sweep, how):
    trainable, kwargs = _class_trainable(how)
    out = sweep(
        trainable,
        stop={"training_iteration": 4},
        checkpoint_config=CheckpointConfig(checkpoint_frequency=2),
        **kwargs,
    )
    arts = _artifacts(out.only_run())
    assert [a[0] for a in arts] == ["model", "model"]
    assert [_iteration(a) for a in arts] == [2, 4]
    assert all(a[3] == [("state.txt", "")] for a in arts)


@pytest.mark.parametrize("how", ["callback", "decorator"])
def test_a_class_trial_failing_outside_step_is_marked_failed(sweep, how):
    trainable, kwargs = _class_trainable(how)
    out = sweep(
        trainable,
        {"fail_save": True},
        stop={"training_iteration": 3},
        checkpoint_config=CheckpointConfig(checkpoint_frequency=1),
        **kwargs,
    )
    (result,) = out.results
    assert "disk full while saving" in str(result.error)
    assert out.only_run().exit_code == 1


@pytest.mark.parametrize("how", ["callback", "decorator"])
def test_class_trainables_completed_and_failed(sweep, how):
    trainable, kwargs = _class_trainable(how)
    out = sweep(
        trainable,
        {"fail_at": tune.grid_search([0, 3])},
        stop={"training_iteration": 5},
        **kwargs,
    )
    by_fail = {r.config["fail_at"]: r for r in out.results}
    completed, failed = out.run_for(by_fail[0]), out.run_for(by_fail[3])
    assert completed.column("a") == [0, 1, 2, 3, 4] and completed.exit_code == 0
    assert completed.column("n/x") == [10, 20, 30, 40, 50]
    assert failed.column("a") == [0, 1] and failed.exit_code == 1
    assert "class trainable failed at step 3" in str(by_fail[3].error)


@pytest.mark.parametrize("how", ["callback", "decorator"])
def test_early_stopped_class_trials_finish_cleanly(sweep, how):
    trainable, kwargs = _class_trainable(how)
    out = sweep(
        trainable,
        {"fail_at": 0, "rank": tune.grid_search([2, 1])},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                metric="score", mode="max", max_t=6, grace_period=1, reduction_factor=2
            ),
            max_concurrent_trials=1,
        ),
        **kwargs,
    )
    # Best trial first, one at a time: ASHA stops the second one early.
    lengths = {}
    for result in out.results:
        run = out.run_for(result)
        assert run.exit_code == 0
        assert run.column("training_iteration") == tune_iterations(result)
        lengths[result.config["rank"]] = len(run.rows)
    assert lengths[2] == 6 and lengths[1] < 6, lengths


def _checkpointing(config):
    for i in range(2):
        path = tempfile.mkdtemp()
        Path(path, "weights.txt").write_text(str(i))
        report({"i": i}, checkpoint=Checkpoint.from_directory(path))


def _iteration(artifact) -> int:
    """The training_iteration in an artifact's metadata (a JSON text)."""
    return int(json.loads(artifact[2])["training_iteration"])


def _artifacts(run):
    return [
        (a.type, a.name, a.metadata, [(e.path, e.ref) for e in a.manifest.contents])
        for a in run.artifacts
    ]


@pytest.mark.parametrize("how", ["callback", "decorator"])
@pytest.mark.parametrize("storage", ["path", "file-uri"])
def test_checkpoints_become_model_artifacts(ray_session, tmp_path, how, storage):
    root = tmp_path / "results"
    storage_path = str(root) if storage == "path" else root.as_uri()
    trainable, callbacks = _checkpointing, None
    if how == "callback":
        callbacks = [WandbLoggerCallback(project="ckpt", upload_checkpoints=True)]
    else:
        trainable = wandb_trainable(project="ckpt", upload_checkpoints=True)(
            _checkpointing
        )
    tune.Tuner(
        trainable,
        run_config=RunConfig(
            name="ckpt", storage_path=storage_path, callbacks=callbacks, verbose=0
        ),
    ).fit()
    (path,) = _trial_run_files(root)
    run = read_run(path)
    arts = _artifacts(run)
    assert [a[0] for a in arts] == ["model", "model"]
    assert {a[1] for a in arts} == {f"checkpoint-{run.run_id}"}
    assert [_iteration(a) for a in arts] == [1, 2]
    assert all(a[3] == [("weights.txt", "")] for a in arts)  # uploaded files


@pytest.mark.parametrize("how", ["callback", "decorator"])
def test_checkpoints_on_remote_storage_become_reference_artifacts(
    ray_session, tmp_path, how
):
    # A filesystem that is not the local one (as s3 or gcs would be), yet
    # reachable here: wandbtune references the checkpoint instead of skipping it.
    root = tmp_path / "remote"
    root.mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(root), pyarrow.fs.LocalFileSystem())
    trainable, callbacks = _checkpointing, None
    if how == "callback":
        callbacks = [
            WandbLoggerCallback(
                project="ref", upload_checkpoints=True, dir=str(tmp_path / "wandb-dir")
            )
        ]
    else:
        trainable = wandb_trainable(
            project="ref", upload_checkpoints=True, dir=str(tmp_path / "wandb-dir")
        )(_checkpointing)
    tune.Tuner(
        trainable,
        run_config=RunConfig(
            name="ref",
            storage_path="/store",
            storage_filesystem=fs,
            callbacks=callbacks,
            verbose=0,
        ),
    ).fit()
    (path,) = _trial_run_files(tmp_path / "wandb-dir")
    arts = _artifacts(read_run(path))
    assert len(arts) == 2
    for _, _, metadata, entries in arts:
        ((_, ref),) = entries
        assert ref.startswith(f"file://{root}/store/ref/")
        assert f"file://{root}/store/ref/" in metadata


def test_the_callback_pickles_without_its_api_key(tmp_path):
    secret = "secret-" + "k" * 33
    callback = WandbLoggerCallback(project="p", api_key=secret)
    assert secret.encode() not in pickle.dumps(callback)
    restored = pickle.loads(pickle.dumps(callback))
    assert restored._settings.project == "p"


def test_a_decorated_trainable_with_the_callback_is_logged_once(sweep):
    @wandb_trainable(project="once")
    def fn(config):
        report({"x": 1})

    out = sweep(fn, callbacks=[WandbLoggerCallback(project="once")])
    assert out.only_run().column("x") == [1]


def test_a_misspelt_callback_argument_is_named():
    with pytest.raises(TypeError, match="projekt"):
        WandbLoggerCallback(projekt="x")


INTERRUPTED = """
import os, sys, time
from ray import tune
from tests.raycompat import RunConfig, report
from wandbtune import WandbLoggerCallback, wandb_trainable

def slow(config):
    for i in range(10_000):
        time.sleep(0.02)
        report({"i": i})

trainable = slow
callbacks = []
if sys.argv[2] == "decorator":
    trainable = wandb_trainable(project="sigint")(slow)
else:
    callbacks = [WandbLoggerCallback(project="sigint")]
if sys.argv[2] == "callback-beside-own-run":
    import wandb  # the user's own run on the driver stays open throughout
    parent = wandb.init(project="parent", dir=sys.argv[1] + "-parent")
try:
    tune.Tuner(trainable, param_space={"n": tune.grid_search([0, 1])},
               run_config=RunConfig(name="sigint", storage_path=sys.argv[1],
                                         callbacks=callbacks, verbose=0)).fit()
finally:
    # Read the runs as fit() leaves them, before W&B's own exit hooks run.
    from wandbtune.testing import find_run_files, read_run
    for path in find_run_files(sys.argv[1]):
        run = read_run(path)
        kind = run.job_type or "trial"
        print("RUN", run.run_id, len(run.rows), run.exit_code, kind, flush=True)
"""


def _results_recorded(storage: Path) -> list[int]:
    """How many results Tune recorded for each trial so far (progress.csv)."""
    return [
        max(0, path.read_text().count("\n") - 1)
        for path in storage.glob("*/*/progress.csv")
    ]


@pytest.mark.parametrize("how", ["callback", "decorator", "callback-beside-own-run"])
def test_interrupting_fit_finishes_and_flushes_every_run(tmp_path, how):
    storage = tmp_path / "results"
    # (Its stderr, Ray's chatter, is not read: it must not fill a pipe.)
    interrupted = child_process(
        "-c", INTERRUPTED, str(storage), how, stderr=subprocess.DEVNULL
    )
    with interrupted as proc:

        def both_trials_have_results() -> bool:
            recorded = _results_recorded(storage)
            return len(recorded) == 2 and min(recorded) >= 2

        out = interrupt_when(proc, both_trials_have_results, "two trials' results")
    # As fit() returned: both runs complete and finished (an interrupted trial
    # is finished like a stopped one, exit code 0).
    lines = [line.split() for line in out.splitlines() if line.startswith("RUN ")]
    seen = [line[:4] for line in lines if line[4] == "trial"]
    assert len(seen) == 2, out
    assert all(int(rows) > 0 and code == "0" for _, _, rows, code in seen), seen
    # The callback's run for the experiment is complete and finished too.
    experiment = [line for line in lines if line[4] == "tune-experiment"]
    assert len(experiment) == (0 if how == "decorator" else 1), out
    assert all(code == "0" for _, _, _, code, _ in experiment), experiment
    # and every result Tune recorded is in W&B. (The decorator logs in the
    # trial actor, so a last result the driver dropped while shutting down
    # may be in W&B too: one row more, never one less.)
    paths = _trial_run_files(storage)
    assert len(paths) == 2
    for path in paths:
        run = read_run(path)
        trial_dir = Path(path).parents[2]
        recorded = (trial_dir / "progress.csv").read_text().count("\n") - 1
        iterations = run.column("training_iteration")
        assert iterations[:recorded] == list(range(1, recorded + 1))
        extra = (0, 1) if how == "decorator" else (0,)
        assert len(iterations) - recorded in extra


def test_the_callback_tunes_on_when_w_and_b_is_unreachable(sweep, caplog):
    from tests.test_lifecycle import UNREACHABLE, init_attempts

    def fn(config):
        for i in range(3):
            report({"i": i})

    with caplog.at_level("WARNING", logger="wandbtune"):
        out = sweep(
            fn, callbacks=[WandbLoggerCallback(project="outage", **UNREACHABLE)]
        )
    (result,) = out.results
    assert result.error is None and tune_iterations(result) == [1, 2, 3]
    # W&B was asked once for the trial's run, and nothing was logged.
    assert len(init_attempts(out.storage, result.metrics["trial_id"])) == 1
    files = [*out.runs.values(), *out.aborted]
    assert [row for run in files for row in run.rows] == []
    (warning,) = [r for r in caplog.records if "logging is off" in r.getMessage()]
    assert "strict=True" in warning.getMessage()


def test_with_the_callback_strict_stops_the_experiment(sweep):
    from tests.test_lifecycle import UNREACHABLE, UNREACHABLE_ERROR

    def fn(config):
        report({"i": 0})

    callback = WandbLoggerCallback(project="outage", strict=True, **UNREACHABLE)
    with pytest.raises(Exception, match=UNREACHABLE_ERROR):
        sweep(fn, callbacks=[callback])


def test_the_callback_leaves_the_users_own_driver_runs_open(sweep, tmp_path):
    import wandb

    mine = wandb.init(project="mine", dir=str(tmp_path), reinit="create_new")
    try:
        out = sweep(
            lambda config: report({"x": 1}),
            callbacks=[WandbLoggerCallback(project="beside")],
        )
        assert out.only_run().exit_code == 0  # complete when fit() returned
        mine.log({"still": 1})  # the user's run was not shut down
    finally:
        mine.finish()
