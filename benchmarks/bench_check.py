"""Checking the runs: read every W&B run file of a sweep back and judge it.

A run is complete when its rows hold every reported ``step`` 0..n-1 and it
has an exit record. The files are searched where each variant writes them
(``search_roots``); per trial, the best copy found anywhere counts, and the
``storage_*`` counts judge only the copies under the sweep's storage path.
"""

from __future__ import annotations

import collections
import glob
import os
from typing import Any


def session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def search_roots(storage: str, name: str, start_dir: str) -> dict[str, list[str]]:
    """Where the run files of experiment ``name`` can be, by kind of place.

    ``start_dir`` is the directory the benchmark was started from (it changes
    into its temporary directory before ``ray.init``)."""
    artifacts = glob.glob(os.path.join(session_dir(), "artifacts", "*", name))
    return {
        "storage_path": [os.path.join(storage, name)],
        "driver_artifacts": [os.path.join(a, "driver_artifacts") for a in artifacts],
        "working_dirs": [os.path.join(a, "working_dirs") for a in artifacts],
        "other": [
            os.path.join(start_dir, "wandb"),
            os.path.join(os.getcwd(), "wandb"),
            os.path.expanduser(os.path.join("~", "ray_results", name)),
        ],
    }


def check_runs(
    storage: str, name: str, trial_ids: list[str], reports: int, start_dir: str
) -> dict[str, Any]:
    """Read every run file of the sweep and judge it.

    A run is complete when its rows hold every reported ``step`` 0..n-1 and it
    has an exit record. Per trial, the best copy found anywhere counts;
    ``storage_*`` judges only copies under the sweep's storage path."""
    from wandbtune.testing import find_run_files, read_run

    wanted = set(trial_ids)
    copies: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    read_errors = []
    for place, roots in search_roots(storage, name, start_dir).items():
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
