"""Tune's public names, on every supported Ray.

Recent Ray has ``RunConfig``, ``CheckpointConfig``, ``Checkpoint``, ``report``
and ``get_checkpoint`` in ``ray.tune``; older Ray (2.30) has them only in
``ray.train``, which is what users of older Ray call in their Tune trainables.
The tests use whichever this Ray has, so the same test runs on both ends of the
supported range.
"""

from __future__ import annotations

from typing import Any

import ray.train
from ray import tune

#: True when this Ray has ``ray.tune.report`` (2.30 has not).
HAS_TUNE_REPORT = hasattr(tune, "report")


def _tune_or_train(name: str) -> Any:
    found = getattr(tune, name, None)
    return found if found is not None else getattr(ray.train, name)


report = _tune_or_train("report")
get_checkpoint = _tune_or_train("get_checkpoint")
Checkpoint = _tune_or_train("Checkpoint")
CheckpointConfig = _tune_or_train("CheckpointConfig")
FailureConfig = _tune_or_train("FailureConfig")
RunConfig = _tune_or_train("RunConfig")

# Ray Train: the V2 trainer on current Ray (its RunConfig is ray.train's), the
# V1 trainer on 2.30. V1 runs the trainer as a Tune trial that needs a CPU of
# its own unless told otherwise; two workers then fit the suite's 2 CPUs.
try:
    from ray.train.v2.api.data_parallel_trainer import (
        DataParallelTrainer as DataParallelTrainer,
    )

    TRAIN_V2 = True
except ImportError:  # Ray 2.30
    from ray.train.data_parallel_trainer import (  # type: ignore[no-redef]
        DataParallelTrainer as DataParallelTrainer,
    )

    TRAIN_V2 = False

TrainRunConfig = ray.train.RunConfig
TrainFailureConfig = ray.train.FailureConfig


def scaling(num_workers: int = 2, cpus_per_worker: float = 1.0) -> Any:
    """``ScalingConfig`` for ``num_workers`` CPU workers that fit 2 CPUs."""
    if TRAIN_V2:
        return ray.train.ScalingConfig(
            num_workers=num_workers, resources_per_worker={"CPU": cpus_per_worker}
        )
    return ray.train.ScalingConfig(
        num_workers=num_workers,
        resources_per_worker={"CPU": cpus_per_worker},
        trainer_resources={"CPU": 0},
    )
