"""Benchmark: the cost of logging Ray Tune trials to W&B, five ways.

One process, one Ray session (``ray.init(num_cpus=2)``), W&B offline. The same
sweep runs with:

- ``bare``: a plain function trainable calling ``tune.report`` in a loop;
- ``decorator``: that function under ``@wandbtune.wandb_trainable``;
- ``wandbtune-callback``: the plain function with ``wandbtune.WandbLoggerCallback``;
- ``ray-callback``: the plain function with Ray's ``WandbLoggerCallback``;
- ``ray-setup_wandb``: a function calling Ray's ``setup_wandb``, ``run.log``
  next to every ``tune.report``, and ``run.finish()``.

Variants alternate within each round (round-robin, start rotated each round).
For each sweep it measures ``Tuner.fit()`` wall time, the Ray actors and the
processes (Ray workers, wandb-core) started, the peak RSS of those processes,
and reads back every offline run to check it holds every report and an exit
record. Writes ``bench.md``, ``bench.png`` and ``bench.json`` to ``--out``.

    python benchmarks/bench.py --rounds 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import platform
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

SCRIPT = os.path.abspath(__file__)
START_DIR = os.getcwd()
VARIANTS = [
    "bare",
    "decorator",
    "wandbtune-callback",
    "ray-callback",
    "ray-setup_wandb",
]
W_AND_B_VARIANTS = VARIANTS[1:]
DEFAULT_SHAPES = ["8x200", "1x3000"]
LARGE_SHAPE = "64x50"
SAMPLE_INTERVAL_S = 0.2
QUIET_TIMEOUT_S = 20.0
# Ray's own helper processes that are children of the raylet but not workers.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# --------------------------------------------------------------------------
# Process sampler: a separate process, so that sampling takes no GIL time
# from the Tune driver being measured.
# --------------------------------------------------------------------------


def _classify(proc: Any) -> str | None:
    """'worker' for a Ray worker process, 'wandb' for wandb-core, else None."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except Exception:  # noqa: BLE001 - gone, or no access
        return None
    first = cmd[0] if cmd else name
    if name == "wandb-core" or os.path.basename(first) == "wandb-core":
        return "wandb"
    if first.startswith("ray::") and not first.startswith(RAY_AGENTS):
        return "worker"  # ray::IDLE, ray::ImplicitFunc, ray::_WandbLoggingActor...
    if any(os.path.basename(c) == "default_worker.py" for c in cmd[:3]):
        return "worker"  # a worker before it set its title
    return None


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


def sampler_main(root: int, interval: float) -> None:
    """Sample ``root``'s descendants until a line arrives on stdin; print JSON."""
    first: dict[str, list[int]] | None = None
    seen: dict[str, set[int]] = {"worker": set(), "wandb": set()}
    peak_rss = 0
    max_alive = {"worker": 0, "wandb": 0}
    samples = 0
    while True:
        alive = {"worker": 0, "wandb": 0}
        rss = 0
        current: dict[str, list[int]] = {"worker": [], "wandb": []}
        for proc in _descendants(root):
            kind = _classify(proc)
            if kind is None:
                continue
            try:
                rss += proc.memory_info().rss
            except Exception:  # noqa: BLE001 - exited meanwhile
                continue
            seen[kind].add(proc.pid)
            current[kind].append(proc.pid)
            alive[kind] += 1
        samples += 1
        peak_rss = max(peak_rss, rss)
        for kind in alive:
            max_alive[kind] = max(max_alive[kind], alive[kind])
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
            }
        ),
        flush=True,
    )


class Sampler:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                SCRIPT,
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
        return {
            "workers_started": len(set(data["seen"]["worker"]) - first["worker"]),
            "wandb_core_started": len(set(data["seen"]["wandb"]) - first["wandb"]),
            "workers_seen": len(data["seen"]["worker"]),
            "wandb_core_seen": len(data["seen"]["wandb"]),
            "max_alive": data["max_alive"],
            "peak_rss_mb": data["peak_rss_mb"],
            "samples": data["samples"],
        }


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


