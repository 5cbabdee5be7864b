"""One trial's W&B run: started, fed rows, finished, flushed."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from wandbtune import _compat, _node_service
from wandbtune._artifacts import log_checkpoint
from wandbtune._row import CONFIG_KEYS, TRAINING_ITERATION, clean, is_excluded, to_row
from wandbtune._settings import CONFIG_KEY, GROUP_ENV_VAR, ConfigError, Settings

logger = logging.getLogger("wandbtune")


def run_config(config: Mapping[str, Any], excludes: tuple[str, ...]) -> dict[str, Any]:
    """The trial config as W&B config: without ``"wandb"`` or excluded keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        key = str(key)
        if key == CONFIG_KEY or is_excluded(key, excludes):
            continue
        out[key] = clean(value)
    return out


def project_of(settings: Settings, trial: str | None) -> str | None:
    """The W&B project of ``trial``'s run; ConfigError if there is none (and
    W&B is not disabled)."""
    project = settings.resolved_project()
    if not project and settings.mode() != "disabled":
        raise ConfigError(
            f"no W&B project for trial {trial}: pass "
            "project=... to @wandb_trainable or WandbLoggerCallback, put it in "
            'the trial config as "wandb": {"project": ...}, or set WANDB_PROJECT.'
        )
    return project


def init_kwargs(
    settings: Settings,
    *,
    trial_id: str | None,
    trial_name: str | None,
    experiment: str | None,
    config: Mapping[str, Any],
    dir: str | None,
    require_project: bool = True,
) -> dict[str, Any]:
    """The arguments for ``wandb.init`` (without the API key)."""
    project = (
        project_of(settings, trial_name or trial_id)
        if require_project
        else settings.resolved_project()
    )
    kwargs: dict[str, Any] = {
        "project": project,
        "group": settings.group or settings.env(GROUP_ENV_VAR) or experiment,
        "config": run_config(config, settings.excludes),
        "allow_val_change": True,
    }
    for name, var in (("mode", "WANDB_MODE"), ("entity", "WANDB_ENTITY")):
        if settings.environ.get(var):  # shipped from the driver
            kwargs[name] = settings.environ[var]
    if trial_id:
        kwargs["id"] = trial_id
        if not settings.offline():  # offline W&B ignores it, with a warning
            kwargs["resume"] = "allow"
    if trial_name:
        kwargs["name"] = trial_name
    dir = settings.env("WANDB_DIR") or dir  # the user's choice wins over ours
    if dir and "dir" not in settings.init_kwargs:
        os.makedirs(dir, exist_ok=True)
        kwargs["dir"] = dir
    kwargs.update(settings.init_kwargs)
    return kwargs


class Segment(Protocol):
    """The part of a trial that runs in one process (a trial actor), from its
    start or restore until it ends there (it returns, fails, is paused or
    stopped)."""

    #: when it began in this process (wall-clock time)
    began: float
    #: whether it has ended
    ended: bool


class RunMovedOn(Exception):
    """A trial segment's run was not started: the segment had ended before
    its start came round, and the trial goes on in another process that
    logs to the run now (``_node_service.moved_on``)."""


def start_run(
    settings: Settings,
    *,
    exclusive: bool = True,
    require_project: bool = True,
    node_service: bool = False,
    segment: Segment | None = None,
    **trial: Any,
) -> Any:
    """``wandb.init`` for one trial; raises ConfigError on bad settings.

    ``exclusive``: the run is the process's only one (a trial actor), so a run
    left open there is finished first. The callback holds one run per running
    trial in the driver instead, side by side. ``node_service``: the run goes
    to the node's W&B service if there is one (``_node_service``), else to
    one of this process's own. ``segment``: the part of the trial this run
    is started for; if it has ended by the time the start comes round, and
    the trial went on in another process since, RunMovedOn is raised
    instead of starting the run again.
    """
    kwargs = init_kwargs(settings, require_project=require_project, **trial)
    _compat.wandb_list_packages_once()
    _compat.wandb_apply_launch_inputs_only_if_staged()
    key = None if settings.offline() else settings.read_api_key()
    kwargs["settings"] = _wandb_settings(
        kwargs.get("settings"),
        key,
        base_url=settings.environ.get("WANDB_BASE_URL"),
    )
    starting = _DRIVER_STARTS.starting(disabled=settings.mode() == "disabled")
    with starting if not exclusive else contextlib.nullcontext():
        return _init(
            settings,
            kwargs,
            key,
            exclusive=exclusive,
            node_service=node_service,
            segment=segment,
        )


