"""One W&B service per node for the decorator's trials (wandbtune._node_service).

Offline, real Tune sweeps and the real wandb client: the trials of a node
log to one W&B service that a Ray actor owns, hand their runs over at their
end, and the end of the experiment waits until every run is written. The
online side (a trial's end never waits for uploads; a silent server) is in
test_online.py; a killed trial's run in test_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tests.helpers import report_with_state, restored_state
from tests.raycompat import RunConfig, report
from wandbtune import wandb_trainable
from wandbtune._compat import in_ray_worker, wandb_can_hand_over
from wandbtune._node_service import NAMESPACE
from wandbtune.testing import read_runs

pytestmark = pytest.mark.skipif(
    not wandb_can_hand_over(),
    reason="this wandb's service cannot take runs over (0.19): each trial "
    "process runs its own W&B service, as the other tests check",
)


def service_started_here() -> bool:
    """True if this process started the W&B service it logs to: W&B's token
    (``WANDB_SERVICE``, set once connected) names the starter's pid."""
    token = os.environ.get("WANDB_SERVICE", "")
    return token.split("-")[1:2] == [str(os.getpid())]


@wandb_trainable(project="node")
def reports_its_service(config):
    import wandb

    assert wandb.run is not None  # waits until the run has started
    for i in range(1, 4):
        report(
            {
                "score": config["n"] * 10 + i,
                "service": os.environ.get("WANDB_SERVICE", ""),
                "service_started_here": service_started_here(),
            }
        )


def test_the_trials_of_a_node_share_one_w_and_b_service(sweep):
    out = sweep(
        reports_its_service,
        {"n": tune.grid_search([1, 2, 3, 4])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=False),
    )
    assert len(out.results) == 4 and not out.results.errors
    # Four trial processes, one W&B service, which none of them started.
    assert len({r.metrics["pid"] for r in out.results}) == 4
    services = {r.metrics["service"] for r in out.results}
    assert len(services) == 1 and "" not in services, services
    assert [r.metrics["service_started_here"] for r in out.results] == [False] * 4
    # Every run was handed over and finished, and is complete on disk when
    # fit() returns.
    assert out.aborted == [] and len(out.runs) == 4
    for result in out.results:
        run = out.run_for(result)
        n = result.config["n"]
        assert run.column("score") == [n * 10 + i for i in range(1, 4)]
        assert run.exit_code == 0
    # The node's actor is gone with the experiment.
    left = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    ]
    assert left == []


def kill_the_node_service() -> int:
    """Kill the W&B service of this node's actor (SIGKILL, as the kernel's
    out-of-memory killer would); its pid. ``-ww``: whole command lines (``ps``
    cuts them at its column width otherwise, and a long checkout path once hid
    ``wandb-core``)."""
    table = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    processes = {}
    for line in table.splitlines():
        pid, ppid, args = line.split(None, 2)
        processes[pid] = (ppid, args)
    services = [
        int(pid)
        for pid, (ppid, args) in processes.items()
        if "wandb-core" in args
        and "ray::NodeService" in processes.get(ppid, ("", ""))[1]
    ]
    assert len(services) == 1, table
    os.kill(services[0], signal.SIGKILL)
    return services[0]


class KillTheNodeService(tune.Callback):
    """Kills the node's W&B service once: at a trial's ``at``-th result, or
    when the first trial completes (``at=None``)."""

    def __init__(self, at: Optional[int] = None) -> None:
        self.at = at
        self.killed: list[int] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"at": self.at, "killed": []}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.at == result["training_iteration"] and not self.killed:
            self.killed.append(kill_the_node_service())

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.at is None and not self.killed:
            self.killed.append(kill_the_node_service())


def fit_killing(
    trainable: Any,
    storage: Path,
    n: list[int],
    killer: KillTheNodeService,
    **tune_config: Any,
) -> Any:
    """A sweep over ``n``, one trial at a time, with ``killer`` among its
    callbacks."""
    results = tune.Tuner(
        trainable,
        param_space={"n": tune.grid_search(n)},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, **tune_config),
        run_config=RunConfig(
            name="killed", storage_path=str(storage), callbacks=[killer], verbose=0
        ),
    ).fit()
    assert len(killer.killed) == 1
    return results


@wandb_trainable(project="node")
def three_reports(config):
    for i in range(1, 4):
        report({"score": config["n"] * 10 + i})