# --------------------------------------------------------------------------
# Trainables (defined in __main__: Ray pickles them by value)
# --------------------------------------------------------------------------


def train_plain(config: dict[str, Any]) -> None:
    from ray import tune

    n = config["n"]
    for i in range(n):
        tune.report({"loss": 1.0 / (i + 1), "acc": i / n, "step": i})


def train_setup_wandb(config: dict[str, Any]) -> None:
    from ray import tune
    from ray.air.integrations.wandb import setup_wandb

    run = setup_wandb(config, project="bench")
    n = config["n"]
    for i in range(n):
        metrics = {"loss": 1.0 / (i + 1), "acc": i / n, "step": i}
        run.log(metrics)
        tune.report(metrics)
    run.finish()


def make_variant(variant: str) -> tuple[Any, list[Any]]:
    """(trainable, callbacks) for one variant."""
    import wandbtune

    if variant == "bare":
        return train_plain, []
    if variant == "decorator":
        return wandbtune.wandb_trainable(project="bench")(train_plain), []
    if variant == "wandbtune-callback":
        return train_plain, [wandbtune.WandbLoggerCallback(project="bench")]
    if variant == "ray-callback":
        from ray.air.integrations.wandb import WandbLoggerCallback

        return train_plain, [WandbLoggerCallback(project="bench")]
    if variant == "ray-setup_wandb":
        return train_setup_wandb, []
    raise ValueError(variant)


# --------------------------------------------------------------------------
# One sweep
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


def session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def search_roots(storage: str, name: str) -> dict[str, list[str]]:
    """Where offline runs of experiment ``name`` can be, by kind of place."""
    artifacts = glob.glob(os.path.join(session_dir(), "artifacts", "*", name))
    return {
        "storage_path": [os.path.join(storage, name)],
        "driver_artifacts": [os.path.join(a, "driver_artifacts") for a in artifacts],
        "working_dirs": [os.path.join(a, "working_dirs") for a in artifacts],
        "other": [
            os.path.join(START_DIR, "wandb"),
            os.path.join(os.getcwd(), "wandb"),
            os.path.expanduser(os.path.join("~", "ray_results", name)),
        ],
    }


def check_runs(
    storage: str, name: str, trial_ids: list[str], reports: int
) -> dict[str, Any]:
    """Read every offline run of the sweep and judge it.

    A run is complete when its rows hold every reported ``step`` 0..n-1 and it
    has an exit record. Per trial, the best copy found anywhere counts;
    ``storage_*`` judges only copies under the sweep's storage path."""
    from wandbtune.testing import find_run_files, read_run

    wanted = set(trial_ids)
    copies: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    read_errors = []
    for place, roots in search_roots(storage, name).items():
        for root in roots:
            if not os.path.isdir(root):
                continue
            for path in find_run_files(root):
                try:
                    run = read_run(path)
                except Exception as exc:  # noqa: BLE001
                    read_errors.append(f"{path}: {exc!r}")
                    continue
                if run.run_id not in wanted:
                    continue
                steps = set(run.column("step"))
                gone = sorted(set(range(reports)) - steps)
                missing = len(gone)
                copies[run.run_id].append(
                    {
                        "place": place,
                        "path": path,
                        "rows": len(run.rows),
                        "missing_rows": missing,
                        "missing_steps": _ranges(gone),
                        "exit_code": run.exit_code,
                        "complete": missing == 0 and run.exit_code is not None,
                    }
                )

    def judge(pick: list[dict[str, Any]] | None) -> tuple[int, int, int]:
        if not pick:
            return 0, reports, 1  # no run: every row missing, no exit
        best = min(
            pick,
            key=lambda c: (
                not c["complete"],
                c["missing_rows"],
                c["exit_code"] is None,
            ),
        )
        return (
            int(best["complete"]),
            best["missing_rows"],
            int(best["exit_code"] is None),
        )

    out: dict[str, Any] = {"runs_expected": len(wanted), "read_errors": read_errors}
    for label, filt in (("", None), ("storage_", "storage_path")):
        found = complete = missing_rows = no_exit = 0
        for tid in wanted:
            pick = [
                c for c in copies.get(tid, []) if filt is None or c["place"] == filt
            ]
            found += bool(pick)
            c, m, e = judge(pick)
            complete += c
            missing_rows += m
            no_exit += e
        out[label + "runs_found"] = found
        out[label + "runs_complete"] = complete
        out[label + "missing_rows"] = missing_rows
        out[label + "runs_without_exit"] = no_exit
    out["places"] = dict(
        collections.Counter(c["place"] for cs in copies.values() for c in cs)
    )
    out["exit_codes"] = dict(
        collections.Counter(str(c["exit_code"]) for cs in copies.values() for c in cs)
    )
    out["copies_per_run"] = max((len(cs) for cs in copies.values()), default=0)
    # Trials with no complete copy anywhere, with every copy found.
    out["incomplete"] = [
        {
            "trial_id": tid,
            "copies": [
                {k: v for k, v in c.items() if k != "path"} for c in copies.get(tid, [])
            ],
        }
        for tid in sorted(wanted)
        if not any(c["complete"] for c in copies.get(tid, []))
    ]
    return out


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts: list[str] = []
    for v in values:
        if parts and int(parts[-1].rsplit("-", 1)[-1]) == v - 1:
            parts[-1] = parts[-1].split("-")[0] + f"-{v}"
        else:
            parts.append(str(v))
    return ", ".join(parts)