class _DriverStarts:
    """Runs side by side in one process (the callback's, the experiment's)
    start on more than one thread.

    At the same time where wandb can (its setup locks its service connection;
    online each start mostly waits for the server), else one at a time (wandb
    0.19's first ``wandb.init`` in a process starts its service without a
    lock, and its key is process-wide). Before starts go side by side, W&B is
    set up in the process (``wandb.setup()``, once per W&B session: again
    after a teardown): ``wandb.init`` loads the process's settings lazily,
    without a lock, and a run whose start raced with that went to W&B's
    default server instead of ``WANDB_BASE_URL``'s (wandb 0.31; 1 fit in 3
    to 6 of the online benchmark's shape). The service is not stopped after
    an outage while a run is starting (``idle``).
    """

    def __init__(self) -> None:
        self._one_at_a_time = threading.Lock()
        self._changed = threading.Condition()
        self._starting = 0

    @contextlib.contextmanager
    def starting(self, *, disabled: bool) -> Iterator[None]:
        """Around one ``wandb.init`` (``disabled``: of a disabled run, which
        needs no W&B service)."""
        side_by_side = _compat.wandb_inits_side_by_side()
        with self._changed:
            self._starting += 1
        try:
            if not side_by_side:
                with self._one_at_a_time:
                    yield
                return
            if not disabled:
                with self._one_at_a_time:
                    if not _compat.wandb_service_connected():
                        import wandb

                        wandb.setup()
            yield
        finally:
            with self._changed:
                self._starting -= 1

    @contextlib.contextmanager
    def idle(self) -> Iterator[bool]:
        """Whether no run is starting; none starts while this is held."""
        with self._changed:
            yield self._starting == 0


_DRIVER_STARTS = _DriverStarts()


def _init(
    settings: Settings,
    kwargs: dict[str, Any],
    key: str | None,
    *,
    exclusive: bool,
    node_service: bool,
    segment: Segment | None = None,
) -> Any:
    import wandb

    if key:
        _compat.wandb_use_key(key)
    node = None
    if not exclusive:
        kwargs["reinit"] = "create_new"
    elif node_service and settings.mode() != "disabled":
        node = _node_service.connect()
        if kwargs.get("id"):
            run_id = str(kwargs["id"])
            if segment is not None and segment.ended:
                if _node_service.moved_on(run_id, segment.began):
                    raise RunMovedOn(run_id)
            _node_service.release(run_id)  # an earlier attempt's, on any node
            if node is not None:  # before the run opens: a kill during init too
                began = segment.began if segment is not None else None
                _node_service.register(node, run_id, began)
    else:
        _compat.wandb_own_service()
    _compat.wandb_wait_for_a_new_run_dir(
        kwargs.get("dir") or settings.env("WANDB_DIR"), kwargs.get("id")
    )
    try:
        return _init_exclusive(kwargs) if exclusive else wandb.init(**kwargs)
    except BaseException as exc:
        if node is not None and kwargs.get("id"):
            _node_service.forget(node, str(kwargs["id"]), opened=False)
        if isinstance(exc, TypeError):
            raise ConfigError(f"wandb.init rejected the arguments: {exc}") from exc
        if node is None or not _compat.wandb_service_gone(exc):
            raise
    # The node's W&B service is gone (killed, out of memory): this process
    # starts a service of its own, and its later trials use that one.
    logger.warning(
        "wandbtune: this node's W&B service is gone; trial %s logs through a "
        "W&B service of its own process.",
        kwargs.get("id"),
    )
    _node_service.disconnect()
    # W&B forgets its setup at once, then talks to the dead service: bounded.
    _teardown_wandb(limit=2.0)
    _compat.wandb_drop_run()  # the run whose finish failed is still wandb.run
    return _init_exclusive(kwargs)


def _init_exclusive(kwargs: dict[str, Any]) -> Any:
    """``wandb.init`` for the process's only run."""
    import wandb

    if wandb.run is not None:
        # A run left open in this process (by user code or an earlier trial
        # that was never cleaned up) would otherwise swallow this trial's rows.
        wandb.run.finish()
    return wandb.init(**kwargs)


