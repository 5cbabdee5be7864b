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

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Optional

from wandbtune import _compat
from wandbtune._run import TrialRun, flush_wandb, start_or_warn
from wandbtune._settings import Settings

# One trial runs in a Tune actor at a time; this is its run (None if W&B could
# not start one), and whether the mixin is set up for it.
_active: Optional[TrialRun] = None
_instrumented = False
_active_lock = threading.Lock()

#: How long cleanup waits for a stopped trial's function to unwind (Tune kills
#: actors that take more than 5 s to stop at the end of an experiment).
_THREAD_JOIN_S = 0.5


def active_run() -> Optional[TrialRun]:
    """The W&B run of the trial running in this process, if instrumented."""
    return _active


def instrumented() -> bool:
    """True while a decorated trial is set up in this process (even if W&B
    logging is off for it)."""
    return _instrumented


class WandbTrainableMixin:
    """Instruments a Tune function trainable's actor; see module docstring."""

    _wandbtune_settings: ClassVar[Settings] = Settings()
    _wandbtune_run: Optional[TrialRun] = None

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
        self._wandbtune_start(config)

    def train(self) -> dict[str, Any]:
        try:
            result: dict[str, Any] = super().train()  # type: ignore[misc]
        except BaseException:
            # The trial is over: finish and flush now, before Tune hears of
            # it. At the end of an experiment Tune gives stopping actors 5 s
            # before it kills them, which a loaded machine can exceed.
            self._wandbtune_end(failed=True, flush=True)
            raise
        if self._wandbtune_run is not None:
            self._wandbtune_run.log_result(result)
            if _compat.RESULT_DUPLICATE in result:
                # The function returned: its last result was the one before.
                self._wandbtune_end(failed=False, flush=True)
        return result

    def save(self, *args: Any, **kwargs: Any) -> Any:
        # Tune persists a checkpoint through save() for function and class
        # trainables alike; the result holds it and its training_iteration.
        with self._wandbtune_failing():
            saved = super().save(*args, **kwargs)  # type: ignore[misc]
        if self._wandbtune_run is not None:
            metrics = getattr(saved, "metrics", None) or {}
            self._wandbtune_run.log_checkpoint(
                getattr(saved, "checkpoint", None), metrics.get("training_iteration")
            )
        return saved

    def restore(self, *args: Any, **kwargs: Any) -> Any:
        with self._wandbtune_failing():
            return super().restore(*args, **kwargs)  # type: ignore[misc]

    @contextmanager
    def _wandbtune_failing(self) -> Iterator[None]:
        """An exception here fails the trial in Tune: mark the run failed."""
        try:
            yield
        except BaseException:
            if self._wandbtune_run is not None:
                self._wandbtune_run.failed = True
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
            self._wandbtune_end(failed=failed, flush=True)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # reuse_actors: the previous trial is over, a new one starts here.
        try:
            ok: bool = super().reset_config(new_config)  # type: ignore[misc]
        finally:
            self._wandbtune_end(failed=False, flush=False)
        if ok:
            self._wandbtune_start(new_config)
        return ok

    def _wandbtune_start(self, config: dict[str, Any]) -> None:
        global _active, _instrumented
        settings = self._wandbtune_settings.merged(config)
        storage = _compat.trainable_storage(self)
        run = start_or_warn(
            settings,
            trial_id=getattr(self, "trial_id", None),
            trial_name=getattr(self, "trial_name", None),
            experiment=_compat.experiment_name(storage),
            config=config,
            dir=_compat.storage_trial_dir(storage),
        )
        with _active_lock:
            self._wandbtune_run = _active = run
            _instrumented = True

    def _wandbtune_end(self, *, failed: bool, flush: bool) -> None:
        global _active, _instrumented
        with _active_lock:
            run, self._wandbtune_run = self._wandbtune_run, None
            if _active is run:
                _active = None
            _instrumented = False
        if run is not None:
            run.finish(failed=failed, flush=flush)
        elif flush:
            # The run was finished earlier (e.g. by a reset_config that could
            # not reuse this actor): still make sure it is written.
            flush_wandb()


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
