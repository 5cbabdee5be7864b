"""Helpers for testing trainables against what W&B receives (yours and ours).

Built on :mod:`wandbtune.offline`, which reads one offline run file. A
retried or restored trial writes one offline file per attempt, all with the
trial's run id; ``wandb sync`` joins them into one run. :func:`read_runs`
does the same for a whole experiment.
"""

from __future__ import annotations

import os
from pathlib import Path

from wandbtune.offline import RunFile, find_run_files, read_records, read_run

__all__ = ["RunFile", "find_run_files", "read_records", "read_run", "read_runs"]


def read_runs(root: str | os.PathLike[str]) -> dict[str, list[RunFile]]:
    """Every offline run below ``root``, by run id: each run's attempts in
    the order they were written (files of runs that never started, with no
    id, are left out)."""
    paths = sorted(find_run_files(root), key=lambda p: Path(p).stat().st_mtime)
    runs: dict[str, list[RunFile]] = {}
    for path in paths:
        run = read_run(path, partial=True)
        if run.run_id:
            runs.setdefault(run.run_id, []).append(run)
    return runs
