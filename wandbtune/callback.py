"""``WandbLoggerCallback``: the same runs as the decorator, configured on the
``Tuner``, for class trainables or for users who prefer it there."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Optional

from ray.tune.logger import LoggerCallback

from wandbtune import _compat
from wandbtune._mixin import WandbTrainableMixin
from wandbtune._run import TrialRun, flush_wandb, start_or_warn
from wandbtune._settings import Settings

__all__ = ["WandbLoggerCallback"]

logger = logging.getLogger("wandbtune")


class WandbLoggerCallback(LoggerCallback):  # type: ignore[misc]
    """Log every trial as one W&B run, from the Tune driver.

    Takes the arguments of Ray's ``WandbLoggerCallback`` and of
    ``@wandb_trainable``, and makes the same runs and rows (one shared path
    from a result to a row). Unlike Ray's, it starts no actor or process per
    trial: the driver holds one W&B run per running trial, side by side. Failed
    trials are finished with exit code 1. The API key is never pickled with the
    callback (Tune writes callbacks into ``tuner.pkl``).

    Use it with class trainables, or to keep W&B out of the trainable's code;
    ``@wandb_trainable`` is lighter on the driver and gives the trainable its
    run as ``wandb.run``.
    """

    def __init__(
        self,
        project: Optional[str] = None,
        group: Optional[str] = None,
        api_key_file: Optional[str] = None,
        api_key: Optional[str] = None,
        excludes: Optional[Sequence[str]] = None,
        log_config: bool = False,
        upload_checkpoints: bool = False,
        strict: bool = False,
        **wandb_init_kwargs: Any,
    ) -> None:
        self._settings = Settings.from_arguments(
            "WandbLoggerCallback",
            project=project,
            group=group,
            api_key_file=api_key_file,
            api_key=api_key,
            excludes=() if excludes is None else excludes,
            log_config=log_config,
            upload_checkpoints=upload_checkpoints,
            strict=strict,
            **wandb_init_kwargs,
        )
        self._settings = replace(self._settings, ship_environ=False)
        self._settings.check_init_kwargs("WandbLoggerCallback")
        self._runs: dict[str, TrialRun] = {}
        self._skipped: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment's storage (tuner.pkl):
        # no key and no live runs go with it.
        state = self.__dict__.copy()
        state["_settings"] = replace(self._settings, api_key=None)
        state["_runs"] = {}
        return state

    def log_trial_start(self, trial: Any) -> None:
        trial_id = trial.trial_id
        if trial_id in self._runs or trial_id in self._skipped:
            return
        if _is_decorated(trial):
            self._skipped.add(trial_id)
            logger.warning(
                "wandbtune: %s is decorated with @wandb_trainable, which logs its "
                "trials already; WandbLoggerCallback leaves them to it.",
                trial,
            )
            return
        settings = self._settings.check_trial_config(trial.config)
        storage = getattr(trial, "storage", None)
        # Bad settings raise here, on the driver, before every trial fails.
        run = start_or_warn(
            settings,
            exclusive=False,
            trial_id=trial_id,
            trial_name=str(trial),
            experiment=_compat.experiment_name(storage),
            config=trial.config,
            dir=_compat.storage_trial_dir(storage),
        )
        if run is None:
            self._skipped.add(trial_id)
        else:
            self._runs[trial_id] = run

    def log_trial_result(
        self, iteration: int, trial: Any, result: dict[str, Any]
    ) -> None:
        run = self._runs.get(trial.trial_id)
        if run is not None:
            run.log_result(result)

    def on_checkpoint(
        self,
        iteration: int,
        trials: list[Any],
        trial: Any,
        checkpoint: Any,
        **info: Any,
    ) -> None:
        run = self._runs.get(trial.trial_id)
        if run is not None:
            last = getattr(trial, "last_result", None) or {}
            run.log_checkpoint(checkpoint, last.get("training_iteration"))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        run = self._runs.pop(trial.trial_id, None)
        if run is not None:
            run.finish(failed=failed)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials still running here were interrupted (Tuner.fit() stopped):
        # finished like a stopped trial (exit code 0), as the decorator does,
        # holding everything Tune received; Tuner.restore resumes them.
        for trial_id in list(self._runs):
            self._runs.pop(trial_id).finish(failed=False)
        if "wandb" in sys.modules and _compat.wandb_open_runs() == 0:
            # No run of the user's is open in this process either: wait until
            # W&B's service has written everything before fit() returns.
            # (With one open, shutting the service down would end it too.)
            flush_wandb()


def _is_decorated(trial: Any) -> bool:
    try:
        cls = trial.get_trainable_cls()
    except Exception:  # noqa: BLE001
        return False
    return isinstance(cls, type) and issubclass(cls, WandbTrainableMixin)