def run_sweep(
    variant: str,
    trials: int,
    reports: int,
    reuse: bool,
    storage: str,
    name: str,
    check: bool = True,
) -> dict[str, Any]:
    from ray import tune

    rec: dict[str, Any] = {
        "variant": variant,
        "trials": trials,
        "reports": reports,
        "reuse": reuse,
        "name": name,
    }
    try:
        trainable, callbacks = make_variant(variant)
        tuner = tune.Tuner(
            trainable,
            param_space={"n": reports, "x": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(reuse_actors=reuse),
            run_config=tune.RunConfig(
                storage_path=storage, name=name, verbose=0, callbacks=callbacks
            ),
        )
        before = actor_table()
        sampler = Sampler()
        t0 = time.perf_counter()
        try:
            grid = tuner.fit()
        finally:
            rec["wall_s"] = time.perf_counter() - t0
            rec["procs"] = sampler.stop()
        after = actor_table()
        new = [cls for aid, cls in after.items() if aid not in before]
        rec["actors_started"] = len(new)
        rec["actor_classes"] = dict(
            sorted(collections.Counter(cls.rsplit(".", 1)[-1] for cls in new).items())
        )
        errors = [str(e).strip().splitlines()[0][:200] for e in grid.errors]
        if errors:
            rec["error"] = f"{len(errors)} trial(s) failed: {errors[0]}"
        results = list(grid)
        trial_ids = [r.metrics.get("trial_id") for r in results if r.metrics]
        short = [
            r.metrics.get("training_iteration")
            for r in results
            if (r.metrics or {}).get("training_iteration") != reports
        ]
        if short or len(trial_ids) != trials:
            rec.setdefault("error", f"Tune got fewer results than reported: {short}")
        rec["leftover"] = wait_quiet()
        if check and variant != "bare":
            rec["runs"] = check_runs(storage, name, trial_ids, reports)
    except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the rest
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        rec["traceback"] = traceback.format_exc()
        rec["leftover"] = wait_quiet()
    return rec


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def git_state() -> str:
    here = os.path.dirname(SCRIPT)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "wandbtune"],
            cwd=os.path.dirname(here),
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"git {sha}" + (" + uncommitted changes in wandbtune/" if dirty else "")
    except Exception:  # noqa: BLE001
        return "git ?"


