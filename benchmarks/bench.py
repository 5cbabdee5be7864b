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

``--online`` runs ``bare`` and the four W&B variants with ``mode="online"``
against a W&B-compatible server on this machine (openwandb) behind a proxy
adding 40 ms each way; it checks every run on the server's store when
``fit()`` returns, and writes ``online.md`` and ``online.json`` (and
``online.png`` if matplotlib is installed)::

    python benchmarks/bench.py --online --rounds 2 --out benchmarks/results

This file runs the rounds; the rest lives beside it, imported from the
script's directory (which Python puts first on ``sys.path``):

- ``bench_variants.py``: the shapes and the variants (what is run);
- ``bench_measure.py``: wall time, actors, processes and memory;
- ``bench_check.py``: reading the W&B run files back, counting complete runs;
- ``bench_online.py``: the server and the proxy for ``--online``, and
  reading the runs back from the server;
- ``bench_report.py``: the table, the chart and the JSON;
- ``bench_source.py``: the wandbtune snapshot and the machine, for the header.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

import bench_check
import bench_measure
import bench_online
import bench_report
import bench_source
import bench_variants
from bench_variants import (
    DEFAULT_SHAPES,
    EXTRA_VARIANTS,
    LARGE_SHAPE,
    ONLINE_MAX_CONCURRENT,
    ONLINE_SHAPES,
    ONLINE_VARIANTS,
    ONLINE_WORK_MS,
    VARIANTS,
)

# Before the chdir into the temporary directory: where a stray ./wandb can be.
START_DIR = os.getcwd()


