"""wandbtune's offline-run reader checked against W&B's own upload of the same
files.

The real wandb client writes offline runs (nested config and rows, an image, a
W&B Table, explicit summary updates, tags, notes, config updated after init,
a failed exit); ``wandb sync`` of the same venv uploads them to a
W&B-compatible server on this machine (openwandb, tests/wandb_server.py)
through the test proxy, which sees the exit code the client sends. What the
server keeps is compared with what ``wandbtune.offline.read_run`` reads from
the files: every history row (the server's ``wandb-history.jsonl``, as the file
stream sent it, and the numbers in its metrics table), the config, the summary
(the uploaded ``wandb-summary.json`` and the summary column), name, tags,
notes, exit code, and the uploaded media files.

What the server cannot show is said where it is skipped: the run's group and
entity (openwandb keeps neither for a run), and which exit code a run ended
with in its state (``finished`` either way; the proxy sees the code instead).

Which ``wandb sync``: on wandb >= 0.20 ``wandb sync`` (wandb-core, the same
code that wrote the file). On wandb 0.19 ``wandb sync`` is the legacy Python
uploader, which never sends config changed after ``wandb.init`` (its sender
debounces config updates and the sync loop never flushes them: the server
keeps the config of init) and applies summary updates differently from
wandb-core (it ignores ``del run.summary[k]``); 0.19's wandb-core uploader,
``wandb beta sync``, is used there instead. It uploads no media files: the
image and table are then checked in the run's local ``files`` directory only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.online_fixtures import *  # noqa: F403 - the wandb_server fixture
from tests.wandb_server import (
    FAKE_KEY,
    FaultProxy,
    OpenWandbServer,
    Store,
    StoredRunFiles,
    stored_run_files,
)
from wandbtune.offline import RunFile, read_run

PROJECT = "offline-reader"
#: 40 KB: the row holding it spans two 32 KiB blocks of the run file.
BIG = "b" * 40_000

WRITE_RUNS = r"""
import sys

import numpy as np
import wandb

root, project = sys.argv[1], sys.argv[2]


def start(run_id, **kwargs):
    return wandb.init(
        project=project, id=run_id, mode="offline", dir=root,
        settings=wandb.Settings(quiet=True), **kwargs,
    )


run = start(
    "rich",
    name="rich run",
    group="readers",
    tags=["nested", "media"],
    notes="rows, media, a table and late config",
    config={
        "optimizer": {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99]},
        "layers": 3,
        "model": {"encoder": {"width": 64, "act": "relu"}},
    },
)
table = wandb.Table(columns=["epoch", "label"], data=[[1, "cat"], [2, "dog"]])
for i in range(6):
    row = {
        "loss": 1.0 / (i + 1),
        "train": {"acc": i / 10, "grad": {"norm": 2.0 * i, "max": i}},
        "phase": f"epoch-{i}",
        "ok": i % 2 == 0,
    }
    if i == 2:
        row["sample"] = wandb.Image(np.full((8, 8, 3), 60, np.uint8))
    if i == 3:
        row["predictions"] = table
    if i == 4:
        row["blob"] = "b" * 40_000
    run.log(row)
run.config.update({"added": 7, "schedule": {"warmup": 2}})
run.config.update({"layers": 4}, allow_val_change=True)
run.config["late"] = "set by item"
run.summary["best_loss"] = 0.125
run.summary["loss"] = 0.5  # replaces the last logged loss
run.summary["eval"] = {"acc": 0.75, "split": "val"}
run.summary.update({"final": True})
run.finish(exit_code=0)

run = start("failed", config={"seed": 1})
for i in range(3):
    run.log({"x": i, "nested": {"y": -i}})
run.finish(exit_code=3)

# del run.summary[...] writes a summary record that removes the key
run = start("summary-removal")
run.log({"x": 1})
run.summary["scratch"] = 5
run.summary["kept"] = 6
del run.summary["scratch"]
run.finish()

