"""Quickstart: every trial of a Tune sweep becomes a W&B run.

    python examples/quickstart.py [STORAGE_PATH]

Needs no W&B account: without credentials it logs offline and tells you how
to upload the runs later with `wandb sync`.
"""

from _common import offline_unless_logged_in, print_runs, storage_path

offline_unless_logged_in()

from ray import tune  # noqa: E402

from wandbtune import wandb_trainable  # noqa: E402


@wandb_trainable(project="wandbtune-quickstart", excludes=["debug"], log_config=True)
def train_fc(config):
    for i in range(10):
        tune.report(
            {
                "mean_accuracy": (i + config["alpha"]) / 10,
                "debug": {"step_seconds": 0.0},
            }
        )


if __name__ == "__main__":
    tuner = tune.Tuner(
        train_fc,
        param_space={
            "alpha": tune.grid_search([0.1, 0.2, 0.3]),
            "beta": tune.uniform(0.5, 1.0),
        },
        run_config=tune.RunConfig(name="quickstart", storage_path=storage_path()),
    )
    results = tuner.fit()
    best = results.get_best_result(metric="mean_accuracy", mode="max")
    print(f"Best alpha: {best.config['alpha']}")
    print_runs(results.experiment_path)