#: How long a trial waits for W&B to start its run before training on without
#: it (W&B's own default is 90 s, for every trial).
INIT_TIMEOUT_S = 15.0
#: How long finishing a run waits for uploads (W&B's default: forever). What is
#: not uploaded by then stays on disk for ``wandb sync``.
FINISH_TIMEOUT_S = 120.0
#: How long the end of a trial waits for W&B's service to write what it holds
#: and exit (offline: well under a second; online, run.finish has already
#: waited for the uploads).
TEARDOWN_TIMEOUT_S = 30.0
#: The same, after W&B could not start a run: nothing is pending then, and a
#: service left retrying is stopped.
OUTAGE_TEARDOWN_S = 3.0


def _wandb_settings(
    user: Any,
    api_key: str | None,
    *,
    base_url: str | None = None,
) -> Any:
    """The user's ``wandb.Settings`` (or dict), else quiet ones, with the key.

    Quiet by default: a sweep of many trials would otherwise print W&B's
    banner and run summary for every trial into the driver's output. The key
    travels in the settings object, not the environment or a file. Unless the
    user chose one, W&B gets INIT_TIMEOUT_S to start a run.
    """
    import wandb

    extra: dict[str, Any] = {"api_key": api_key} if api_key else {}
    extra_timeout: dict[str, Any] = {}
    if base_url:  # the driver's WANDB_BASE_URL; the user's own setting wins
        extra_timeout["base_url"] = base_url
    if "WANDB_INIT_TIMEOUT" not in os.environ:
        extra_timeout["init_timeout"] = INIT_TIMEOUT_S
    if "WANDB_FINISH_TIMEOUT" not in os.environ and _compat.wandb_has_setting(
        "finish_timeout"  # not in older wandb
    ):
        extra_timeout["finish_timeout"] = FINISH_TIMEOUT_S
    if user is None:
        return wandb.Settings(quiet=True, silent=True, **extra_timeout, **extra)
    if isinstance(user, Mapping):
        return wandb.Settings(**{**extra_timeout, **user, **extra})
    unset = {k: v for k, v in extra_timeout.items() if k not in user.model_fields_set}
    extra = {**unset, **extra}
    return user.model_copy(update=extra) if extra else user


def start_or_warn(
    settings: Settings, *, outage_teardown: bool = True, **trial: Any
) -> TrialRun | None:
    """Start a trial's run; if W&B cannot, warn once and return None (or raise
    when ``strict``). Bad settings (ConfigError) always raise.
    ``outage_teardown``: when W&B could not start the run and no run is open,
    stop W&B's service (the caller may do that later itself instead)."""
    try:
        return TrialRun.start(settings, **trial)
    except ConfigError:
        raise
    except RunMovedOn:
        logger.warning(
            "wandbtune: trial %s went on in another process before W&B could "
            "start its run here (a loaded machine); the run is left to that "
            "process. Where it went on from the trial's own checkpoint, it logs "
            "what Tune kept of this part from result.json; from another "
            "trial's (a PBT exploit), this part is only in Tune's results.",
            trial.get("trial_name") or trial.get("trial_id"),
        )
        return None
    except Exception as exc:  # noqa: BLE001 - a W&B outage never stops training
        if outage_teardown:
            stop_service_after_outage()
        if settings.strict:
            raise
        logger.warning(
            "wandbtune: W&B logging is off for trial %s: W&B could not start a "
            "run (%s). Training goes on; pass strict=True to fail the trial "
            "instead.",
            trial.get("trial_name") or trial.get("trial_id"),
            f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
        )
        return None


def stop_service_after_outage() -> None:
    """After W&B could not start a run: if no run is open in this process,
    stop W&B's service (nothing to write, and a service that cannot reach W&B
    may go on retrying, using CPU, or holding the trial at its end). Not while
    another thread of this process starts a run: that start stops it if it
    fails too, else the service is in use (the callback stops it at the end
    of the experiment)."""
    with _DRIVER_STARTS.idle() as idle:
        if idle and "wandb" in sys.modules and _compat.wandb_open_runs() == 0:
            flush_wandb(OUTAGE_TEARDOWN_S, warn=False)


