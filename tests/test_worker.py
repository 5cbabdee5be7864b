"""The W&B thread and the gate on the ``wandb`` module, in-process (no Ray).

The sweeps in test_trainable_runs and test_faults show the same behaviour end
to end (user code touching ``wandb`` at the start of a trial gets the run);
these pin down what only a controlled schedule can show: who waits, for what,
and that nothing stays patched.

No assertion here depends on how fast the machine is: threads meet at events,
and where a thread must *not* wait, the wait it would have is made far longer
(60 s) than the join that checks it returned (30 s).
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable

import pytest

from wandbtune._worker import Gate, Worker

#: How long a wait that must not happen would last (a gate's timeout)...
WOULD_WAIT_S = 60.0
#: ...and how long a test gives a thread that must not wait to finish.
JOIN_S = 30.0
#: How long a read of ``wandb.run`` that the gate must hold back is given to
#: (wrongly) finish: any read finishes within this if nothing holds it.
HELD_S = 2.0


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(JOIN_S)
    return thread


def test_tasks_run_in_order_and_wait_idle_waits_for_all_of_them():
    worker = Worker("test-worker")
    seen: list[int] = []
    release = threading.Event()
    worker.submit(release.wait)
    for i in range(100):
        worker.submit(seen.append, i)
    assert not worker.wait_idle(0.05)  # blocked behind the first task
    assert seen == []
    release.set()
    assert worker.wait_idle(JOIN_S)
    assert seen == list(range(100))


def test_a_failing_task_is_logged_and_the_thread_goes_on(caplog):
    worker = Worker("test-worker")
    seen: list[str] = []
    worker.submit(lambda: 1 / 0)
    worker.submit(seen.append, "after")
    assert worker.wait_idle(JOIN_S)
    assert seen == ["after"]
    assert "internal error in the W&B thread" in caplog.text


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module: the gate only touches the module object."""
    module = types.ModuleType("wandb")
    module.run = None  # type: ignore[attr-defined]
    module.termlog = print  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _starting_run(worker: Worker, module: types.ModuleType) -> threading.Event:
    """Submit a 'start' that sets module.run once released (by the test)."""
    release = threading.Event()

    def start() -> None:
        release.wait(WOULD_WAIT_S)
        module.run = "the run"  # type: ignore[attr-defined]

    worker.submit(start)
    return release


def test_the_gate_holds_the_user_thread_until_the_run_has_started(fake_wandb):
    worker = Worker("test-worker")
    reading = threading.Event()  # user code is about to read wandb.run
    read = threading.Event()  # it has read it
    held: list[bool] = []

    def start() -> None:
        # The run starts once user code is reading wandb.run, and only after
        # giving that read HELD_S to finish: the gate must hold it back.
        assert reading.wait(WOULD_WAIT_S)
        held.append(not read.wait(HELD_S))
        fake_wandb.run = "the run"  # type: ignore[attr-defined]

    worker.submit(start)
    seen: dict[str, object] = {}

    def user_code() -> None:
        reading.set()
        seen["run"] = fake_wandb.run  # what user code would see
        read.set()

    user = threading.Thread(target=user_code, daemon=True)
    gate = Gate(worker, lambda: user, timeout=WOULD_WAIT_S)
    gate.install()
    assert type(fake_wandb) is not types.ModuleType
    user.start()
    user.join(WOULD_WAIT_S + JOIN_S)
    assert not user.is_alive()
    assert held == [True], "user code read wandb.run before the run started"
    assert seen["run"] == "the run"
    assert type(fake_wandb) is types.ModuleType  # ungated after passing
    assert worker.wait_idle(JOIN_S)


def test_other_threads_and_other_names_never_wait(fake_wandb, caplog):
    # The run is starting (and stays so until the end): anything that waited
    # for it would wait WOULD_WAIT_S, longer than each join below.
    worker = Worker("test-worker")
    release = _starting_run(worker, fake_wandb)
    seen: dict[str, object] = {}

    def user_code() -> None:
        seen["user:termlog"] = fake_wandb.termlog  # not a name that waits

    def other_thread() -> None:
        seen["other:run"] = fake_wandb.run  # not the user's thread
        seen["other:termlog"] = fake_wandb.termlog

    user = threading.Thread(target=user_code, daemon=True)
    gate = Gate(worker, lambda: user, timeout=WOULD_WAIT_S)
    gate.install()
    user.start()
    user.join(JOIN_S)
    assert not user.is_alive(), "the user's thread waited for an ungated name"
    assert not _in_thread(other_thread).is_alive(), "another thread waited"
    assert seen == {"user:termlog": print, "other:run": None, "other:termlog": print}
    assert not worker.idle()  # the run was still starting all along
    assert "has not started" not in caplog.text
    gate.remove()
    gate.remove()  # idempotent
    assert type(fake_wandb) is types.ModuleType
    release.set()
    assert worker.wait_idle(JOIN_S)


def test_the_gate_gives_up_after_its_timeout(fake_wandb, caplog):
    worker = Worker("test-worker")
    release = _starting_run(worker, fake_wandb)
    gate = Gate(worker, threading.current_thread, timeout=0.2)
    gate.install()
    assert fake_wandb.run is None  # went on without the run
    assert not worker.idle()  # it gave up: the run had not started
    assert "has not started this trial's run" in caplog.text
    assert type(fake_wandb) is types.ModuleType
    release.set()
    assert worker.wait_idle(JOIN_S)


def test_a_hung_w_and_b_holds_up_the_trial_once_not_at_every_report(
    monkeypatch, caplog
):
    # W&B stops answering mid-run: the W&B thread blocks in a row. The trial
    # waits for it once (the alignment of users' own rows), then trains on.
    from wandbtune import _mixin
    from wandbtune._settings import Settings

    worker = Worker("test-worker")
    monkeypatch.setattr(_mixin, "_worker", worker)
    hung = threading.Event()
    gate = Gate(worker, lambda: None, timeout=0.2)
    trial = _mixin._Trial(Settings(), {}, gate)
    trial.started.set()
    worker.submit(hung.wait, WOULD_WAIT_S + JOIN_S)  # a row W&B never takes

    def before_user_code() -> None:  # what each train() does first
        _mixin.WandbTrainableMixin._wandbtune_before_user_code(None, trial)  # type: ignore[arg-type]

    monkeypatch.setattr(_mixin, "_WAIT_S", 0.2)
    before_user_code()  # waits for the row, gives up after _WAIT_S
    assert caplog.text.count("did not log the trial's last result") == 1
    # Had a later train() waited again, it would wait for WOULD_WAIT_S.
    monkeypatch.setattr(_mixin, "_WAIT_S", WOULD_WAIT_S)
    later = _in_thread(lambda: [before_user_code() for _ in range(2)])
    assert not later.is_alive(), "a later train() waited for the hung W&B again"
    assert not worker.idle()  # W&B was hung throughout
    assert caplog.text.count("did not log the trial's last result") == 1
    hung.set()
    assert worker.wait_idle(JOIN_S)
