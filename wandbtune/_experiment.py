"""One W&B run for the whole Tune experiment, made on the driver.

Beside the trials' runs (same project and group), a run named after the
experiment, with ``job_type="tune-experiment"`` and an id derived from the
experiment's directory (so ``Tuner.restore`` continues it), holds:

- ``trials``: a table with one row per trial: its id and run id, name,
  status, how it ended (``outcome``), iterations, the last and the best value
  of the Tune metric, PBT exploits, and its config (flattened, without
  ``"wandb"`` and excluded keys). W&B tables are immutable: each log is a new
  version. It is logged ``table_interval_s`` after the run starts, again at
  most that often while trials report or end, and once more when the
  experiment ends.
- the best trial, picked as Tune's ``ResultGrid.get_best_result(metric,
  mode)`` picks it, with Tune's default scope ``"last"``: each trial's last
  reported value of the metric counts, NaN and infinities never win. Summary
  ``best/trial_id``, ``best/<metric>``, ``best/iteration`` and
  ``best/config/<key>``; and a row with ``best/<metric>`` each time the best
  changes (x-axis ``tune/results``, the number of results so far): the curve
  of the sweep converging. (With scope "last" it can go down: when the leading
  trial gets worse, the best is the best of the latest values.)
- ``exploits``: for PBT, one row per exploit (trial, source trial, their
  iterations, old and new config), read from PBT's own log of them,
  ``pbt_global.txt`` in the experiment's directory on the driver (written
  unless ``PopulationBasedTraining(log_config=False)``).
- summary ``tune/trials`` and a count per outcome (``tune/completed``...).

The metric and mode are, in this order: the ones given to wandbtune
(``metric=``, ``metric_mode=``: ``mode=`` is ``wandb.init``'s), those of
``TuneConfig(metric=, mode=)``, those of the scheduler (e.g.
``ASHAScheduler(metric=, mode=)``) or of the searcher.

How a trial ended (``outcome_of``): ``completed`` (its function returned, or
a ``stop=`` criterion was met, or it reached the scheduler's ``max_t``),
``early_stopped`` (a scheduler stopped it before), ``error`` (it failed for
good) or ``interrupted`` (still running, paused or pending when the
experiment ended: ``fit()`` interrupted, ``time_budget_s``, a stopper that
stops all). A ``stop=`` dict is told apart from a scheduler exactly; a
``stop=`` ``Stopper`` object only when the scheduler never stops trials
(FIFO, PBT): with both, a trial a Stopper stopped counts as
``early_stopped``.

All of it happens on the driver: Tune's callbacks are the source. The cost
per result is constant (a few dict operations, and one ``run.log`` of a small
row when the best changes); the table is built only when it is logged.
Nothing here raises into Tune: W&B trouble logs one warning.

Two ways in: ``ExperimentRun``, a Tune callback
(``tune.RunConfig(callbacks=[wandbtune.ExperimentRun(project=...)])``), and
``ExperimentLog``, the same logic as a plain object that another callback
forwards Tune's events to.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import numbers
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional, TypeVar

from ray.tune import Callback

from wandbtune import _compat
from wandbtune._row import clean, flatten, is_excluded
from wandbtune._run import flush_wandb, start_run, stop_service_after_outage
from wandbtune._settings import CONFIG_KEY, GROUP_ENV_VAR, ConfigError, Settings

__all__ = [
    "COMPLETED",
    "EARLY_STOPPED",
    "ERROR",
    "INTERRUPTED",
    "ExperimentLog",
    "ExperimentRun",
    "TrialOutcomes",
    "TuneSetup",
    "outcome_of",
]

logger = logging.getLogger("wandbtune")

#: How a trial ended.
COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
ERROR = "error"
INTERRUPTED = "interrupted"
OUTCOMES = (COMPLETED, EARLY_STOPPED, ERROR, INTERRUPTED)

#: The experiment run's ``job_type``.
JOB_TYPE = "tune-experiment"
#: Keys of the tables in the experiment run.
TRIALS_KEY = "trials"
EXPLOITS_KEY = "exploits"
#: The x-axis of the ``best/<metric>`` curve: results received so far.
RESULTS_KEY = "tune/results"
#: Tune's default scope for ``get_best_result``: each trial's last value.
BEST_SCOPE = "last"
#: The tag given online to the best trial's run.
BEST_TAG = "best"
#: How often (at most) the trials table is logged again while trials run.
TABLE_INTERVAL_S = 30.0
#: How long tagging the best trial's run may take at the end (online).
TAG_TIMEOUT_S = 20.0

#: PBT's log of its exploits, in the experiment's directory on the driver.
PBT_LOG = "pbt_global.txt"
_PERTURBED = "@perturbed"

# Tune's trial statuses (``Trial.PENDING``... are these strings).
_PENDING, _RUNNING, _PAUSED = "PENDING", "RUNNING", "PAUSED"
_TERMINATED, _ERROR = "TERMINATED", "ERROR"

_F = TypeVar("_F", bound=Callable[..., Any])


# --- What the driver knows about the experiment ---------------------------------


@dataclass(frozen=True)
class TuneSetup:
    """The experiment's metric and mode, and what can stop its trials."""

    metric: Optional[str] = None
    mode: Optional[str] = None
    #: A ``stop=`` Stopper object that can stop single trials.
    stopper_stops_trials: bool = False
    #: False for schedulers that never stop a trial (FIFO, PBT).
    scheduler_stops_trials: bool = True
    #: (time attribute, max_t) of ASHA or HyperBand: a trial stopped there ran
    #: its full budget.
    budget: Optional[tuple[str, float]] = None
    scheduler: Optional[str] = None
    search_alg: Optional[str] = None


