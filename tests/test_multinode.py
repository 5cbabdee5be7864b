"""Trials on other nodes: a simulated cluster (``ray.cluster_utils.Cluster``)
with a head that runs no trials and two worker nodes.

The API key given to the decorator reaches the trials on the worker nodes
(in the pickled trainable, through Ray, not through the experiment's
storage), and each of them logs a complete run; the same for the ranks of a
Ray Train run spread over both nodes. A node that joins during an
experiment gets a W&B service of its own for its trials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from tests.conftest import ROOT
from tests.helpers import run_sweep
from tests.raycompat import DataParallelTrainer, TrainRunConfig, report, scaling
from wandbtune import wandb_trainable
from wandbtune._compat import wandb_can_hand_over

KEY = "wbtune0node" + "5" * 29  # 40 characters, like a real key


def _files_with_key(root: Path) -> list[str]:
    return [
        str(path)
        for path in root.rglob("*")
        if path.is_file() and KEY.encode() in path.read_bytes()
    ]


@pytest.fixture(scope="module")
def cluster() -> Any:
    import os
    import sys

    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(
        address=cluster.address,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[:1]])}
        },
    )
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_trials_on_worker_nodes_get_the_key_and_log_complete_runs(cluster, tmp_path):
    import ray

    head = cluster.head_node.node_id

    @wandb_trainable(project="nodes", api_key=KEY)
    def on_a_node(config):
        import ray

        from wandbtune import _mixin

        run = _mixin.active_run()
        for i in range(3):
            report(
                {
                    "i": i,
                    "node": ray.get_runtime_context().get_node_id(),
                    "has_key": run is not None and run.settings.read_api_key() == KEY,
                }
            )

    out = run_sweep(on_a_node, {"n": tune.grid_search([0, 1])}, tmp_path)
    assert len(out.runs) == 2
    nodes = set()
    for run in out.runs.values():
        assert run.column("i") == [0, 1, 2] and run.exit_code == 0
        assert run.column("has_key") == [True] * 3
        nodes.update(run.column("node"))
    assert head not in nodes and len(nodes) == 2  # one trial on each worker node
    assert ray.is_initialized()

    assert _files_with_key(tmp_path) == []


def test_a_training_loops_ranks_on_worker_nodes_get_the_key(cluster, tmp_path):
    import hashlib

    import ray

    from wandbtune.testing import read_runs

    head = cluster.head_node.node_id
    seen = tmp_path / "seen"
    seen.mkdir()

    @wandb_trainable(project="nodes", api_key=KEY)
    def loop(config):
        import gc
        import hashlib

        import ray.train

        from wandbtune._settings import Settings

        # The decorated loop's settings, as this rank unpickled them (the key
        # compared by its hash: this loop is pickled with what it refers to).
        keys = [
            hashlib.sha256(o.api_key.encode()).hexdigest()
            for o in gc.get_objects()
            if isinstance(o, Settings) and o.api_key
        ]
        rank = ray.train.get_context().get_world_rank()
        node = ray.get_runtime_context().get_node_id()
        Path(config["seen"], f"rank-{rank}").write_text(
            json.dumps({"node": node, "has_key": config["key_sha256"] in keys})
        )
        for i in range(3):
            ray.train.report({"i": i})

    DataParallelTrainer(
        loop,
        train_loop_config={
            "seen": str(seen),
            "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
        },
        scaling_config=scaling(2),
        run_config=TrainRunConfig(name="nodes", storage_path=str(tmp_path / "storage")),
    ).fit()

    ranks = {path.name: json.loads(path.read_text()) for path in seen.iterdir()}
    assert sorted(ranks) == ["rank-0", "rank-1"]
    nodes = {rank["node"] for rank in ranks.values()}
    assert head not in nodes and len(nodes) == 2  # one rank on each worker node
    for rank in ranks.values():
        assert rank["has_key"], rank  # the decorator's settings hold it
    runs = read_runs(tmp_path / "storage")
    assert len(runs) == 1
    ((run,),) = runs.values()
    assert run.column("i") == [0, 1, 2] and run.exit_code == 0
    assert ray.is_initialized()

    assert _files_with_key(tmp_path) == []


class AddANodeAfterTheFirstTrial(tune.Callback):
    """Adds a node with the resource "late" when the first trial completes."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.added: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"cluster": None, "added": []}  # Tune saves its callbacks

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.added:
            node = self.cluster.add_node(num_cpus=1, resources={"late": 1})
            self.added.append(node.node_id)


@pytest.mark.skipif(
    not wandb_can_hand_over(),
    reason="this wandb's service cannot take a run over (0.19): no W&B "
    "service per node, each trial process runs its own",
)
def test_a_node_that_joins_during_the_experiment_gets_a_w_and_b_service(
    cluster, tmp_path, monkeypatch
):
    # The first trial runs on a worker node; when it completes, a node with
    # the resource "late" joins the cluster, and the second trial, which
    # needs it, runs there. Its run goes through that node's W&B service,
    # which the driver started before it scheduled the trial's actor
    # (checked to fail: without that, the trial's process ran a service of
    # its own). Last in this module: the new node stays.
    @wandb_trainable(project="nodes")
    def where(config):
        import ray

        from wandbtune import _mixin, _node_service

        assert _mixin.active_run() is not None  # waits until it has started
        report(
            {
                "node": ray.get_runtime_context().get_node_id(),
                "on_the_nodes_service": _node_service.current() is not None,
            }
        )

    import ray

    from wandbtune import _node_service

    # Looked for before every trial actor (not at most once a second): the
    # test does not depend on how long its first trial takes.
    monkeypatch.setattr(_node_service, "NEW_NODES_EVERY_S", 0.0)
    adder = AddANodeAfterTheFirstTrial(cluster)
    out = run_sweep(
        tune.with_resources(
            where, lambda config: {"cpu": 1, "late": 1} if config["n"] else {"cpu": 1}
        ),
        {"n": tune.grid_search([0, 1])},
        tmp_path,
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        callbacks=[adder],
    )
    assert len(adder.added) == 1
    assert len(out.runs) == 2
    by_n = {r.config["n"]: out.runs[r.metrics["trial_id"]] for r in out.results}
    assert by_n[1].column("node") == [adder.added[0]]  # on the node that joined
    assert by_n[0].column("node") != by_n[1].column("node")
    for run in by_n.values():
        assert run.exit_code == 0
        assert run.column("on_the_nodes_service") == [True]
    # Every node's actor, the new one's too, was stopped when fit() ended.
    left = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == _node_service.NAMESPACE
    ]
    assert left == []
