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
from wandbtune._callback_runs import CallbackRuns
from wandbtune._experiment import (
    ExperimentLog,
    TrialOutcomes,
    experiment_run_in_this_fit,
    experiment_runs_unfinished,
    tune_setup,
)
from wandbtune._mixin import WandbTrainableMixin
from wandbtune._run import (
    ERROR,
    INTERRUPTED,
    OUTAGE_TEARDOWN_S,
    Outcome,
    flush_wandb,
    project_of,
)
from wandbtune._settings import ConfigError, Settings

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
        experiment_run: bool = True,
        metric: Optional[str] = None,
        metric_mode: Optional[str] = None,
        **wandb_init_kwargs: Any,
    ) -> None:
        if not isinstance(experiment_run, bool):
            raise ConfigError(
                "WandbLoggerCallback: experiment_run must be True or False, got "
                f"{experiment_run!r}."
            )
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
        self._runs = CallbackRuns()
        self._skipped: set[str] = set()
        #: Trials whose settings say upload_checkpoints.
        self._uploads: set[str] = set()
        #: The experiment's own run (and how each trial ended), on by default.
        self._experiment: Optional[ExperimentLog] = None
        self._outcomes = TrialOutcomes()
        if experiment_run:
            self._experiment = ExperimentLog(
                self._settings,
                metric=metric,
                metric_mode=metric_mode,
                where="WandbLoggerCallback",
                outage_teardown=False,  # the callback's end stops the service
            )
            self._outcomes = self._experiment.outcomes
        self._metric = (metric, metric_mode)

    # --- Tune's events: the trials' runs, and the experiment run --------------

    def setup(
        self,
        stop: Any = None,
        num_samples: Optional[int] = None,
        total_num_samples: Optional[int] = None,
        **info: Any,
    ) -> None:
        if self._experiment is not None and experiment_run_in_this_fit():
            # An ExperimentRun in the same fit() logs the experiment's run
            # (the same run: a second start would find its id in use).
            logger.info(
                "wandbtune: WandbLoggerCallback leaves the experiment's run to "
                "the ExperimentRun beside it."
            )
            self._experiment = None
            self._outcomes = TrialOutcomes()
        if self._experiment is not None:
            self._experiment.setup(
                stop=stop,
                num_samples=num_samples,
                total_num_samples=total_num_samples,
                **info,
            )
        else:
            self._outcomes.setup = tune_setup(*self._metric)

    def on_trial_start(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        super().on_trial_start(iteration, trials, trial, **info)
        if self._experiment is not None:
            self._experiment.on_trial_start(trial, trials)
        else:
            self._outcomes.start(trial)

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Any],
        trial: Any,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        if self._experiment is not None:
            self._experiment.on_trial_result(trial, result)
        else:
            self._outcomes.result(trial, result)
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        if self._experiment is not None:
            self._experiment.on_trial_complete(trial)
        else:
            self._outcomes.complete(trial)
        super().on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        if self._experiment is not None:
            self._experiment.on_trial_error(trial)
        else:
            self._outcomes.error(trial)
        super().on_trial_error(iteration, trials, trial, **info)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._runs.raise_failure()
        super().on_step_end(iteration, trials, **info)
        if self._experiment is not None:
            self._experiment.on_step_end()

    def get_state(self) -> Optional[dict[str, Any]]:
        if self._experiment is not None:
            return {"experiment": self._experiment.get_state()}
        return {"outcomes": self._outcomes.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if self._experiment is not None and "experiment" in state:
            self._experiment.set_state(state["experiment"])
        elif "outcomes" in state:
            self._outcomes.set_state(state["outcomes"])

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the experiment's storage (tuner.pkl):
        # no key and no live runs go with it.
        state = self.__dict__.copy()
        state["_settings"] = replace(self._settings, api_key=None)
        return state

    def log_trial_start(self, trial: Any) -> None:
        trial_id = trial.trial_id
        if self._runs.is_open(trial_id) or trial_id in self._skipped:
            return
        if _is_decorated(trial):
            self._skipped.add(trial_id)
            logger.warning(
                "wandbtune: %s is decorated with @wandb_trainable, which logs its "
                "trials already; WandbLoggerCallback leaves them to it.",
                trial,
            )
            return
        # Bad settings raise here, on the driver, before every trial fails;
        # the run itself starts off Tune's loop.
        settings = self._settings.check_trial_config(trial.config)
        project_of(settings, str(trial))
        if not settings.offline():
            settings.read_api_key()  # a missing key file, named now
        if settings.upload_checkpoints:
            self._uploads.add(trial_id)
        storage = getattr(trial, "storage", None)
        self._runs.start(
            trial_id,
            settings,
            trial_name=str(trial),
            experiment=_compat.experiment_name(storage),
            config=trial.config,
            dir=_compat.storage_trial_dir(storage),
        )

    def log_trial_result(
        self, iteration: int, trial: Any, result: dict[str, Any]
    ) -> None:
        self._runs.log_result(trial.trial_id, result)

    def on_checkpoint(
        self,
        iteration: int,
        trials: list[Any],
        trial: Any,
        checkpoint: Any,
        **info: Any,
    ) -> None:
        if trial.trial_id in self._uploads:  # the trial's own setting
            last = getattr(trial, "last_result", None) or {}
            self._runs.log_checkpoint(
                trial.trial_id, checkpoint, last.get("training_iteration")
            )

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        trial_id = trial.trial_id
        if self._runs.is_open(trial_id):
            outcome = _outcome(trial, self._outcomes.get(trial_id))
            self._runs.end(trial_id, outcome, failed)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials still running here were interrupted (Tuner.fit() stopped):
        # finished like a stopped trial (exit code 0), as the decorator does,
        # holding everything Tune received; Tuner.restore resumes them.
        outcomes = self._outcomes.end(trials)
        by_id = {trial.trial_id: trial for trial in trials}
        for trial_id in self._runs.open_trials():
            outcome = _outcome(by_id.get(trial_id), outcomes.get(trial_id))
            self._runs.end(trial_id, outcome, failed=False)
        try:
            if self._experiment is not None:
                # While the trials' runs are finished on their threads.
                self._experiment.on_experiment_end(trials, flush=False)
        finally:
            self._runs.close()
        if (
            "wandb" in sys.modules
            and _compat.wandb_open_runs() == 0
            and not experiment_runs_unfinished()  # an ExperimentRun's, ending later
        ):
            # No run of the user's is open in this process either: wait until
            # W&B's service has written everything before fit() returns.
            # (With one open, shutting the service down would end it too.)
            # After an outage, every run is finished: a service left retrying
            # is stopped soon.
            flush_wandb(OUTAGE_TEARDOWN_S if self._runs.saw_outage else None)
        self._runs.raise_failure()


def _outcome(trial: Any, name: Optional[str]) -> Outcome:
    """The outcome to record in a trial's run: with Tune's error message
    (``Type: message``) for an error."""
    name = name or INTERRUPTED
    if name != ERROR:
        return Outcome(name)
    message = _compat.trial_error_message(trial)
    return Outcome(ERROR, error=message)


def _is_decorated(trial: Any) -> bool:
    try:
        cls = trial.get_trainable_cls()
    except Exception:  # noqa: BLE001
        return False
    return isinstance(cls, type) and issubclass(cls, WandbTrainableMixin)
