"""The part of ``@wandb_trainable`` that lives in Tune's trial actor.

Tune builds a function trainable's actor class from the function's
``__mixins__`` (the hook Ray's own ``wandb_mixin`` used). Living in the actor
rather than only in the function gives wandbtune what a function cannot see:
the ``training_iteration`` Tune assigns to each result, every result however
it was reported (``tune.report``, ``ray.train.report``, a yielded or returned
dict), failures raised to Tune, and ``cleanup``, which Tune calls when a
scheduler stops a trial while its function is blocked in ``report``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Optional

from wandbtune import _compat, _init_guard
from wandbtune._run import (
    COMPLETED,
    INIT_TIMEOUT_S,
    TEARDOWN_TIMEOUT_S,
    Outcome,
    TrialRun,
    exploit_of,
    flush_wandb,
    forget_lineage,
    init_kwargs,
    start_or_warn,
)
from wandbtune._settings import Settings
from wandbtune._worker import Gate, Worker

logger = logging.getLogger("wandbtune")

#: The thread that does this process's W&B work (see ``_worker``).
_worker = Worker()

#: How long user code waits for W&B at most: for a run to start, or for the
#: rows before it to be logged, before it goes on without W&B.
_WAIT_S = INIT_TIMEOUT_S + 15.0
#: How long the end of a trial waits for its run to be finished and written.
_END_WAIT_S = INIT_TIMEOUT_S + TEARDOWN_TIMEOUT_S + 15.0

#: How long cleanup waits for a stopped trial's function to unwind (Tune kills
#: actors that take more than 5 s to stop at the end of an experiment).
_THREAD_JOIN_S = 0.5


class _Trial:
    """One trial's W&B run, as the trial's threads and the W&B thread share it.

    The W&B thread starts the run, logs rows and finishes it; the trial's
    threads only submit that work (``_worker``), and wait for it where user
    code could otherwise see a run that is behind Tune.
    """

    def __init__(self, settings: Settings, trial: dict[str, Any], gate: Gate) -> None:
        self.settings = settings
        self.trial = trial
        self.gate = gate
        self.run: Optional[TrialRun] = None
        self.error: Optional[BaseException] = None
        self.started = threading.Event()
        #: When the trial's segment in this actor began (wall-clock time),
        #: and whether it is over (set before its finish is submitted): a
        #: start that comes round after that is late (``_run.Segment``).
        self.began = time.time()
        self.ended = False
        self.failed = False
        #: Whether user code waits for the rows before it (until W&B once
        #: took longer than _WAIT_S: a hung W&B must not slow every report).
        self.patient = True
        #: How the trial ended, where this process can tell (else the driver).
        self.outcome: Optional[Outcome] = None

    # --- in the W&B thread ----------------------------------------------------

    def start(self) -> None:
        try:
            import wandb  # noqa: F401 - imported here, off the trial's threads

            self.gate.install()
            self.run = start_or_warn(
                self.settings,
                node_service=True,
                segment=self,
                **self.trial,
            )
            if self.run is not None:
                _init_guard.install(self.run.run, owner=threading.current_thread())
        except BaseException as exc:  # noqa: BLE001 - raised in the trial's thread
            self.error = exc
        finally:
            self.started.set()

    def log_result(self, result: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log_result(result)
            if self.run.service_gone:
                self._start_again(result, guard=True)

    def log_checkpoint(self, checkpoint: Any, iteration: Any) -> None:
        if self.run is not None:
            self.run.log_checkpoint(checkpoint, iteration)

    def finish(self, failed: bool, flush: bool) -> None:
        self.gate.remove()
        _init_guard.remove()
        if self.error is not None:  # the trial ended before it could be raised
            logger.error("wandbtune: this trial's W&B run failed: %r", self.error)
        if self.run is not None:
            self._finish_run(failed, flush)
            if self.run.service_gone:
                self._start_again(None, guard=False)
                if self.run is not None:
                    self._finish_run(failed, flush)
        elif flush:
            flush_wandb()

    def _finish_run(self, failed: bool, flush: bool) -> None:
        assert self.run is not None
        if self.outcome is not None:
            self.run.record_outcome(self.outcome)
        self.run.finish(failed=failed or self.failed, flush=flush)

    def _start_again(self, result: Optional[Mapping[str, Any]], *, guard: bool) -> None:
        """The node's W&B service died under this trial's run (killed, out of
        memory): what it had not written is lost with it. Start the run again
        (same id: W&B resumes it) on a W&B service of this process's own
        (``_run._init`` falls back), log again what this attempt had logged
        since what reached W&B (``TrialRun.refill``), then ``result``, the
        row the dead service refused. ``guard``: the trial goes on (user
        code's ``wandb.init`` is guarded again), not at its end."""
        lost = self.run
        assert lost is not None
        forget_lineage(str(lost.run.id))  # only what reached W&B counts
        trial = {**self.trial, "exploit": None, "restored_iteration": None}
        try:
            self.run = start_or_warn(self.settings, node_service=True, **trial)
        except BaseException as exc:  # noqa: BLE001 - strict=True: raised in the trial
            self.run, self.error = None, exc
            return
        if self.run is None:
            return
        if guard:
            _init_guard.install(self.run.run, owner=threading.current_thread())
        self.run.refill(lost)
        if result is not None:
            self.run.log_result(result)

    # --- in the trial's threads -----------------------------------------------

    def wait(self, what: str) -> bool:
        """Wait until the W&B thread has done everything submitted so far;
        False if it has not within _WAIT_S."""
        if _worker.wait_idle(_WAIT_S):
            return True
        logger.warning(
            "wandbtune: W&B did not %s within %.0f s; the trial goes on "
            "without waiting for it.",
            what,
            _WAIT_S,
        )
        return False

    def raise_start_error(self) -> None:
        """Fail the trial if its run could not start and that must fail it
        (bad settings, or ``strict=True``)."""
        error, self.error = self.error, None
        if error is not None:
            raise error


# One trial runs in a Tune actor at a time; this is it (None between trials),
# and whether the mixin is set up for it.
_active: Optional[_Trial] = None
_instrumented = False
_active_lock = threading.Lock()


def active_run() -> Optional[TrialRun]:
    """The W&B run of the trial running in this process, if instrumented;
    waits for it to start."""
    trial = _active
    if trial is None:
        return None
    trial.wait("start this trial's run")
    return trial.run


def instrumented() -> bool:
    """True while a decorated trial is set up in this process (even if W&B
    logging is off for it)."""
    return _instrumented


class WandbTrainableMixin:
    """Instruments a Tune function trainable's actor; see module docstring."""

    _wandbtune_settings: ClassVar[Settings] = Settings()
    _wandbtune_trial: Optional[_Trial] = None
    _wandbtune_pending: Optional[tuple[Settings, dict[str, Any]]] = None

    # --- on the driver -------------------------------------------------------
    # Tune asks a trainable class for each new trial's resources on the driver,
    # with the trial's resolved config: the one per-trial hook a decorated
    # trainable has there. wandbtune checks config["wandb"] in it, so a bad
    # setting fails fit() at once instead of every trial in its worker.

    @classmethod
    def default_resource_request(cls, config: dict[str, Any]) -> Any:
        cls._wandbtune_settings.check_trial_config(config)
        return super().default_resource_request(config)  # type: ignore[misc]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Tune's function-trainable class (and a user's subclass) defines its own
        # default_resource_request below this mixin: check there too.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("default_resource_request")
        if isinstance(own, classmethod) and not hasattr(own.__func__, "_wandbtune"):
            cls.default_resource_request = classmethod(_checking(own.__func__))  # type: ignore[assignment]

    # --- in the trial actor --------------------------------------------------

    def setup(self, config: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().setup(config, *args, **kwargs)  # type: ignore[misc]
        self._wandbtune_prepare(config)

    def train(self) -> dict[str, Any]:
        self._wandbtune_start()
        trial = self._wandbtune_trial
        if trial is not None:
            self._wandbtune_before_user_code(trial)
        try:
            result: dict[str, Any] = super().train()  # type: ignore[misc]
        except BaseException as exc:
            # The trial is over: finish and flush now, before Tune hears of
            # it. At the end of an experiment Tune gives stopping actors 5 s
            # before it kills them, which a loaded machine can exceed.
            if trial is not None:
                trial.outcome = Outcome.of_error(exc)
            self._wandbtune_end(failed=True, flush=True, wait=True)
            raise
        if trial is not None:
            # Logged in the W&B thread while Tune handles the result; the
            # next train() waits for it before the function runs on.
            _worker.submit(trial.log_result, result)
            if _compat.RESULT_DUPLICATE in result or (
                result.get("done") and not _compat.is_function_trainable(self)
            ):
                # The function returned, or a class's step() said it is done.
                trial.outcome = Outcome(COMPLETED)
            if _compat.RESULT_DUPLICATE in result:
                # The function returned: its last result was the one before.
                # Finish the run now, without holding up Tune. W&B's service
                # writes a finished run out at once; it is kept for a next
                # trial in this actor (reuse_actors) and shut down in cleanup.
                self._wandbtune_end(failed=False, flush=False, wait=False)
        return result

    def _wandbtune_before_user_code(self, trial: _Trial) -> None:
        """Called before train() lets user code run on (the function resumes
        from its last report, or a class's step() runs)."""
        if not trial.started.is_set():
            return  # still starting: user code touching wandb waits (Gate)
        trial.gate.remove()
        # What user code logs itself lines up with the last reported row
        # only if that row has reached W&B: usually done long ago.
        if trial.patient and not trial.wait("log the trial's last result"):
            trial.patient = False
        trial.raise_start_error()

    def save(self, *args: Any, **kwargs: Any) -> Any:
        # Tune persists a checkpoint through save() for function and class
        # trainables alike; the result holds it and its training_iteration.
        with self._wandbtune_failing():
            saved = super().save(*args, **kwargs)  # type: ignore[misc]
        trial = self._wandbtune_trial
        if trial is not None:
            metrics = getattr(saved, "metrics", None) or {}
            _worker.submit(
                trial.log_checkpoint,
                getattr(saved, "checkpoint", None),
                metrics.get("training_iteration"),
            )
        return saved

    def restore(self, checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
        # Before train(): the run starts here, knowing where the trial goes on
        # from (its own checkpoint: a retry; another trial's: a PBT exploit).
        self._wandbtune_start(restored=getattr(checkpoint, "metrics", None))
        with self._wandbtune_failing():
            return super().restore(checkpoint, *args, **kwargs)  # type: ignore[misc]

    @contextmanager
    def _wandbtune_failing(self) -> Iterator[None]:
        """An exception here fails the trial in Tune: mark the run failed."""
        try:
            yield
        except BaseException:
            if self._wandbtune_trial is not None:
                self._wandbtune_trial.failed = True
            raise

    def cleanup(self) -> None:
        thread = _compat.training_thread()
        failed = False
        try:
            super().cleanup()  # type: ignore[misc]
        except Exception:
            failed = True
            raise
        finally:
            if thread is not None:
                # Stopped early: the function was released with SystemExit(0)
                # and unwinds now; let it, so what it logs on the way out and
                # the restore of ray.train's API happen before we finish.
                thread.join(timeout=_THREAD_JOIN_S)
            self._wandbtune_end(failed=failed, flush=True, wait=True)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # reuse_actors: the previous trial is over, a new one starts here.
        try:
            ok: bool = super().reset_config(new_config)  # type: ignore[misc]
        finally:
            self._wandbtune_end(failed=False, flush=False, wait=False)
        if ok:
            self._wandbtune_prepare(new_config)
        return ok

    def _wandbtune_prepare(self, config: dict[str, Any]) -> None:
        """A trial is set up in this actor: check its settings now (bad ones
        fail setup()), start its run when it first trains or restores.

        Tune can set up an actor for a trial and then run that trial on
        another one (reuse_actors): a run started here would stay empty."""
        global _instrumented
        settings = self._wandbtune_settings.merged(config)
        storage = _compat.trainable_storage(self)
        trial: dict[str, Any] = dict(
            trial_id=getattr(self, "trial_id", None),
            trial_name=getattr(self, "trial_name", None),
            experiment=_compat.experiment_name(storage),
            config=config,
            dir=_compat.storage_trial_dir(storage),
        )
        init_kwargs(settings, **trial)  # bad settings raise here, in setup()
        self._wandbtune_pending = (settings, trial)
        with _active_lock:
            _instrumented = True

    def _wandbtune_start(self, restored: Optional[Mapping[str, Any]] = None) -> None:
        """Start the prepared trial's run, if not started yet."""
        global _active, _instrumented
        pending, self._wandbtune_pending = self._wandbtune_pending, None
        if pending is None:
            return
        settings, trial = pending
        if not _worker.idle():
            # reuse_actors: the previous trial's run is still being written.
            # Let it be, before this trial runs: W&B's backlog in this actor
            # stays one trial long, which the end of the experiment can drain
            # (Tune kills stopping actors after 5 s), however short trials are.
            self._wandbtune_drain("finish the previous trial's run")
        trial = {
            **trial,
            "exploit": exploit_of(trial["trial_id"], restored, trial["config"]),
            "restored_iteration": (restored or {}).get("training_iteration"),
            "result_files": _compat.trial_result_files(_compat.trainable_storage(self)),
        }
        function = _compat.is_function_trainable(self)
        # A class's setup() and step() run in this thread; the function of a
        # function trainable in its own, which is the one to hold back.
        gate = Gate(_worker, _compat.training_thread if function else _nobody, _WAIT_S)
        state = _Trial(settings, trial, gate)
        gate.install()  # if wandb is imported already; else start() does it
        _worker.submit(state.start)
        with _active_lock:
            self._wandbtune_trial = _active = state
            _instrumented = True
        if not function or settings.strict:
            # A class's step() runs in this thread, right after; and with
            # strict=True no user code runs unless the run has started.
            state.wait("start this trial's run")
            gate.remove()
            state.raise_start_error()

    def _wandbtune_end(self, *, failed: bool, flush: bool, wait: bool) -> None:
        global _active, _instrumented
        self._wandbtune_pending = None  # set up, never run here: no run
        with _active_lock:
            trial, self._wandbtune_trial = self._wandbtune_trial, None
            if _active is trial:
                _active = None
            _instrumented = False
        if trial is not None:
            trial.ended = True
            _worker.submit(trial.finish, failed, flush)
        elif flush:
            # The run was finished earlier (the function returned, or a
            # reset_config could not reuse this actor): make sure it is written.
            _worker.submit(flush_wandb)
        if wait:
            self._wandbtune_drain("finish this trial's run")

    @staticmethod
    def _wandbtune_drain(what: str) -> None:
        """Wait, bounded, until the W&B thread has done all it was given."""
        if not _worker.wait_idle(_END_WAIT_S):
            logger.warning(
                "wandbtune: W&B did not %s within %.0f s; "
                "what it wrote is on disk for `wandb sync`.",
                what,
                _END_WAIT_S,
            )


def _nobody() -> None:
    return None


def _checking(request: Any) -> Any:
    def default_resource_request(cls: Any, config: dict[str, Any]) -> Any:
        cls._wandbtune_settings.check_trial_config(config)
        return request(cls, config)

    default_resource_request._wandbtune = True  # type: ignore[attr-defined]
    return default_resource_request


def mixin_for(settings: Settings) -> type:
    """A mixin class carrying one decorated trainable's settings.

    Made per decoration so that each decorated function ships its own settings
    with the actor class (cloudpickle sends this class by value, its base by
    reference).
    """
    return type(
        "WandbTrainableMixin",
        (WandbTrainableMixin,),
        {
            "_wandbtune_settings": settings,
            "__module__": __name__,
            "__qualname__": "mixin_for.<locals>.WandbTrainableMixin",
        },
    )
