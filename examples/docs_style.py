"""The style of Ray's documentation: settings in the trial config, train.report.

    python examples/docs_style.py [STORAGE_PATH]

The "wandb" entry of the config sets the project and the API key file for
each trial; it is never logged as W&B config. `train.report` (ray.train)
works inside a decorated trainable on current Ray, where plain Tune rejects it,
and on older Ray, where it is Tune's own API. Offline, the key file need not
exist.
"""

from _common import offline_unless_logged_in, print_runs, storage_path

offline_unless_logged_in()

from ray import train, tune  # noqa: E402

from wandbtune import wandb_trainable  # noqa: E402

# Recent Ray: tune.RunConfig. Older Ray (2.30), and its docs: train.RunConfig.
RunConfig = getattr(tune, "RunConfig", None) or train.RunConfig


@wandb_trainable
def train_fn(config):
    for _ in range(10):
        loss = config["a"] + config["b"]
        train.report({"loss": loss})


if __name__ == "__main__":
    results = tune.Tuner(
        train_fn,
        param_space={
            "a": tune.choice([1, 2, 3]),
            "b": tune.choice([4, 5, 6]),
            "wandb": {
                "project": "Optimization_Project",
                "api_key_file": "~/.wandb_key",
            },
        },
        run_config=RunConfig(name="docs_style", storage_path=storage_path()),
    ).fit()
    print_runs(results.experiment_path)