#: Run summary keys for how a trial ended (``tune/outcome``: one of
#: COMPLETED, EARLY_STOPPED, ERROR, INTERRUPTED) and its error.
OUTCOME_KEY = "tune/outcome"
ERROR_KEY = "tune/error"
#: The file in the run that holds a failed trial's traceback.
TRACEBACK_FILE = "tune_error.txt"
COMPLETED = "completed"
EARLY_STOPPED = "early_stopped"
ERROR = "error"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``name`` and, for ERROR, the error and traceback."""

    name: str
    error: str | None = None
    traceback: str | None = None

    @classmethod
    def of_error(cls, exc: BaseException) -> Outcome:
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        message = str(exc).strip().splitlines()
        first = message[0] if message else ""
        return cls(ERROR, f"{type(exc).__name__}: {first}"[:1000], text)


class TrialRun:
    """A started W&B run and what wandbtune needs to feed and finish it."""

    def __init__(
        self,
        run: Any,
        settings: Settings,
        *,
        exploit: Exploit | None = None,
        node: Any = None,
        config_after: Mapping[str, Any] | None = None,
    ) -> None:
        self.run = run
        self.settings = settings
        #: The node's actor the run is handed over to at its end (None: it is
        #: finished in this process).
        self.node = node
        self.failed = False
        #: The W&B service this run was started on is gone (the node's,
        #: killed): nothing more reaches it; see ``_mixin._Trial``.
        self.service_gone = False
        #: The last results this attempt logged, to log again on another
        #: service if that one dies before writing them (``refill``).
        self._recent: collections.deque[Mapping[str, Any]] = collections.deque(
            maxlen=RECENT_RESULTS
        )
        self._checkpoints: set[str] = set()
        self._sent_config: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._finished = False
        # A retried or restored trial resumes its run: rows up to here were
        # logged by an earlier attempt, and W&B would drop them if sent again.
        earlier = earlier_attempts(run)
        self._lineage = earlier
        self._logged_up_to = earlier.last_iteration
        # W&B's step is training_iteration + offset: 0 until a PBT exploit
        # takes the trial back to an earlier iteration (W&B's step must not).
        self._offset = earlier.offset
        #: (W&B step, training_iteration) of the last row this attempt logged.
        self._last_logged: tuple[int | None, int] | None = None
        if exploit is not None:
            self._start_lineage(exploit, earlier)
        if config_after:
            self._update_config(run_config(config_after, settings.excludes))
        if exploit is None and earlier.exploits:
            self.set_summary(EXPLOITS_KEY, earlier.exploits)  # each attempt lists all
        try:
            # Charts use Tune's iteration as their x-axis, and rows the user
            # logs without it get the last reported one (step_sync).
            run.define_metric("*", step_metric=TRAINING_ITERATION)
        except Exception as exc:  # noqa: BLE001
            self._warn_once("define_metric", f"could not set the x-axis: {exc}")

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        exploit: Exploit | None = None,
        restored_iteration: Any = None,
        result_files: Sequence[str] = (),
        node_service: bool = False,
        **trial: Any,
    ) -> TrialRun:
        config_after = None
        if exploit is not None:
            # A resumed run gets the config W&B has, the trial's before the
            # exploit (the exploit's old_config), with the init's laid over
            # it: send the new config after reading the old.
            config_after, trial = trial.get("config"), {**trial, "config": {}}
        started = start_run(settings, node_service=node_service, **trial)
        shared = node_service and settings.mode() != "disabled"
        node = _node_service.current() if shared else None
        run = cls(
            started, settings, exploit=exploit, node=node, config_after=config_after
        )
        if exploit is None and isinstance(restored_iteration, int):
            run.fill_in(result_files, restored_iteration)
        return run

    def fill_in(self, result_files: Sequence[str], up_to: int) -> None:
        """Log what Tune kept of this trial up to the checkpoint it goes on
        from, where earlier attempts' W&B data lacks it (their W&B service
        died before writing it out, a killed worker or driver; or their run
        never started, a late start: ``RunMovedOn``). Read from Tune's
        ``result.json`` copies that are on this node
        (``_compat.trial_result_files``), the driver's first; a later copy
        adds only iterations past what the ones before it held. Where the
        file holds an iteration twice (after a PBT exploit), the first row
        is logged: left as it was, untested."""
        done = self._logged_up_to or 0
        if up_to <= done:
            return
        filled = 0
        for path in result_files:
            try:
                with open(path, encoding="utf-8") as fh:
                    lines = fh.readlines()
            except OSError:
                continue  # not on this node (remote storage, another driver)
            for line in lines:
                try:
                    result = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a kill
                iteration = result.get(TRAINING_ITERATION)
                if isinstance(iteration, int) and done < iteration <= up_to:
                    self.log_result(result)
                    done = max(done, iteration)
                    self._logged_up_to = done
                    filled += 1
        if filled:
            logger.info(
                "wandbtune: %d results Tune kept for this trial were missing "
                "from W&B (its earlier attempt's W&B data was cut short); "
                "logged them from result.json.",
                filled,
            )

    def log_checkpoint(self, checkpoint: Any, iteration: Any) -> None:
        """Log a persisted Tune checkpoint as an artifact version, once, if
        ``upload_checkpoints`` is on; never raises."""
        if self._finished or checkpoint is None or not self.settings.upload_checkpoints:
            return
        key = str(getattr(checkpoint, "path", id(checkpoint)))
        if key in self._checkpoints:
            return
        self._checkpoints.add(key)
        log_checkpoint(self.run, checkpoint, trial_id=self.run.id, iteration=iteration)

    def log_result(self, result: Mapping[str, Any]) -> None:
        """Log one Tune result as one row; never raises.

        If W&B rejects a value, the row is logged again with every value that
        is not a plain number, bool or string written as text: one strange
        value never costs the row its other metrics.
        """
        if self._finished or _compat.RESULT_DUPLICATE in result:
            return
        try:
            row, config = to_row(
                result,
                excludes=self.settings.excludes,
                log_config=self.settings.log_config,
            )
            if self.settings.log_config and isinstance(result.get("config"), Mapping):
                config.update(run_config(result["config"], self.settings.excludes))
            self._update_config(config)
            if self._repeats_an_earlier_attempt(row.get(TRAINING_ITERATION)):
                return
            step = self._step_for(row.get(TRAINING_ITERATION))
        except Exception as exc:  # noqa: BLE001 - logging never stops training
            if not self._lost_service(exc):  # a config change can meet it too
                self._warn_once("log", f"a result was not logged to W&B: {exc!r}")
            return
        try:
            self.run.log(row, step=step)
        except Exception as exc:  # noqa: BLE001
            if self._lost_service(exc):
                return
            self._warn_once(
                "plain",
                f"W&B rejected a value ({exc!r}); such values are logged as text",
            )
            try:
                self.run.log(_plain(row), step=step)
            except Exception as exc2:  # noqa: BLE001
                self._warn_once("log", f"a result was not logged to W&B: {exc2!r}")
                return
        iteration = row.get(TRAINING_ITERATION)
        if isinstance(iteration, int):
            self._last_logged = (step, iteration)
        if self.node is not None:  # only a node's service is lost this way
            self._recent.append(result)

    def _update_config(self, config: Mapping[str, Any]) -> None:
        changed = {
            k: v
            for k, v in config.items()
            if k not in self._sent_config or self._sent_config[k] != v
        }
        if changed:
            self.run.config.update(changed, allow_val_change=True)
            self._sent_config.update(changed)

    def refill(self, lost: TrialRun) -> None:
        """Log again what ``lost`` (this run, started on a W&B service that
        died) logged after what reached W&B from it (its last RECENT_RESULTS
        results at most)."""
        done = self._logged_up_to
        again = [
            result
            for result in lost._recent
            if done is None
            or not isinstance(result.get(TRAINING_ITERATION), int)
            or result[TRAINING_ITERATION] > done
        ]
        for result in again:
            self.log_result(result)
        if again:
            logger.info(
                "wandbtune: logged %d results again that the lost W&B service "
                "had not written.",
                len(again),
            )

    @property
    def logged_by_earlier_attempts(self) -> int | None:
        """The last training_iteration earlier attempts logged to this run."""
        return self._lineage.last_iteration

    def _start_lineage(self, exploit: Exploit, earlier: Lineage) -> None:
        """PBT restored this trial from another trial's checkpoint with a new
        config: Tune reports the iterations after that checkpoint again, with
        other values. They are logged (after every earlier row: W&B's step
        goes on while training_iteration goes back), and the exploit is
        recorded in the run's summary."""
        self._logged_up_to = None  # a new computation: every row counts
        if earlier.last_step is not None:
            self._offset = earlier.last_step - exploit.source_iteration
        record = {
            "iteration": earlier.last_iteration,
            "source_trial": exploit.source_trial,
            "source_iteration": exploit.source_iteration,
            "old_config": {
                key: value
                for key, value in run_config(
                    earlier.config, self.settings.excludes
                ).items()
                # the trial's identity (pid, hostname...) and W&B's own keys
                if key not in CONFIG_KEYS and not key.startswith("_")
            },
            "new_config": run_config(exploit.config, self.settings.excludes),
        }
        exploits = [*earlier.exploits, record]
        self._lineage = replace(earlier, exploits=exploits)
        self.set_summary(EXPLOITS_KEY, exploits)

    def _summary_keys(self) -> set[str]:
        """The keys of the run's summary (online, with what W&B resumed);
        empty if W&B cannot say."""
        try:
            return set(self.run.summary.keys())
        except Exception:  # noqa: BLE001
            return set()

    def set_summary(self, key: str, value: Any) -> None:
        """Set one summary key of the run; trouble is one warning, never
        raised."""
        try:
            self.run.summary[key] = value
        except Exception as exc:  # noqa: BLE001 - never stops training
            self._warn_once("summary", f"{key} was not set in W&B: {exc!r}")

    def _repeats_an_earlier_attempt(self, iteration: Any) -> bool:
        """True for a row an earlier attempt of this trial already logged.

        After a retry or ``Tuner.restore`` the trial goes on from its last
        checkpoint, so Tune reports again the iterations after it. The rows
        of the first attempt are kept; the repeats are not logged again.
        """
        done = self._logged_up_to
        if done is None or not isinstance(iteration, int) or iteration > done:
            return False
        self._warn_once(
            "repeat",
            f"this trial's earlier attempt logged iterations up to {done} to this "
            f"run; the restored trial reports some of them again (from "
            f"{iteration}), which are not logged twice.",
        )
        return True

    def _step_for(self, iteration: Any) -> int | None:
        """W&B's step for a row: Tune's iteration, unless W&B would drop it.

        W&B drops a row whose step is behind its current one, which happens
        when user code committed rows of its own between two reports; such a
        row is then logged at W&B's next step (charts still line up, as their
        x-axis is ``training_iteration``).
        """
        if not isinstance(iteration, int) or isinstance(iteration, bool):
            return None
        step = iteration + self._offset
        current = _compat.wandb_current_step(self.run)
        if current is not None and step < current:
            self._warn_once(
                "step",
                f"rows logged to this run outside Tune moved W&B's step ({current}) "
                f"past Tune's training_iteration ({iteration}); later rows are "
                "logged at W&B's next step. Log your own data with commit=False "
                "to keep W&B's step equal to training_iteration.",
            )
            return None
        return step

    def record_outcome(self, outcome: Outcome) -> None:
        """Put how the trial ended in the run summary (and an error's
        traceback in a file of the run); never raises."""
        if self._finished:
            return
        self.set_summary(OUTCOME_KEY, outcome.name)
        if outcome.error is not None:
            self.set_summary(ERROR_KEY, outcome.error)
        elif ERROR_KEY in self._summary_keys():
            # An earlier attempt's error, resumed with the run: not this one's.
            try:
                del self.run.summary[ERROR_KEY]
            except Exception as exc:  # noqa: BLE001 - never stops training
                self._warn_once("summary", f"{ERROR_KEY} was not cleared: {exc!r}")
        if outcome.traceback is not None:
            try:
                path = os.path.join(self.run.dir, TRACEBACK_FILE)
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(outcome.traceback)
                # Written after W&B's start, so uploaded only if saved.
                self.run.save(path, base_path=self.run.dir, policy="now")
            except Exception as exc:  # noqa: BLE001 - never stops training
                self._warn_once("traceback", f"traceback not saved: {exc!r}")

    def finish(self, *, failed: bool = False, flush: bool = False) -> None:
        """Finish the run (exit code 1 if failed) and, if asked, wait until
        its data is on disk; never raises."""
        if self._finished:
            return
        self._finished = True
        _remember_lineage(self)
        exit_code = 1 if (failed or self.failed) else 0
        if self.node is not None and self._hand_over(exit_code):
            return  # the node's W&B service finishes it; nothing to flush here
        if not self.service_gone:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:  # noqa: BLE001
                if not self._lost_service(exc):
                    self._warn_once("finish", f"could not finish the W&B run: {exc!r}")
        if self.service_gone:
            # The caller starts the run again, from what reached W&B: what
            # this process remembers of it went with the service.
            forget_lineage(str(self.run.id))
            return
        if flush:
            flush_wandb()

    def _hand_over(self, exit_code: int) -> bool:
        """Hand the run to the node's W&B service, which finishes it while
        the trial goes on or exits; False if it must be finished here."""
        try:
            if _node_service.hand_over(self.node, self.run, exit_code):
                return True
        except Exception as exc:  # noqa: BLE001
            # Service gone: finished nowhere, the caller starts it again.
            if not self._lost_service(exc) and getattr(self.run, "_is_finished", False):
                # Let go of already: the node's actor finishes it (as failed)
                # when this process is gone.
                self._warn_once("finish", f"the W&B run was not handed over: {exc!r}")
                return True
        _node_service.forget(self.node, str(self.run.id))  # finished here
        return False

    def _lost_service(self, exc: BaseException) -> bool:
        """True if ``exc`` says the node's W&B service this run is on is gone
        (then ``service_gone`` is set: the caller starts the run again)."""
        if self.node is not None and _compat.wandb_service_gone(exc):
            self.service_gone = True
        return self.service_gone

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("wandbtune: %s", message)


