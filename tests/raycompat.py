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
