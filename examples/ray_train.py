"""Ray Train: one W&B run per training run, logged by rank 0.

    python examples/ray_train.py [STORAGE_PATH]

Two CPU workers train a toy model with DataParallelTrainer (TorchTrainer in
practice). Runs offline without a W&B account.
"""

from _common import offline_unless_logged_in, print_runs, storage_path

offline_unless_logged_in()

import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
from ray import train  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402

from wandbtune import wandb_trainable  # noqa: E402

try:  # Train V2, the default on current Ray
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
except ImportError:  # Ray 2.30
    from ray.train.data_parallel_trainer import DataParallelTrainer  # type: ignore


@wandb_trainable(project="wandbtune-train")
def train_loop_per_worker(config):
    rank = train.get_context().get_world_rank()
    start, weight = 0, 0.0
    checkpoint = train.get_checkpoint()
    if checkpoint:  # a restarted worker group goes on from here
        with checkpoint.as_directory() as path:
            state = json.loads(Path(path, "state.json").read_text())
            start, weight = state["epoch"], state["weight"]
    for epoch in range(start + 1, config["epochs"] + 1):
        weight += config["lr"] * (1.0 - weight)  # each rank its shard, in reality
        loss = (1.0 - weight) ** 2
        with tempfile.TemporaryDirectory() as path:
            Path(path, "state.json").write_text(
                json.dumps({"epoch": epoch, "weight": weight})
            )
            train.report(
                {"loss": loss, "epoch": epoch, "rank": rank},
                checkpoint=train.Checkpoint.from_directory(path),
            )


if __name__ == "__main__":
    ray.init(num_cpus=3, include_dashboard=False)
    scaling = {"num_workers": 2, "resources_per_worker": {"CPU": 1}}
    if DataParallelTrainer.__module__.startswith("ray.train.data_parallel"):
        scaling["trainer_resources"] = {"CPU": 0}  # Ray 2.30 runs it as a trial
    result = DataParallelTrainer(
        train_loop_per_worker,
        train_loop_config={"epochs": 5, "lr": 0.3},
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(name="ray-train", storage_path=storage_path()),
    ).fit()
    print(f"Trained: {result.path}")
    # Train V2: the run's directory; Ray 2.30: its trial's, inside it
    run_dir = Path(result.path)
    print_runs(str(run_dir if run_dir.name == "ray-train" else run_dir.parent))
