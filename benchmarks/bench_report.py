"""Writing the report: the summary table (``bench.md``), the raw measurements
(``bench.json``) and the chart (``bench.png``); for ``--online``,
``online.md``, ``online.json`` and (if matplotlib is there) ``online.png``.

``summarize`` turns the sweeps' records into one row per shape,
``reuse_actors`` and variant (median and range over the rounds, ratios to
``bare``); ``markdown`` and ``chart`` render those rows, ``online_markdown``
the online ones.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
from typing import Any

from bench_measure import QUIET_TIMEOUT_S, SAMPLE_INTERVAL_S
from bench_variants import ONLINE_SUFFIX, parse_shape

#: The issue's goal online (#11): the decorator and wandbtune's callback.
ONLINE_GOAL_RATIO = 1.3
ONLINE_GOAL_VARIANTS = (
    "decorator" + ONLINE_SUFFIX,
    "wandbtune-callback" + ONLINE_SUFFIX,
)


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
            trials, reports = parse_shape(cfg[0])
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


def server_completeness(recs: list[dict[str, Any]], key: str) -> str:
    """Runs complete on the server over the rounds (``key``: when ``fit()``
    returned, or after the sweep's processes ended); what was lacking if any."""
    checks = [(r.get("round"), r[key]) for r in recs if key in r]
    if not checks:
        return "–"
    exp = sum(c["runs_expected"] for _, c in checks)
    ok = sum(c["runs_complete"] for _, c in checks)
    if ok == exp:
        return f"{ok}/{exp}"
    parts = [f"**{ok}/{exp}**"]
    per_round = ", ".join(
        f"{c['runs_complete']}/{c['runs_expected']}" for _, c in checks
    )
    parts.append(f"by round {per_round}")
    states: collections.Counter[str] = collections.Counter()
    for _, c in checks:
        states.update(c["states"])
    parts.append("states " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
    missing = sum(c["missing_rows"] for _, c in checks)
    if missing:
        parts.append(f"{missing} rows missing")
    bad_config = sum(c["runs_found"] - c["runs_config_ok"] for _, c in checks)
    if bad_config:
        parts.append(f"{bad_config} without the trial's config")
    return "; ".join(parts)


def summarize_online(
    records: list[dict[str, Any]], configs: list[tuple[str, bool]], variants: list[str]
) -> list[dict[str, Any]]:
    """``summarize``'s rows, with the server's completeness, W&B's memory per
    concurrent trial and the requests through the proxy."""
    rows = summarize(records, configs, variants)
    for row in rows:
        recs = [
            r
            for r in records
            if shape_key(r) == (row["shape"], row["reuse"])
            and r["variant"] == row["variant"]
        ]
        good = [r for r in recs if "error" not in r and "procs" in r]
        row["server_at_return"] = server_completeness(recs, "server_at_return")
        row["server_after_wait"] = server_completeness(recs, "server_after_wait")
        row["server_all_complete_at_return"] = all(
            r["server_at_return"]["runs_complete"]
            == r["server_at_return"]["runs_expected"]
            for r in recs
            if "server_at_return" in r
        ) and any("server_at_return" in r for r in recs)
        row["wandb_mb_per_trial"] = [r["procs"]["wandb_rss_per_trial_mb"] for r in good]
        row["wandb_mb_per_trial_median_sample"] = [
            r["procs"]["wandb_rss_per_trial_median_mb"] for r in good
        ]
        row["trials_max_alive"] = [r["procs"]["trials_max_alive"] for r in good]
        row["requests"] = [r.get("requests", {}).get("total", 0) for r in recs]
    # Peak RSS (workers + wandb-core) above bare's, per concurrent trial: what
    # W&B costs in all, its client in the trial processes included.
    for row in rows:
        bare = next(
            (
                b
                for b in rows
                if (b["shape"], b["reuse"]) == (row["shape"], row["reuse"])
                and b["variant"] == "bare"
            ),
            None,
        )
        trials = max(row["trials_max_alive"], default=0)
        if bare and bare.get("rss") and row.get("rss") and trials:
            row["added_rss_per_trial_mb"] = (
                statistics.median(row["rss"]) - statistics.median(bare["rss"])
            ) / trials
    return rows


def online_markdown(
    rows: list[dict[str, Any]], meta: dict[str, Any], records: list[dict[str, Any]]
) -> str:
    m = meta["machine"]
    o = meta["online"]
    sweep = meta["sweep"]
    lines = [
        "# wandbtune benchmark, online",
        "",
        f"{meta['date']} · {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM · "
        f"Python {m['python']}, ray {m['ray']}, wandb {m['wandb']}, "
        f"wandbtune {m['wandbtune']} ({meta['source']}) · rounds: {meta['rounds']} · "
        f"total {meta['total_min']:.1f} min · command: `{meta['command']}`",
        "",
        f"Server: {o['server']} on 127.0.0.1 behind a proxy (in a process of its "
        f"own) adding {o['latency_ms_each_way']:g} ms to each request and "
        f"{o['latency_ms_each_way']:g} ms to each answer; `WANDB_BASE_URL` = the "
        "proxy, `WANDB_API_KEY` = a made-up `local-…` key, both set before "
        f"`ray.init`. Each trial: {sweep['work_s'] * 1000:g} ms of work "
        f"(`{sweep['work']}`) before each report; "
        f"`max_concurrent_trials={sweep['max_concurrent']}`; 1 CPU each, "
        "`ray.init(num_cpus=2)`.",
        "",
        "Load of the shared machine (`uptime`): before "
        f"`{meta['uptime_start']}`; after `{meta['uptime_end']}`. 1-min load "
        f"average at sweep starts: median {meta['load_median']:.2f}, "
        f"{meta['load_min']:.2f}–{meta['load_max']:.2f}.",
        "",
        "Wall time is `Tuner.fit()`; median [min–max] over rounds; × bare = median "
        "/ bare median. W&B MB per concurrent trial: the largest RSS sum of W&B's "
        "processes (wandb-core, wherever it runs) in one sample / the most trial "
        "processes alive in one sample; median over rounds (wandb-core only: "
        "the W&B client inside a trial's process is in peak RSS). Peak RSS: the "
        "largest RSS sum of Ray workers and wandb-core processes in one sample, "
        "median over rounds. Added MB per concurrent trial: (peak RSS − bare's "
        "peak RSS) / the most trial processes alive in one sample, W&B's client "
        "in the trial processes and Ray's logging actors included. Complete on the "
        "server: the trial's run is in the server's store with state `finished`, "
        "the trial's config (`n`, `x`) and a row for every reported `step`; read "
        "as `fit()` returns, and again once the sweep's Ray workers and "
        f"wandb-core processes have ended (at most {QUIET_TIMEOUT_S:.0f} s later). "
        "Requests: through the proxy during the sweep, median over rounds.",
        "",
        "| shape | reuse_actors | variant | wall s, median [range] | × bare "
        "| W&B MB per concurrent trial | peak RSS MB "
        "| added MB per concurrent trial | actors started "
        "| processes started (workers + wandb-core) "
        "| complete on the server when fit() returned "
        "| complete once its processes ended | requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "wall_med" not in row:
            err = row["errors"][0] if row["errors"] else "no data"
            lines.append(
                f"| {row['shape']} | {row['reuse']} | {row['variant']} | "
                f"**error** ({row['rounds'] - row['rounds_ok']}/{row['rounds']} "
                f"rounds): {err.replace('|', '/')} | | | | | | | | | |"
            )
            continue
        wall = fmt_range(row["walls"])
        if row["errors"]:
            wall += (
                f" ({row['rounds'] - row['rounds_ok']} rounds failed: "
                f"{row['errors'][0].replace('|', '/')})"
            )
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else "–"
        if row["variant"] == "bare":
            ratio = "1.00"
        rss = f"{statistics.median(row['rss']):.0f}"
        added = (
            f"{row['added_rss_per_trial_mb']:+.0f}"
            if "added_rss_per_trial_mb" in row and row["variant"] != "bare"
            else "–"
        )
        mem = (
            f"{statistics.median(row['wandb_mb_per_trial']):.0f}"
            if row["variant"] != "bare"
            else "–"
        )
        procs = f"{fmt_counts(row['workers'])} + {fmt_counts(row['wandb_core'])}"
        lines.append(
            f"| {row['shape']} | {row['reuse']} | {row['variant']} | {wall} "
            f"| {ratio} | {mem} | {rss} | {added} | {fmt_counts(row['actors'])} "
            f"| {procs} "
            f"| {row['server_at_return']} | {row['server_after_wait']} "
            f"| {statistics.median(row['requests']):.0f} |"
        )
    lines += ["", "## Against the issue's goals", ""]
    lines.append(
        f"- `Tuner.fit()` ≤ {ONLINE_GOAL_RATIO}× bare for the decorator and "
        "wandbtune's callback:"
    )
    for row in rows:
        if row["variant"] in ONLINE_GOAL_VARIANTS and "ratio" in row:
            met = "met" if row["ratio"] <= ONLINE_GOAL_RATIO else "**missed**"
            lines.append(
                f"  - {row['shape']} reuse={row['reuse']} {row['variant']}: "
                f"{row['ratio']:.2f} ({met}; rounds "
                f"{row['ratio_min']:.2f}–{row['ratio_max']:.2f})"
            )
    lines.append("- every run complete on the server when `fit()` returns:")
    for row in rows:
        if row["variant"] != "bare":
            met = "yes" if row["server_all_complete_at_return"] else "**no**"
            lines.append(
                f"  - {row['shape']} reuse={row['reuse']} {row['variant']}: {met} "
                f"({row['server_at_return']})"
            )
    lines += ["", "## Details", ""]
    lines.append("Actors started, by class (per round when rounds differ):")
    lines.append("")
    for row in rows:
        if "actor_classes" not in row:
            continue
        uniq = [json.dumps(c) for c in row["actor_classes"]]
        shown = uniq[0] if len(set(uniq)) == 1 else " / ".join(uniq)
        lines.append(
            f"- {row['shape']} reuse={row['reuse']} {row['variant']}: "
            + shown.replace('"', "")
        )
    lines += [
        "",
        "W&B memory per concurrent trial, per round (peak-sum / trials alive; in "
        "brackets the median over samples of W&B RSS / trial processes alive "
        "then):",
        "",
    ]
    for row in rows:
        if row["variant"] == "bare" or not row.get("wandb_mb_per_trial"):
            continue
        per = ", ".join(
            f"{a:.0f} [{b:.0f}] ({t} trials)"
            for a, b, t in zip(
                row["wandb_mb_per_trial"],
                row["wandb_mb_per_trial_median_sample"],
                row["trials_max_alive"],
                strict=True,
            )
        )
        lines.append(f"- {row['shape']} reuse={row['reuse']} {row['variant']}: {per}")
    lines += ["", "Runs not complete on the server when `fit()` returned:", ""]
    bad = [
        (r, inc)
        for r in records
        for inc in r.get("server_at_return", {}).get("incomplete", [])
    ]
    for r, inc in bad:
        shape, reuse = shape_key(r)
        later = {
            i["trial_id"]: i
            for i in r.get("server_after_wait", {}).get("incomplete", [])
        }
        after = later.get(inc["trial_id"])
        lines.append(
            f"- round {r['round'] + 1}, {shape} reuse={reuse} {r['variant']}, "
            f"trial {inc['trial_id']}: {json.dumps(inc)}; after the processes "
            f"ended: {json.dumps(after) if after else 'complete'}"
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
    lines += [f"- {s} reuse={r} {v}: {lo}" for s, r, v, lo in left] or ["- none"]
    errs = [
        (row["shape"], row["reuse"], row["variant"], e)
        for row in rows
        for e in row["errors"]
    ]
    lines += ["", "Errors:", ""]
    lines += [f"- {s} reuse={r} {v}: {e}" for s, r, v, e in errs] or ["- none"]
    return "\n".join(lines) + "\n"


def try_chart(
    rows: list[dict[str, Any]], variants: list[str], path: str, title: str
) -> None:
    """``chart``, or a note when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: no {path}", flush=True)
        return
    chart(rows, variants, path, title)


def write_online_report(
    out: str,
    records: list[dict[str, Any]],
    meta: dict[str, Any],
    configs: list[tuple[str, bool]],
    variants: list[str],
) -> str:
    """Write online.md, online.json and (with matplotlib) online.png to ``out``;
    returns online.md's text."""
    rows = summarize_online(records, configs, variants)
    text = online_markdown(rows, meta, records)
    with open(os.path.join(out, "online.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "online.json"), "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1, default=str)
    m = meta["machine"]
    try_chart(
        rows,
        variants,
        os.path.join(out, "online.png"),
        f"Tuner.fit() time relative to no logging, online "
        f"(+{meta['online']['latency_ms_each_way']:g} ms each way) · "
        f"{meta['rounds']} rounds · {m['nproc']} CPUs · ray {m['ray']}, "
        f"wandb {m['wandb']}",
    )
    return text


def write_report(
    out: str,
    records: list[dict[str, Any]],
    meta: dict[str, Any],
    configs: list[tuple[str, bool]],
    variants: list[str],
) -> str:
    """Write bench.md, bench.json and bench.png to ``out``; returns bench.md's text."""
    rows = summarize(records, configs, variants)
    with open(os.path.join(out, "bench.md"), "w") as fh:
        fh.write(markdown(rows, meta, records))
    with open(os.path.join(out, "bench.json"), "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1, default=str)
    m = meta["machine"]
    try_chart(
        rows,
        variants,
        os.path.join(out, "bench.png"),
        f"Tuner.fit() time relative to no logging · {meta['rounds']} rounds · "
        f"{m['nproc']} CPUs · ray {m['ray']}, wandb {m['wandb']}",
    )
    with open(os.path.join(out, "bench.md")) as fh:
        return fh.read()