@pytest.mark.parametrize("reuse_actors", [True, False])
def test_after_the_node_service_dies_later_trials_log_through_their_own(
    ray_session, tmp_path, reuse_actors
):
    # One trial at a time; the node's W&B service is killed when the first
    # has completed. Training never stops, and every later trial's run is
    # complete: its process (a reused one still connected to the dead
    # service, or a new one given its address) starts a W&B service of its
    # own (checked to fail: without that, the later trials had no run). The
    # first trial's run may have been cut short by the kill: not read.
    storage = tmp_path / "results"
    results = fit_killing(
        three_reports,
        storage,
        [1, 2, 3, 4],
        KillTheNodeService(),
        reuse_actors=reuse_actors,
    )
    assert len(results) == 4 and not results.errors
    later = [r for r in results if r.config["n"] > 1]
    assert len(later) == 3
    runs = read_runs(storage / "killed")
    for result in later:
        (run,) = runs[str(result.metrics["trial_id"])]
        n = result.config["n"]
        assert [row["score"] for row in run.rows] == [n * 10 + i for i in range(1, 4)]
        assert run.exit_code == 0 and run.damaged is None


@wandb_trainable(project="node")
def fails_at_two(config):
    for i in range(1, 4):
        if i == 2 and config["n"] == 2:
            raise ValueError("boom")
        report({"score": i})


def test_a_handed_over_run_keeps_how_its_trial_ended(sweep):
    out = sweep(
        fails_at_two,
        {"n": tune.grid_search([1, 2])},
        tune_config=tune.TuneConfig(reuse_actors=True),
    )
    assert len(out.results) == 2 and len(out.results.errors) == 1
    assert out.aborted == [] and len(out.runs) == 2
    codes = {r.config["n"]: out.run_for(r).exit_code for r in out.results}
    assert codes == {1: 0, 2: 1}
    assert out.run_for(next(r for r in out.results if r.config["n"] == 2)).column(
        "score"
    ) == [1]


@wandb_trainable(project="node")
def fails_the_first_time(config):
    import wandb

    assert wandb.run is not None  # waits until the run has started
    marker = Path(config["marker"])
    report({"service_started_here": service_started_here()})
    if not marker.exists():
        marker.touch()
        raise ValueError("the first time")
    report({"service_started_here": service_started_here()})


def test_a_restored_experiment_gets_its_node_service_too(ray_session, tmp_path):
    # Tune saves its controller's state with the experiment and restores it:
    # nothing of wandbtune's may come back with it and keep the restored
    # experiment from starting its node services.
    storage = tmp_path / "results"
    space = {"marker": str(tmp_path / "failed")}
    first = tune.Tuner(
        fails_the_first_time,
        param_space=space,
        run_config=RunConfig(name="restore", storage_path=str(storage), verbose=0),
    ).fit()
    assert first[0].error is not None
    (result,) = tune.Tuner.restore(
        str(storage / "restore"), fails_the_first_time, resume_errored=True
    ).fit()
    assert result.error is None
    here = result.metrics_dataframe["service_started_here"].tolist()
    assert len(here) >= 1 and not any(here), here


@wandb_trainable(project="node")
def six_slow_reports(config):
    for i in range(1, 7):
        time.sleep(0.3)
        report({"score": 10 + i})