def tune_setup(metric: Optional[str] = None, mode: Optional[str] = None) -> TuneSetup:
    """What ``tune.run`` (which ``Tuner.fit`` calls) was given, read while it
    sets up its callbacks; ``metric`` and ``mode``, if given, win.

    Tune tells a callback's ``setup`` only the stop criteria and sample
    counts. ``tune.run``'s own arguments (``metric``, ``mode``, the
    ``scheduler``, the experiment's ``stopper``) are read from its frame,
    up the stack; if that is not found (another Ray), only what is given here
    is known.
    """
    found = _compat.tune_run_arguments()
    scheduler = found.get("scheduler")
    search_alg = found.get("search_alg")
    experiments = found.get("experiments")
    stopper = None
    if isinstance(experiments, Sequence) and experiments:
        stopper = getattr(experiments[0], "stopper", None)
    if not metric:
        metric, mode = _first_metric(
            (found.get("metric"), found.get("mode")),
            (
                getattr(scheduler, "metric", None),
                _compat.scheduler_mode(scheduler),
            ),
            (
                getattr(getattr(search_alg, "searcher", None), "metric", None),
                getattr(getattr(search_alg, "searcher", None), "mode", None),
            ),
        )
    return TuneSetup(
        metric=metric,
        mode=mode if mode in ("max", "min") else None,
        stopper_stops_trials=_stops_trials(stopper),
        scheduler_stops_trials=_scheduler_stops_trials(scheduler, bool(found)),
        budget=_budget(scheduler),
        scheduler=type(scheduler).__name__ if scheduler is not None else None,
        search_alg=type(search_alg).__name__ if search_alg is not None else None,
    )


def _first_metric(*candidates: tuple[Any, Any]) -> tuple[Optional[str], Any]:
    for metric, mode in candidates:
        # Tune's placeholder metric when none was given
        if isinstance(metric, str) and metric and metric != "_metric":
            return metric, mode
    return None, None


def _stops_trials(stopper: Any) -> bool:
    """Whether a Tune stopper can stop single trials (a time budget or a
    plateau of the whole experiment stops them all, which is an interrupt)."""
    if stopper is None:
        return False
    from ray.tune.stopper import CombinedStopper, TimeoutStopper
    from ray.tune.stopper.noop import NoopStopper

    if isinstance(stopper, (TimeoutStopper, NoopStopper)):
        return False
    if isinstance(stopper, CombinedStopper):
        return any(_stops_trials(part) for part in _compat.stopper_parts(stopper))
    return True


def _scheduler_stops_trials(scheduler: Any, known: bool) -> bool:
    if not known:
        return True  # unknown: assume it may
    if scheduler is None:
        return False
    from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

    if type(scheduler) is FIFOScheduler:
        return False
    # PBT pauses and exploits, never stops (PB2 is a PBT).
    return not isinstance(scheduler, PopulationBasedTraining)


def _budget(scheduler: Any) -> Optional[tuple[str, float]]:
    """ASHA and HyperBand stop a trial that reached ``max_t``: that trial ran
    its full budget."""
    time_attr, max_t = _compat.scheduler_budget(scheduler)
    if isinstance(time_attr, str) and _is_number(max_t):
        return time_attr, float(max_t)  # type: ignore[arg-type]
    return None


def _run_id(storage: Any, name: str) -> str:
    """The experiment run's id: the same for every ``fit()`` of the same
    experiment directory (``Tuner.restore`` continues the run)."""
    where = _compat.experiment_location(storage) or name
    return "tune-" + hashlib.sha1(where.encode()).hexdigest()[:16]


#: What the experiment run takes from the trials' settings when not given its
#: own: where the trials' runs go.
_INHERITED_INIT_KWARGS = ("entity", "mode")


def _like_the_trials(settings: Settings, trial: Any) -> Settings:
    """``settings``, completed with the trials' (the decorator's, merged with
    the first trial's ``config["wandb"]``) where they say nothing: project,
    group, entity, mode and API key. Decorator users may give these to
    ``@wandb_trainable`` only."""
    own = _trainable_settings(trial) or settings
    trials = own.merged(getattr(trial, "config", None) or {})
    changes: dict[str, Any] = {}
    if not settings.resolved_project() and trials.resolved_project():
        changes["project"] = trials.resolved_project()
    if not settings.group and not settings.env(GROUP_ENV_VAR) and trials.group:
        changes["group"] = trials.group
    if not (settings.api_key or settings.api_key_file):
        changes["api_key"] = trials.api_key
        changes["api_key_file"] = trials.api_key_file
    inherited = {
        k: trials.init_kwargs[k]
        for k in _INHERITED_INIT_KWARGS
        if k in trials.init_kwargs and k not in settings.init_kwargs
    }
    if inherited:
        changes["init_kwargs"] = {**settings.init_kwargs, **inherited}
    return replace(settings, **changes) if changes else settings


#: Every ExperimentLog of this process (the callback's, ExperimentRun's).
_LOGS: weakref.WeakSet[ExperimentLog] = weakref.WeakSet()


def experiment_runs_unfinished() -> bool:
    """True while an experiment run of this process is starting or open: its
    own end finishes it and waits for W&B (a teardown before would cut its
    start short)."""
    return any(log._starting is not None or log._run is not None for log in list(_LOGS))


def experiment_run_in_this_fit() -> bool:
    """True if the callbacks of the ``tune.run`` up the stack (the fit()
    being set up) include an ``ExperimentRun``."""
    callbacks = _compat.tune_run_arguments().get("callbacks")
    try:
        return any(isinstance(callback, ExperimentRun) for callback in callbacks or ())
    except TypeError:  # not a list: nothing to go by
        return False


def _pbt_log(trial: Any) -> Optional[str]:
    path = getattr(trial, "local_experiment_path", None)
    return os.path.join(path, PBT_LOG) if isinstance(path, str) else None


def _trainable_settings(trial: Any) -> Optional[Settings]:
    """The ``@wandb_trainable`` settings of a trial's trainable, if decorated."""
    try:
        cls = trial.get_trainable_cls()
    except Exception:  # noqa: BLE001
        return None
    settings = getattr(cls, "_wandbtune_settings", None)
    return settings if isinstance(settings, Settings) else None


