"""Measuring one sweep: wall time, Ray actors, processes and their memory.

``measured(rec)`` wraps ``Tuner.fit()``: it times the block, samples the
processes below the benchmark process while it runs (in a separate sampler
process, so that sampling takes no GIL time from the Tune driver being
measured) and counts the actors the block started. ``wait_quiet()`` waits,
untimed, for one sweep's processes to end before the next starts.

The sampler is this file run as a script::

    python bench_measure.py --_sample PID --_interval SECONDS

It samples PID's descendants every SECONDS until a line arrives on its stdin,
then prints one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

SAMPLE_INTERVAL_S = 0.2
QUIET_TIMEOUT_S = 20.0
# Ray's own helper processes that are children of the raylet but not workers.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
# The process title of a trial's actor (every trainable here is a function).
TRIAL_TITLES = ("ray::ImplicitFunc",)
# W&B's processes, for the W&B memory: its service (the ``wandb-core`` binary;
# before wandb 0.18 optionally ``python -m wandb service``) and the
# ``gpu_stats`` helper wandb-core may start.
WANDB_BINARIES = ("wandb-core", "gpu_stats")


# --------------------------------------------------------------------------
# Which process is what
# --------------------------------------------------------------------------


def _kind(cmd: list[str], name: str) -> str | None:
    """'worker' for a Ray worker process, 'wandb' for wandb-core, else None."""
    first = cmd[0] if cmd else name
    if name == "wandb-core" or os.path.basename(first) == "wandb-core":
        return "wandb"
    if first.startswith("ray::") and not first.startswith(RAY_AGENTS):
        return "worker"  # ray::IDLE, ray::ImplicitFunc, ray::_WandbLoggingActor...
    if any(os.path.basename(c) == "default_worker.py" for c in cmd[:3]):
        return "worker"  # a worker before it set its title
    return None


def _classify(proc: Any) -> str | None:
    """'worker' for a Ray worker process, 'wandb' for wandb-core, else None."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except Exception:  # noqa: BLE001 - gone, or no access
        return None
    return _kind(cmd, name)


def _is_wandb_process(cmd: list[str], name: str) -> bool:
    """A W&B service process (any version) or a helper it started."""
    first = cmd[0] if cmd else name
    if name in WANDB_BINARIES or os.path.basename(first) in WANDB_BINARIES:
        return True
    return cmd[1:4] == ["-m", "wandb", "service"]


def _is_trial(cmd: list[str], name: str) -> bool:
    first = cmd[0] if cmd else name
    return first.startswith(TRIAL_TITLES)


def _psutil() -> Any:
    """psutil: installed, or the copy Ray ships in ray/thirdparty_files."""
    try:
        import psutil
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("ray")
        assert spec is not None and spec.submodule_search_locations
        sys.path.append(
            os.path.join(list(spec.submodule_search_locations)[0], "thirdparty_files")
        )
        import psutil
    return psutil


def _descendants(root: int) -> list[Any]:
    psutil = _psutil()

    me = os.getpid()
    try:
        return [p for p in psutil.Process(root).children(recursive=True) if p.pid != me]
    except psutil.NoSuchProcess:
        return []


# --------------------------------------------------------------------------
# The sampler process
# --------------------------------------------------------------------------


def sampler_main(root: int, interval: float) -> None:
    """Sample ``root``'s descendants until a line arrives on stdin; print JSON.

    Per sample: the Ray workers and wandb-core processes alive and their RSS
    summed (``peak_rss_mb`` keeps the largest sum); and, for W&B's memory, the
    RSS summed over W&B's processes and the trial processes alive."""
    first: dict[str, list[int]] | None = None
    seen: dict[str, set[int]] = {"worker": set(), "wandb": set()}
    peak_rss = 0
    max_alive = {"worker": 0, "wandb": 0}
    samples = 0
    wandb_peak_rss = 0
    trials_max = 0
    wandb_per_trial: list[float] = []  # samples with trial and W&B processes
    while True:
        alive = {"worker": 0, "wandb": 0}
        rss = 0
        wandb_rss = 0
        trials = 0
        current: dict[str, list[int]] = {"worker": [], "wandb": []}
        for proc in _descendants(root):
            try:
                cmd = proc.cmdline()
                name = proc.name()
            except Exception:  # noqa: BLE001 - gone, or no access
                continue
            kind = _kind(cmd, name)
            is_wandb = _is_wandb_process(cmd, name)
            if kind is None and not is_wandb:
                continue
            try:
                mem = proc.memory_info().rss
            except Exception:  # noqa: BLE001 - exited meanwhile
                continue
            if is_wandb:
                wandb_rss += mem
            if kind is None:
                continue
            if kind == "worker" and _is_trial(cmd, name):
                trials += 1
            rss += mem
            seen[kind].add(proc.pid)
            current[kind].append(proc.pid)
            alive[kind] += 1
        samples += 1
        peak_rss = max(peak_rss, rss)
        for kind in alive:
            max_alive[kind] = max(max_alive[kind], alive[kind])
        wandb_peak_rss = max(wandb_peak_rss, wandb_rss)
        trials_max = max(trials_max, trials)
        if trials and wandb_rss:
            wandb_per_trial.append(wandb_rss / trials)
        if first is None:
            first = current
            print("ready", flush=True)
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready:
            break
    assert first is not None
    print(
        json.dumps(
            {
                "first": first,
                "seen": {k: sorted(v) for k, v in seen.items()},
                "peak_rss_mb": peak_rss / 2**20,
                "max_alive": max_alive,
                "samples": samples,
                "wandb_peak_rss_mb": wandb_peak_rss / 2**20,
                "trials_max_alive": trials_max,
                "wandb_per_trial_median_mb": (
                    statistics.median(wandb_per_trial) / 2**20
                    if wandb_per_trial
                    else 0.0
                ),
            }
        ),
        flush=True,
    )


