"""Shared fixtures: one local Ray per test module, real wandb in offline mode.

W&B's servers are the one part not run here: every run is offline, and tests
read the ``run-*.wandb`` files W&B would sync (wandbtune.testing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Set before Ray starts so that every worker process inherits them.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
# Train V2's controller looks at its workers every 2 s by default, so each
# training run ends up to 2 s after its loop returns, more than once per
# fit (a failure, a restart); 0.2 s takes 30-40 % off the Train tests here
# and changes nothing they check (measured on ray 2.60: a 4-epoch fit
# 21 -> 15 s, a restarted worker group 30 -> 25 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
for var in (
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_PROJECT_NAME",
    "WANDB_DIR",
    "WANDB_GROUP_NAME",
):
    os.environ.pop(var, None)


#: How long the driver's W&B gets to shut down after a module's tests.
TEARDOWN_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def no_driver_wandb_service_across_modules() -> Iterator[None]:
    """Each module starts without a W&B service token in this process's
    environment, and leaves none behind.

    A W&B run in the driver (the callback's, or a test's own) starts a service
    and puts its token, ``WANDB_SERVICE``, in ``os.environ``; every Ray started
    afterwards hands it to its workers, so a later module's trials would not
    be what they claim. After each module, W&B is shut down in the driver and
    the token dropped.
    """
    assert "WANDB_SERVICE" not in os.environ, (
        "a W&B service token was inherited from before this module "
        f"(WANDB_SERVICE={os.environ.get('WANDB_SERVICE')!r})"
    )
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        # In a thread: a service W&B cannot shut down must fail the module,
        # not hang the suite.
        done = threading.Thread(target=wandb.teardown, daemon=True)
        done.start()
        done.join(TEARDOWN_S)
        assert not done.is_alive(), (
            f"W&B did not shut down in the driver within {TEARDOWN_S:.0f} s"
        )
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="module")
def ray_session() -> Any:
    """One small local Ray for the whole module (trainables in ``tests`` are
    importable on its workers)."""
    import ray

    start_ray()
    yield ray
    ray.shutdown()


#: The running Ray's session directory (its processes' logs are in "logs").
_session: dict[str, Path] = {}


def start_ray() -> None:
    """(Re)start the suite's small local Ray; its processes take this
    process's environment as it is now."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[:1]])},
            "worker_process_setup_hook": "tests.worker_setup.dump_stacks_on_sigusr2",
        },
    )
    _session["dir"] = Path(context.address_info["session_dir"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """When a test times out (pytest-timeout), add the stacks of the Ray
    workers' threads to its report: a hang in a trial actor shows there, not in
    the driver's stack that pytest-timeout prints."""
    outcome = yield
    report = outcome.get_result()
    # pytest-timeout fails the test and prints a "+++ Timeout +++" banner
    # (when Ray's signal check swallows the failure, the test ends otherwise).
    said = f"{report.longrepr}\n{report.capstdout}"
    if not (report.failed and call.when == "call" and "Timeout" in said):
        return
    if not _session:
        return
    logs = _session["dir"] / "logs"
    sizes = {path: path.stat().st_size for path in logs.glob("worker-*.err")}
    signalled = 0
    for path in sizes:
        # Ray names them worker-<worker id>-<job id>-<pid>.err
        pid = path.stem.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), signal.SIGUSR2)
            signalled += 1
        except (ValueError, OSError):  # not a pid, or the process is gone
            pass
    time.sleep(2.0)
    stacks = []
    for path in sorted(logs.glob("worker-*.err")):
        with path.open("rb") as file:
            file.seek(sizes.get(path, 0))
            new = file.read().decode(errors="replace")
        if "Thread 0x" in new or "Current thread" in new:
            stacks.append(f"--- {path.name}\n{new}")
    report.sections.append(
        (
            f"stacks of {signalled} Ray worker processes at the timeout",
            "\n".join(stacks) or "(none written)",
        )
    )


def worker_stderr() -> str:
    """Everything the processes of the Ray started by ``start_ray`` wrote to
    stderr so far (Ray keeps each worker's in ``logs/worker-*.err``): what
    trials log in their process, e.g. wandbtune's warnings."""
    logs = _session["dir"] / "logs"
    return "".join(
        path.read_text(errors="replace") for path in sorted(logs.glob("worker-*.err"))
    )


@pytest.fixture
def sweep(ray_session: Any, tmp_path: Path) -> Callable[..., Any]:
    """Run a tiny real Tune sweep in ``tmp_path`` and return a SweepOutcome."""
    from tests.helpers import run_sweep

    def _run(
        trainable: Any, param_space: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        return run_sweep(trainable, param_space or {}, tmp_path, **kwargs)

    return _run


@contextmanager
def child_process(
    *args: str, env: dict[str, str] | None = None, stderr: int = subprocess.PIPE
) -> Iterator[subprocess.Popen[str]]:
    """A Python child (its stdout piped, as text) in its own process group;
    on the way out, if it still runs, the whole group is killed (a Ray or a
    W&B service it started with it)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=os.environ.copy() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def interrupt_when(
    proc: subprocess.Popen[str], ready: Callable[[], Any], what: str
) -> str:
    """Send SIGINT (Ctrl-C) to a ``child_process`` once ``ready()`` holds and
    return its stdout once it exits; fail the test if it ends first, or if
    either wait takes more than 120 s. ``what``: what ``ready`` waits for."""
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the child ended before it was interrupted ({what})")
        if time.monotonic() > deadline:
            pytest.fail(f"not within 120 s: {what}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the child did not exit within 120 s of SIGINT")
    return out
