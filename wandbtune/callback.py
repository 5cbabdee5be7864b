"""``WandbLoggerCallback``: the same runs as the decorator, configured on the
``Tuner``, for class trainables or for users who prefer it there."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Optional

from ray.tune.logger import LoggerCallback

from wandbtune import _compat
from wandbtune._experiment import ExperimentLog, TrialOutcomes, tune_setup
from wandbtune._mixin import WandbTrainableMixin
from wandbtune._run import (
    ERROR,
    FINISH_TIMEOUT_S,
    INTERRUPTED,
    Outcome,
    TrialRun,
    flush_wandb,
    start_or_warn,
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
        self._runs: dict[str, TrialRun] = {}
        self._finisher = _Finisher()
        self._skipped: set[str] = set()
        #: The experiment's own run (and how each trial ended), on by default.
        self._experiment: Optional[ExperimentLog] = None
        self._outcomes = TrialOutcomes()
        if experiment_run:
            self._experiment = ExperimentLog(
                self._settings,
                metric=metric,
                metric_mode=metric_mode,
                where="WandbLoggerCallback",
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
        # Should Tune start a trial again after telling its end (a retry is
        # told as on_trial_recover, and the run stays open), the earlier run
        # (same id) must be finished first.
        self._finisher.wait_for(trial_id, FINISH_TIMEOUT_S)
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
            run.record_outcome(_outcome(trial, self._outcomes.get(trial.trial_id)))
            self._finish(run, failed)

    def _finish(self, run: TrialRun, failed: bool) -> None:
        """Finish a trial's run. Online, that waits for W&B's uploads (about
        a second a run against a server 40 ms away): the wait happens on a
        thread of its own, not in Tune's loop; the end of the experiment
        waits for it. Offline, finishing is CPU only: done here."""
        if run.settings.offline() or run.settings.mode() == "disabled":
            run.finish(failed=failed)
        else:
            self._finisher.submit(str(run.run.id), lambda: run.finish(failed=failed))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials still running here were interrupted (Tuner.fit() stopped):
        # finished like a stopped trial (exit code 0), as the decorator does,
        # holding everything Tune received; Tuner.restore resumes them.
        outcomes = self._outcomes.end(trials)
        by_id = {trial.trial_id: trial for trial in trials}
        for trial_id in list(self._runs):
            run = self._runs.pop(trial_id)
            run.record_outcome(_outcome(by_id.get(trial_id), outcomes.get(trial_id)))
            self._finish(run, failed=False)
        self._finisher.close(FINISH_TIMEOUT_S)
        if self._experiment is not None:
            self._experiment.on_experiment_end(trials, flush=False)
        if "wandb" in sys.modules and _compat.wandb_open_runs() == 0:
            # No run of the user's is open in this process either: wait until
            # W&B's service has written everything before fit() returns.
            # (With one open, shutting the service down would end it too.)
            flush_wandb()


class _Finisher:
    """A thread that finishes runs one after the other, started with the
    first and ended by ``close``."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[
            Optional[tuple[str, threading.Event, Callable[[], None]]]
        ] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        #: run id -> set when that run is finished
        self._pending: dict[str, threading.Event] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Finisher, ())  # pickled with the callback: a new, idle one

    def submit(self, run_id: str, finish: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="wandbtune-finish", daemon=True
            )
            self._thread.start()
        done = self._pending[run_id] = threading.Event()
        self._tasks.put((run_id, done, finish))

    def wait_for(self, run_id: str, timeout: float) -> None:
        """Wait until the run ``run_id`` is finished, if it is being."""
        done = self._pending.get(run_id)
        if done is not None:
            done.wait(timeout)

    def close(self, timeout: float) -> None:
        """Wait until every run submitted is finished (at most ``timeout``:
        each finish is bounded by W&B's ``finish_timeout``), then end."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._tasks.put(None)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(
                "wandbtune: W&B runs were still being finished after %.0f s; "
                "what they wrote is on disk for `wandb sync`.",
                timeout,
            )

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            run_id, done, finish = task
            try:
                finish()
            except Exception:  # noqa: BLE001 - TrialRun.finish never raises
                logger.exception("wandbtune: internal error finishing a run")
            finally:
                if self._pending.get(run_id) is done:
                    del self._pending[run_id]
                done.set()


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
