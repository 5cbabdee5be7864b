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
from wandbtune._run import (
    INIT_TIMEOUT_S,
    TEARDOWN_TIMEOUT_S,
    TrialRun,
    flush_wandb,
    init_kwargs,
    start_or_warn,
)
from wandbtune._settings import Settings
from wandbtune._worker import Worker

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

    W&B's work (starting runs, logging rows, finishing) is done in order on a
    thread of the callback's own, so Tune's loop never waits for it; it is all
    done when ``fit()`` returns.
    """

    #: How long the end of the experiment waits for W&B's thread to be done.
    END_WAIT_S = INIT_TIMEOUT_S + TEARDOWN_TIMEOUT_S + 15.0

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
        self._runs: dict[str, TrialRun] = {}  # only the W&B thread uses it
        self._started: set[str] = set()  # trials handed to the W&B thread
        self._worker = Worker("wandbtune-callback")
        self._error: Optional[BaseException] = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment's storage (tuner.pkl):
        # no key, no live runs and no thread go with it.
        state = self.__dict__.copy()
        state["_settings"] = replace(self._settings, api_key=None)
        state["_runs"] = {}
        state["_started"] = set()
        state["_worker"] = None
        state["_error"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._worker = Worker("wandbtune-callback")

    def log_trial_start(self, trial: Any) -> None:
        self._raise_error()
        trial_id = trial.trial_id
        if trial_id in self._started:
            return
        self._started.add(trial_id)
        if _is_decorated(trial):
            logger.warning(
                "wandbtune: %s is decorated with @wandb_trainable, which logs its "
                "trials already; WandbLoggerCallback leaves them to it.",
                trial,
            )
            return
        # Bad settings raise here, on the driver, before every trial fails.
        settings = self._settings.check_trial_config(trial.config)
        storage = getattr(trial, "storage", None)
        info: dict[str, Any] = dict(
            trial_id=trial_id,
            trial_name=str(trial),
            experiment=_compat.experiment_name(storage),
            config=trial.config,
            dir=_compat.storage_trial_dir(storage),
        )
        init_kwargs(settings, **info)
        self._worker.submit(self._start, settings, info)
        if settings.strict:
            # No trial goes on unless its run has started.
            self._worker.wait_idle(self.END_WAIT_S)
            self._raise_error()

    def _raise_error(self) -> None:
        """Raise, on Tune's thread, what failed a run's start in the W&B thread."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _start(self, settings: Settings, info: dict[str, Any]) -> None:
        try:
            run = start_or_warn(settings, exclusive=False, **info)
        except BaseException as exc:  # noqa: BLE001 - raised on Tune's thread
            # Bad settings, or strict=True: fails fit() at the next hook.
            self._error = exc
            return
        if run is not None:
            self._runs[info["trial_id"]] = run

    def log_trial_result(
        self, iteration: int, trial: Any, result: dict[str, Any]
    ) -> None:
        self._raise_error()
        if trial.trial_id in self._started:
            # A copy: Tune may change its dict while the W&B thread logs it.
            self._worker.submit(self._log, trial.trial_id, dict(result))

    def _log(self, trial_id: str, result: dict[str, Any]) -> None:
        run = self._runs.get(trial_id)
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
        if trial.trial_id in self._started:
            last = getattr(trial, "last_result", None) or {}
            self._worker.submit(
                self._log_checkpoint,
                trial.trial_id,
                checkpoint,
                last.get("training_iteration"),
            )

    def _log_checkpoint(self, trial_id: str, checkpoint: Any, iteration: Any) -> None:
        run = self._runs.get(trial_id)
        if run is not None:
            run.log_checkpoint(checkpoint, iteration)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._raise_error()
        if trial.trial_id in self._started:
            self._worker.submit(self._finish, trial.trial_id, failed)

    def _finish(self, trial_id: str, failed: bool) -> None:
        run = self._runs.pop(trial_id, None)
        if run is not None:
            run.finish(failed=failed)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials still running here were interrupted (Tuner.fit() stopped):
        # finished like a stopped trial (exit code 0), as the decorator does,
        # holding everything Tune received; Tuner.restore resumes them.
        self._worker.submit(self._finish_all)
        if not self._worker.stop(self.END_WAIT_S):
            logger.warning(
                "wandbtune: W&B did not finish the runs within %.0f s; what it "
                "wrote is on disk for `wandb sync`.",
                self.END_WAIT_S,
            )
        self._raise_error()
        if "wandb" in sys.modules and _compat.wandb_open_runs() == 0:
            # No run of the user's is open in this process either: wait until
            # W&B's service has written everything before fit() returns.
            # (With one open, shutting the service down would end it too.)
            flush_wandb()

    def _finish_all(self) -> None:
        for trial_id in list(self._runs):
            self._finish(trial_id, failed=False)


def _is_decorated(trial: Any) -> bool:
    try:
        cls = trial.get_trainable_cls()
    except Exception:  # noqa: BLE001
        return False
    return isinstance(cls, type) and issubclass(cls, WandbTrainableMixin)
