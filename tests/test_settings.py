"""Settings resolution and the arguments wandbtune gives wandb.init."""

from __future__ import annotations

import warnings

import pytest

from wandbtune._run import TrialRun, init_kwargs
from wandbtune._settings import ConfigError, Settings


@pytest.mark.parametrize("var", ["WANDB_PROJECT_NAME", "WANDB_PROJECT"])
def test_project_comes_from_the_environment_like_rays(monkeypatch, var):
    monkeypatch.delenv("WANDB_PROJECT_NAME", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv(var, "from-env")
    assert Settings().resolved_project() == "from-env"
    assert Settings(project="explicit").resolved_project() == "explicit"


def test_trial_config_overrides_the_decorator_and_replaces_its_key_source():
    base = Settings.from_arguments(
        "t", project="a", api_key_file="/k", excludes=["x"], tags=["t1"]
    )
    merged = base.merged({"wandb": {"project": "b", "api_key": "k2", "notes": "n"}})
    assert merged.project == "b" and merged.api_key == "k2"
    assert merged.api_key_file is None and merged.excludes == ("x",)
    assert merged.init_kwargs == {"tags": ["t1"], "notes": "n"}
    assert base.merged({"lr": 1}) is base


def test_the_key_is_never_part_of_the_repr_or_init_kwargs():
    settings = Settings.from_arguments("t", project="p", api_key="secret-key")
    assert "secret-key" not in repr(settings)
    kwargs = init_kwargs(
        settings,
        trial_id="t1",
        trial_name="n",
        experiment="e",
        config={"wandb": {"api_key": "secret-key"}, "lr": 1},
        dir=None,
    )
    assert "secret-key" not in repr(kwargs)
    assert kwargs["config"] == {"lr": 1}


def test_an_unreadable_key_file_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    settings = Settings(project="p", api_key_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY.*WANDB_MODE=offline"):
        settings.read_api_key()


def test_wandb_init_gets_no_deprecated_arguments(tmp_path, capfd, monkeypatch):
    # W&B prints its deprecation warnings; let it speak for this test.
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    settings = Settings.from_arguments(
        "t", project="p", mode="offline", settings={"quiet": False}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = TrialRun.start(
            settings,
            trial_id="dep1",
            trial_name="dep",
            experiment="e",
            config={"a": 1},
            dir=str(tmp_path),
        )
        run.log_result({"training_iteration": 1, "x": 1.0})
        run.finish(flush=True)
    messages = [str(w.message) for w in caught] + [capfd.readouterr().err]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_driver_settings_travel_with_the_pickled_settings(monkeypatch):
    import pickle

    monkeypatch.setenv("WANDB_PROJECT", "driver-project")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "never-shipped-" + "k" * 30)
    shipped = pickle.loads(pickle.dumps(Settings()))
    assert b"never-shipped" not in pickle.dumps(Settings())
    monkeypatch.setenv("WANDB_PROJECT", "worker-project")
    monkeypatch.delenv("WANDB_MODE")
    assert shipped.resolved_project() == "driver-project"
    assert shipped.offline()
    assert Settings().resolved_project() == "worker-project"


def test_a_rejected_value_is_logged_as_text_with_the_rest_of_the_row(tmp_path):
    import wandb

    from wandbtune.testing import find_run_files, read_run

    class Broken(wandb.Histogram):  # a W&B value whose serialisation fails
        def __init__(self):
            pass

        def to_json(self, run=None):
            raise ValueError("cannot serialise")

        def __str__(self):
            return "broken-value"

    run = TrialRun.start(
        Settings(project="p", init_kwargs={"mode": "offline"}),
        trial_id="rej1",
        trial_name="rej",
        experiment="e",
        config={},
        dir=str(tmp_path),
    )
    run.log_result({"training_iteration": 1, "loss": 0.5, "bad": Broken()})
    run.finish(flush=True)
    (path,) = find_run_files(tmp_path)
    (row,) = read_run(path).rows
    assert row["loss"] == 0.5 and row["bad"] == "broken-value"


def test_w_and_b_gets_bounded_time_to_start_a_run_unless_the_user_chose(monkeypatch):
    from wandbtune._run import INIT_TIMEOUT_S, _wandb_settings

    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    assert INIT_TIMEOUT_S == 15.0  # W&B's own default is 90 s, for every trial
    assert _wandb_settings(None, None).init_timeout == INIT_TIMEOUT_S
    assert _wandb_settings({"init_timeout": 40}, None).init_timeout == 40
