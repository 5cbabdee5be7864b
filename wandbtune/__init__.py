"""wandbtune: one decorator, and every Ray Tune trial is a complete W&B run."""

from wandbtune._decorator import wandb_trainable
from wandbtune._experiment import ExperimentRun
from wandbtune._settings import ConfigError
from wandbtune._setup import setup_wandb
from wandbtune.callback import WandbLoggerCallback

__all__ = [
    "ConfigError",
    "ExperimentRun",
    "WandbLoggerCallback",
    "setup_wandb",
    "wandb_trainable",
]
__version__ = "0.1.0"
