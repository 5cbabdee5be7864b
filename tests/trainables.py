"""Decorated trainables in an importable module: cloudpickle ships these by
reference (the worker imports this module), unlike ones defined in a test
function or in ``__main__``, which travel by value."""

from __future__ import annotations

from ray import train

from tests.raycompat import report
from wandbtune import wandb_trainable


@wandb_trainable(project="module-project", excludes=["debug"], log_config=True)
def train_fc(config):
    """Module-level trainable in the README's first example."""
    for i in range(4):
        report(
            {
                "mean_accuracy": (i + config["alpha"]) / 10,
                "debug": {"grad": i},
                "nested": {"x": i},
            }
        )


@wandb_trainable
def train_docs_style(config):
    for _ in range(3):
        loss = config["a"] + config["b"]
        train.report({"loss": loss})  # ray.train.report, as in Ray's docs
