"""Hygiene: nothing left behind after ``Tuner.fit()`` returns, and no
deprecation warning from wandb or Ray caused by wandbtune.

This module starts its own Ray without the rest of the suite's WANDB_SILENT,
so that W&B says everything it would say to a user.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from ray import tune

from tests.conftest import ROOT
from tests.helpers import run_sweep
from tests.raycompat import report
from wandbtune import WandbLoggerCallback, wandb_trainable

#: W&B as chatty as it gets: deprecations are printed, not hidden.
LOUD = {"settings": {"quiet": False, "silent": False}}


@pytest.fixture(scope="module")
def ray_session() -> Any:
    import sys

    import ray

    if ray.is_initialized():
        ray.shutdown()
    silent = os.environ.pop("WANDB_SILENT", None)  # Ray's processes inherit this
    if "wandb" in sys.modules:  # W&B read WANDB_SILENT in this process before:
        sys.modules["wandb"].teardown()  # make it read the environment again
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[:1]]),
            }
        },
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        if silent is not None:
            os.environ["WANDB_SILENT"] = silent


def _plain(config):
    for i in range(2):
        report({"i": i})


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, name and command line) of every process below ``pid``, from /proc
    (the name too: an exiting process has an empty command line)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        commands[int(entry.name)] = f"{name}: {cmdline.decode(errors='replace')}"
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, commands.get(child, "")))
            todo.append(child)
    return found


def _open_files() -> list[str]:
    """What this process's file descriptors point at, sorted."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, now closed
            continue
    return sorted(targets)


def _settled(before: dict[str, Any]) -> dict[str, Any]:
    """A snapshot once descriptors that only wait for the garbage collector
    (W&B's and Ray's closed-over sockets) are gone and threads that end with
    ``fit()`` have ended (wandbtune's interrupt watch on Ray 2.30 looks
    8 times a second), or after 10 s."""
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        now = _snapshot()
        settled = len(now["fds"]) <= len(before["fds"])
        if (settled and now["threads"] == before["threads"]) or (
            time.monotonic() > deadline
        ):
            return now
        time.sleep(0.5)


def _snapshot() -> dict[str, Any]:
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "fds": _open_files(),
        "wandb": [
            cmd
            for _, cmd in _descendants(os.getpid())
            if "wandb" in cmd.split(":")[0] or "gpu_stats" in cmd.split(":")[0]
        ],
    }


def _new(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    left = list(after["fds"])
    for target in before["fds"]:
        if target in left:
            left.remove(target)
    return left


def test_nothing_is_left_behind_after_fit(ray_session, tmp_path):
    # A bare sweep first: Ray's own threads, sockets and idle workers settle.
    run_sweep(_plain, {}, tmp_path / "warmup")
    before = _snapshot()  # W&B services of earlier tests' own runs may be here

    decorated = wandb_trainable(project="leaks")(_plain)
    out = run_sweep(decorated, {"n": tune.grid_search([0, 1])}, tmp_path / "deco")
    assert len(out.runs) == 2
    after_decorator = _settled(before)

    callback = WandbLoggerCallback(project="leaks")
    out = run_sweep(
        _plain, {"n": tune.grid_search([0, 1])}, tmp_path / "cb", callbacks=[callback]
    )
    assert len(out.runs) == 2
    after_callback = _settled(before)

    for after in (after_decorator, after_callback):
        # no new W&B service, in the driver or below it (Ray's workers)
        assert set(after["wandb"]) <= set(before["wandb"]), after["wandb"]
        assert after["threads"] == before["threads"]
        assert len(after["fds"]) <= len(before["fds"]), _new(before, after)


def test_wandb_warns_of_nothing_outdated_in_a_callback_sweep(
    ray_session, tmp_path, capfd
):
    # The callback runs W&B in this process, so every warning and message W&B
    # prints is seen here. The decorator starts, feeds and finishes runs with
    # the same code in the trial's process; test_settings checks that code
    # in-process for deprecations the same way.
    callback = WandbLoggerCallback(project="hygiene", **LOUD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_sweep(_plain, {}, tmp_path, callbacks=[callback])
    assert out.only_run().exit_code == 0
    printed = capfd.readouterr().err.splitlines()
    assert any(line.startswith("wandb: Run history") for line in printed)  # W&B spoke
    lines = printed + [f"{w.filename}: {w.message}" for w in caught]
    deprecations = [
        line for line in lines if "deprecat" in line.lower() and "wandb" in line.lower()
    ]
    assert deprecations == []
