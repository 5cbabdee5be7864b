"""Population based training, and one W&B run for the whole experiment.

    python examples/pbt.py [STORAGE_PATH]

Every trial is a W&B run (``@wandb_trainable``). ``wandbtune.ExperimentRun``
adds a run for the experiment itself, beside them in the same project and
group: a ``trials`` table (how each trial ended, its last and best score, its
config), the best trial (as ``get_best_result`` picks it) and its curve, and
an ``exploits`` table of PBT's exploits. Needs no W&B account: without
credentials it logs offline and tells you how to upload the runs later.
"""

from _common import offline_unless_logged_in, print_runs, storage_path

offline_unless_logged_in()

import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from ray import tune  # noqa: E402
from ray.tune.schedulers import PopulationBasedTraining  # noqa: E402

import wandbtune  # noqa: E402
from wandbtune import wandb_trainable  # noqa: E402


@wandb_trainable(project="wandbtune-pbt")
def train_fn(config):
    # A toy model whose best learning rate is 5: PBT moves the population there.
    step, score = 0, 0.0
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # PBT restarts a trial from another trial's checkpoint
        with checkpoint.as_directory() as path:
            state = json.loads(Path(path, "state.json").read_text())
            step, score = state["step"], state["score"]
    while step < 10:
        step += 1
        score += config["lr"] - 0.1 * config["lr"] ** 2
        if step % 2:
            tune.report({"score": score})
            continue
        with tempfile.TemporaryDirectory() as path:
            Path(path, "state.json").write_text(
                json.dumps({"step": step, "score": score})
            )
            tune.report(
                {"score": score}, checkpoint=tune.Checkpoint.from_directory(path)
            )


if __name__ == "__main__":
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=4,
        hyperparam_mutations={"lr": [0.5, 1.0, 2.0, 5.0, 8.0]},
        quantile_fraction=0.5,
        # Not synch=True: in Ray 2.30 to 2.60 synchronous PBT can end a trial
        # early and leave the others paused for ever (ray-project/ray#57906).
    )
    results = tune.Tuner(
        train_fn,
        param_space={"lr": tune.grid_search([0.5, 1.0, 2.0, 8.0])},
        tune_config=tune.TuneConfig(
            scheduler=pbt, metric="score", mode="max", reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name="pbt",
            storage_path=storage_path(),
            # One run for the experiment: same project and group as the trials.
            callbacks=[wandbtune.ExperimentRun(project="wandbtune-pbt")],
        ),
    ).fit()
    best = results.get_best_result()
    print(f"Best trial: {best.metrics['trial_id']} (lr {best.config['lr']})")
    print_runs(results.experiment_path)
    experiment_runs = os.path.join(results.experiment_path, "wandb", "offline-run-*")
    if os.environ.get("WANDB_MODE") == "offline":
        print("and the experiment's own run (its trials, best trial and exploits):")
        print(f"  wandb sync {experiment_runs}")