@pytest.mark.parametrize("reuse_actors", [True, False])
def test_a_trial_whose_node_service_dies_keeps_every_result_in_its_run(
    ray_session, tmp_path, reuse_actors
):
    # The node's W&B service is killed while the trial runs, at its third
    # result: what the service had not written is lost with it. The trial's
    # run goes on through a W&B service of the trial's own process, and what
    # the lost service had not written is logged again: over its local run
    # files (a second resumes the first where the first holds rows; `wandb
    # sync` joins them) every result is there once (checked to fail: without
    # the restart, the rows from the kill on were missing; without logging
    # again, those before it).
    storage = tmp_path / "results"
    results = fit_killing(
        six_slow_reports,
        storage,
        [1],
        KillTheNodeService(at=3),
        reuse_actors=reuse_actors,
    )
    assert len(results) == 1 and not results.errors
    (result,) = results
    attempts = read_runs(storage / "killed")[str(result.metrics["trial_id"])]
    assert 1 <= len(attempts) <= 2
    rows = [row for run in attempts for row in run.rows]
    assert [row["training_iteration"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["score"] for row in rows] == [11, 12, 13, 14, 15, 16]
    assert attempts[-1].exit_code == 0


class PauseOnce(FIFOScheduler):
    """Pauses each trial once, at its config's ``pause_at`` iteration (0:
    never), as PBT pauses a trial it exploits."""

    def __init__(self) -> None:
        super().__init__()
        self.paused: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result["training_iteration"] == trial.config["pause_at"]:
            if trial.trial_id not in self.paused:
                self.paused.add(trial.trial_id)
                return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE


#: Run ids whose hand-over this process holds back (``hold_back_hand_overs_until``).
_HELD_BACK: set[str] = set()


def hold_back_hand_overs_until(resumed: Path) -> None:
    """In this trial process: the first hand-over of a run in ``_HELD_BACK``
    waits until ``resumed`` exists (at most 30 s). A delay injected into
    wandbtune's own call, standing in for a W&B thread that a loaded
    machine holds up (seen in CI), so that the paused trial resumes
    elsewhere while its first actor is still handing its run over."""
    from wandbtune import _node_service

    real = _node_service.hand_over
    if getattr(real, "held_back", False):
        return

    def hand_over(node: Any, run: Any, exit_code: int) -> bool:
        if str(run.id) in _HELD_BACK:
            _HELD_BACK.discard(str(run.id))
            _wait_for(resumed)
        return real(node, run, exit_code)

    hand_over.held_back = True  # type: ignore[attr-defined]
    _node_service.hand_over = hand_over


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30.0
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@wandb_trainable(project="node")
def pauses_once(config):
    """Six checkpointed reports; creates ``resumed`` when it goes on from a
    checkpoint (with ``start_held``: once its run has started). Without
    ``start_held``, the first hand-over is held back until then."""
    resumed, start_held = Path(config["resumed"]), "start_held" in config
    hold_back_hand_overs_until(resumed)
    if config["pause_at"] and not start_held:
        _HELD_BACK.add(tune.get_context().get_trial_id())
    start = restored_state({"i": 0})["i"]
    if start:
        if start_held:
            import wandb

            assert wandb.run is not None  # waits until this segment's run started
        resumed.touch()
    for i in range(start + 1, 7):
        time.sleep(0.1)
        report_with_state({"score": i}, {"i": i})


def test_a_paused_trial_resumed_in_another_actor_keeps_both_its_segments(
    sweep, tmp_path
):
    # Tune pauses a trial (as PBT does) while its actor's W&B thread still
    # hands the trial's run over (a loaded machine), and resumes the trial in
    # another actor: its new start must wait for that hand-over. Without
    # reuse_actors the move is certain (Tune stops the first actor, whose
    # cleanup waits for W&B); with it (PBT's usual setting) Tune resets the
    # first actor for another trial, the hand-over runs in the background,
    # and the same race happens whenever the trial moves. Before, the node's
    # service finished the first segment as failed at once, and with
    # reuse_actors the late hand-over then ended the resumed segment's
    # stream, losing its rows (checked to fail so: exit code 1 both ways,
    # and scores [3, 4] of [3, 4, 5, 6] with reuse_actors).
    out = sweep(
        pauses_once,
        {"pause_at": tune.grid_search([2, 0, 0]), "resumed": str(tmp_path / "resumed")},
        tune_config=tune.TuneConfig(reuse_actors=False, scheduler=PauseOnce()),
        allow_attempts=True,
    )
    assert len(out.results) == 3 and not out.results.errors
    paused = next(r for r in out.results if r.config["pause_at"] == 2)
    pids = paused.metrics_dataframe["pid"].tolist()
    assert len(pids) == 6 and len(set(pids)) == 2, pids  # it moved
    assert len(out.attempts) == 3 and out.aborted == []
    for result in out.results:
        segments = out.attempts[str(result.metrics["trial_id"])]
        assert len(segments) == (2 if result is paused else 1)
        assert [s.exit_code for s in segments] == [0] * len(segments)
        assert [i for s in segments for i in s.column("score")] == [1, 2, 3, 4, 5, 6]


def hold_back_first_starts() -> None:
    """In a trial process: the first start of a run whose config has
    ``pause_at`` and ``start_held`` waits until ``resumed`` exists (at most
    30 s), and creates ``start_held`` so that no later start of it waits. A
    delay injected into wandbtune's own call, standing in for a W&B start
    that a loaded machine holds up (44–55 s seen for a fresh process's first
    start with two busy loops beside examples/pbt.py), so that the trial is
    paused and resumes in another actor before its first segment's run
    starts. Installed when a trial process loads this module (to unpickle
    the trainable), before any start: the trial's own code would come too
    late where wandb is imported already."""
    from wandbtune import _run

    real = _run._init
    if getattr(real, "held_back", False):
        return

    def _init(settings: Any, kwargs: dict[str, Any], key: Any, **options: Any) -> Any:
        config = kwargs.get("config") or {}
        held = config.get("start_held")
        if config.get("pause_at") and held and not Path(held).exists():
            Path(held).touch()
            _wait_for(Path(config["resumed"]))
        return real(settings, kwargs, key, **options)

    _init.held_back = True  # type: ignore[attr-defined]
    _run._init = _init


if in_ray_worker():
    hold_back_first_starts()


def test_a_segment_whose_start_comes_round_after_the_trial_moved_on_leaves_it_the_run(
    sweep, tmp_path, monkeypatch
):
    # A paused trial's first segment ran and ended before its W&B start came
    # round (held back here); the trial resumed in another actor, whose start
    # opened the run and logged the first segment's rows from Tune's
    # result.json. The late start must leave the run alone. Checked to fail
    # without that: it opened the run again after the resumed segment, a
    # second, empty run file (under load, seen in CI's examples/pbt.py test:
    # the two starts collided and a segment ended with exit code 1).
    # Tune copies the trial's result.json from the driver's staging directory
    # to the experiment's storage only every 10 s or more: here never before
    # the end (seen in CI: the copy in storage lacked the first segment).
    # Checked to fail when only storage's copy is read: scores [3, 4, 5, 6].
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "3600")
    out = sweep(
        pauses_once,
        {
            "pause_at": tune.grid_search([2, 0]),
            "resumed": str(tmp_path / "resumed"),
            "start_held": str(tmp_path / "held"),
        },
        tune_config=tune.TuneConfig(reuse_actors=False, scheduler=PauseOnce()),
        allow_attempts=True,
    )
    assert (tmp_path / "held").exists(), "the first start was not held back"
    assert len(out.results) == 2 and not out.results.errors
    paused = next(r for r in out.results if r.config["pause_at"] == 2)
    pids = paused.metrics_dataframe["pid"].tolist()
    assert len(pids) == 6 and len(set(pids)) == 2, pids  # it moved
    assert out.aborted == []
    for result in out.results:
        segments = out.attempts[str(result.metrics["trial_id"])]
        assert len(segments) == 1, [s.column("score") for s in segments]
        assert [s.exit_code for s in segments] == [0]
        assert segments[0].column("score") == [1, 2, 3, 4, 5, 6]
        assert segments[0].column("training_iteration") == [1, 2, 3, 4, 5, 6]