#: How many of its last results a trial's run keeps, to log them again if
#: the node's W&B service dies before writing them out (``TrialRun.refill``):
#: a few MB at most; a service writes its run log in 32 KiB blocks.
RECENT_RESULTS = 1000

#: The run summary key listing a trial's PBT exploits.
EXPLOITS_KEY = "pbt/exploits"


@dataclass(frozen=True)
class Exploit:
    """A PBT exploit: the trial goes on from another trial's checkpoint."""

    source_trial: str
    source_iteration: int
    config: Mapping[str, Any]


def exploit_of(
    trial_id: str | None, restored: Mapping[str, Any] | None, config: Any = None
) -> Exploit | None:
    """The exploit a restore is, or None for the trial's own checkpoint (a
    retry, ``Tuner.restore``, PBT resuming a paused trial).

    Tune restores a function trainable from a result: the metrics it was
    saved with name the trial that saved it. PBT hands an exploiting trial
    the cloned trial's checkpoint, so the two ids differ only then.
    """
    if not restored or not trial_id:
        return None
    source = restored.get("trial_id")
    iteration = restored.get(TRAINING_ITERATION)
    if not isinstance(source, str) or source == trial_id:
        return None
    if not isinstance(iteration, int):
        return None
    return Exploit(source, iteration, dict(config or {}))


