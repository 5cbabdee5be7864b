"""Shared fixtures: one local Ray per test module, real wandb in offline mode.

W&B's servers are the one part not run here: every run is offline, and tests
read the ``run-*.wandb`` files W&B would sync (wandbtune.testing).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Set before Ray starts so that every worker process inherits them.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
for var in (
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_PROJECT_NAME",
    "WANDB_DIR",
    "WANDB_GROUP_NAME",
):
    os.environ.pop(var, None)


@pytest.fixture(scope="module")
def ray_session() -> Any:
    """One small local Ray for the whole module (trainables in ``tests`` are
    importable on its workers)."""
    import ray

    start_ray()
    yield ray
    ray.shutdown()


def start_ray() -> None:
    """(Re)start the suite's small local Ray; its processes take this
    process's environment as it is now."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[:1]])}
        },
    )


@pytest.fixture
def sweep(ray_session: Any, tmp_path: Path) -> Callable[..., Any]:
    """Run a tiny real Tune sweep in ``tmp_path`` and return a SweepOutcome."""
    from tests.helpers import run_sweep

    def _run(
        trainable: Any, param_space: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        return run_sweep(trainable, param_space or {}, tmp_path, **kwargs)

    return _run
