"""Train V1 (Ray 2.30, or current Ray with ``RAY_TRAIN_V2_ENABLED=0``): how
rank 0 hears that Ray is about to kill it, so that it finishes its W&B run
first.

V1 runs no code in rank 0 before it kills it: no ``finally``, no atexit, no
worker-shutdown hook (V2 has one). The notice comes from elsewhere, through
the Ray cluster's key-value store, which rank 0 watches (every 0.25 s) from
before its run starts until it has finished it:

- **another rank failed**: Ray kills rank 0 the moment that rank's error
  reaches the trainer, so the failing rank writes its error and holds it
  until rank 0 says it has finished (at most ``TELL_WAIT_S``);
- **the trial was stopped** (``fit()`` interrupted, a Tune scheduler or
  stopper, a PBT pause): Tune stops the trainer's trial actor and then removes
  the placement group, which kills rank 0. In the trial actor, the trial
  session's ``finish`` (which Tune's stop reaches) waits until rank 0 has
  finished (at most ``TELL_WAIT_S``) before Tune's own cleanup goes on;
- **``fit()`` was interrupted** (Ctrl-C on the driver): a thread on the driver
  sees Tune take the interrupt and writes it at once. Tune asks the trainer
  to stop only after its last experiment checkpoint, and kills it 10 s after
  that if the trainer does not return (an epoch longer than that), with no
  cleanup: this notice is what reaches rank 0 in that case.

The first notice decides how the run ends: a failure or an interrupt as
failed (exit code 1, the reason in ``train/error``), a stop as finished
(exit code 0, as for a Tune trial a scheduler stops; 1 when the trainer had
already failed).

Our code runs on the driver and in the trial actor only where the decorated
training loop is pickled (the driver, at ``fit()``) and unpickled (the trial
actor, when the trainer is set up): ``on_pickled`` and ``on_unpickled``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Optional

from wandbtune import _compat

logger = logging.getLogger("wandbtune")

__all__ = [
    "TELL_WAIT_S",
    "RankZeroNotices",
    "on_pickled",
    "on_unpickled",
    "tell_rank_zero_a_rank_failed",
]

#: How often rank 0 looks for a notice, and the driver for an interrupt.
WATCH_INTERVAL_S = 0.25
#: How long a failing rank or a stopping trial waits for rank 0 to finish its
#: run: W&B's final flush (3 s) and the time to hear the notice.
TELL_WAIT_S = 6.0

#: A trial stopped by an interrupt may stop before the driver's notice of
#: the interrupt is written: how long rank 0 waits for it then.
INTERRUPT_GRACE_S = 0.5
#: A notice's text starts with what happened; the rest is the reason.
_FAILED = "failed:"
_STOPPED = "stopped:"


def _trial_key(trial_id: str) -> Optional[str]:
    """The key under which rank 0 of a trial's current attempt is found."""
    job = _compat.ray_job_id()
    return f"train-trial-{job}-{trial_id}" if job else None


def _interrupts_key() -> Optional[str]:
    """The key counting the driver's interrupted ``fit()`` calls."""
    job = _compat.ray_job_id()
    return f"tune-interrupts-{job}" if job else None


class RankZeroNotices:
    """Rank 0's side: listens from before its run starts, finishes the run
    on the first notice, and says when the run is finished."""

    def __init__(self, key: str, interrupts_key: Optional[str]) -> None:
        self.key = key
        self._interrupts_key = interrupts_key
        self._interrupts_at_start = (
            _compat.cluster_get(interrupts_key) if interrupts_key else None
        )
        self._stopped = threading.Event()

    @classmethod
    def listen(cls) -> Optional[RankZeroNotices]:
        """On a V1 rank 0: start listening (from now on a failing rank and a
        stopping trial wait for this run); None elsewhere or without the
        cluster's store."""
        key = _compat.train_attempt_key()
        if key is None or not _compat.cluster_put(f"{key}:watched", "1"):
            return None
        trial = _compat.train_trial_id()
        trial_key = _trial_key(trial) if trial else None
        if trial_key is not None:
            _compat.cluster_put(trial_key, key)
        return cls(key, _interrupts_key())

    def watch(self, end: Callable[[bool, str], None]) -> None:
        """Call ``end(failed, reason)`` on the first notice (in a thread)."""
        threading.Thread(
            target=self._watch, args=(end,), name="wandbtune-ranks", daemon=True
        ).start()

    def _watch(self, end: Callable[[bool, str], None]) -> None:
        while not self._stopped.is_set():
            if self._interrupted():
                end(True, "fit() was interrupted")
                return
            notice = _compat.cluster_get(self.key)
            if notice is not None:
                if notice.startswith(_STOPPED) and self._interrupted(
                    wait_s=INTERRUPT_GRACE_S
                ):
                    end(True, "fit() was interrupted")
                else:
                    end(notice.startswith(_FAILED), notice.split(":", 1)[1].strip())
                return
            self._stopped.wait(WATCH_INTERVAL_S)

    def _interrupted(self, wait_s: float = 0.0) -> bool:
        """Whether the driver counted an interrupt since rank 0 started
        listening, waiting up to ``wait_s`` for it."""
        if self._interrupts_key is None:
            return False
        deadline = time.monotonic() + wait_s
        while True:
            interrupts = _compat.cluster_get(self._interrupts_key)
            # None: no count, or the store did not answer: no news. A count
            # only grows.
            if interrupts is not None and interrupts != self._interrupts_at_start:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(WATCH_INTERVAL_S / 2)

    def finished(self) -> None:
        """The run is finished: nobody needs to wait for it any more."""
        self._stopped.set()
        _compat.cluster_put(f"{self.key}:finished", "1")