@dataclass(frozen=True)
class Lineage:
    """What earlier attempts of a trial logged to its run (same id)."""

    #: W&B step and training_iteration of the last row logged, if any.
    last_step: int | None = None
    last_iteration: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    exploits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def offset(self) -> int:
        if self.last_step is None or self.last_iteration is None:
            return 0
        return max(0, self.last_step - self.last_iteration)


#: Lineages of runs finished in this process (a reused actor), by run id.
_finished_lineages: dict[str, Lineage] = {}


def forget_lineage(run_id: str) -> None:
    """Forget what this process remembers of ``run_id``'s attempts (their
    W&B service is gone: only what reached W&B counts)."""
    _finished_lineages.pop(run_id, None)


def _remember_lineage(trial_run: TrialRun) -> None:
    try:
        lineage = trial_run._lineage
        if trial_run._last_logged is not None:
            step, iteration = trial_run._last_logged
            if step is None:  # logged at W&B's next step
                current = _compat.wandb_current_step(trial_run.run)
                step = None if current is None else current - 1
            lineage = replace(lineage, last_step=step, last_iteration=iteration)
        config = dict(trial_run.run.config)
        _finished_lineages[str(trial_run.run.id)] = replace(lineage, config=config)
    except Exception as exc:  # noqa: BLE001 - a guess, never a failure
        logger.debug("wandbtune: lineage not kept: %r", exc)


