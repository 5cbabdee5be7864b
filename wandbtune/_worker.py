"""W&B's work for the trials of one process, done in order on one thread.

A decorated trial hands its W&B work (start the run, log each result, finish
and flush) to this thread, so that the trial's own threads never wait for
W&B: starting W&B (importing it, starting its service, ``wandb.init``) takes
about a second per trial process, and each ``run.log`` waits for W&B's own
I/O thread. Tasks run one at a time in the order they were submitted, so a
trial's rows reach its run in Tune's order, and a trial reusing the actor
starts its run only after the previous one is finished.

While a trial's run is starting, its training thread may already run user
code. Such code can reach for the run through the ``wandb`` module
(``wandb.run``, ``wandb.log``, an integration calling ``wandb.init``): the
``wandb`` module is *gated* then, and those names make the training thread
wait until the run has started and every row before is logged (see
``Gate``). Other threads and other names never wait.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import queue
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, ClassVar, Optional

logger = logging.getLogger("wandbtune")

#: Tasks waiting for the W&B thread before a submitter waits for room: a
#: bound on memory if W&B falls far behind (each task holds one result).
MAX_PENDING = 10_000

Task = tuple[Callable[..., Any], tuple[Any, ...]]


class Worker:
    """A daemon thread running submitted callables in order; never raises."""

    def __init__(self, name: str = "wandbtune") -> None:
        self._name = name
        self._tasks: queue.Queue[Task] = queue.Queue(MAX_PENDING)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._loop, name=self._name, daemon=True
                    )
                    self._thread.start()
        self._tasks.put((fn, args))

    def idle(self) -> bool:
        """True when every submitted task is done."""
        return self._tasks.unfinished_tasks == 0

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Wait until every task submitted so far is done; False on timeout.

        Returns at once on the worker's own thread (a task cannot wait for
        itself)."""
        if threading.current_thread() is self._thread:
            return self.idle()
        done = self._tasks.all_tasks_done
        with done:
            return done.wait_for(lambda: self._tasks.unfinished_tasks == 0, timeout)

    def _loop(self) -> None:
        while True:
            fn, args = self._tasks.get()
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - the thread serves every trial
                logger.exception("wandbtune: internal error in the W&B thread")
            finally:
                self._tasks.task_done()


#: ``wandb`` module attributes through which user code reaches the current run.
GATED_NAMES = frozenset(
    {
        "run",
        "init",
        "log",
        "config",
        "summary",
        "finish",
        "save",
        "define_metric",
        "log_artifact",
        "use_artifact",
        "log_model",
        "use_model",
        "link_model",
        "watch",
        "unwatch",
        "alert",
        "mark_preempting",
    }
)


class _GatedModule(types.ModuleType):
    """The ``wandb`` module's class while a gate is open: see ``Gate``."""

    def __getattribute__(self, name: str) -> Any:
        if name in GATED_NAMES:
            gate = _gate
            if gate is not None:
                gate.pass_through()
        # Not super(): the gate may be removed (the class swapped back) by now.
        return types.ModuleType.__getattribute__(self, name)


_gate: Optional[Gate] = None


class Gate:
    """Makes the training thread wait for the run when it touches ``wandb``.

    Installed on the ``wandb`` module (its ``__class__``) while a trial's run
    starts in the W&B thread; removed once user code has passed it, at the
    trial's first train() after the start, or when the run finishes. Only
    ``thread_of_user_code()`` waits, and only for the names in GATED_NAMES:
    W&B's own threads and the W&B thread itself go straight through.
    """

    def __init__(
        self,
        worker: Worker,
        thread_of_user_code: Callable[[], Optional[threading.Thread]],
        timeout: float,
    ) -> None:
        self._worker = worker
        self._user_thread = thread_of_user_code
        self._timeout = timeout

    def install(self) -> None:
        """Gate the ``wandb`` module, now or, if it is not imported yet, the
        moment its import completes (before any thread can see it)."""
        global _gate
        _gate = self
        wandb = sys.modules.get("wandb")
        if wandb is None:
            _GateOnImport.arm()
        elif type(wandb) is types.ModuleType:
            wandb.__class__ = _GatedModule

    def pass_through(self) -> None:
        if threading.current_thread() is not self._user_thread():
            return
        if not self._worker.wait_idle(self._timeout):
            logger.warning(
                "wandbtune: W&B has not started this trial's run after %.0f s; "
                "your code goes on without waiting for it.",
                self._timeout,
            )
        self.remove()

    def remove(self) -> None:
        """Ungate the ``wandb`` module; a no-op if this gate is not on."""
        global _gate
        if _gate is not self:
            return
        _gate = None
        _GateOnImport.disarm()
        wandb = sys.modules.get("wandb")
        if wandb is not None and type(wandb) is _GatedModule:
            wandb.__class__ = types.ModuleType  # type: ignore[assignment]


class _GateOnImport(importlib.abc.MetaPathFinder):
    """Gates ``wandb`` at the end of its import, while Python's import lock
    for it is still held: a user thread importing wandb at the same time as
    the W&B thread gets the gated module, never the bare one."""

    _armed: ClassVar[Optional[_GateOnImport]] = None

    @classmethod
    def arm(cls) -> None:
        if cls._armed is None:
            cls._armed = cls()
            sys.meta_path.insert(0, cls._armed)

    @classmethod
    def disarm(cls) -> None:
        finder, cls._armed = cls._armed, None
        if finder is not None and finder in sys.meta_path:
            sys.meta_path.remove(finder)

    def find_spec(
        self, name: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if name != "wandb":
            return None
        type(self).disarm()  # once: the import below must not find us again
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or loader is None or exec_module is None:
            return spec

        def gated_exec_module(module: types.ModuleType) -> None:
            exec_module(module)
            if _gate is not None and type(module) is types.ModuleType:
                module.__class__ = _GatedModule

        loader.exec_module = gated_exec_module  # type: ignore[method-assign]
        return spec