def test_the_node_actor_ignores_a_late_hand_over_and_knows_which_segment_started_last(
    monkeypatch,
):
    # The node actor's bookkeeping alone, in this process (no Ray, and no W&B
    # service: its start is replaced, as nothing here reaches it). A trial's
    # first process hands its run over after the trial has gone on in a
    # second process: that hand-over must not end the second one's stream,
    # nor make the actor forget that the second one holds the run.
    from wandbtune import _node_actor

    monkeypatch.setattr(_node_actor, "wandb_start_service_here", lambda: "no-service")
    node = _node_actor.NodeService()
    finished: list[tuple[str, int]] = []

    def start_finishing(run_id: str, code: int) -> None:  # as the real one,
        with node._lock:  # without W&B: the run is no longer open
            if node._open.pop(run_id, None) is not None:
                finished.append((run_id, code))

    monkeypatch.setattr(node, "_start_finishing", start_finishing)
    second = subprocess.Popen(["sleep", "60"])  # a live process that is not this one
    try:
        # Segments that began a minute ago, 5 s apart: a start's own time
        # (now) is later than both.
        first, began = os.getpid(), time.time() - 60.0
        node.register("run", first, began)
        node.register("run", second.pid, began + 5)  # the trial went on there
        node.finish("run", 0, pid=first)  # the first process's late hand-over
        node.forget("run", pid=first)
        assert finished == []
        # A late start of the first segment sees the later segment's start...
        assert node.started_elsewhere("run", first, began)
        assert not node.started_elsewhere("run", second.pid, began + 5)  # its own
        assert not node.started_elsewhere("other run", first, began)
        # ...but a late start of the later segment does not count the earlier
        # segment's start, even when that came round last (both late).
        node.register("both late", second.pid, began + 5)
        node.register("both late", first, began)
        assert not node.started_elsewhere("both late", second.pid, began + 5)
        # A start that could not open its run started no segment.
        node.register("not opened", second.pid, began + 5)
        node.forget("not opened", pid=second.pid, opened=False)
        assert not node.started_elsewhere("not opened", first, began)
        second.kill()  # the process logging to the run dies: the run is
        second.wait()  # still its own, so the actor finishes it as failed
        deadline = time.monotonic() + 30.0
        while ("run", 1) not in finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert finished == [("run", 1)]
    finally:
        second.kill()
        second.wait()
