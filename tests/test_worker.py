"""The W&B thread and the gate on the ``wandb`` module, in-process (no Ray).

The sweeps in test_trainable_runs and test_faults show the same behaviour end
to end (user code touching ``wandb`` at the start of a trial gets the run);
these pin down what only a controlled schedule can show: who waits, for what,
and that nothing stays patched.
"""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from wandbtune._worker import Gate, Worker


def test_tasks_run_in_order_and_wait_idle_waits_for_all_of_them():
    worker = Worker("test-worker")
    seen: list[int] = []
    release = threading.Event()
    worker.submit(release.wait)
    for i in range(100):
        worker.submit(seen.append, i)
    assert not worker.wait_idle(0.05)  # blocked behind the first task
    release.set()
    assert worker.wait_idle(5)
    assert seen == list(range(100))


def test_a_failing_task_is_logged_and_the_thread_goes_on(caplog):
    worker = Worker("test-worker")
    seen: list[str] = []
    worker.submit(lambda: 1 / 0)
    worker.submit(seen.append, "after")
    assert worker.wait_idle(5)
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
    """Submit a 'start' that sets module.run once released."""
    release = threading.Event()

    def start() -> None:
        release.wait(5)
        module.run = "the run"  # type: ignore[attr-defined]

    worker.submit(start)
    return release


def test_the_gate_holds_the_user_thread_until_the_run_has_started(fake_wandb):
    worker = Worker("test-worker")
    release = _starting_run(worker, fake_wandb)
    seen: dict[str, object] = {}

    def user_code() -> None:
        seen["run"] = fake_wandb.run  # what user code would see

    user = threading.Thread(target=user_code)
    gate = Gate(worker, lambda: user, timeout=10)
    gate.install()
    assert type(fake_wandb) is not types.ModuleType
    user.start()
    user.join(0.2)
    assert user.is_alive(), "user code read wandb.run before the run started"
    release.set()
    user.join(5)
    assert seen["run"] == "the run"
    assert type(fake_wandb) is types.ModuleType  # ungated after passing
    assert worker.wait_idle(5)


def test_other_threads_and_other_names_never_wait(fake_wandb):
    worker = Worker("test-worker")
    release = _starting_run(worker, fake_wandb)
    user = threading.Thread(target=lambda: None)
    gate = Gate(worker, lambda: user, timeout=10)
    gate.install()
    start = time.monotonic()
    assert fake_wandb.run is None  # this thread is not the user's: no wait
    assert fake_wandb.termlog is print
    assert time.monotonic() - start < 1
    gate.remove()
    gate.remove()  # idempotent
    assert type(fake_wandb) is types.ModuleType
    release.set()
    assert worker.wait_idle(5)


def test_the_gate_gives_up_after_its_timeout(fake_wandb, caplog):
    worker = Worker("test-worker")
    release = _starting_run(worker, fake_wandb)
    gate = Gate(worker, threading.current_thread, timeout=0.2)
    gate.install()
    assert fake_wandb.run is None  # went on without the run
    assert "has not started this trial's run" in caplog.text
    assert type(fake_wandb) is types.ModuleType
    release.set()
    assert worker.wait_idle(5)


def test_a_hung_w_and_b_holds_up_the_trial_once_not_at_every_report(
    monkeypatch, caplog
):
    # W&B stops answering mid-run: the W&B thread blocks in a row. The trial
    # waits for it once (the alignment of users' own rows), then trains on.
    from wandbtune import _mixin
    from wandbtune._settings import Settings

    monkeypatch.setattr(_mixin, "_WAIT_S", 0.2)
    worker = Worker("test-worker")
    monkeypatch.setattr(_mixin, "_worker", worker)
    hung = threading.Event()
    gate = Gate(worker, lambda: None, timeout=0.2)
    trial = _mixin._Trial(Settings(), {}, gate)
    trial.started.set()
    worker.submit(hung.wait)  # a row W&B never takes

    waits = []
    for _ in range(3):  # three train() calls
        start = time.monotonic()
        _mixin.WandbTrainableMixin._wandbtune_before_user_code(None, trial)  # type: ignore[arg-type]
        waits.append(time.monotonic() - start)
    hung.set()
    assert waits[0] >= 0.2
    assert max(waits[1:]) < 0.1
    assert caplog.text.count("did not log the trial's last result") == 1