# a later row with fewer nested leaves: W&B keeps the others in the summary;
# but a dict set as one summary value is one leaf, replaced by a nested update
run = start("summary-nested-leaves")
run.log({"val": {"loss": 1.0, "acc": 0.5}})
run.log({"val": {"loss": 0.5}})
run.summary["pair"] = {"x": 1, "y": "z"}
run.summary["pair"]["x"] = 2
run.finish()

# a config value that is a dict with only a "value" key, as a sweep's
# parameters are often written
run = start("config-value-key", config={"dropout": {"value": 0.1}, "plain": 1})
run.log({"x": 1})
run.finish()

wandb.teardown()
"""

#: The runs every comparison covers (the others each exercise one rule of
#: W&B's summary and config that the reader once got wrong).
COMPARED = ["rich", "failed"]
ALL_RUNS = [*COMPARED, "summary-removal", "summary-nested-leaves", "config-value-key"]
#: W&B's own bookkeeping in the summary, rewritten by the uploader at the end
#: (the run's runtime): not part of what a user logged.
BOOKKEEPING = {"_wandb", "_runtime"}


def _wandb_version() -> tuple[int, ...]:
    version = importlib.metadata.version("wandb")
    return tuple(int(part) for part in version.split(".")[:2])


#: wandb-core's ``wandb sync`` (see the module docstring for 0.19).
CORE_SYNC = _wandb_version() >= (0, 20)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The offline runs, written by the real wandb client in a process of its
    own, by run id: each run's ``offline-run-*`` directory."""
    root = tmp_path_factory.mktemp("offline-runs")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_SERVICE", None)
    subprocess.run(
        [sys.executable, "-c", WRITE_RUNS, str(root), PROJECT],
        check=True,
        env=env,
        timeout=180,
    )
    dirs = {}
    for run_id in ALL_RUNS:
        (path,) = root.glob(f"wandb/offline-run-*-{run_id}")
        dirs[run_id] = path
    return dirs


@pytest.fixture(scope="module")
def read(run_dirs: dict[str, Path]) -> dict[str, RunFile]:
    """What the reader makes of each run file."""
    return {
        run_id: read_run(path / f"run-{run_id}.wandb")
        for run_id, path in run_dirs.items()
    }


@dataclass
class Synced:
    store: Store
    #: per run id, the exit code of the last file-stream request that
    #: completed the run, as the client sent it through the proxy
    exit_codes: dict[str, int | None]

    def files(self, run_id: str) -> StoredRunFiles:
        files = stored_run_files(self.store, run_id)
        assert files is not None, f"run {run_id} never reached the server"
        return files