def _tell(key: str, notice: str) -> bool:
    """Write ``notice`` for rank 0 of the attempt ``key`` unless its run is
    finished; wait for it to be (at most TELL_WAIT_S). False on timeout."""
    if _compat.cluster_get(f"{key}:finished") is not None:
        return True
    _compat.cluster_put(key, notice[:900], overwrite=False)  # the first decides
    deadline = time.monotonic() + TELL_WAIT_S
    while time.monotonic() < deadline:
        if _compat.cluster_get(f"{key}:finished") is not None:
            return True
        time.sleep(WATCH_INTERVAL_S / 2)
    return False


def tell_rank_zero_a_rank_failed(rank: Optional[int], exc: BaseException) -> None:
    """A rank's loop raised. Ray will kill rank 0 as soon as it hears of it:
    hold the error until rank 0 has finished its run, if rank 0 listens."""
    key = _compat.train_attempt_key()
    if key is None or _compat.cluster_get(f"{key}:watched") is None:
        return
    if not _tell(key, f"{_FAILED} rank {rank} failed: {type(exc).__name__}: {exc}"):
        logger.warning(
            "wandbtune: rank 0 did not finish its W&B run within %.0f s of this "
            "rank's error; Ray Train stops it now.",
            TELL_WAIT_S,
        )


def _before_trial_stops(trial_id: str, trainer_ended: bool) -> None:
    """In a trainer's trial actor, before Tune's cleanup (which ends with
    rank 0 killed): have rank 0 finish its run first. The trainer ended
    before rank 0 finished: it failed (a worker lost, an error of the
    trainer's own; a loop that raised has told rank 0 itself)."""
    trial_key = _trial_key(trial_id)
    key = _compat.cluster_get(trial_key) if trial_key else None
    if key is None:  # not a Train trial, or rank 0 never listened
        return
    if trainer_ended:
        notice = f"{_FAILED} the trainer failed (see Tune's error for the trial)"
    else:
        notice = f"{_STOPPED} the trial was stopped before the loop returned"
    if not _tell(key, notice):
        logger.warning(
            "wandbtune: rank 0 did not finish its W&B run within %.0f s of the "
            "trial's stop; Ray stops it now.",
            TELL_WAIT_S,
        )


# --- the driver: Tune takes an interrupt ------------------------------------------

_driver_watch = threading.Lock()
_driver_watcher: Optional[threading.Thread] = None


def on_pickled() -> None:
    """Where a decorated loop is pickled: on a V1-capable driver, watch for
    Tune's interrupt until the next ``tune.run`` has returned (a ``Tuner``
    pickles its trainable when it is made, and may be fit later)."""
    global _driver_watcher
    if _driver_watcher is not None and _driver_watcher.is_alive():
        return
    if not _compat.is_ray_driver() or not _compat.train_v1_possible():
        return
    with _driver_watch:
        if _driver_watcher is not None and _driver_watcher.is_alive():
            return
        _driver_watcher = threading.Thread(
            target=_watch_for_interrupts, name="wandbtune-interrupts", daemon=True
        )
        _driver_watcher.start()


def _watch_for_interrupts() -> None:
    """Tune's SIGINT handler only sets a flag and puts back the handler it
    found: when the handler changes back to one seen before (or from Tune's
    to one that is not Tune's), ``fit()`` was interrupted. Count it in the
    store, where rank 0 looks. A new handler of Tune's is a ``tune.run``
    starting, not an interrupt. Ends when a ``tune.run`` has returned, or
    when Ray is shut down."""
    handler = _compat.sigint_handler()
    seen = [handler]
    fit_seen = False
    while True:
        try:
            now = _compat.sigint_handler()
            if now is not handler:
                restored = any(now is earlier for earlier in seen)
                if restored or (
                    _compat.is_tune_sigint_handler(handler)
                    and not _compat.is_tune_sigint_handler(now)
                ):
                    _count_interrupt()
                seen.append(now)
                handler = now
            if _compat.tune_runs_in_main_thread():
                fit_seen = True
            elif fit_seen or not _compat.is_ray_driver():
                return
        except Exception:  # noqa: BLE001 - a lost notice, never a failure
            logger.debug("wandbtune: interrupt watch", exc_info=True)
            return
        time.sleep(WATCH_INTERVAL_S / 2)


def _count_interrupt() -> None:
    key = _interrupts_key()
    if key is not None:
        count = int(_compat.cluster_get(key) or 0) + 1
        _compat.cluster_put(key, str(count))


def on_unpickled() -> None:
    """Where a decorated loop is unpickled: in a V1 trainer's trial actor,
    have the trial's cleanup wait for rank 0 (installed once per process)."""
    if _compat.is_ray_driver() or not _compat.train_v1_possible():
        return
    _compat.before_function_trial_stops(_before_trial_stops)
