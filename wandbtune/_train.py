"""``@wandb_trainable`` on a Ray Train training loop: one W&B run per
training run, logged by rank 0.

Ray Train runs the decorated ``train_loop_per_worker`` on every worker.
Rank 0 starts the run (id stable for the run's storage path and name, so a
worker-group restart or a re-fit that resumes from the run's checkpoint
continues it; name = the run's name; config = ``train_loop_config``), mirrors
every ``ray.train.report`` into it as one row, and finishes it when the loop
returns (exit code 0) or raises (exit code 1, the error in the summary). Other
ranks start no run. Inside a Tune trial (Ray's ``TuneReportCallback`` in the
trainer's RunConfig) rank 0's reports already reach the trial's run through
Tune, so the loop opens none.

Ray Train kills workers without running their ``finally`` when another
worker fails or ``fit()`` is interrupted. On Train V2 rank 0 finishes its run
(exit code 1) in Ray's worker-shutdown hook first. Train V1 (Ray 2.30) has
no such hook: there rank 0 hears it from the failing rank, the stopping
trial or the interrupted driver (``_train_v1_notices``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Optional

from wandbtune import _compat, _init_guard, _train_v1_notices
from wandbtune._row import TRAINING_ITERATION
from wandbtune._run import TrialRun, flush_wandb, start_or_warn
from wandbtune._settings import Settings
from wandbtune._train_v1_notices import RankZeroNotices

logger = logging.getLogger("wandbtune")

__all__ = ["ERROR_KEY", "training_loop_run"]

#: The run summary key holding ``Type: message`` of the error that ended it.
ERROR_KEY = "train/error"
#: How long finishing waits for W&B's service at the end: Ray Train gives a
#: worker's shutdown hooks 5 s in all before it kills the worker.
_SHUTDOWN_FLUSH_S = 3.0

_noted: set[str] = set()


@contextmanager
def training_loop_run(settings: Settings, config: Mapping[str, Any]) -> Iterator[None]:
    """Around one Ray Train worker's training loop: see the module docstring."""
    rank = _compat.world_rank()
    settings = settings.merged(config)
    if rank != 0:
        try:
            if settings.all_ranks:
                with _rank_in_shared_run(settings, config, rank):
                    yield
            else:
                yield
        except Exception as exc:
            _train_v1_notices.tell_rank_zero_a_rank_failed(rank, exc)
            raise
        return
    if _compat.train_reports_to_tune():
        _note_once(
            "tune",
            "this Ray Train run reports into a Tune trial (TuneReportCallback): "
            "rank 0's reports are logged to the trial's W&B run, and the "
            "decorated training loop opens no run of its own; wandb.log here "
            "goes nowhere (log through ray.train.report).",
        )
        import wandb

        # A disabled run: the loop's own wandb.log calls are dropped, not
        # raised on, and nothing is logged twice.
        wandb.init(mode="disabled")
        yield
        return
    identity = _compat.train_run_identity()
    if settings.all_ranks:
        settings = _shared(settings, rank=0)
    # V1: from now on a failing rank or a stopping trial waits for rank 0 to
    # finish the run (either can happen while W&B is still starting here).
    notices = RankZeroNotices.listen()
    run = start_or_warn(
        settings,
        trial_id=identity["run_id"],
        trial_name=identity["name"],
        experiment=identity["name"],  # the default group, as for Tune trials
        config=config,
        dir=identity["dir"],
    )
    if run is None:  # W&B could not start: train on without it
        if notices is not None:
            notices.finished()  # nothing to finish
        yield
        return
    loop = _TrainingLoopRun(run, notices)
    loop.begin()
    try:
        yield
    except BaseException as exc:
        loop.end(failed=True, error=f"{type(exc).__name__}: {exc}")
        raise
    loop.end(failed=False)


def _shared(settings: Settings, rank: Optional[int]) -> Settings:
    """Settings that join the run in W&B's shared mode as ``rank-<rank>``;
    rank 0 is the primary writer, the only one that sets the run's state."""
    import wandb

    settings.check_all_ranks("all_ranks")
    shared: dict[str, Any] = {
        "mode": "shared",
        "x_label": f"rank-{rank}",
        "x_primary": rank == 0,
        "x_update_finish_state": rank == 0,
    }
    user = settings.init_kwargs.get("settings")
    if user is None:
        merged: Any = wandb.Settings(quiet=True, silent=True).model_copy(update=shared)
    elif isinstance(user, Mapping):
        merged = {**user, **shared}
    else:
        merged = user.model_copy(update=shared)
    init = {k: v for k, v in settings.init_kwargs.items() if k != "mode"}
    environ = {k: v for k, v in settings.environ.items() if k != "WANDB_MODE"}
    return replace(settings, init_kwargs={**init, "settings": merged}, environ=environ)


