"""One W&B service per node for the decorator's trials (wandbtune._node_service).

Offline, real Tune sweeps and the real wandb client: the trials of a node
log to one W&B service that a Ray actor owns, hand their runs over at their
end, and the end of the experiment waits until every run is written. The
online side (a trial's end never waits for uploads; a silent server) is in
test_online.py; a killed trial's run in test_faults.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray
from ray import tune

from tests.raycompat import RunConfig, report
from wandbtune import wandb_trainable
from wandbtune._compat import wandb_can_hand_over
from wandbtune._node_service import NAMESPACE

pytestmark = pytest.mark.skipif(
    not wandb_can_hand_over(),
    reason="this wandb's service cannot take runs over (0.19): each trial "
    "process runs its own W&B service, as the other tests check",
)


def service_started_here() -> bool:
    """True if this process started the W&B service it logs to: W&B's token
    (``WANDB_SERVICE``, set once connected) names the starter's pid."""
    token = os.environ.get("WANDB_SERVICE", "")
    return token.split("-")[1:2] == [str(os.getpid())]


@wandb_trainable(project="node")
def reports_its_service(config):
    import wandb

    assert wandb.run is not None  # waits until the run has started
    for i in range(1, 4):
        report(
            {
                "score": config["n"] * 10 + i,
                "service": os.environ.get("WANDB_SERVICE", ""),
                "service_started_here": service_started_here(),
            }
        )


def test_the_trials_of_a_node_share_one_w_and_b_service(sweep):
    out = sweep(
        reports_its_service,
        {"n": tune.grid_search([1, 2, 3, 4])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=False),
    )
    assert len(out.results) == 4 and not out.results.errors
    # Four trial processes, one W&B service, which none of them started.
    assert len({r.metrics["pid"] for r in out.results}) == 4
    services = {r.metrics["service"] for r in out.results}
    assert len(services) == 1 and "" not in services, services
    assert [r.metrics["service_started_here"] for r in out.results] == [False] * 4
    # Every run was handed over and finished, and is complete on disk when
    # fit() returns.
    assert out.aborted == [] and len(out.runs) == 4
    for result in out.results:
        run = out.run_for(result)
        n = result.config["n"]
        assert run.column("score") == [n * 10 + i for i in range(1, 4)]
        assert run.exit_code == 0
    # The node's actor is gone with the experiment.
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    ]
    assert left == []


@wandb_trainable(project="node")
def fails_at_two(config):
    for i in range(1, 4):
        if i == 2 and config["n"] == 2:
            raise ValueError("boom")
        report({"score": i})


def test_a_handed_over_run_keeps_how_its_trial_ended(sweep):
    out = sweep(
        fails_at_two,
        {"n": tune.grid_search([1, 2])},
        tune_config=tune.TuneConfig(reuse_actors=True),
    )
    assert len(out.results) == 2 and len(out.results.errors) == 1
    assert out.aborted == [] and len(out.runs) == 2
    codes = {r.config["n"]: out.run_for(r).exit_code for r in out.results}
    assert codes == {1: 0, 2: 1}
    assert out.run_for(next(r for r in out.results if r.config["n"] == 2)).column(
        "score"
    ) == [1]


@wandb_trainable(project="node")
def fails_the_first_time(config):
    import wandb

    assert wandb.run is not None  # waits until the run has started
    marker = Path(config["marker"])
    report({"service_started_here": service_started_here()})
    if not marker.exists():
        marker.touch()
        raise ValueError("the first time")
    report({"service_started_here": service_started_here()})


def test_a_restored_experiment_gets_its_node_service_too(ray_session, tmp_path):
    # Tune saves its controller's state with the experiment and restores it:
    # nothing of wandbtune's may come back with it and keep the restored
    # experiment from starting its node services.
    storage = tmp_path / "results"
    space = {"marker": str(tmp_path / "failed")}
    first = tune.Tuner(
        fails_the_first_time,
        param_space=space,
        run_config=RunConfig(name="restore", storage_path=str(storage), verbose=0),
    ).fit()
    assert first[0].error is not None
    (result,) = tune.Tuner.restore(
        str(storage / "restore"), fails_the_first_time, resume_errored=True
    ).fit()
    assert result.error is None
    here = result.metrics_dataframe["service_started_here"].tolist()
    assert len(here) >= 1 and not any(here), here
