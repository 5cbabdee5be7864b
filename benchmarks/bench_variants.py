"""What the benchmark runs: the shapes of a sweep and the ways of logging it.

A shape ``TRIALSxREPORTS`` is a sweep of TRIALS grid points, each reporting
REPORTS times. A variant is one way of logging that sweep to W&B (or not, for
``bare``). ``make_variant(name)`` gives the trainable and the Tune callbacks.

The trainables are pickled *by value*, as they were when they lived in the
script's ``__main__``: ``make_variant`` registers this module with Ray's
cloudpickle, so Ray workers do not need to import it.

Online variants (``<variant>-online``, run by ``bench.py --online``) are the
same four W&B variants with ``mode="online"`` passed to W&B's entry point.
They need a server, whose URL and key reach every Ray worker through
``WANDB_BASE_URL`` / ``WANDB_API_KEY`` set in ``os.environ`` before
``ray.init`` (see ``bench_online.py``).

A trial can do some work before each report (``work_s`` in its config,
absent for the offline shapes): ``time.sleep`` (``work="sleep"``, work done
elsewhere, as on a GPU) or a busy loop on the trial's core (``work="cpu"``).
"""

from __future__ import annotations

import sys
from typing import Any

VARIANTS = [
    "bare",
    "decorator",
    "wandbtune-callback",
    "ray-callback",
    "ray-setup_wandb",
]
W_AND_B_VARIANTS = VARIANTS[1:]
#: Run only when named in --variants: the callback without its experiment run,
#: to measure what the experiment run costs the driver.
EXTRA_VARIANTS = ["wandbtune-callback-no-experiment-run"]
ONLINE_SUFFIX = "-online"
ONLINE_VARIANTS = [v + ONLINE_SUFFIX for v in W_AND_B_VARIANTS]
DEFAULT_SHAPES = ["8x200", "1x3000"]
LARGE_SHAPE = "64x50"
WARMUP_SHAPE = (2, 5)  # trials, reports: one untimed sweep per variant
PROJECT = "bench"
# The online shape (issue #11): 6 trials x 20 reports, 20 ms of work before
# each report, 2 trials at a time.
ONLINE_SHAPES = ["6x20"]
ONLINE_WORK_MS = 20.0
ONLINE_MAX_CONCURRENT = 2


def parse_shape(shape: str) -> tuple[int, int]:
    """'8x200' -> (8 trials, 200 reports)."""
    trials, reports = (int(x) for x in shape.split("x"))
    return trials, reports


def is_online(variant: str) -> bool:
    return variant.endswith(ONLINE_SUFFIX)


# --------------------------------------------------------------------------
# Trainables (pickled by value: see the module docstring)
# --------------------------------------------------------------------------


def work(config: dict[str, Any]) -> None:
    """The trial's work before one report: ``work_s`` seconds, if set."""
    import time

    seconds = config.get("work_s", 0)
    if not seconds:
        return
    if config.get("work", "sleep") == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def train_plain(config: dict[str, Any]) -> None:
    from ray import tune

    n = config["n"]
    for i in range(n):
        work(config)
        tune.report({"loss": 1.0 / (i + 1), "acc": i / n, "step": i})


def train_setup_wandb(config: dict[str, Any]) -> None:
    from ray import tune
    from ray.air.integrations.wandb import setup_wandb

    run = setup_wandb(config, project="bench")
    n = config["n"]
    for i in range(n):
        work(config)
        metrics = {"loss": 1.0 / (i + 1), "acc": i / n, "step": i}
        run.log(metrics)
        tune.report(metrics)
    run.finish()


def train_setup_wandb_online(config: dict[str, Any]) -> None:
    """``train_setup_wandb`` with ``mode="online"``."""
    from ray import tune
    from ray.air.integrations.wandb import setup_wandb

    run = setup_wandb(config, project="bench", mode="online")
    n = config["n"]
    for i in range(n):
        work(config)
        metrics = {"loss": 1.0 / (i + 1), "acc": i / n, "step": i}
        run.log(metrics)
        tune.report(metrics)
    run.finish()


def make_variant(variant: str) -> tuple[Any, list[Any]]:
    """(trainable, callbacks) for one variant."""
    import ray.cloudpickle

    import wandbtune

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    name = variant
    # W&B's own arguments: offline variants pass none (WANDB_MODE=offline).
    kwargs: dict[str, Any] = {}
    if is_online(name):
        variant = name[: -len(ONLINE_SUFFIX)]
        kwargs["mode"] = "online"
    if variant == "bare" and not kwargs:
        return train_plain, []
    if variant == "decorator":
        return wandbtune.wandb_trainable(project=PROJECT, **kwargs)(train_plain), []
    if variant == "wandbtune-callback":
        return train_plain, [wandbtune.WandbLoggerCallback(project=PROJECT, **kwargs)]
    if variant == "wandbtune-callback-no-experiment-run":
        callback = wandbtune.WandbLoggerCallback(
            project=PROJECT, experiment_run=False, **kwargs
        )
        return train_plain, [callback]
    if variant == "ray-callback":
        from ray.air.integrations.wandb import WandbLoggerCallback

        return train_plain, [WandbLoggerCallback(project=PROJECT, **kwargs)]
    if variant == "ray-setup_wandb":
        return (train_setup_wandb_online if kwargs else train_setup_wandb), []
    raise ValueError(name)