@contextmanager
def _rank_in_shared_run(
    settings: Settings, config: Mapping[str, Any], rank: Optional[int]
) -> Iterator[None]:
    """A rank other than 0 with ``all_ranks``: joins rank 0's run for its
    system metrics and console, logs no rows."""
    identity = _compat.train_run_identity()
    run = start_or_warn(
        _shared(settings, rank),
        trial_id=identity["run_id"],
        trial_name=identity["name"],
        experiment=None,
        config={},
        dir=None,  # its own files stay on its node; rank 0's is the run's log
    )
    try:
        yield
    finally:
        if run is not None:
            run.finish(flush=True)


class _TrainingLoopRun:
    """Rank 0's run while the loop runs: mirrors reports, finishes once."""

    def __init__(
        self, run: TrialRun, notices: Optional[RankZeroNotices] = None
    ) -> None:
        self.run = run
        #: The training_iteration of the last report: the count of reports
        #: since the loop started, after the iteration of the checkpoint it
        #: went on from, as Tune counts (see _restored_iteration).
        self.count = _restored_iteration(run)
        self._owner: Any = None
        self._original: Optional[Callable[..., Any]] = None
        self._ended = threading.Lock()
        self._done = False
        #: V1: where rank 0 hears that Ray is about to kill it.
        self._notices = notices

    def begin(self) -> None:
        self._owner = _compat.train_report_owner()
        self._original = self._owner.report
        self._owner.report = self._report
        _init_guard.install(self.run.run)
        _compat.train_on_worker_shutdown(self._killed)  # V2
        if self._notices is not None:  # V1 (no hook): told through the store
            self._notices.watch(self._noticed)

    def _noticed(self, failed: bool, reason: str) -> None:
        """V1: Ray is about to kill rank 0 (another rank failed, the trial is
        stopping, fit() was interrupted): finish the run now."""
        self.end(
            failed=failed,
            error=f"stopped by Ray Train before the training loop returned: {reason}"
            if failed
            else None,
            flush_s=_SHUTDOWN_FLUSH_S,
        )

    def _report(self, *args: Any, **kwargs: Any) -> Any:
        assert self._original is not None
        metrics = args[0] if args else kwargs.get("metrics")
        checkpoint = args[1] if len(args) > 1 else kwargs.get("checkpoint")
        index = self.count + 1
        if checkpoint is not None:
            _mark_iteration(checkpoint, index)
        before = _compat.train_report_index()
        out = self._original(*args, **kwargs)
        if before is not None and _compat.train_report_index() == before:
            return out  # V2 skipped this report (a worker failed meanwhile)
        self.count = index
        if isinstance(metrics, Mapping):
            self.run.log_result({**metrics, TRAINING_ITERATION: index})
        if checkpoint is not None:
            self.run.log_checkpoint(checkpoint, index)
        return out

    def _killed(self) -> None:
        self.end(
            failed=True,
            error="stopped by Ray Train before the training loop returned "
            "(another worker failed, or fit() was interrupted)",
            flush_s=_SHUTDOWN_FLUSH_S,
        )

    def end(
        self,
        *,
        failed: bool,
        error: Optional[str] = None,
        flush_s: Optional[float] = None,
    ) -> None:
        with self._ended:
            if self._done:
                return
            self._done = True
        if self._owner is not None and self._original is not None:
            self._owner.report = self._original
        _init_guard.remove()
        try:
            if error is not None:
                self.run.set_summary(ERROR_KEY, error[:1000])
            self.run.finish(failed=failed)
            flush_wandb(flush_s)  # the worker is killed soon: write it out now
        finally:
            if self._notices is not None:  # V1: nobody need wait for rank 0 now
                self._notices.finished()


#: The checkpoint metadata key holding the training_iteration of the report
#: that saved the checkpoint.
ITERATION_METADATA_KEY = "wandbtune_training_iteration"


def _mark_iteration(checkpoint: Any, iteration: int) -> None:
    """Write ``iteration`` into a reported checkpoint's metadata (Ray's
    ``Checkpoint.update_metadata``; a file in the checkpoint's directory)."""
    try:
        checkpoint.update_metadata({ITERATION_METADATA_KEY: iteration})
    except Exception:  # noqa: BLE001 - never stops training
        logger.debug("wandbtune: checkpoint not marked", exc_info=True)


def _restored_iteration(run: TrialRun) -> int:
    """The training_iteration this attempt of the loop goes on from.

    Ray Train counts reports, not iterations: a worker-group restart or a
    re-fit goes on from the last checkpoint, and the reports after it are
    made again. As Tune does for trials, wandbtune numbers them from the
    checkpoint's iteration (marked in its metadata when it was reported), so
    they repeat logged iterations and are not logged twice. With no
    checkpoint, from 0; with a checkpoint wandbtune did not mark (one given by
    the user), after what earlier attempts logged.
    """
    try:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        marked = checkpoint.get_metadata().get(ITERATION_METADATA_KEY)
    except Exception:  # noqa: BLE001 - never stops training
        logger.debug("wandbtune: restored checkpoint not read", exc_info=True)
        marked = None
    if isinstance(marked, int):
        return marked
    return run.logged_by_earlier_attempts or 0


def _note_once(what: str, message: str) -> None:
    if what not in _noted:
        _noted.add(what)
        logger.warning("wandbtune: %s", message)
