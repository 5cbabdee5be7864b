"""Ray Train online, against the suite's W&B-compatible server: a decorated
training loop's run reaches the server, and ``all_ranks=True`` has every rank
join rank 0's run (W&B's shared mode) without a second run or a second
end."""

from __future__ import annotations

import pytest

from tests.online_fixtures import *  # noqa: F403 - the fixtures
from tests.online_fixtures import Online, with_key
from tests.raycompat import DataParallelTrainer, TrainRunConfig, scaling
from tests.test_train import _loop
from wandbtune import ConfigError, wandb_trainable


def _fit(tmp_path, loop, name):
    DataParallelTrainer(
        loop,
        train_loop_config={"epochs": 3},
        scaling_config=scaling(2),
        run_config=TrainRunConfig(name=name, storage_path=str(tmp_path / "storage")),
    ).fit()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("all_ranks", [False, True])
def test_a_training_loops_run_reaches_the_server(
    online: Online, proxy, tmp_path, all_ranks
):
    loop = wandb_trainable(project="train-online", all_ranks=all_ranks, **with_key())(
        _loop
    )
    _fit(tmp_path, loop, name=f"ranks-{all_ranks}")
    stored = online.store.runs("train-online").values()
    runs = [r for r in stored if r.name == f"ranks-{all_ranks}"]
    assert len(runs) == 1, runs  # one run, whatever the ranks
    (run,) = runs
    assert run.state == "finished"
    rows = online.store.rows(run.run_id)
    assert [row["loss"] for row in rows if "loss" in row] == [1.0, 2.0, 3.0]
    # With all_ranks, rank 1 writes to the same run (shared mode) and leaves
    # its state to rank 0. (openwandb keeps no per-writer label, so which
    # rank sent what cannot be checked here.)
    streams = [
        s for s in proxy.seen if run.run_id in s.path and "file_stream" in s.path
    ]
    assert [s.exitcode for s in streams if s.complete] == [0]


def test_all_ranks_is_refused_offline_when_given():
    with pytest.raises(ConfigError, match="all_ranks=True needs W&B online"):
        wandb_trainable(project="p", all_ranks=True, mode="offline")(_loop)