def earlier_attempts(run: Any) -> Lineage:
    """What earlier attempts of this trial logged to ``run`` (same id); never
    raises.

    In this process (a reused actor) it is remembered. Online, W&B resumes the
    run and restores its summary. Offline, each attempt writes its own
    ``offline-run-*-<id>`` directory (``wandb sync`` joins them into one run):
    those beside this one are read.
    """
    try:
        remembered = _finished_lineages.get(str(run.id))
        if remembered is not None:
            return remembered
        if getattr(run, "resumed", False):
            value = run.summary.get(TRAINING_ITERATION)
            step = _compat.wandb_current_step(run)
            exploits = run.summary.get(EXPLOITS_KEY)
            return Lineage(
                last_step=None if not step else step - 1,
                last_iteration=int(value) if isinstance(value, (int, float)) else None,
                config=dict(run.config),
                exploits=list(exploits) if isinstance(exploits, list) else [],
            )
        if not getattr(run, "offline", False):
            return Lineage()
        return _lineage_beside(run)
    except Exception as exc:  # noqa: BLE001 - a guess, never a failure
        logger.debug("wandbtune: earlier attempts not read: %r", exc)
        return Lineage()


def _lineage_beside(run: Any) -> Lineage:
    from pathlib import Path

    from wandbtune.offline import read_run

    own = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files
    last: tuple[int, int] | None = None  # (step, iteration) of the last row
    config: dict[str, Any] = {}
    exploits: list[dict[str, Any]] = []
    for path in own.parent.glob(f"offline-run-*-{run.id}*/run-{run.id}.wandb"):
        if path.parent == own:
            continue
        attempt = read_run(path, partial=True)  # a killed worker's: what was read
        for row in attempt.rows:
            step, iteration = row.get("_step"), row.get(TRAINING_ITERATION)
            if isinstance(step, int) and isinstance(iteration, (int, float)):
                if last is None or step > last[0]:
                    last = (step, int(iteration))
                    config = attempt.config
        found = attempt.summary.get(EXPLOITS_KEY)
        if isinstance(found, list) and len(found) > len(exploits):
            exploits = found
    if last is None:
        return Lineage(exploits=exploits)
    return Lineage(
        last_step=last[0], last_iteration=last[1], config=config, exploits=exploits
    )


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    plain = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, plain) else str(v)[:1000] for k, v in row.items()}


