"""The callback's trial runs, kept out of Tune's loop.

``WandbLoggerCallback`` runs in Tune's loop on the driver, where every wait
holds every trial's results and every new trial. Online, starting a run waits
for W&B's server (≈ 0.35 s at 40 ms each way, more for the driver's first:
``import wandb``) and finishing one waits for its uploads (≈ 1.3 s). So Tune's
thread only queues what happens to a run; one thread (the feeder) starts the
runs and logs their rows in the order Tune told them, and each run is finished
on a thread of its own, so that runs ending together upload side by side. The
end of the experiment waits for all of it, bounded.

Offline (and disabled) runs cost CPU only, no waiting: their work stays in
Tune's thread. On a thread of its own it competes with Tune's loop for the
driver's GIL: 1 trial x 3000 reports, ``reuse_actors`` on, measured 1.35x
bare against 1.17x in Tune's thread (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from wandbtune._run import FINISH_TIMEOUT_S, Outcome, TrialRun, start_or_warn
from wandbtune._settings import Settings

logger = logging.getLogger("wandbtune")

#: At most this many runs are finished (their uploads waited for) at once.
FINISHING_AT_ONCE = 16


class CallbackRuns:
    """One W&B run per trial, fed from Tune's loop without waiting for W&B.

    Tune's thread calls ``start``, ``log_result``, ``log_checkpoint``, ``end``
    and ``close``. The first error of a run's start that must stop the
    experiment (bad settings, or a W&B failure with ``strict``) is raised
    there by ``raise_failure``, once; no run is started after it.
    """

    def __init__(self) -> None:
        self._queue: _Items = queue.SimpleQueue()
        self._feeder: Optional[threading.Thread] = None
        self._finish_slots = threading.BoundedSemaphore(FINISHING_AT_ONCE)
        #: Tune's thread: trials whose run was asked for and not yet ended,
        #: and whether it is fed in Tune's thread (offline) or queued.
        self._open: dict[str, bool] = {}
        #: The feeder's: the started runs, by trial id.
        self._runs: dict[str, TrialRun] = {}
        #: The feeder's: trial id -> the thread finishing that trial's last run.
        self._finishing: dict[str, threading.Thread] = {}
        self._failure: Optional[BaseException] = None
        self._failed = False
        #: A start failed because of W&B (an outage): its service may be left
        #: retrying, for the callback to stop at the experiment's end.
        self.saw_outage = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (CallbackRuns, ())  # pickled with the callback: new and idle

    # --- Tune's thread ----------------------------------------------------------

    def is_open(self, trial_id: str) -> bool:
        return trial_id in self._open

    def open_trials(self) -> list[str]:
        return list(self._open)

    def start(self, trial_id: str, settings: Settings, **trial: Any) -> None:
        """Start the trial's run (``trial``: ``start_or_warn``'s arguments)."""
        inline = self._open[trial_id] = settings.offline()
        self._put(inline, "start", trial_id, settings, trial)

    def log_result(self, trial_id: str, result: dict[str, Any]) -> None:
        inline = self._open.get(trial_id)
        if inline is not None:
            self._put(inline, "result", trial_id, dict(result))

    def log_checkpoint(self, trial_id: str, checkpoint: Any, iteration: Any) -> None:
        """Log a checkpoint as an artifact, and wait until that (and what was
        queued before it) is done: Tune may delete the checkpoint's files once
        this returns."""
        inline = self._open.get(trial_id)
        if inline is not None:
            done = threading.Event()
            self._put(inline, "checkpoint", trial_id, checkpoint, iteration, done)
            while not done.wait(0.5):
                if self._feeder is None or not self._feeder.is_alive():
                    return

    def end(self, trial_id: str, outcome: Outcome, failed: bool) -> None:
        """Record how the trial ended and finish its run."""
        inline = self._open.pop(trial_id, None)
        if inline is not None:
            self._put(inline, "end", trial_id, outcome, failed)

    def close(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """Wait until every run asked for is started, fed and finished (at
        most ``timeout``; what is not uploaded by then stays on disk for
        ``wandb sync``), then end the feeder."""
        feeder, self._feeder = self._feeder, None
        if feeder is None:
            return
        deadline = time.monotonic() + timeout
        self._queue.put(None)
        feeder.join(timeout)
        finishing = list(self._finishing.values())
        for thread in finishing:
            thread.join(max(0.0, deadline - time.monotonic()))
        if feeder.is_alive() or any(t.is_alive() for t in finishing):
            logger.warning(
                "wandbtune: W&B runs were still being started or finished after "
                "%.0f s; what they wrote is on disk for `wandb sync`.",
                timeout,
            )

    def raise_failure(self) -> None:
        """Raise the error that stops the experiment, if there is one (once)."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _put(self, inline: bool, *item: Any) -> None:
        if inline:
            self._do_one(item)
            return
        if self._feeder is None:
            # A queue per feeder: one a timed-out close left behind keeps its.
            self._queue = queue.SimpleQueue()
            self._feeder = threading.Thread(
                target=self._feed,
                args=(self._queue,),
                name="wandbtune-callback-runs",
                daemon=True,
            )
            self._feeder.start()
        self._queue.put(item)

    # --- the feeder thread (and Tune's, for offline runs) ---------------------

    def _feed(self, items: _Items) -> None:
        while True:
            item = items.get()
            if item is None:
                return
            self._do_one(item)

    def _do_one(self, item: tuple[Any, ...]) -> None:
        what, trial_id, *args = item
        try:
            self._do[what](self, trial_id, *args)
        except Exception:  # noqa: BLE001 - TrialRun's methods never raise
            logger.exception("wandbtune: internal error with a trial's run")

    def _start(self, trial_id: str, settings: Settings, trial: dict[str, Any]) -> None:
        # Should Tune start a trial again after telling its end, the earlier
        # run (same id) must be finished first.
        earlier = self._finishing.get(trial_id)
        if earlier is not None:
            earlier.join(FINISH_TIMEOUT_S)
        if self._failed:
            return  # the experiment is stopping: no more runs
        try:
            # No teardown after an outage here: other threads' runs may be
            # finishing; the callback stops the service at the end.
            run = start_or_warn(
                settings,
                exclusive=False,
                outage_teardown=False,
                trial_id=trial_id,
                **trial,
            )
        except Exception as exc:  # noqa: BLE001 - raised in Tune's thread
            self._failed = True
            self._failure = exc
            return
        if run is None:
            self.saw_outage = True
        else:
            self._runs[trial_id] = run

    def _result(self, trial_id: str, result: dict[str, Any]) -> None:
        run = self._runs.get(trial_id)
        if run is not None:
            run.log_result(result)

    def _checkpoint(
        self, trial_id: str, checkpoint: Any, iteration: Any, done: threading.Event
    ) -> None:
        try:
            run = self._runs.get(trial_id)
            if run is not None:
                run.log_checkpoint(checkpoint, iteration)
        finally:
            done.set()

    def _end(self, trial_id: str, outcome: Outcome, failed: bool) -> None:
        run = self._runs.pop(trial_id, None)
        if run is None:
            return
        run.record_outcome(outcome)
        if run.settings.offline():  # disabled too: CPU only, in Tune's thread
            run.finish(failed=failed)
            return

        def finish() -> None:
            with self._finish_slots:
                run.finish(failed=failed)

        thread = threading.Thread(
            target=finish, name=f"wandbtune-finish-{trial_id}", daemon=True
        )
        thread.start()
        self._finishing[trial_id] = thread

    _do: dict[str, Callable[..., None]] = {
        "start": _start,
        "result": _result,
        "checkpoint": _checkpoint,
        "end": _end,
    }


_Items = queue.SimpleQueue[Optional[tuple[Any, ...]]]
