"""An API key given to wandbtune is written to no file of the experiment.

Runs are online against a closed port on this machine (W&B's servers are the
one part not run here), so the key is really read and handed to W&B.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ray import tune

from tests.raycompat import report
from tests.test_lifecycle import UNREACHABLE
from wandbtune import WandbLoggerCallback, _settings, wandb_trainable

KEY = "wbtune0secret" + "7" * 27  # 40 characters, like a real key


def _report(config):
    report({"x": 1})


def _files_with_key(root: Path) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and KEY.encode() in path.read_bytes()
    ]


def test_a_key_given_to_the_decorator_or_callback_is_in_no_file(
    sweep, tmp_path, monkeypatch
):
    online = {k: v for k, v in UNREACHABLE.items() if k != "api_key"}
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))

    sweep(wandb_trainable(project="k", api_key=KEY, **online)(_report), name="arg")
    sweep(
        wandb_trainable(project="k", api_key_file=str(key_file), **online)(_report),
        name="file",
    )
    sweep(
        _report,
        name="callback",
        callbacks=[WandbLoggerCallback(project="k", api_key=KEY, **online)],
    )
    monkeypatch.setenv("WANDB_API_KEY", KEY)  # read by the driver-side callback
    sweep(_report, name="env", callbacks=[WandbLoggerCallback(project="k", **online)])

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "tuner.pkl" for p in written)  # Tune wrote its state
    # and W&B its logs (run files too, where wandb writes them before the
    # server answers; wandb 0.19 writes only its debug logs then)
    assert any(p.name == "debug-internal.log" for p in written)
    assert _files_with_key(tmp_path) == [str(key_file)]


@pytest.mark.parametrize("how", ["decorator", "callback"])
def test_a_key_in_the_trial_config_is_warned_about_once_on_the_driver(
    sweep, monkeypatch, caplog, how
):
    # Tune itself writes the trial config to its files; wandbtune can only keep
    # the key out of W&B and say so, once, on the driver, before trials start.
    monkeypatch.setattr(_settings, "_warned_key_in_config", False)
    space = {"wandb": {"project": "k", "api_key": KEY}, "i": tune.grid_search([0, 1])}
    with caplog.at_level("WARNING", logger="wandbtune"):
        if how == "decorator":
            out = sweep(wandb_trainable(_report), space)
        else:
            out = sweep(_report, space, callbacks=[WandbLoggerCallback()])
    warnings = [r.getMessage() for r in caplog.records if "api_key" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "api_key_file" in warnings[0] and "WANDB_API_KEY" in warnings[0]
    assert len(out.runs) == 2
    for run in out.runs.values():
        assert "wandb" not in run.config and KEY not in repr(run.config)


def test_a_pickled_key_is_a_token_that_each_ray_cluster_resolves(ray_session):
    # The key travels through the Ray cluster's key-value store; a driver that
    # starts a second cluster (as this suite does per module) must put it there
    # again, not reuse the first cluster's token.
    import pickle

    from tests.conftest import start_ray

    settings = _settings.Settings(api_key=KEY)
    pickled = pickle.dumps(settings)
    assert KEY.encode() not in pickled
    assert pickle.loads(pickled).api_key == KEY
    start_ray()  # a new cluster, an empty store
    again = pickle.dumps(settings)
    assert KEY.encode() not in again
    assert pickle.loads(again).api_key == KEY