def _teardown_wandb(limit: float) -> tuple[threading.Thread, list[BaseException]]:
    """``wandb.teardown()`` on a thread of its own, waited for at most
    ``limit`` s: the thread (alive if it is still waiting) and its errors."""
    import wandb

    errors: list[BaseException] = []

    def teardown() -> None:
        try:
            wandb.teardown()
        except BaseException as exc:  # noqa: BLE001 - the caller's to report
            errors.append(exc)

    thread = threading.Thread(target=teardown, name="wandbtune-teardown", daemon=True)
    thread.start()
    thread.join(limit)
    return thread, errors


def flush_wandb(timeout: float | None = None, *, warn: bool = True) -> None:
    """Wait until W&B's service has written everything, then stop it.

    ``run.finish()`` returns before an offline run's file is complete, and Ray
    kills a worker's child processes (W&B's service among them) when the
    worker exits: without this, a stopped trial's run file can stay empty.

    Never waits longer than ``timeout`` (TEARDOWN_TIMEOUT_S): a service that
    cannot reach W&B's servers may retry for ever (wandb 0.19 does), and
    training must not wait for it. Past the timeout the service is stopped;
    what it had written stays on disk for ``wandb sync``.
    """
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    limit = TEARDOWN_TIMEOUT_S if timeout is None else timeout
    # wandb.teardown() forgets W&B's setup (and its service) first thing:
    # keep hold of it to stop a service that does not exit.
    setup = _compat.wandb_setup()
    thread, errors = _teardown_wandb(limit)
    if thread.is_alive():
        stopped = _compat.wandb_kill_service(setup)
        thread.join(5.0)
        if not warn:
            return
        logger.warning(
            "wandbtune: W&B's service did not shut down within %.0f s (are W&B's "
            "servers reachable?); %s. What it wrote is on disk for `wandb sync`.",
            limit,
            "it was stopped" if stopped else "it is left to exit on its own",
        )
    elif errors and warn:
        logger.warning("wandbtune: W&B did not shut down cleanly: %r", errors[0])
