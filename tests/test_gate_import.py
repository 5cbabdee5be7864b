"""User code that imports wandb while wandbtune's thread is importing it gets
the gated module: its first ``wandb.log`` waits for the trial's run.

Each case runs in a fresh interpreter, where wandb is not imported yet."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_RACE = textwrap.dedent(
    """
    import sys, threading, time
    from wandbtune._worker import Gate, Worker

    worker = Worker()
    user = threading.current_thread()
    gate = Gate(worker, lambda: user, 30)
    gate.install()  # wandb is not imported yet
    assert "wandb" not in sys.modules
    started = threading.Event()

    def start():  # as _mixin's _Trial.start: import wandb, then start a run
        started.set()
        import wandb  # noqa: F401
        time.sleep(0.5)

    worker.submit(start)
    started.wait()
    import wandb  # the user's code, while the W&B thread imports it

    print(type(wandb).__name__)
    gate.remove()
    print(type(wandb).__name__)
    """
)


@pytest.mark.parametrize("attempt", range(3))
def test_a_module_imported_during_the_w_and_b_threads_import_is_gated(attempt):
    out = subprocess.run(
        [sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["_GatedModule", "module"]
