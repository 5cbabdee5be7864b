"""Every way out of a trial finishes its run, with the right exit code, on disk."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import wandb as _imported_in_trials  # noqa: F401 - see three_reports_without_w_and_b
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from tests.conftest import child_process, worker_stderr
from tests.helpers import tune_iterations
from tests.raycompat import report
from wandbtune import wandb_trainable


class Boom(ValueError):
    pass


@wandb_trainable(project="lifecycle")
def fails_after_two(config):
    report({"x": 1})
    report({"x": 2})
    raise Boom("boom at step three")


@wandb_trainable(project="lifecycle")
def long_runner(config):
    for i in range(1000):
        report({"score": config["q"] * (i + 1)})


def test_a_returning_trial_finishes_with_exit_code_zero(sweep):
    @wandb_trainable(project="lifecycle")
    def returns(config):
        report({"x": 1})

    run = sweep(returns).only_run()
    assert run.finished and run.exit_code == 0


def test_an_exception_marks_the_run_failed_and_reaches_tune_unchanged(sweep):
    out = sweep(fails_after_two)
    (result,) = out.results
    assert isinstance(result.error, Boom)  # Ray re-raises it as the same type
    assert "boom at step three" in str(result.error)
    assert "fails_after_two" in str(result.error)  # the user's frame is there
    run = out.only_run()
    assert run.column("x") == [1, 2]
    assert run.exit_code == 1


def test_a_trial_stopped_by_a_stop_criterion_is_finished_on_disk(sweep):
    out = sweep(long_runner, {"q": 1}, stop={"training_iteration": 3})
    (result,) = out.results
    run = out.only_run()
    assert run.column("training_iteration") == tune_iterations(result) == [1, 2, 3]
    assert run.exit_code == 0


def test_trials_stopped_early_by_asha_are_complete_and_finished(sweep):
    out = sweep(
        long_runner,
        # One trial at a time, best first: every later trial falls below the
        # rung's cutoff, so ASHA stops it early (deterministically).
        {"q": tune.grid_search([4, 3, 2, 1])},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(
                metric="score", mode="max", max_t=8, grace_period=1, reduction_factor=2
            ),
            max_concurrent_trials=1,
        ),
    )
    assert len(out.runs) == 4
    lengths = {}
    for result in out.results:
        run = out.run_for(result)
        assert run.exit_code == 0
        assert run.column("training_iteration") == tune_iterations(result)
        lengths[result.config["q"]] = len(run.rows)
    assert lengths[4] == 8
    assert all(lengths[q] < 8 for q in (3, 2, 1)), lengths


def test_reused_actors_give_each_trial_its_own_complete_run(sweep):
    @wandb_trainable(project="reuse")
    def short(config):
        for i in range(3):
            report({"who": config["n"], "i": i})

    out = sweep(
        short,
        {"n": tune.grid_search([0, 1, 2, 3])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
    )
    assert len(out.runs) == 4
    for result in out.results:
        run = out.run_for(result)
        assert run.column("who") == [result.config["n"]] * 3
        assert run.column("training_iteration") == [1, 2, 3]
        assert run.exit_code == 0


def test_user_code_sees_its_own_trials_run_from_its_first_line(sweep):
    # The run starts in the background while the function runs; code that
    # touches wandb waits for it. With a reused actor, the previous trial's
    # run is finished by then and must not be the one seen.
    @wandb_trainable(project="first-line")
    def first_line(config):
        import wandb

        run_id = wandb.run.id if wandb.run is not None else None
        wandb.log({"own": config["n"]}, commit=False)  # needs the run too
        report({"n": config["n"], "seen": run_id})

    out = sweep(
        first_line,
        {"n": tune.grid_search([0, 1, 2])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
    )
    assert len(out.runs) == 3
    for result in out.results:
        run = out.run_for(result)
        assert run.column("seen") == [result.metrics["trial_id"]]
        assert run.run_id == result.metrics["trial_id"]
        assert run.column("own") == [result.config["n"]]  # before report: step 0


def test_a_trial_stopped_while_its_function_blocks_is_flushed(sweep):
    # The function is blocked in report() when Tune stops the actor; the run
    # must still be on disk, complete, when the worker process is gone.
    @wandb_trainable(project="blocked")
    def slow(config):
        for i in range(100):
            time.sleep(0.01)
            report({"i": i})

    out = sweep(slow, stop={"training_iteration": 2})
    run = out.only_run()
    assert run.column("i") == [0, 1]
    assert run.finished


UNREACHABLE = {
    # Online, against a closed port on this machine, with a fake key: W&B
    # cannot start a run. (W&B's servers are the one thing not run here.)
    "mode": "online",
    "api_key": "f" * 40,
    "settings": {"base_url": "http://127.0.0.1:9", "init_timeout": 3},
}
#: How W&B says it could not start a run there: newer wandb names the server,
#: wandb 0.19 says that run initialization timed out.
UNREACHABLE_ERROR = r"127\.0\.0\.1:9|Run initialization has timed out"


@wandb_trainable(project="outage", **UNREACHABLE)
def three_reports_without_w_and_b(config):
    import wandb

    # Waits until wandbtune has given up starting the run, so that its warning
    # is logged before the trial can end (Tune kills a finished trial's
    # process within seconds). Ray imports this module, and so wandb, in the
    # trial's process before the trial starts: wandb.run is gated from the
    # trial's first line.
    assert wandb.run is None
    for i in range(3):
        report({"i": i})


def init_attempts(storage: Path, trial_id: str) -> list[Path]:
    """The local directories W&B made for the trial's ``wandb.init`` calls,
    whether the run started or not (``wandb/run-<time>-<id>``)."""
    return sorted(storage.glob(f"*/*/wandb/*run-*-{trial_id}"))


def test_when_w_and_b_is_unreachable_training_goes_on_with_one_warning(sweep):
    out = sweep(three_reports_without_w_and_b, {"n": tune.grid_search([0, 1])})
    assert len(out.results) == 2
    logs = worker_stderr()  # the trials' processes log there
    for result in out.results:
        assert result.error is None
        assert tune_iterations(result) == [1, 2, 3]
        assert list(result.metrics_dataframe["i"]) == [0, 1, 2]
        trial_id = result.metrics["trial_id"]
        # W&B was asked once for the trial's run...
        assert len(init_attempts(out.storage, trial_id)) == 1
        # ...and the trial says once that it goes on without W&B (its name
        # ends with its id), not once per report.
        warnings = re.findall(
            rf"wandbtune: W&B logging is off for trial \S*{re.escape(trial_id)}\b",
            logs,
        )
        assert len(warnings) == 1, logs[-3000:]
    # Nothing was logged. (What W&B leaves of an aborted start differs: no
    # run file on wandb 0.19; on 0.31 one with the run's record, no rows.)
    files = [*out.runs.values(), *out.aborted]
    assert [row for run in files for row in run.rows] == []


@contextmanager
def _server_that_never_answers() -> Iterator[int]:
    """A port on this machine that accepts connections and never replies: a
    W&B server too slow to answer (a stand-in; W&B's are not reachable here)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(128)  # the kernel completes connections; nobody reads them
        yield server.getsockname()[1]


def test_when_w_and_b_never_answers_each_trial_loses_a_bounded_time(sweep):
    def fn(config):
        for i in range(3):
            report({"i": i})

    with _server_that_never_answers() as port:
        silent = {
            **UNREACHABLE,
            "settings": {"base_url": f"http://127.0.0.1:{port}", "init_timeout": 3},
        }
        started = time.monotonic()
        out = sweep(wandb_trainable(project="slow", **silent)(fn), {"n": 0})
        elapsed = time.monotonic() - started
    (result,) = out.results
    assert result.error is None and tune_iterations(result) == [1, 2, 3]
    # W&B's own default would hold the trial for 90 s, then fail it; here it
    # waits 3 s (wandbtune's default, 15 s, is checked in test_settings).
    assert elapsed < 45, elapsed


def test_strict_fails_the_trial_when_w_and_b_is_unreachable(sweep):
    @wandb_trainable(project="outage", strict=True, **UNREACHABLE)
    def fn(config):
        report({"i": 0})

    (result,) = sweep(fn).results
    assert result.error is not None
    assert re.search(UNREACHABLE_ERROR, str(result.error))


FLUSH_AGAINST_A_SILENT_SERVER = """
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import wandb
from wandbtune._run import flush_wandb

def services():
    # This process's live child processes that are W&B's (its service, by
    # command line); every child is printed, so a failure shows what was left.
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] not in "ZX":
            found.append(command[:200])
    print("CHILDREN", found, flush=True)
    return [command for command in found if "wandb" in command]

try:
    wandb.init(project="silent", dir=sys.argv[1])
except Exception as exc:
    print("INIT FAILED", type(exc).__name__, flush=True)
print("SERVICES BEFORE", len(services()), flush=True)
started = time.monotonic()
flush_wandb(float(sys.argv[2]))
print("FLUSHED IN", time.monotonic() - started, flush=True)
print("SERVICES AFTER", len(services()), flush=True)
"""


def test_a_w_and_b_service_that_does_not_shut_down_is_stopped_in_bounded_time(
    tmp_path,
):
    # After W&B failed to start a run against a server that never answers,
    # its service does not shut down for a while (wandb 0.31: it waits about
    # 4 s for requests to that server; 0.19: for ever, retrying). Ending the
    # trial then must not wait longer than flush_wandb's timeout: the service
    # is stopped. In a child process: the service is its child, and W&B's
    # state in this one stays untouched.
    timeout = 1.0
    with _server_that_never_answers() as port:
        env = {
            **os.environ,
            "WANDB_MODE": "online",
            "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
            "WANDB_API_KEY": "f" * 40,
            "WANDB_INIT_TIMEOUT": "2",
        }
        env.pop("WANDB_SERVICE", None)
        script = FLUSH_AGAINST_A_SILENT_SERVER
        with child_process("-c", script, str(tmp_path), str(timeout), env=env) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                pytest.fail("the child did not finish within 120 s")
    out = stdout + stderr
    assert proc.returncode == 0, out
    assert "INIT FAILED" in out  # the setup this test is about
    assert re.search(r"SERVICES BEFORE [1-9]", out), out  # a service was running
    (warning,) = [line for line in out.splitlines() if "did not shut down" in line]
    assert "within 1 s" in warning and "it was stopped" in warning, warning
    flushed = float(re.search(r"FLUSHED IN (\S+)", out).group(1))
    assert flushed < timeout + 5, out
    assert "SERVICES AFTER 0" in out, out