# --- How trials end -----------------------------------------------------------------


def outcome_of(trial: Any, event: str, *, stopped: Optional[str] = None) -> str:
    """How a trial ended, from the Tune callback event that ended it.

    ``event``: ``"complete"`` (``on_trial_complete``), ``"error"``
    (``on_trial_error``) or ``"end"`` (the trial was not finished at
    ``on_experiment_end``). ``stopped``: what ``stop_reason`` said of the
    trial's last result, if Tune flagged it ``done``.

    Tune calls ``on_trial_complete`` for a returned function (its last result
    reached callbacks without ``done``), for a trial stopped on a result
    (``done``: a stop criterion or the scheduler), and for a paused or
    pending trial a scheduler removed (HyperBand).
    """
    if event == "error":
        return ERROR
    if event != "complete":
        status = getattr(trial, "status", None)
        return ERROR if status == _ERROR else INTERRUPTED
    if getattr(trial, "status", None) in (_PAUSED, _PENDING):
        return EARLY_STOPPED
    return stopped or COMPLETED


def stop_reason(trial: Any, result: Mapping[str, Any], setup: TuneSetup) -> str:
    """Why Tune flagged this result ``done`` (call only for such a result):
    ``completed`` for a stop criterion or the scheduler's full budget,
    ``early_stopped`` for a scheduler."""
    criteria = getattr(trial, "stopping_criterion", None) or {}
    for key, limit in criteria.items():
        value = _lookup(result, str(key))
        try:
            if value is not None and value >= limit:
                return COMPLETED
        except TypeError:
            continue
    if setup.budget is not None:
        time_attr, max_t = setup.budget
        value = _lookup(result, time_attr)
        if _is_number(value) and value >= max_t:
            return COMPLETED
    if setup.stopper_stops_trials and not setup.scheduler_stops_trials:
        return COMPLETED
    return EARLY_STOPPED