@pytest.fixture(scope="module")
def synced(
    run_dirs: dict[str, Path],
    wandb_server: OpenWandbServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Synced]:
    """Every run uploaded by ``wandb sync`` to the server, through the proxy."""
    work = tmp_path_factory.mktemp("sync")
    proxy = FaultProxy(wandb_server.url).start()
    try:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("WANDB_")
        }
        env.update(
            WANDB_BASE_URL=proxy.url,
            WANDB_API_KEY=FAKE_KEY,
            WANDB_SILENT="true",
            WANDB_CONFIG_DIR=str(work / "config"),
            WANDB_CACHE_DIR=str(work / "cache"),
            WANDB_DATA_DIR=str(work / "data"),
        )
        wandb_cli = str(Path(sys.executable).parent / "wandb")
        if CORE_SYNC:
            command = [wandb_cli, "sync", *map(str, run_dirs.values())]
        else:  # every run directory below it
            (wandb_dir,) = {path.parent for path in run_dirs.values()}
            command = [wandb_cli, "beta", "sync", str(wandb_dir)]
        done = subprocess.run(
            command,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        exit_codes: dict[str, int | None] = {}
        for seen in proxy.seen:
            for run_id in run_dirs:
                if seen.path.endswith(f"/{run_id}/file_stream") and seen.complete:
                    exit_codes[run_id] = seen.exitcode
        yield Synced(store=wandb_server.store, exit_codes=exit_codes)
    finally:
        proxy.stop()


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _without(mapping: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if key not in keys}


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


# --- everything the server keeps, for the runs the reader gets right --------------


def test_the_runs_cover_nested_keys_media_a_table_and_a_multi_block_row(read):
    rich = read["rich"]
    assert len(rich.rows) == 6
    assert rich.rows[0]["train"]["grad"] == {"norm": 0.0, "max": 0}
    assert rich.rows[2]["sample"]["_type"] == "image-file"
    assert rich.rows[3]["predictions"]["_type"] == "table-file"
    assert rich.rows[4]["blob"] == BIG
    assert Path(rich.path).stat().st_size > 32 * 1024
    assert rich.config["layers"] == 4 and rich.config["late"] == "set by item"
    assert rich.summary["loss"] == 0.5 and rich.summary["eval"]["split"] == "val"


@pytest.mark.parametrize("run_id", COMPARED)
def test_every_row_is_the_row_wandb_sync_uploaded(read, synced, run_id):
    uploaded = synced.files(run_id).history()
    rows = _json(read[run_id].rows)
    assert len(rows) == len(uploaded) > 0
    assert [row["_step"] for row in rows] == list(range(len(rows)))
    for row, sent in zip(rows, uploaded, strict=True):
        assert row == sent, f"step {sent.get('_step')}"


@pytest.mark.parametrize("run_id", COMPARED)
def test_numbers_in_rows_are_the_servers_metrics(read, synced, run_id):
    """The server's metrics table keeps top-level numbers only, by step."""
    numbers = []
    for row in read[run_id].rows:
        kept = {
            key: value
            for key, value in row.items()
            if not key.startswith("_")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        if kept:
            numbers.append({"_step": row["_step"], **kept})
    stored = synced.store.rows(run_id)
    assert len(numbers) == len(stored) > 0
    assert numbers == stored


@pytest.mark.parametrize("run_id", COMPARED)
def test_config_is_the_servers_including_updates_after_init(read, synced, run_id):
    stored = synced.store.run(run_id)
    assert stored is not None
    config = _without(read[run_id].config, {"_wandb"})
    assert len(config) == len(stored.config) > 0
    assert _json(config) == stored.config


@pytest.mark.parametrize("run_id", COMPARED)
def test_summary_is_the_uploaded_summary_including_explicit_updates(
    read, synced, run_id
):
    uploaded = synced.files(run_id).summary()
    assert uploaded is not None
    summary = _json(_without(read[run_id].summary, BOOKKEEPING))
    uploaded = _without(uploaded, BOOKKEEPING)
    assert sorted(summary) == sorted(uploaded)
    assert summary == uploaded


@pytest.mark.parametrize("run_id", COMPARED)
def test_scalar_summary_values_are_the_servers_summary_column(read, synced, run_id):
    """The server's summary column keeps top-level scalars not starting with _."""
    stored = synced.store.run(run_id)
    assert stored is not None
    scalars = {
        key: value
        for key, value in read[run_id].summary.items()
        if not key.startswith("_") and _scalar(value)
    }
    assert len(scalars) == len(stored.summary) > 0
    assert scalars == stored.summary


@pytest.mark.parametrize("run_id", COMPARED)
def test_name_project_tags_and_notes_are_the_servers(read, synced, run_id):
    # The group and entity are not compared: openwandb keeps no group for a
    # run, and an offline run has no entity (the server files it under its
    # default team).
    run = read[run_id]
    stored = synced.store.run(run_id)
    files = synced.files(run_id)
    assert stored is not None
    assert run.run_id == run_id and run.project == stored.project == PROJECT
    if run.name:  # a run given no name gets one from the server
        assert run.name == stored.name
    assert bool(run.name) == (run_id == "rich")
    assert run.tags == files.tags
    assert run.notes == files.notes
    if run_id == "rich":
        assert run.tags == ["nested", "media"] and run.notes
        assert run.group == "readers"


@pytest.mark.parametrize("run_id", COMPARED)
def test_exit_code_is_the_one_wandb_sync_reported(read, synced, run_id):
    # The server's state is "finished" whatever the code; the proxy saw the
    # code the client sent with the file stream's last request.
    stored = synced.store.run(run_id)
    assert stored is not None and stored.state == "finished"
    assert read[run_id].finished
    assert run_id in synced.exit_codes
    assert read[run_id].exit_code == synced.exit_codes[run_id]
    assert read[run_id].exit_code == {"rich": 0, "failed": 3}[run_id]


def test_media_rows_point_at_the_image_and_table_files(read, synced, run_dirs):
    rich = read["rich"]
    media = [
        (key, value)
        for row in rich.rows
        for key, value in row.items()
        if isinstance(value, dict) and "_type" in value
    ]
    assert [(key, value["_type"]) for key, value in media] == [
        ("sample", "image-file"),
        ("predictions", "table-file"),
    ]
    files = synced.files("rich")
    for key, value in media:
        local = (run_dirs["rich"] / "files" / value["path"]).read_bytes()
        assert hashlib.sha256(local).hexdigest() == value["sha256"], key
        assert len(local) == value["size"], key
        if CORE_SYNC:  # 0.19's `wandb beta sync` uploads no media files
            assert files.file(value["path"]) == local, key
    table = json.loads((run_dirs["rich"] / "files" / media[1][1]["path"]).read_text())
    assert table["columns"] == ["epoch", "label"]
    assert table["data"] == [[1, "cat"], [2, "dog"]]


# --- summary removals, nested summary leaves, config dicts with a "value" key ---


def _summaries(read, synced, run_id):
    uploaded = synced.files(run_id).summary()
    assert uploaded is not None
    summary = _json(_without(read[run_id].summary, BOOKKEEPING))
    return summary, _without(uploaded, BOOKKEEPING)


def test_a_summary_key_deleted_by_the_run_is_not_in_the_summary(read, synced):
    summary, uploaded = _summaries(read, synced, "summary-removal")
    assert "scratch" not in uploaded and uploaded["kept"] == 6
    assert summary == uploaded


def test_nested_summary_keeps_leaves_a_later_row_did_not_log(read, synced):
    summary, uploaded = _summaries(read, synced, "summary-nested-leaves")
    assert uploaded["val"] == {"loss": 0.5, "acc": 0.5}
    assert uploaded["pair"] == {"x": 2}  # wandb-core's (0.19 and 0.31)
    assert summary == uploaded


def test_a_config_dict_with_a_value_key_is_kept_as_logged(read, synced):
    stored = synced.store.run("config-value-key")
    assert stored is not None
    assert stored.config == {"dropout": {"value": 0.1}, "plain": 1}
    assert _without(read["config-value-key"].config, {"_wandb"}) == stored.config


# --- cut-off and corrupt files ----------------------------------------------------


def test_a_cut_off_copy_reads_as_a_prefix_of_the_rows(read, tmp_path):
    """Cut anywhere (mid-record, mid-block, inside the row spanning two
    blocks), a run file reads as the rows before the cut, without error: a
    run still being written, or killed, looks like that."""
    full = read["rich"]
    data = Path(full.path).read_bytes()
    cut = tmp_path / "run-cut.wandb"
    counts = []
    mid_block = 32 * 1024 + 16 * 1024
    cuts = sorted({*range(7, len(data), 97), mid_block, len(data) - 1})
    for size in cuts:
        cut.write_bytes(data[:size])
        run = read_run(cut)
        assert run.rows == full.rows[: len(run.rows)], size
        assert run.exit_code is None, size  # the exit record is the last
        assert read_run(cut, partial=True).damaged is None, size
        counts.append(len(run.rows))
    assert counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == len(full.rows)
    assert len(set(counts)) == len(full.rows) + 1  # each row appears at a cut
    assert 0 < counts[cuts.index(mid_block)] < len(full.rows)


def test_a_corrupt_copy_raises_unless_partial_then_keeps_the_rows_before(
    read, tmp_path
):
    full = read["rich"]
    data = bytearray(Path(full.path).read_bytes())
    data[32 * 1024 + 200] ^= 0xFF  # inside the second block's first chunk
    corrupt = tmp_path / "run-corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_run(corrupt)
    run = read_run(corrupt, partial=True)
    assert run.damaged is not None and "checksum" in run.damaged
    assert 0 < len(run.rows) < len(full.rows)
    assert run.rows == full.rows[: len(run.rows)]
    assert run.exit_code is None
