"""Early stopping with ASHA: stopped trials are finished, complete W&B runs.

python examples/asha.py [STORAGE_PATH]
"""

from _common import offline_unless_logged_in, print_runs, storage_path

offline_unless_logged_in()

from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from wandbtune import wandb_trainable  # noqa: E402


@wandb_trainable(project="wandbtune-asha")
def train_fn(config):
    accuracy = 0.0
    for _ in range(20):
        accuracy += config["lr"] * (1 - accuracy)
        tune.report({"accuracy": accuracy})


if __name__ == "__main__":
    results = tune.Tuner(
        train_fn,
        param_space={"lr": tune.grid_search([0.3, 0.1, 0.03, 0.01])},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                metric="accuracy",
                mode="max",
                max_t=20,
                grace_period=2,
                reduction_factor=2,
            ),
            max_concurrent_trials=2,
        ),
        run_config=tune.RunConfig(name="asha", storage_path=storage_path()),
    ).fit()
    print_runs(results.experiment_path)