class TrialOutcomes:
    """Tells how each trial ended, fed with Tune's callback events (driver).

    ``result`` costs a dict lookup unless the result is ``done``. The final
    outcome of a trial is returned by ``complete``, ``error`` or, for trials
    unfinished when the experiment ends, ``end``.
    """

    def __init__(self, setup: Optional[TuneSetup] = None) -> None:
        self.setup = setup or TuneSetup()
        self._stopped: dict[str, str] = {}
        self._final: dict[str, str] = {}
        self._started: set[str] = set()

    def start(self, trial: Any) -> None:
        """A trial (re)starts: a restored or retried one is not over."""
        trial_id = str(trial.trial_id)
        self._started.add(trial_id)
        self._final.pop(trial_id, None)
        self._stopped.pop(trial_id, None)

    def result(self, trial: Any, result: Mapping[str, Any]) -> None:
        # Read now: Ray 2.60 hands callbacks the result that becomes
        # trial.last_result, which it flags done when the function returns.
        if result.get("done"):
            self._stopped[str(trial.trial_id)] = stop_reason(trial, result, self.setup)

    def complete(self, trial: Any) -> str:
        trial_id = str(trial.trial_id)
        outcome = outcome_of(trial, "complete", stopped=self._stopped.get(trial_id))
        self._final[trial_id] = outcome
        return outcome

    def error(self, trial: Any) -> str:
        self._final[str(trial.trial_id)] = ERROR
        return ERROR

    def end(self, trials: Sequence[Any]) -> dict[str, str]:
        """The outcome of every trial at the end of the experiment; those
        not finished yet were interrupted."""
        out: dict[str, str] = {}
        for trial in trials:
            trial_id = str(trial.trial_id)
            outcome = self._final.get(trial_id)
            if outcome is None:
                status = getattr(trial, "status", None)
                if status == _TERMINATED and trial_id not in self._started:
                    # Finished before this fit() (Tuner.restore) and not in
                    # the state Tune restored: what Tune's result says.
                    last = getattr(trial, "last_result", None) or {}
                    outcome = COMPLETED if last.get("done") else INTERRUPTED
                else:
                    outcome = outcome_of(trial, "end")
                self._final[trial_id] = outcome
            out[trial_id] = outcome
        return out

    def get(self, trial_id: str) -> Optional[str]:
        return self._final.get(trial_id)

    def get_state(self) -> dict[str, Any]:
        return {"final": dict(self._final)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        final = state.get("final")
        if isinstance(final, Mapping):
            self._final.update({str(k): str(v) for k, v in final.items()})


# --- The experiment run ---------------------------------------------------------------


def _guarded(method: _F) -> _F:
    """Never raise into Tune: the first failure logs a warning."""

    @functools.wraps(method)
    def wrapper(self: ExperimentLog, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - Tune goes on without it
            self._trouble(f"{method.__name__}: {type(exc).__name__}: {exc}")
            return None

    return wrapper  # type: ignore[return-value]


class ExperimentLog:
    """The experiment's W&B run, fed with Tune's events on the driver.

    ``settings``: project, group, API key, excludes and ``wandb.init``
    arguments, as for the trials' runs; ``metric``/``metric_mode`` override
    what the experiment was given; ``table_interval_s``: the trials table is
    logged again at most this often while trials run.

    Forward to it, from a Tune callback: ``setup(**info)``,
    ``on_trial_start(trial, trials)``, ``on_trial_result(trial, result)``,
    ``on_trial_complete(trial)``, ``on_trial_error(trial)``,
    ``on_step_end()``, ``on_experiment_end(trials, flush=...)``, and
    ``get_state``/``set_state`` (outcomes survive ``Tuner.restore``).
    ``outcomes`` tells how each trial ended.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metric: Optional[str] = None,
        metric_mode: Optional[str] = None,
        table_interval_s: float = TABLE_INTERVAL_S,
        where: str = "ExperimentRun",
        outage_teardown: bool = True,
    ) -> None:
        if metric is not None and not isinstance(metric, str):
            raise ConfigError(f"{where}: metric must be a string, got {metric!r}.")
        if metric_mode not in (None, "max", "min"):
            raise ConfigError(
                f'{where}: metric_mode must be "max" or "min", got {metric_mode!r}.'
            )
        if metric and not metric_mode:
            raise ConfigError(f'{where}: give metric_mode="max" or "min" with metric=.')
        if not _is_number(table_interval_s) or table_interval_s < 0:
            raise ConfigError(
                f"{where}: table_interval_s must be a number of seconds >= 0, "
                f"got {table_interval_s!r}."
            )
        self._settings = settings
        self._metric_arg = metric
        self._mode_arg = metric_mode
        self._interval = float(table_interval_s)
        #: Stop W&B's service when the run cannot start (False: the owner
        #: does that at the experiment's end).
        self._outage_teardown = outage_teardown
        self._reset()

    def _reset(self) -> None:
        self.outcomes = TrialOutcomes()
        self._setup = TuneSetup(metric=self._metric_arg, mode=self._mode_arg)
        self._info: dict[str, Any] = {}
        self._run: Any = None
        self._starting: Optional[_RunStart] = None
        _LOGS.add(self)
        self._off = False
        self._warned = False
        self._finished = False
        #: Tune's list of all trials (the same list object on every call).
        self._all: Optional[Sequence[Any]] = None
        self._seen: dict[str, Any] = {}  # trials seen, in order
        self._initial: dict[str, dict[str, Any]] = {}  # first config seen
        self._tags: dict[str, str] = {}  # PBT's tag of a trial -> its id
        self._results = 0
        self._last: dict[str, float] = {}  # last value of the metric per trial
        self._order: dict[str, int] = {}
        self._best: Optional[tuple[str, float]] = None
        #: Rows of the best-so-far curve from before the run had started.
        self._early_best: list[dict[str, Any]] = []
        self._dirty = False
        self._logged_at = -math.inf
        self._exploits: list[list[Any]] = []
        self._exploit_configs: dict[str, dict[str, Any]] = {}
        self._exploit_counts: dict[str, int] = {}
        self._pbt_offset = 0
        self._exploits_logged = 0
        self._tagged: Optional[str] = None
        self._best_config_keys: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Tune writes callbacks into the experiment's storage (tuner.pkl): no
        # key, no run, no trials go with it.
        return {
            "_settings": replace(self._settings, api_key=None),
            "_metric_arg": self._metric_arg,
            "_mode_arg": self._mode_arg,
            "_interval": self._interval,
            "_outage_teardown": self._outage_teardown,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # --- Tune's events ---------------------------------------------------------

    @property
    def metric(self) -> Optional[str]:
        return self._setup.metric

    @property
    def mode(self) -> Optional[str]:
        return self._setup.mode

    @property
    def run(self) -> Any:
        """The experiment's W&B run (None until it has started: it starts on a
        thread with the first trial, and Tune's next event takes it)."""
        return self._run

    @_guarded
    def setup(self, **info: Any) -> None:
        """At ``Callback.setup``: learns the experiment's metric, mode and
        stoppers (from ``tune.run``, up the stack)."""
        self._info = dict(info)
        self._setup = tune_setup(self._metric_arg, self._mode_arg)
        self.outcomes.setup = self._setup

    @_guarded
    def on_trial_start(
        self, trial: Any, trials: Optional[Sequence[Any]] = None
    ) -> None:
        if trials is not None:
            self._all = trials
        self.outcomes.start(trial)
        self._see(trial)
        self._ensure_run(trial)
        self._dirty = True

    @_guarded
    def on_trial_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        self.outcomes.result(trial, result)
        if self._off:
            return
        trial_id = trial.trial_id
        if trial_id not in self._order:
            self._see(trial)
        self._ensure_run(trial)  # to start it, or to take it once started
        self._results += 1
        self._dirty = True
        metric = self._setup.metric
        if metric and self._setup.mode is not None:
            value = _lookup(result, metric)
            if _is_number(value):
                self._update_best(trial_id, float(value))
        # PBT logs an exploit while Tune handles the result that set it off
        # (before this callback hears of it): read it now, knowing the result.
        self._read_pbt_log(
            [trial], current=(trial_id, result.get("training_iteration"))
        )
        if self._run is not None:
            self._maybe_relog()

    @_guarded
    def on_trial_complete(self, trial: Any) -> None:
        self.outcomes.complete(trial)
        self._trial_ended(trial)

    @_guarded
    def on_trial_error(self, trial: Any) -> None:
        self.outcomes.error(trial)
        self._trial_ended(trial)

    @_guarded
    def on_step_end(self) -> None:
        """Once per step of Tune's loop: logs the table again if it is due."""
        if self._dirty and not self._off and self._ensure_run(None):
            self._maybe_relog()

    @_guarded
    def on_experiment_end(self, trials: Sequence[Any], *, flush: bool = True) -> None:
        """Log everything one last time and finish the run (before ``fit()``
        returns, an interrupted one included). ``flush``: wait until W&B has
        written it, unless other runs are open in this process."""
        if self._finished:
            return
        trials = list(trials)
        self.outcomes.end(trials)
        if self._off:
            return
        for trial in trials:
            if trial.trial_id not in self._order:
                self._see(trial)
        if not self._ensure_run(trials[0] if trials else None, wait=True):
            return
        self._all = trials
        self._finished = True
        try:
            best = self._final_best(trials)
            try:
                self._relog(best=best)
            finally:
                if best is not None:
                    self._tag_best(best[0])
        finally:
            self._finish(flush)

    def get_state(self) -> dict[str, Any]:
        """For ``Callback.get_state``: what ``Tuner.restore`` needs back."""
        return {
            "outcomes": self.outcomes.get_state(),
            "initial": dict(self._initial),
            "results": self._results,
            "tagged": self._tagged,
        }

    @_guarded
    def set_state(self, state: Mapping[str, Any]) -> None:
        outcomes = state.get("outcomes")
        if isinstance(outcomes, Mapping):
            self.outcomes.set_state(outcomes)
        initial = state.get("initial")
        if isinstance(initial, Mapping):
            for trial_id, config in initial.items():
                self._initial.setdefault(str(trial_id), dict(config))
        if isinstance(state.get("results"), int):
            self._results = state["results"]
        if isinstance(state.get("tagged"), str):
            self._tagged = state["tagged"]

    # --- the run -----------------------------------------------------------

    def _ensure_run(self, trial: Any, *, wait: bool = False) -> bool:
        """True once the run has started. It starts off Tune's loop (online,
        a start waits for W&B's server, and the driver's first imports
        wandb): the first call with a trial starts it on a thread, later calls
        take it once it is there; ``wait``: wait for it (the experiment's
        end)."""
        if self._run is not None:
            return True
        if self._off:
            return False
        if self._starting is None:
            if trial is None:
                return False
            try:
                self._starting = self._start(trial)
            except Exception as exc:  # noqa: BLE001 - Tune goes on without it
                self._off = True
                self._trouble(f"W&B could not start it ({type(exc).__name__}: {exc})")
                return False
        if wait:
            self._starting.join(START_WAIT_S)
        if self._starting.is_alive() and not wait:
            return False
        starting, self._starting = self._starting, None
        run = starting.take()
        if run is None:
            self._off = True
            if self._outage_teardown:
                stop_service_after_outage()
            error = starting.error
            why = (
                f"{type(error).__name__}: {error}".splitlines()[0][:300]
                if error is not None
                else f"no run after {START_WAIT_S:.0f} s"
            )
            self._trouble(f"W&B could not start it ({why})")
            return False
        self._run = run
        if starting.api_key:
            # wandb 0.19's client-side API calls (a table asks the server
            # about its artifact type) take the key of the thread that logs.
            _compat.wandb_use_key(starting.api_key)
        metric = self._setup.metric
        if metric:
            try:
                self._run.define_metric(RESULTS_KEY)
                self._run.define_metric(f"best/{metric}", step_metric=RESULTS_KEY)
                early, self._early_best = self._early_best, []
                for row in early:  # found while the run started
                    self._run.log(row)
            except Exception as exc:  # noqa: BLE001
                logger.debug("wandbtune: define_metric failed: %r", exc)
        self._dirty = True
        # The first table is due table_interval_s from now, not at once: a
        # table is an artifact, and logging one held Tune's loop 0.3 s (online,
        # at the first result); an experiment shorter than the interval logs
        # one table, at its end.
        self._logged_at = time.monotonic()
        return True

    def _start(self, trial: Any) -> _RunStart:
        storage = getattr(trial, "storage", None)
        name = _compat.experiment_name(storage) or "tune-experiment"
        settings = _like_the_trials(self._settings, trial)
        settings = replace(
            settings, init_kwargs={**settings.init_kwargs, "job_type": JOB_TYPE}
        )
        return _RunStart(
            settings,
            exclusive=False,
            trial_id=_run_id(storage, name),
            trial_name=name,
            experiment=name,
            config=self._run_config(),
            dir=_compat.storage_experiment_dir(storage),
        )

    def _run_config(self) -> dict[str, Any]:
        setup = self._setup
        config: dict[str, Any] = {
            "metric": setup.metric,
            "mode": setup.mode,
            "best_scope": BEST_SCOPE,
            "scheduler": setup.scheduler,
            "search_alg": setup.search_alg,
        }
        for key in ("num_samples", "total_num_samples", "time_budget_s", "stop"):
            if self._info.get(key) not in (None, {}):
                config[key] = self._info[key]
        return {k: v for k, v in config.items() if v is not None}

    def _finish(self, flush: bool) -> None:
        run, self._run = self._run, None
        self._off = True
        try:
            run.finish()
        except Exception as exc:  # noqa: BLE001
            self._trouble(f"could not finish the run: {exc!r}")
        if flush and "wandb" in sys.modules and _compat.wandb_open_runs() == 0:
            # No other run is open in this process: wait until W&B's service
            # has written everything before fit() returns.
            flush_wandb()

    def _trouble(self, message: str) -> None:
        if self._warned:
            logger.debug("wandbtune: experiment run: %s", message)
            return
        self._warned = True
        logger.warning(
            "wandbtune: the experiment's W&B run: %s. Tune goes on; later trouble "
            "with it is logged at debug level.",
            message[:500],
        )

    # --- trials ------------------------------------------------------------

    def _see(self, trial: Any) -> None:
        trial_id = str(trial.trial_id)
        if trial_id not in self._order:
            self._order[trial_id] = len(self._order)
            self._seen[trial_id] = trial
        tag = getattr(trial, "experiment_tag", None)
        if isinstance(tag, str) and tag:
            self._tags.setdefault(tag.split(_PERTURBED)[0], trial_id)
            if _PERTURBED in tag:
                return  # a restored PBT trial: not its first config
        if trial_id not in self._initial:
            self._initial[trial_id] = self._config_of(getattr(trial, "config", None))

    def _trial_ended(self, trial: Any) -> None:
        if trial.trial_id not in self._order:
            self._see(trial)
        self._dirty = True
        if not self._off and self._ensure_run(None):
            self._maybe_relog()

    def _config_of(self, config: Any) -> dict[str, Any]:
        """A trial config as table cells: flattened, without "wandb" and
        excluded keys; values a table cell can hold."""
        if not isinstance(config, Mapping):
            return {}
        excludes = self._settings.excludes
        out: dict[str, Any] = {}
        for key, value in flatten(
            {str(k): v for k, v in config.items() if str(k) != CONFIG_KEY}
        ).items():
            if not is_excluded(key, excludes):
                out[key] = _cell(value)
        return out

    # --- the best trial ------------------------------------------------------

    def _better(self, value: float, than: float) -> bool:
        return value > than if self._setup.mode == "max" else value < than

    def _update_best(self, trial_id: str, value: float) -> None:
        """Best of the trials' last values, kept up to date per result: O(1),
        except when the leading trial gets worse (then O(trials))."""
        best = self._best
        if not math.isfinite(value):  # Tune never picks NaN or infinities
            self._last.pop(trial_id, None)
            if best is not None and best[0] == trial_id:
                self._best = self._best_of_last()
        else:
            self._last[trial_id] = value
            if best is None or self._better(value, best[1]):
                self._best = (trial_id, value)
            elif best[0] == trial_id:
                if value != best[1]:  # the leader got worse
                    self._best = self._best_of_last()
            elif value == best[1] and self._order[trial_id] < self._order[best[0]]:
                self._best = (trial_id, value)  # Tune keeps the first of equals
        if self._best is not None and self._best != best:
            row = {
                f"best/{self._setup.metric}": self._best[1],
                RESULTS_KEY: self._results,
            }
            if self._run is None:
                self._early_best.append(row)  # logged once the run has started
            else:
                self._run.log(row)

    def _best_of_last(self) -> Optional[tuple[str, float]]:
        best: Optional[tuple[str, float]] = None
        for trial_id in sorted(self._last, key=self._order.__getitem__):
            value = self._last[trial_id]
            if best is None or self._better(value, best[1]):
                best = (trial_id, value)
        return best

    def _final_best(self, trials: Sequence[Any]) -> Optional[tuple[Any, Any]]:
        """The trial ``ResultGrid.get_best_result(metric, mode)`` returns (scope
        "last"), from the same data: each trial's ``metric_analysis``."""
        metric, mode = self._setup.metric, self._setup.mode
        if not metric or mode is None or not trials:
            return None
        if len(trials) == 1:  # Tune returns the only trial, whatever its value
            return trials[0], _last_value(trials[0], metric)
        best: Optional[tuple[Any, Any]] = None
        for trial in trials:
            value = _last_value(trial, metric)
            if not _is_number(value) or not math.isfinite(value):
                continue
            if best is None or self._better(value, best[1]):
                best = (trial, value)
        return best

    # --- logging -------------------------------------------------------------

    def _maybe_relog(self) -> None:
        if self._dirty and time.monotonic() - self._logged_at >= self._interval:
            self._relog()

    def _trials(self) -> list[Any]:
        trials = list(self._all) if self._all is not None else []
        known = {str(t.trial_id) for t in trials}
        trials.extend(t for tid, t in self._seen.items() if tid not in known)
        return trials

    def _relog(self, best: Optional[tuple[Any, Any]] = None) -> None:
        """Log the tables again and update the summary (O(trials))."""
        import wandb

        self._logged_at = time.monotonic()
        self._dirty = False
        trials = self._trials()
        self._read_pbt_log(trials)
        run = self._run
        columns, rows = self._trials_table(trials)
        row: dict[str, Any] = {
            TRIALS_KEY: wandb.Table(columns=columns, data=rows, allow_mixed_types=True)
        }
        if len(self._exploits) > self._exploits_logged:
            row[EXPLOITS_KEY] = wandb.Table(
                columns=[
                    "trial_id",
                    "source_trial_id",
                    "iteration",
                    "source_iteration",
                    "old_config",
                    "new_config",
                ],
                data=[list(r) for r in self._exploits],
                allow_mixed_types=True,
            )
            self._exploits_logged = len(self._exploits)
        try:
            run.log(row)
        except Exception as exc:  # noqa: BLE001 - the summary goes on
            # W&B can refuse a table (wandb 0.19 asks the server about the
            # table's artifact first): the summary and the tag still go out.
            self._trouble(f"logging the tables: {type(exc).__name__}: {exc}")
        self._update_summary(trials, best)

    def _trials_table(self, trials: Sequence[Any]) -> tuple[list[Any], list[list[Any]]]:
        metric, mode = self._setup.metric, self._setup.mode
        configs = [self._config_of(getattr(t, "config", None)) for t in trials]
        keys: dict[str, None] = {}
        for config in configs:
            keys.update(dict.fromkeys(config))
        columns: list[Any] = [
            "trial_id",
            "run_id",
            "trial_name",
            "status",
            "outcome",
            "iterations",
        ]
        if metric:
            columns += [f"last_{metric}", f"best_{metric}"]
        columns += ["exploits", *(f"config/{k}" for k in keys)]
        rows = []
        for trial, config in zip(trials, configs, strict=True):
            trial_id = str(trial.trial_id)
            last = getattr(trial, "last_result", None) or {}
            row = [
                trial_id,
                trial_id,  # wandbtune's runs have the trial's id
                _cell(str(trial)),
                _cell(getattr(trial, "status", None)),
                self.outcomes.get(trial_id),
                _cell(last.get("training_iteration")),
            ]
            if metric:
                analysis = _analysis(trial, metric)
                row += [_cell(analysis.get("last")), _cell(analysis.get(mode or "max"))]
            row.append(self._exploit_counts.get(trial_id, 0))
            row += [config.get(k) for k in keys]
            rows.append(row)
        return columns, rows

    def _update_summary(
        self, trials: Sequence[Any], best: Optional[tuple[Any, Any]]
    ) -> None:
        summary = self._run.summary
        counts = dict.fromkeys(OUTCOMES, 0)
        for trial in trials:
            outcome = self.outcomes.get(str(trial.trial_id))
            if outcome in counts:
                counts[outcome] += 1
        update: dict[str, Any] = {"tune/trials": len(trials)}
        update.update({f"tune/{k}": v for k, v in counts.items()})
        update["tune/exploits"] = len(self._exploits)
        # every result so far (the best's rows set it only when the best moves)
        update[RESULTS_KEY] = self._results
        metric = self._setup.metric
        if best is None and self._best is not None:
            trial = self._seen.get(self._best[0])
            best = (trial, self._best[1]) if trial is not None else None
        if metric and best is not None:
            trial, value = best
            last = getattr(trial, "last_result", None) or {}
            update["best/trial_id"] = str(trial.trial_id)
            update[f"best/{metric}"] = _cell(value)
            update["best/iteration"] = _cell(last.get("training_iteration"))
            config = self._config_of(getattr(trial, "config", None))
            keys = {f"best/config/{k}" for k in config}
            for stale in self._best_config_keys - keys:
                try:
                    del summary[stale]
                except Exception:  # noqa: BLE001 - not there
                    pass
            self._best_config_keys = keys
            update.update({f"best/config/{k}": v for k, v in config.items()})
        summary.update(update)

    # --- PBT -------------------------------------------------------------------

    def _read_pbt_log(
        self, trials: Sequence[Any], current: Optional[tuple[str, Any]] = None
    ) -> None:
        """New lines of PBT's ``pbt_global.txt``: [trial tag, source tag,
        trial iteration, source iteration, source config, new config].

        ``current``: (trial id, training_iteration) of the result Tune is
        handling. PBT writes the trial's iteration before that result is the
        trial's last (asynchronous PBT exploits at the result: one behind);
        where the trial is the current one, its iteration is the result's.
        """
        path = next((p for p in map(_pbt_log, trials[:1]) if p), None)
        if path is None:
            return
        try:
            with open(path, "rb") as fh:
                fh.seek(self._pbt_offset)
                data = fh.read()
        except OSError:
            return  # no PBT, or no exploit yet
        end = data.rfind(b"\n") + 1  # complete lines only
        if not end:
            return
        self._pbt_offset += end
        for trial in self._trials():  # every trial seen, ``trials`` included
            tag = getattr(trial, "experiment_tag", None)
            if isinstance(tag, str) and tag:
                self._tags.setdefault(tag.split(_PERTURBED)[0], str(trial.trial_id))
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                tag, source_tag, iteration, source_iteration, _, new = json.loads(line)
            except (ValueError, TypeError):
                continue
            trial_id = self._tags.get(str(tag).split(_PERTURBED)[0])
            source_id = self._tags.get(str(source_tag).split(_PERTURBED)[0])
            if trial_id is None:
                continue
            if (
                current is not None
                and current[0] == trial_id
                and _is_number(iteration)
                and _is_number(current[1])
                and iteration < current[1]
            ):
                iteration = current[1]
            new_config = self._config_of(new)
            old_config = self._exploit_configs.get(trial_id) or self._initial.get(
                trial_id, {}
            )
            self._exploit_configs[trial_id] = new_config
            self._exploit_counts[trial_id] = self._exploit_counts.get(trial_id, 0) + 1
            self._exploits.append(
                [
                    trial_id,
                    source_id,
                    _cell(iteration),
                    _cell(source_iteration),
                    json.dumps(old_config, sort_keys=True, default=str),
                    json.dumps(new_config, sort_keys=True, default=str),
                ]
            )

    # --- online: tag the best trial's run ------------------------------------------

    def _tag_best(self, trial: Any) -> None:
        """Online, give the best trial's run the tag "best" (and take it from
        a run tagged by an earlier fit() of this experiment) through W&B's
        public API; best effort, bounded in time, never raises."""
        run = self._run
        if run is None or getattr(run, "offline", True):
            return
        own = _trainable_settings(trial) or self._settings
        settings = own.merged(getattr(trial, "config", None) or {})
        if settings.offline():
            return
        trial_id = str(trial.trial_id)
        project = settings.resolved_project() or run.project
        entity = (
            settings.init_kwargs.get("entity")
            or settings.env("WANDB_ENTITY")
            or getattr(run, "entity", None)
        )
        key = settings.read_api_key() or self._settings.read_api_key()
        base_url = _base_url(settings) or _base_url(self._settings)
        previous = self._tagged if self._tagged != trial_id else None
        errors: list[BaseException] = []

        def tag() -> None:
            try:
                import wandb

                overrides = {"base_url": base_url} if base_url else {}
                api: Any = wandb.Api(
                    api_key=key, overrides=overrides, timeout=int(TAG_TIMEOUT_S)
                )
                if previous:
                    _retag(
                        api, entity, project, previous, lambda tags: tags - {BEST_TAG}
                    )
                _retag(api, entity, project, trial_id, lambda tags: tags | {BEST_TAG})
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=tag, name="wandbtune-tag-best", daemon=True)
        thread.start()
        thread.join(TAG_TIMEOUT_S + 5)
        if thread.is_alive() or errors:
            why = f"{errors[0]!r}" if errors else "W&B did not answer in time"
            logger.warning(
                "wandbtune: the best trial's run %s/%s/%s was not tagged %r: %s",
                entity,
                project,
                trial_id,
                BEST_TAG,
                why[:300],
            )
            return
        self._tagged = trial_id


#: A run's tags, and a change of them alone, in W&B's GraphQL API: what the
#: public API's ``Run.update()`` sends, less the rest of the run (its config
#: and summary, sent again by ``update()``, would be a second writer).
_RUN_TAGS = """
query RunTags($entity: String, $project: String!, $run: String!) {
  project(name: $project, entityName: $entity) { run(name: $run) { tags } }
}"""
_SET_RUN_TAGS = """
mutation SetRunTags($entity: String, $project: String, $run: String, $tags: [String!]) {
  upsertBucket(input: {entityName: $entity, modelName: $project, name: $run,
                       tags: $tags}) { bucket { id } }
}"""


def _retag(
    api: Any,
    entity: Optional[str],
    project: Optional[str],
    run_id: str,
    change: Callable[[set[str]], set[str]],
) -> None:
    """Change a run's tags on the server, if it has that run (an upsert of
    a run that is not there would create it)."""
    where = {"entity": entity, "project": project, "run": run_id}
    found = _compat.wandb_api_graphql(api, _RUN_TAGS, where)
    run = ((found or {}).get("project") or {}).get("run")
    if run is None:
        return
    tags = list(run.get("tags") or [])
    wanted = change(set(tags))
    if wanted == set(tags):
        return
    kept = [t for t in tags if t in wanted]
    new = [*kept, *sorted(wanted - set(tags))]
    _compat.wandb_api_graphql(api, _SET_RUN_TAGS, {**where, "tags": new})


#: How long the experiment's end waits for its run to start (W&B's
#: init_timeout bounds a start, which may also wait behind the callback's
#: trial runs' starts). A run that starts later is finished at once.
START_WAIT_S = 60.0


class _RunStart:
    """``start_run`` on a thread of its own; ``take()`` the run once the
    thread has ended (a run that starts after a ``take()`` is finished)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.error: Optional[BaseException] = None
        self.api_key = None if settings.offline() else settings.read_api_key()
        self._run: Any = None
        self._taken = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._start,
            args=(settings,),
            kwargs=kwargs,
            name="wandbtune-experiment-run",
            daemon=True,
        )
        self._thread.start()

    def _start(self, settings: Settings, **kwargs: Any) -> None:
        try:
            run = start_run(settings, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - taken in Tune's thread
            self.error = exc
            return
        with self._lock:
            late = self._taken
            self._run = run
        if late:  # the experiment ended without it
            run.finish()

    def take(self) -> Any:
        with self._lock:
            self._taken = True
            return self._run

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()


class ExperimentRun(Callback):  # type: ignore[misc]
    """One W&B run for the whole Tune experiment (see the module's docstring).

    ``tune.RunConfig(callbacks=[wandbtune.ExperimentRun(project=...)])``

    Arguments as for ``@wandb_trainable`` (``project``, ``group``,
    ``api_key_file``, ``api_key``, ``excludes``, ``wandb.init`` arguments),
    and: ``metric`` and ``metric_mode`` (``"max"`` or ``"min"``) to pick the
    best trial by (default: ``TuneConfig``'s metric and mode, else the
    scheduler's or searcher's; ``mode=`` is ``wandb.init``'s, as for the
    trials); ``table_interval_s``,
    how often at most the trials table is logged again while trials run.
    What is not given here (project, group, entity, mode, API key) is taken
    from the trials' settings: ``@wandb_trainable``'s, with the first trial's
    ``config["wandb"]``.
    ``WandbLoggerCallback`` makes this run itself.
    """

    def __init__(
        self,
        project: Optional[str] = None,
        group: Optional[str] = None,
        api_key_file: Optional[str] = None,
        api_key: Optional[str] = None,
        excludes: Optional[Sequence[str]] = None,
        metric: Optional[str] = None,
        metric_mode: Optional[str] = None,
        table_interval_s: float = TABLE_INTERVAL_S,
        **wandb_init_kwargs: Any,
    ) -> None:
        settings = Settings.from_arguments(
            "ExperimentRun",
            project=project,
            group=group,
            api_key_file=api_key_file,
            api_key=api_key,
            excludes=() if excludes is None else excludes,
            **wandb_init_kwargs,
        )
        settings = replace(settings, ship_environ=False)
        settings.check_init_kwargs("ExperimentRun")
        self.log = ExperimentLog(
            settings,
            metric=metric,
            metric_mode=metric_mode,
            table_interval_s=table_interval_s,
        )

    def setup(
        self,
        stop: Any = None,
        num_samples: Optional[int] = None,
        total_num_samples: Optional[int] = None,
        **info: Any,
    ) -> None:
        self.log.setup(
            stop=stop,
            num_samples=num_samples,
            total_num_samples=total_num_samples,
            **info,
        )

    def on_trial_start(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        self.log.on_trial_start(trial, trials)

    def on_trial_result(
        self,
        iteration: int,
        trials: list[Any],
        trial: Any,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        self.log.on_trial_result(trial, result)

    def on_trial_complete(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        self.log.on_trial_complete(trial)

    def on_trial_error(
        self, iteration: int, trials: list[Any], trial: Any, **info: Any
    ) -> None:
        self.log.on_trial_error(trial)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.log.on_step_end()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.log.on_experiment_end(trials, flush=True)

    def get_state(self) -> Optional[dict[str, Any]]:
        return self.log.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.log.set_state(state)


# --- helpers --------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _lookup(result: Mapping[str, Any], key: str) -> Any:
    """``result[key]``, where ``a/b`` also reaches ``result["a"]["b"]``."""
    value = result.get(key)
    if value is None and "/" in key:
        node: Any = result
        for part in key.split("/"):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        value = node
    return value


def _analysis(trial: Any, metric: str) -> Mapping[str, Any]:
    try:
        analysis = trial.metric_analysis.get(metric)
    except Exception:  # noqa: BLE001 - not a Tune trial of a known Ray
        return {}
    return analysis if isinstance(analysis, Mapping) else {}


def _last_value(trial: Any, metric: str) -> Any:
    return _analysis(trial, metric).get(BEST_SCOPE)


def _cell(value: Any) -> Any:
    """A value a W&B table cell holds as it is: numbers, strings, None;
    anything else as JSON or text."""
    value = clean(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def _base_url(settings: Settings) -> Optional[str]:
    user = settings.init_kwargs.get("settings")
    url = user.get("base_url") if isinstance(user, Mapping) else None
    if url is None and user is not None and not isinstance(user, Mapping):
        if "base_url" in getattr(user, "model_fields_set", ()):
            url = getattr(user, "base_url", None)
    return str(url) if url else settings.env("WANDB_BASE_URL")