def package_dir() -> str:
    """The wandbtune package the current environment would import (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("wandbtune")
    if spec is None or not spec.origin:
        raise SystemExit("wandbtune is not installed: pip install -e . first")
    return os.path.dirname(spec.origin)


def fingerprint(pkg: str) -> str:
    """sha1 over the package's .py files (names and contents), 12 hex digits."""
    import hashlib

    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(pkg, "*.py"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


def snapshot_package(pkg: str, tmp: str) -> str:
    """Copy wandbtune into ``tmp`` and import it from there, in this process and
    (through PYTHONPATH, set before ray.init) in every Ray worker: edits to the
    working tree during a long run do not mix two versions into one table."""
    root = os.path.join(tmp, "src")
    shutil.copytree(
        pkg,
        os.path.join(root, "wandbtune"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return root


def worker_import_path() -> str:
    """Where a Ray worker imports wandbtune from."""
    import ray

    @ray.remote(num_cpus=0)
    def where() -> str:
        import wandbtune

        return os.path.dirname(wandbtune.__file__)

    return ray.get(where.remote())


def machine_line() -> dict[str, str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    import ray
    import wandb

    import wandbtune

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "wandb": wandb.__version__,
        "wandbtune": wandbtune.__version__,
    }


def shape_key(rec: dict[str, Any]) -> tuple[str, bool]:
    return f"{rec['trials']}x{rec['reports']}", rec["reuse"]


def fmt_range(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def fmt_counts(values: list[int]) -> str:
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{int(statistics.median(values))} ({lo}–{hi})"


def completeness(recs: list[dict[str, Any]], prefix: str = "") -> str:
    runs = [r["runs"] for r in recs if "runs" in r]
    if not runs:
        return "–"
    exp = sum(r["runs_expected"] for r in runs)
    ok = sum(r[prefix + "runs_complete"] for r in runs)
    if ok == exp:
        return f"complete {ok}/{exp}"
    found = sum(r[prefix + "runs_found"] for r in runs)
    if found == 0:
        return f"0/{exp}: no run files there"
    missing = sum(r[prefix + "missing_rows"] for r in runs)
    no_exit = sum(r[prefix + "runs_without_exit"] for r in runs)
    parts = [f"**{ok}/{exp} complete**"]
    if found < exp:
        parts.append(f"{exp - found} run(s) not found")
    if missing:
        parts.append(f"{missing} rows missing")
    if no_exit:
        parts.append(f"{no_exit} without exit record")
    return "; ".join(parts)


def summarize(
    records: list[dict[str, Any]], configs: list[tuple[str, bool]], variants: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        bare = [
            r["wall_s"]
            for r in records
            if shape_key(r) == cfg and r["variant"] == "bare" and "error" not in r
        ]
        bare_med = statistics.median(bare) if bare else None
        for variant in variants:
            recs = [
                r for r in records if shape_key(r) == cfg and r["variant"] == variant
            ]
            good = [r for r in recs if "error" not in r and "wall_s" in r]
            errs = [r["error"] for r in recs if "error" in r]
            trials, reports = (int(x) for x in cfg[0].split("x"))
            row: dict[str, Any] = {
                "shape": cfg[0],
                "reuse": cfg[1],
                "variant": variant,
                "rounds_ok": len(good),
                "rounds": len(recs),
                "errors": errs,
            }
            if good:
                walls = [r["wall_s"] for r in good]
                med = statistics.median(walls)
                row.update(
                    wall_med=med, wall_min=min(walls), wall_max=max(walls), walls=walls
                )
                if bare_med:
                    row["ratio"] = med / bare_med
                    row["ratio_min"] = min(walls) / bare_med
                    row["ratio_max"] = max(walls) / bare_med
                    row["us_per_report"] = (med - bare_med) / (trials * reports) * 1e6
                row["actors"] = [r["actors_started"] for r in good]
                row["actor_classes"] = [r["actor_classes"] for r in good]
                row["workers"] = [r["procs"]["workers_started"] for r in good]
                row["wandb_core"] = [r["procs"]["wandb_core_started"] for r in good]
                row["rss"] = [r["procs"]["peak_rss_mb"] for r in good]
            row["complete"] = completeness(recs) if variant != "bare" else "–"
            row["complete_storage"] = (
                completeness(recs, "storage_") if variant != "bare" else "–"
            )
            row["places"] = sorted(
                {p for r in recs for p in r.get("runs", {}).get("places", {})}
            )
            row["leftover"] = [r["leftover"] for r in recs if r.get("leftover")]
            rows.append(row)
    return rows


def markdown(
    rows: list[dict[str, Any]], meta: dict[str, Any], records: list[dict[str, Any]]
) -> str:
    m = meta["machine"]
    lines = [
        "# wandbtune benchmark",
        "",
        f"{meta['date']} · {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM · "
        f"Python {m['python']}, ray {m['ray']}, wandb {m['wandb']}, "
        f"wandbtune {m['wandbtune']} ({meta['source']}) · rounds: {meta['rounds']} · "
        f"1-min load average at sweep starts: median {meta['load_median']:.2f}, "
        f"{meta['load_min']:.2f}–{meta['load_max']:.2f} "
        "(other jobs share the machine) · "
        f"total {meta['total_min']:.1f} min · command: `{meta['command']}`",
        "",
        "Wall time is `Tuner.fit()`; median [min–max] over rounds. × bare = median / "
        "bare median. µs/report = (median − bare median) / (trials × reports) × 10⁶. "
        "Actors: new actor ids in the GCS after the sweep. Processes: Ray worker "
        "processes + wandb-core processes first seen during the sweep (sampled every "
        f"{SAMPLE_INTERVAL_S} s). Peak RSS: largest sum of RSS over Ray workers and "
        "wandb-core processes, median over rounds. Complete: runs (all rounds) whose "
        "best copy has every report as a row and an exit record; in storage_path: the "
        "same, counting only copies under the sweep's storage path.",
        "",
        "| shape | reuse_actors | variant | wall s, median [range] | × bare | "
        "added µs/report | actors started | processes started (workers + wandb-core) | "
        "peak RSS MB | runs | runs in storage_path |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "wall_med" not in row:
            err = row["errors"][0] if row["errors"] else "no data"
            lines.append(
                f"| {row['shape']} | {row['reuse']} | {row['variant']} | "
                f"**error** ({row['rounds'] - row['rounds_ok']}/{row['rounds']} "
                f"rounds): {err.replace('|', '/')} | | | | | | | |"
            )
            continue
        wall = fmt_range(row["walls"])
        if row["errors"]:
            wall += (
                f" ({row['rounds'] - row['rounds_ok']} rounds failed: "
                f"{row['errors'][0].replace('|', '/')})"
            )
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "–"
        us = f"{row['us_per_report']:+.0f}" if "us_per_report" in row else "–"
        if row["variant"] == "bare":
            ratio, us = "1.00", "0"
        procs = f"{fmt_counts(row['workers'])} + {fmt_counts(row['wandb_core'])}"
        rss = f"{statistics.median(row['rss']):.0f}"
        lines.append(
            f"| {row['shape']} | {row['reuse']} | {row['variant']} | {wall} "
            f"| {ratio} | {us} | {fmt_counts(row['actors'])} | {procs} | {rss} "
            f"| {row['complete']} | "
            f"{row['complete_storage']} |"
        )
    lines += ["", "## Details", ""]
    lines.append("Actors started, by class (per round when rounds differ):")
    lines.append("")
    for row in rows:
        if "actor_classes" not in row:
            continue
        classes = row["actor_classes"]
        uniq = [json.dumps(c) for c in classes]
        shown = uniq[0] if len(set(uniq)) == 1 else " / ".join(uniq)
        shown = shown.replace('"', "")
        lines.append(f"- {row['shape']} reuse={row['reuse']} {row['variant']}: {shown}")
    lines += ["", "Where the offline run files were found (kinds of place):", ""]
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows:
        seen[row["variant"]].update(row["places"])
    for variant, places in seen.items():
        if variant != "bare":
            lines.append(f"- {variant}: {', '.join(sorted(places)) or 'none'}")
    lines += ["", "Runs with no complete copy anywhere (every copy found of each):", ""]
    bad = [(r, inc) for r in records for inc in r.get("runs", {}).get("incomplete", [])]
    for r, inc in bad:
        shape, reuse = shape_key(r)
        copies = (
            "; ".join(
                f"{c['place']}: {c['rows']} rows, "
                f"steps missing {c['missing_steps'] or 'none'}, "
                f"exit code {c['exit_code']}"
                for c in inc["copies"]
            )
            or "no file found"
        )
        lines.append(
            f"- round {r['round'] + 1}, {shape} reuse={reuse} {r['variant']}, "
            f"trial {inc['trial_id']}: {copies}"
        )
    if not bad:
        lines.append("- none")
    left = [
        (row["shape"], row["reuse"], row["variant"], row["leftover"])
        for row in rows
        if row["leftover"]
    ]
    lines += [
        "",
        f"Processes still busy {QUIET_TIMEOUT_S:.0f} s after `fit()` "
        "returned (busy Ray workers, wandb-core):",
        "",
    ]
    if left:
        for shape, reuse, variant, lo in left:
            lines.append(f"- {shape} reuse={reuse} {variant}: {lo}")
    else:
        lines.append("- none")
    errs = [
        (row["shape"], row["reuse"], row["variant"], e)
        for row in rows
        for e in row["errors"]
    ]
    lines += ["", "Errors:", ""]
    lines += [f"- {s} reuse={r} {v}: {e}" for s, r, v, e in errs] or ["- none"]
    return "\n".join(lines) + "\n"


def chart(
    rows: list[dict[str, Any]], variants: list[str], path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r["shape"], r["reuse"]) for r in rows))
    shown = [v for v in variants if v != "bare"]
    fig, ax = plt.subplots(figsize=(max(8, 2.6 * len(configs)), 5.2), dpi=120)
    width = 0.8 / max(1, len(shown))
    colors = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    ymax = 1.0
    for i, variant in enumerate(shown):
        xs, ys, lo, hi = [], [], [], []
        for j, cfg in enumerate(configs):
            row = next(
                (
                    r
                    for r in rows
                    if (r["shape"], r["reuse"]) == cfg and r["variant"] == variant
                ),
                None,
            )
            x = j + (i - (len(shown) - 1) / 2) * width
            if row is None or "ratio" not in row:
                ax.text(
                    x,
                    0.05,
                    "error",
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="red",
                )
                continue
            xs.append(x)
            ys.append(row["ratio"])
            lo.append(row["ratio"] - row["ratio_min"])
            hi.append(row["ratio_max"] - row["ratio"])
            ymax = max(ymax, row["ratio_max"])
        bars = ax.bar(
            xs,
            ys,
            width,
            yerr=[lo, hi],
            capsize=3,
            label=variant,
            color=colors[i % len(colors)],
            error_kw={"elinewidth": 0.8},
        )
        for bar, y, up in zip(bars, ys, hi, strict=True):
            ax.annotate(
                f"{y:.2f}",
                (bar.get_x() + bar.get_width() / 2, y + up),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label="bare = 1")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{s}\nreuse_actors={r}" for s, r in configs])
    ax.set_ylabel("Tuner.fit() wall time / bare (median; bars: min–max)")
    ax.set_ylim(0, ymax * 1.15)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    )
    parser.add_argument("--large", action="store_true", help=f"also run {LARGE_SHAPE}")
    parser.add_argument(
        "--shapes", nargs="*", help="TRIALSxREPORTS, replaces the defaults"
    )
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=VARIANTS)
    parser.add_argument(
        "--reuse", nargs="*", choices=["False", "True"], default=["False", "True"]
    )
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp storage dir")
    parser.add_argument(
        "--live",
        action="store_true",
        help="import wandbtune from the working tree, not a snapshot",
    )
    parser.add_argument("--_sample", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--_interval", type=float, default=SAMPLE_INTERVAL_S, help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args._sample is not None:
        sampler_main(args._sample, args._interval)
        return 0

    command = shlex.join(["python", *sys.argv])
    start = time.time()
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    shapes = args.shapes or (DEFAULT_SHAPES + ([LARGE_SHAPE] if args.large else []))
    variants = [v for v in VARIANTS if v in args.variants]
    if "bare" not in variants:
        variants.insert(0, "bare")  # the reference for every ratio
    configs = [(s, r == "True") for s in shapes for r in args.reuse]

    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="wandbtune-bench-")
    pkg = package_dir()
    source = {"git": git_state(), "tree": pkg, "sha1_start": fingerprint(pkg)}
    if not args.live:
        source["snapshot"] = snapshot_package(pkg, tmp)
        # Ray puts the driver's working directory on every worker's sys.path,
        # ahead of PYTHONPATH: run from the temp dir so that a checkout's
        # wandbtune/ there does not shadow the snapshot.
        os.chdir(tmp)

    import ray

    ray.init(num_cpus=2)
    source["worker_imports"] = worker_import_path()
    print(
        f"storage under {tmp}; Ray session {session_dir()}; wandbtune {source}",
        flush=True,
    )
    if not args.live and not source["worker_imports"].startswith(source["snapshot"]):
        print("WARNING: Ray workers do not import the snapshot", flush=True)
    records: list[dict[str, Any]] = []
    try:
        if not args.no_warmup:
            # imports, worker start-up, W&B binaries: not timed
            for variant in variants:
                rec = run_sweep(
                    variant, 2, 5, False, tmp, f"warmup-{variant}", check=False
                )
                print(
                    f"warm-up {variant}: {rec.get('wall_s', 0):.2f} s "
                    f"{rec.get('error', '')}",
                    flush=True,
                )
        n = len(variants)
        for rnd in range(args.rounds):
            order = variants[rnd % n :] + variants[: rnd % n]
            for shape, reuse in configs:
                trials, reports = (int(x) for x in shape.split("x"))
                for variant in order:
                    name = f"r{rnd}-{shape}-reuse{int(reuse)}-{variant}"
                    load1 = os.getloadavg()[0]
                    rec = run_sweep(variant, trials, reports, reuse, tmp, name)
                    rec["round"] = rnd
                    rec["load1_at_start"] = load1
                    records.append(rec)
                    runs = rec.get("runs", {})
                    print(
                        f"round {rnd + 1}/{args.rounds} {shape} reuse={reuse} "
                        f"{variant:20s} {rec.get('wall_s', float('nan')):7.2f} s "
                        f"actors={rec.get('actors_started')} "
                        f"procs={rec.get('procs', {})} "
                        f"runs={runs.get('runs_complete')}/{runs.get('runs_expected')} "
                        f"storage={runs.get('storage_runs_complete')} "
                        f"places={runs.get('places')} leftover={rec.get('leftover')} "
                        f"{rec.get('error', '')}",
                        flush=True,
                    )
                    if not args.keep:
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    source["sha1_end"] = fingerprint(pkg)
    if args.live:
        desc = f"{source['git']}, live tree"
        if source["sha1_end"] != source["sha1_start"]:
            desc += " (**changed during the run**)"
    else:
        desc = (
            f"{source['git']}, snapshot taken at start, "
            f"sources sha1 {source['sha1_start']}"
        )
        if source["sha1_end"] != source["sha1_start"]:
            desc += "; the working tree changed during the run, not the snapshot"
    loads = [r["load1_at_start"] for r in records] or [float("nan")]
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_line(),
        "rounds": args.rounds,
        "command": command,
        "source": desc,
        "source_detail": source,
        "load_median": statistics.median(loads),
        "load_min": min(loads),
        "load_max": max(loads),
        "total_min": (time.time() - start) / 60,
    }
    rows = summarize(records, configs, variants)
    with open(os.path.join(args.out, "bench.md"), "w") as fh:
        fh.write(markdown(rows, meta, records))
    with open(os.path.join(args.out, "bench.json"), "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1, default=str)
    m = meta["machine"]
    chart(
        rows,
        variants,
        os.path.join(args.out, "bench.png"),
        f"Tuner.fit() time relative to no logging · {args.rounds} rounds · "
        f"{m['nproc']} CPUs · ray {m['ray']}, wandb {m['wandb']}",
    )
    print(open(os.path.join(args.out, "bench.md")).read(), flush=True)
    print(f"total {meta['total_min']:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
