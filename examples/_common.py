"""Shared by the examples: offline without credentials, and where runs went."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def offline_unless_logged_in() -> None:
    """Log offline when no W&B credentials are configured on this machine."""
    if os.environ.get("WANDB_MODE"):
        return
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    if not logged_in:
        os.environ["WANDB_MODE"] = "offline"  # before Ray starts: workers inherit it
        print("No W&B credentials found: logging offline (WANDB_MODE=offline).")


def storage_path() -> str | None:
    """Where Tune keeps results: the first argument, or Tune's default."""
    return sys.argv[1] if len(sys.argv) > 1 else None


def print_runs(experiment_path: str) -> None:
    """Say where each trial's W&B run is, what it holds, and how to sync it."""
    from wandbtune.testing import find_run_files, read_run

    files = find_run_files(experiment_path)
    print(f"\n{len(files)} W&B runs under {experiment_path}:")
    for path in files:
        run = read_run(path)
        status = {0: "finished", None: "not finished"}.get(run.exit_code, "failed")
        print(
            f"  {run.name}: {len(run.rows)} rows, {status} "
            f"(project {run.project}, group {run.group})"
        )
    if os.environ.get("WANDB_MODE") == "offline" and files:
        # each run's directory: <experiment>/<trial>/wandb/offline-run-*, or
        # <experiment>/wandb/offline-run-* for a Ray Train run
        where = sorted({str(Path(p).parent.parent / "offline-run-*") for p in files})
        if len(where) > 3:
            where = [f"{experiment_path}/*/wandb/offline-run-*"]
        print("\nUpload them to W&B when you have an account:")
        print(f"  wandb sync {' '.join(where)}")