def run_sweep(
    variant: str,
    trials: int,
    reports: int,
    reuse: bool,
    storage: str,
    name: str,
    check: bool = True,
    work_s: float = 0.0,
    work: str = "sleep",
    max_concurrent: int | None = None,
    online: bench_online.Online | None = None,
) -> dict[str, Any]:
    """One ``Tuner.fit()`` of one variant, measured and (``check``) its runs
    read back: from the run files, or for an online variant from the
    server, once when ``fit()`` returns and again once the sweep's processes
    have ended. Errors are recorded in the result, never raised."""
    from ray import tune

    rec: dict[str, Any] = {
        "variant": variant,
        "trials": trials,
        "reports": reports,
        "reuse": reuse,
        "name": name,
    }
    param_space: dict[str, Any] = {
        "n": reports,
        "x": tune.grid_search(list(range(trials))),
    }
    if work_s:
        param_space.update(work_s=work_s, work=work)
        rec.update(work_s=work_s, work=work)
    if max_concurrent:
        rec["max_concurrent_trials"] = max_concurrent
    on_server = online is not None and bench_variants.is_online(variant)
    try:
        trainable, callbacks = bench_variants.make_variant(variant)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                reuse_actors=reuse, max_concurrent_trials=max_concurrent
            ),
            run_config=tune.RunConfig(
                storage_path=storage, name=name, verbose=0, callbacks=callbacks
            ),
        )
        requests = online.requests() if online else {}
        with bench_measure.measured(rec):
            grid = tuner.fit()
        if on_server:
            assert online is not None
            # At once: what a user opening the W&B page as fit() returns sees.
            configs = {str(r.metrics["trial_id"]): r.config for r in grid if r.metrics}
            rec["server_at_return"] = bench_online.check_server_runs(
                online.store, configs, reports
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
        rec["leftover"] = bench_measure.wait_quiet()
        if on_server:
            assert online is not None
            rec["server_after_wait"] = bench_online.check_server_runs(
                online.store, configs, reports
            )
        elif check and variant != "bare":
            rec["runs"] = bench_check.check_runs(
                storage, name, trial_ids, reports, START_DIR
            )
        if online:
            rec["requests"] = bench_online.requests_delta(requests, online.requests())
    except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the rest
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        rec["traceback"] = traceback.format_exc()
        rec["leftover"] = bench_measure.wait_quiet()
    return rec


def uptime() -> str:
    """``uptime``'s line (the load of the shared machine), or the load averages."""
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS + EXTRA_VARIANTS + ONLINE_VARIANTS,
        help="default: the five offline ones; with --online, the online ones",
    )
    parser.add_argument(
        "--reuse", nargs="*", choices=["False", "True"], default=["False", "True"]
    )
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument(
        "--online",
        action="store_true",
        help="bare and the *-online variants against a local W&B-compatible "
        f"server behind a slow proxy; default shape {' '.join(ONLINE_SHAPES)}, "
        f"{ONLINE_WORK_MS:g} ms of work per report, {ONLINE_MAX_CONCURRENT} "
        "trials at a time; writes online.md/online.json",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=bench_online.DEFAULT_LATENCY_S * 1000,
        help="--online: added by the proxy to each request and each answer",
    )
    parser.add_argument(
        "--work-ms",
        type=float,
        help=f"work before each report (default {ONLINE_WORK_MS:g} with --online, "
        "else 0)",
    )
    parser.add_argument(
        "--work",
        choices=["sleep", "cpu"],
        default="sleep",
        help="the work: time.sleep (done elsewhere, as on a GPU) or a busy loop",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        help="TuneConfig(max_concurrent_trials=); default "
        f"{ONLINE_MAX_CONCURRENT} with --online, else unset",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp storage dir")
    parser.add_argument(
        "--live",
        action="store_true",
        help="import wandbtune from the working tree, not a snapshot",
    )
    # The process sampler is bench_measure.py run as a script; kept here too.
    parser.add_argument("--_sample", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--_interval",
        type=float,
        default=bench_measure.SAMPLE_INTERVAL_S,
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args._sample is not None:
        bench_measure.sampler_main(args._sample, args._interval)
        return 0

    command = shlex.join(["python", *sys.argv])
    start = time.time()
    uptime_start = uptime()
    os.environ["WANDB_SILENT"] = "true"
    if args.online:
        offered = ["bare", *ONLINE_VARIANTS]
        shapes = args.shapes or ONLINE_SHAPES
        work_ms = ONLINE_WORK_MS if args.work_ms is None else args.work_ms
        max_concurrent = args.max_concurrent or ONLINE_MAX_CONCURRENT
    else:
        os.environ["WANDB_MODE"] = "offline"
        offered = VARIANTS + [v for v in EXTRA_VARIANTS if v in (args.variants or ())]
        shapes = args.shapes or (DEFAULT_SHAPES + ([LARGE_SHAPE] if args.large else []))
        work_ms = args.work_ms or 0.0
        max_concurrent = args.max_concurrent
    wrong = [v for v in args.variants or [] if v not in offered]
    if wrong:
        parser.error(
            f"{' '.join(wrong)}: {'not ' if args.online else ''}"
            "an online variant (those run with --online)"
        )
    variants = [v for v in offered if v in (args.variants or offered)]
    if "bare" not in variants:
        variants.insert(0, "bare")  # the reference for every ratio
    sweep_options: dict[str, Any] = {
        "work_s": work_ms / 1000,
        "work": args.work,
        "max_concurrent": max_concurrent,
    }
    configs = [(s, r == "True") for s in shapes for r in args.reuse]

    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="wandbtune-bench-")
    pkg = bench_source.package_dir()
    source = {
        "git": bench_source.git_state(),
        "tree": pkg,
        "sha1_start": bench_source.fingerprint(pkg),
    }
    if not args.live:
        source["snapshot"] = bench_source.snapshot_package(pkg, tmp)
        # Ray puts the driver's working directory on every worker's sys.path,
        # ahead of PYTHONPATH: run from the temp dir so that a checkout's
        # wandbtune/ there does not shadow the snapshot.
        os.chdir(tmp)

    # SIGTERM ends the run through the finally below (server, proxy, temp dir).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    records: list[dict[str, Any]] = []
    online: bench_online.Online | None = None
    online_info: dict[str, Any] = {}
    try:
        if args.online:
            # Before ray.init: every Ray process inherits the URL and the key.
            online = bench_online.Online(
                os.path.join(tmp, "openwandb"), args.latency_ms / 1000
            ).start()
            sweep_options["online"] = online
            os.environ["WANDB_BASE_URL"] = online.url
            os.environ["WANDB_API_KEY"] = online.key
            online_info = online.describe()
            print(f"online: {online_info}", flush=True)

        import ray

        ray.init(num_cpus=2)
        source["worker_imports"] = bench_source.worker_import_path()
        print(
            f"storage under {tmp}; Ray session {bench_check.session_dir()}; "
            f"wandbtune {source}",
            flush=True,
        )
        if not args.live and not source["worker_imports"].startswith(
            source["snapshot"]
        ):
            print("WARNING: Ray workers do not import the snapshot", flush=True)
        if not args.no_warmup:
            # imports, worker start-up, W&B binaries: not timed
            trials, reports = bench_variants.WARMUP_SHAPE
            for variant in variants:
                rec = run_sweep(
                    variant,
                    trials,
                    reports,
                    False,
                    tmp,
                    f"warmup-{variant}",
                    check=False,
                    **sweep_options,
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
                trials, reports = bench_variants.parse_shape(shape)
                for variant in order:
                    name = f"r{rnd}-{shape}-reuse{int(reuse)}-{variant}"
                    load1 = os.getloadavg()[0]
                    rec = run_sweep(
                        variant, trials, reports, reuse, tmp, name, **sweep_options
                    )
                    rec["round"] = rnd
                    rec["load1_at_start"] = load1
                    records.append(rec)
                    runs = rec.get("runs", {})
                    server = ""
                    if "server_at_return" in rec:
                        at, later = rec["server_at_return"], rec["server_after_wait"]
                        server = (
                            f"server: complete {at['runs_complete']}/"
                            f"{at['runs_expected']} at return, "
                            f"{later['runs_complete']} after; states "
                            f"{at['states']} -> {later['states']}; "
                            f"requests {rec.get('requests')} "
                            f"wandb MB/trial "
                            f"{rec['procs']['wandb_rss_per_trial_mb']:.0f} "
                        )
                    print(
                        f"round {rnd + 1}/{args.rounds} {shape} reuse={reuse} "
                        f"{variant:20s} {rec.get('wall_s', float('nan')):7.2f} s "
                        f"actors={rec.get('actors_started')} "
                        f"procs={rec.get('procs', {})} "
                        f"runs={runs.get('runs_complete')}/{runs.get('runs_expected')} "
                        f"storage={runs.get('storage_runs_complete')} "
                        f"places={runs.get('places')} leftover={rec.get('leftover')} "
                        f"{server}{rec.get('error', '')}",
                        flush=True,
                    )
                    if not args.keep:
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    finally:
        if online is not None:
            online.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    source["sha1_end"] = bench_source.fingerprint(pkg)
    loads = [r["load1_at_start"] for r in records] or [float("nan")]
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": bench_source.machine_line(),
        "rounds": args.rounds,
        "command": command,
        "source": bench_source.describe_source(source, args.live),
        "source_detail": source,
        "load_median": statistics.median(loads),
        "load_min": min(loads),
        "load_max": max(loads),
        "total_min": (time.time() - start) / 60,
        "uptime_start": uptime_start,
        "uptime_end": uptime(),
        "sweep": {k: v for k, v in sweep_options.items() if k != "online"},
        "online": online_info,
    }
    if args.online:
        text = bench_report.write_online_report(
            args.out, records, meta, configs, variants
        )
    else:
        text = bench_report.write_report(args.out, records, meta, configs, variants)
    print(text, flush=True)
    print(f"total {meta['total_min']:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