class Sampler:
    """Starts the sampler process on this process; ``stop()`` gives its counts."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--_sample",
                str(os.getpid()),
                "--_interval",
                str(SAMPLE_INTERVAL_S),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"process sampler did not start: {line!r}")

    def stop(self) -> dict[str, Any]:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        data = json.loads(out.strip().splitlines()[-1])
        first = {k: set(v) for k, v in data["first"].items()}
        trials = data["trials_max_alive"]
        return {
            "workers_started": len(set(data["seen"]["worker"]) - first["worker"]),
            "wandb_core_started": len(set(data["seen"]["wandb"]) - first["wandb"]),
            "workers_seen": len(data["seen"]["worker"]),
            "wandb_core_seen": len(data["seen"]["wandb"]),
            "max_alive": data["max_alive"],
            "peak_rss_mb": data["peak_rss_mb"],
            "samples": data["samples"],
            # W&B's processes (wandb-core, wandb service, gpu_stats), wherever
            # they run (trial workers, Ray's logging actors, the driver):
            # largest RSS sum in one sample, and that per concurrent trial
            # (the most trial processes alive in one sample); and the median,
            # over the samples where both were alive, of W&B RSS / trial
            # processes alive then.
            "wandb_peak_rss_mb": data["wandb_peak_rss_mb"],
            "trials_max_alive": trials,
            "wandb_rss_per_trial_mb": (
                data["wandb_peak_rss_mb"] / trials if trials else 0.0
            ),
            "wandb_rss_per_trial_median_mb": data["wandb_per_trial_median_mb"],
        }


# --------------------------------------------------------------------------
# Around one sweep
# --------------------------------------------------------------------------


def actor_table() -> dict[str, str]:
    """Every actor the GCS knows (alive or dead): id -> class name.

    ``ray.util.state.list_actors()`` needs the dashboard's HTTP API, which this
    install does not serve; ``ray._private.state.actors()`` asks the GCS."""
    import ray._private.state

    return {
        aid: a.get("ActorClassName", "?")
        for aid, a in ray._private.state.actors().items()
    }


@contextlib.contextmanager
def measured(rec: dict[str, Any]) -> Iterator[None]:
    """Measure the block (``Tuner.fit()``) into ``rec``: ``wall_s`` and
    ``procs`` always; ``actors_started`` and ``actor_classes`` if it returned."""
    before = actor_table()
    sampler = Sampler()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        rec["wall_s"] = time.perf_counter() - t0
        rec["procs"] = sampler.stop()
    after = actor_table()
    new = [cls for aid, cls in after.items() if aid not in before]
    rec["actors_started"] = len(new)
    rec["actor_classes"] = dict(
        sorted(collections.Counter(cls.rsplit(".", 1)[-1] for cls in new).items())
    )


def wait_quiet(timeout: float = QUIET_TIMEOUT_S) -> dict[str, int]:
    """Wait until no busy Ray worker (only ray::IDLE) and no wandb-core is left
    below this process; returns what was still there at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left: collections.Counter[str] = collections.Counter()
        for proc in _descendants(os.getpid()):
            kind = _classify(proc)
            try:
                title = proc.cmdline()[0]
            except Exception:  # noqa: BLE001
                continue
            if kind == "wandb":
                left["wandb-core"] += 1
            elif kind == "worker" and not title.startswith("ray::IDLE"):
                left[title.split()[0]] += 1
        if not left or time.monotonic() > deadline:
            return dict(left)
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the benchmark's process sampler")
    parser.add_argument("--_sample", type=int, required=True)
    parser.add_argument("--_interval", type=float, default=SAMPLE_INTERVAL_S)
    args = parser.parse_args(argv)
    sampler_main(args._sample, args._interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
