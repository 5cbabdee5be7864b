"""A decorated trainable's trials become complete, correct W&B runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from ray import train, tune

from tests import trainables
from tests.helpers import tune_iterations, user_columns
from tests.raycompat import Checkpoint, report
from wandbtune import wandb_trainable
from wandbtune.testing import find_run_files, read_run


def test_each_trial_is_one_run_with_trial_identity_and_config(sweep):
    out = sweep(
        trainables.train_fc, {"alpha": tune.grid_search([0.1, 0.2])}, name="identity"
    )
    assert len(out.runs) == 2
    for result in out.results:
        run = out.run_for(result)
        trial_id = result.metrics["trial_id"]
        assert run.run_id == trial_id
        assert run.name.startswith("train_fc_") and trial_id in run.name
        assert run.group == "identity"  # the experiment name
        assert run.project == "module-project"
        assert run.config["alpha"] == result.config["alpha"]
        assert run.exit_code == 0


def test_rows_match_tune_results_one_to_one_at_step_training_iteration(sweep):
    out = sweep(trainables.train_fc, {"alpha": 0.3})
    (result,) = out.results
    run = out.only_run()
    assert run.column("training_iteration") == tune_iterations(result) == [1, 2, 3, 4]
    assert [row["_step"] for row in run.rows] == [1, 2, 3, 4]
    assert run.column("mean_accuracy") == pytest.approx([0.03, 0.13, 0.23, 0.33])


def test_nested_dicts_are_flattened_and_excludes_drop_whole_subtrees(sweep):
    out = sweep(trainables.train_fc, {"alpha": 0.1, "debug": "config-too"})
    run = out.only_run()
    assert run.column("nested/x") == [0, 1, 2, 3]
    for row in run.rows:
        assert not any(k == "debug" or k.startswith("debug/") for k in row)
    # excludes apply to the run config as well (as in Ray's callback)
    assert "debug" not in run.config


def test_log_config_logs_config_columns(sweep):
    out = sweep(trainables.train_fc, {"alpha": 0.2})
    assert out.only_run().column("config/alpha") == [0.2] * 4


def test_docs_style_bare_decorator_settings_from_config_and_train_report(sweep):
    space = {
        "a": tune.choice([1, 2, 3]),
        "b": tune.choice([4, 5, 6]),
        "wandb": {
            "project": "Optimization_Project",
            "api_key_file": "~/.wandb_key_that_does_not_exist",
        },
    }
    out = sweep(trainables.train_docs_style, space)
    (result,) = out.results
    assert result.error is None
    run = out.only_run()
    assert run.project == "Optimization_Project"
    assert "wandb" not in run.config
    assert run.config["a"] + run.config["b"] == run.column("loss")[0]
    assert run.column("training_iteration") == [1, 2, 3]
    assert run.exit_code == 0


def test_trainable_defined_in_a_function_travels_by_value(sweep):
    seen = {}

    @wandb_trainable(project="local")
    def local_fn(config):
        seen["this is a closure"] = True  # forces pickling by value
        for i in range(2):
            report({"i": i})

    out = sweep(local_fn)
    run = out.only_run()
    assert run.column("i") == [0, 1] and run.exit_code == 0


def test_every_report_path_is_mirrored_exactly_once(sweep):
    @wandb_trainable(project="paths")
    def all_paths(config):
        report({"via": 1})
        train.report({"via": 2})
        import ray.train

        ray.train.report({"via": 3})
        ckpt = Checkpoint.from_directory(_tmp_checkpoint_dir())
        report({"via": 4}, checkpoint=ckpt)
        return {"via": 5}

    out = sweep(all_paths)
    (result,) = out.results
    assert result.error is None, result.error
    run = out.only_run()
    assert run.column("via") == [1, 2, 3, 4, 5]
    assert (
        run.column("training_iteration") == tune_iterations(result) == [1, 2, 3, 4, 5]
    )


def test_yielded_dicts_are_mirrored(sweep):
    @wandb_trainable(project="gen")
    def generator_fn(config):
        for i in range(3):
            yield {"y": i * 10}

    out = sweep(generator_fn)
    assert out.only_run().column("y") == [0, 10, 20]
    assert out.only_run().exit_code == 0


def test_the_trainable_sees_its_config_unchanged(sweep):
    @wandb_trainable
    def check_config(config):
        report(
            {
                "has_wandb_key": "wandb" in config,
                "project_in_config": config["wandb"]["project"] == "seen",
            }
        )

    out = sweep(check_config, {"x": 1, "wandb": {"project": "seen"}})
    row = user_columns(out.only_run().rows[0])
    assert row["has_wandb_key"] is True and row["project_in_config"] is True


def test_strange_values_never_break_training(sweep):
    class NoJson:
        def __str__(self):
            return "no-json-form"

    @wandb_trainable(project="strange")
    def strange(config):
        report(
            {
                "np_float": np.float32(1.5),
                "np_int": np.int64(7),
                "nan": float("nan"),
                "inf": float("inf"),
                "none": None,
                "text": "hello",
                "bytes": b"raw",
                "obj": NoJson(),
                "image": np.zeros((4, 4, 3), dtype=np.uint8),
                "video": np.zeros((1, 2, 3, 8, 8), dtype=np.uint8),
                "arr1": np.arange(5),
                "list": [1, 2, 3],
                "deep": {"a": {"b": {"c": 1}}},
            }
        )

    out = sweep(strange)
    (result,) = out.results
    assert result.error is None
    run = out.only_run()
    assert run.exit_code == 0
    (row,) = run.rows
    assert row["np_float"] == 1.5 and row["np_int"] == 7
    assert row["text"] == "hello" and row["bytes"] == "raw"
    assert row["obj"] == "no-json-form"
    assert row["image"]["_type"] == "image-file"
    assert row["video"]["_type"] == "video-file"
    assert row["deep/a/b/c"] == 1
    assert row["list"] == [1, 2, 3]
    assert row["nan"] != row["nan"] and row["inf"] == float("inf")


def test_users_own_wandb_logging_never_drops_a_mirrored_row(sweep):
    @wandb_trainable(project="own-logging")
    def logs_a_lot(config):
        import wandb

        for i in range(5):
            wandb.log({"extra": i})  # commits its own row
            wandb.log({"extra2": i})  # and another: W&B's step runs ahead
            wandb.log({"attached": i}, commit=False)
            report({"metric": i})

    out = sweep(logs_a_lot)
    (result,) = out.results
    run = out.only_run()
    mirrored = [r for r in run.rows if "metric" in r]
    assert [r["metric"] for r in mirrored] == [0, 1, 2, 3, 4]
    assert [r["training_iteration"] for r in mirrored] == tune_iterations(result)
    assert run.column("extra") == [0, 1, 2, 3, 4]
    steps = [r["_step"] for r in run.rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # W&B fills the last reported iteration into the user's own rows
    own = [r for r in run.rows if "extra2" in r and "metric" not in r]
    assert len(own) == 5
    assert all("training_iteration" in r for r in own[1:])


def _slow_w_and_b() -> None:
    """In a trial's process: each mirrored row takes 50 ms more to log. W&B
    made slow on purpose, a stand-in for a loaded machine (here W&B is faster
    than Tune's round trip): code that logs right after a report would
    overtake the report's row if it did not wait for it."""
    import time

    from wandbtune._run import TrialRun

    log_result = TrialRun.log_result

    def slowly(self: TrialRun, result: Any) -> None:
        time.sleep(0.05)
        log_result(self, result)

    TrialRun.log_result = slowly  # type: ignore[method-assign]


def test_commit_false_user_data_lands_in_the_mirrored_row(sweep):
    @wandb_trainable(project="attach")
    def attaches(config):
        import wandb

        _slow_w_and_b()
        for i in range(3):
            report({"metric": i})
            wandb.log({"attached": i * 100}, commit=False)

    out = sweep(attaches)
    run = out.only_run()
    assert [row["_step"] for row in run.rows] == [1, 2, 3]
    assert run.column("training_iteration") == [1, 2, 3]
    assert run.column("attached") == [0, 100, 200]


def test_log_on_a_kept_run_object_lands_in_the_mirrored_row(sweep):
    # Code that keeps the run object (as Lightning's WandbLogger keeps its
    # experiment) and logs to it right after each report: each value lands in
    # that report's row, never in the one before.
    @wandb_trainable(project="attach")
    def attaches_to_a_kept_run(config):
        import wandb

        _slow_w_and_b()
        run = wandb.run
        for i in range(20):
            report({"metric": i})
            run.log({"attached": i * 100}, commit=False)

    run = sweep(attaches_to_a_kept_run).only_run()
    rows = [(row.get("training_iteration"), row.get("attached")) for row in run.rows]
    assert len(rows) == 20
    assert rows == [(i + 1, i * 100) for i in range(20)]


def test_a_function_that_reports_faster_than_w_and_b_logs_loses_no_row(sweep):
    # Reports as fast as it can and never touches wandb: every row is
    # written by the trial's end.
    @wandb_trainable(project="fast")
    def fast(config):
        for i in range(3000):
            report({"i": i})

    run = sweep(fast).only_run()
    assert len(run.rows) == 3000
    assert run.column("i") == list(range(3000))
    assert run.exit_code == 0


def _tmp_checkpoint_dir() -> str:
    import tempfile

    path = tempfile.mkdtemp()
    with open(f"{path}/weights.txt", "w") as fh:
        fh.write("w")
    return path


def test_group_tags_notes_and_per_trial_overrides_reach_the_run(sweep):
    @wandb_trainable(project="base", group="base-group", tags=["a"], notes="n1")
    def fn(config):
        report({"x": 1})

    out = sweep(
        fn,
        {
            "which": tune.grid_search(["default", "override"]),
            "wandb": tune.sample_from(
                lambda spec: (
                    {"project": "other", "group": "g2", "tags": ["b"]}
                    if spec.config.which == "override"
                    else {}
                )
            ),
        },
    )
    runs = {r.config["which"]: out.run_for(r) for r in out.results}
    default, override = runs["default"], runs["override"]
    assert (default.project, default.group, default.tags, default.notes) == (
        "base",
        "base-group",
        ["a"],
        "n1",
    )
    assert (override.project, override.group, override.tags, override.notes) == (
        "other",
        "g2",
        ["b"],
        "n1",
    )


def test_w_and_b_settings_set_on_the_driver_after_ray_started_reach_trials(
    sweep, monkeypatch
):
    # The workers were started before these were set: they travel with the
    # trainable, as Ray's callback forwards them to its logging actors.
    monkeypatch.setenv("WANDB_PROJECT", "set-on-the-driver")
    monkeypatch.setenv("WANDB_GROUP_NAME", "driver-group")

    @wandb_trainable
    def fn(config):
        report({"x": 1})

    run = sweep(fn).only_run()
    assert (run.project, run.group) == ("set-on-the-driver", "driver-group")


def test_a_value_w_and_b_rejects_does_not_cost_the_row(sweep):
    @wandb_trainable(project="rejected")
    def fn(config):
        for i in range(3):
            report({"loss": float(i), "w": np.array([np.nan] + [1.0] * 40)})

    run = sweep(fn).only_run()
    assert run.column("loss") == [0.0, 1.0, 2.0]
    assert len(run.column("w")[0]) == 41


def test_setup_wandb_inside_a_decorated_trainable_is_the_trials_run(sweep):
    @wandb_trainable(project="same-run")
    def fn(config):
        import wandb

        import wandbtune

        run = wandbtune.setup_wandb(config)
        report({"same": run == wandb.run, "id_matches": run.id == wandb.run.id})
        run.finish()  # left to wandbtune: the trial's later results still count
        report({"same": True, "id_matches": True})

    out = sweep(fn)
    assert len(out.runs) == 1
    run = out.only_run()
    assert len(run.rows) == 2
    row = user_columns(run.rows[0])
    assert row["same"] is True and row["id_matches"] is True


def test_ray_setup_wandb_inside_a_decorated_trainable_loses_no_row(sweep):
    # Code migrating from Ray's integration keeps its setup_wandb, which calls
    # wandb.init(reinit=True): that would finish the trial's run and lose every
    # mirrored row after it. wandbtune returns the trial's run instead.
    @wandb_trainable(project="ray-setup")
    def fn(config):
        from ray.air.integrations.wandb import setup_wandb

        from wandbtune._compat import TUNE_HAS_REPORT

        # Ray 2.30's setup_wandb returns a disabled run in every Tune trial
        # unless rank_zero_only=False (it compares Tune's rank, None, with 0).
        old_ray = {} if TUNE_HAS_REPORT else {"rank_zero_only": False}
        run = setup_wandb(config, project="ray-setup", **old_ray)
        for i in range(1, 6):
            report({"loss": float(i)})
            run.log({"own": i})  # joins row i (README: lined up with report i)
        run.finish()

    out = sweep(fn, {"x": tune.grid_search([1, 2])})
    assert len(out.aborted) == 0 and len(out.runs) == 2
    for run in out.runs.values():
        assert run.exit_code == 0
        assert run.column("loss") == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert run.column("training_iteration") == [1, 2, 3, 4, 5]
        assert run.column("own") == [1, 2, 3, 4, 5]


def test_only_reinit_create_new_makes_a_second_run_in_a_decorated_trial(sweep):
    @wandb_trainable(project="reinit")
    def fn(config):
        import wandb

        same = wandb.init(project="reinit", reinit="finish_previous")
        from pathlib import Path

        trial_dir = Path(wandb.run.dir).parents[2]  # <trial>/wandb/<run>/files
        other = wandb.init(
            project="reinit", reinit="create_new", id="other-run", dir=trial_dir
        )
        other.log({"other": 1})
        other.finish()
        report({"same": same.id == wandb.run.id, "loss": 1.0})
        report({"same": True, "loss": 2.0})

    out = sweep(fn)
    assert sorted(out.runs) == sorted([out.results[0].metrics["trial_id"], "other-run"])
    trial_run = out.run_for(out.results[0])
    assert trial_run.column("loss") == [1.0, 2.0]
    assert trial_run.column("same") == [True, True]
    assert out.runs["other-run"].column("other") == [1]


def test_wandb_dir_set_on_the_driver_is_where_runs_go(sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "chosen"))

    @wandb_trainable(project="dir")
    def fn(config):
        report({"x": 1})

    out = sweep(fn)
    assert out.runs == {}  # not in the experiment storage
    (path,) = find_run_files(tmp_path / "chosen")
    assert read_run(path).column("x") == [1]
