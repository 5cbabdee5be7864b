"""The callback's trial runs, kept out of Tune's loop.

``WandbLoggerCallback`` runs in Tune's loop on the driver, where every wait
holds every trial's results and every new trial. Online, starting a run waits
for W&B's server (≈ 0.35 s at 40 ms each way, more for the driver's first:
``import wandb``) and finishing one waits for its uploads (≈ 1.3 s). So Tune's
thread only queues what happens to a run; each online run has a thread of its
own that starts it, logs its rows in the order Tune told them and finishes it.
Runs of trials running side by side start side by side (one after the other,
the starts fell behind Tune's trials whenever they were shorter than a start
each), and runs ending together upload side by side. The end of the
experiment waits for all of it, bounded.

Offline (and disabled) runs cost CPU only, no waiting: their work stays in
Tune's thread. On a thread of its own it competes with Tune's loop for the
driver's GIL: 1 trial x 3000 reports, ``reuse_actors`` on, measured 1.35x
bare against 1.17x in Tune's thread (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, Optional

from wandbtune._run import FINISH_TIMEOUT_S, Outcome, TrialRun, start_or_warn
from wandbtune._settings import Settings

logger = logging.getLogger("wandbtune")

#: At most this many runs are started, and this many finished (their uploads
#: waited for), at once: a sweep of many trials at once does not send W&B as
#: many requests at the same moment.
STARTING_AT_ONCE = 16
FINISHING_AT_ONCE = 16


class CallbackRuns:
    """One W&B run per trial, fed from Tune's loop without waiting for W&B.

    Tune's thread calls ``start``, ``log_result``, ``log_checkpoint``, ``end``
    and ``close``. The first error of a run's start that must stop the
    experiment (bad settings, or a W&B failure with ``strict``) is raised
    there by ``raise_failure``, once; no run is started after it.
    """

    def __init__(self) -> None:
        #: Tune's thread: the trials whose run was asked for and not yet ended.
        self._open: dict[str, _RunFeed] = {}
        #: Tune's thread: trial id -> the thread of its last online run, until
        #: ``close`` (a retried trial's run waits for the earlier one's end).
        self._threads: dict[str, threading.Thread] = {}
        self._start_slots = threading.BoundedSemaphore(STARTING_AT_ONCE)
        self._finish_slots = threading.BoundedSemaphore(FINISHING_AT_ONCE)
        self._failure_lock = threading.Lock()
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
        feed = self._open[trial_id] = _RunFeed(self, trial_id)
        if not settings.offline():  # disabled counts as offline: CPU only
            for done in [
                t for t, thread in self._threads.items() if not thread.is_alive()
            ]:
                del self._threads[done]
            feed.start_thread(earlier=self._threads.get(trial_id))
            self._threads[trial_id] = feed.thread  # type: ignore[assignment]
        feed.put("start", settings, trial)

    def log_result(self, trial_id: str, result: dict[str, Any]) -> None:
        feed = self._open.get(trial_id)
        if feed is not None:
            feed.put("result", dict(result))

    def log_checkpoint(self, trial_id: str, checkpoint: Any, iteration: Any) -> None:
        """Log a checkpoint as an artifact, and wait until that (and what was
        queued before it) is done: Tune may delete the checkpoint's files once
        this returns."""
        feed = self._open.get(trial_id)
        if feed is not None:
            done = threading.Event()
            feed.put("checkpoint", checkpoint, iteration, done)
            while not done.wait(0.5):
                if feed.thread is not None and not feed.thread.is_alive():
                    return

    def end(self, trial_id: str, outcome: Outcome, failed: bool) -> None:
        """Record how the trial ended and finish its run."""
        feed = self._open.pop(trial_id, None)
        if feed is not None:
            feed.put("end", outcome, failed)

    def close(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        """Wait until every run asked for is started, fed and finished (at
        most ``timeout``; what is not uploaded by then stays on disk for
        ``wandb sync``)."""
        threads, self._threads = list(self._threads.values()), {}
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            logger.warning(
                "wandbtune: W&B runs were still being started or finished after "
                "%.0f s; what they wrote is on disk for `wandb sync`.",
                timeout,
            )

    def raise_failure(self) -> None:
        """Raise the error that stops the experiment, if there is one (once)."""
        with self._failure_lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    # --- a run's thread (and Tune's, for offline runs) ------------------------

    def _fail(self, exc: BaseException) -> None:
        with self._failure_lock:
            if not self._failed:
                self._failed = True
                self._failure = exc


class _RunFeed:
    """One trial's run, started, fed and finished in the order Tune told:
    on a thread of its own (online), or in the caller's (offline)."""

    def __init__(self, runs: CallbackRuns, trial_id: str) -> None:
        self.runs = runs
        self.trial_id = trial_id
        self.run: Optional[TrialRun] = None
        self.thread: Optional[threading.Thread] = None
        self._items: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def start_thread(self, earlier: Optional[threading.Thread]) -> None:
        self.thread = threading.Thread(
            target=self._feed,
            args=(earlier,),
            name=f"wandbtune-run-{self.trial_id}",
            daemon=True,
        )
        self.thread.start()

    def put(self, *item: Any) -> None:
        if self.thread is None:
            self._do(item)
        else:
            self._items.put(item)

    def _feed(self, earlier: Optional[threading.Thread]) -> None:
        if earlier is not None:
            # Should Tune start a trial again after telling its end, the
            # earlier run (same id) must be finished first.
            earlier.join(FINISH_TIMEOUT_S)
        while True:
            item = self._items.get()
            self._do(item)
            if item[0] == "end":
                return

    def _do(self, item: tuple[Any, ...]) -> None:
        what, *args = item
        try:
            getattr(self, f"_{what}")(*args)
        except Exception:  # noqa: BLE001 - TrialRun's methods never raise
            logger.exception("wandbtune: internal error with a trial's run")

    def _start(self, settings: Settings, trial: dict[str, Any]) -> None:
        slots = self.runs._start_slots if self.thread else contextlib.nullcontext()
        with slots:
            if self.runs._failed:
                return  # the experiment is stopping: no more runs
            try:
                # No teardown after an outage here: other threads' runs may be
                # finishing; the callback stops the service at the end.
                self.run = start_or_warn(
                    settings,
                    exclusive=False,
                    outage_teardown=False,
                    trial_id=self.trial_id,
                    **trial,
                )
            except Exception as exc:  # noqa: BLE001 - raised in Tune's thread
                self.runs._fail(exc)
                return
        if self.run is None:
            self.runs.saw_outage = True

    def _result(self, result: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log_result(result)

    def _checkpoint(
        self, checkpoint: Any, iteration: Any, done: threading.Event
    ) -> None:
        try:
            if self.run is not None:
                self.run.log_checkpoint(checkpoint, iteration)
        finally:
            done.set()

    def _end(self, outcome: Outcome, failed: bool) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        run.record_outcome(outcome)
        if self.thread is None:  # offline: CPU only, in Tune's thread
            run.finish(failed=failed)
            return
        with self.runs._finish_slots:
            run.finish(failed=failed)
