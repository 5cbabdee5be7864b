"""The result-to-row rules, and the offline run reader the other tests rely on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from wandbtune._row import clean, to_row
from wandbtune.testing import read_records, read_run


def test_control_keys_are_dropped_and_identity_keys_go_to_config():
    row, config = to_row(
        {
            "loss": 1.0,
            "done": False,
            "should_checkpoint": True,
            "date": "2026",
            "trial_id": "abc",
            "hostname": "h",
            "pid": 3,
            "node_ip": "1.2.3.4",
            "training_iteration": 4,
            "config": {"lr": 0.1},
        }
    )
    assert row == {"loss": 1.0, "training_iteration": 4}
    assert config == {
        "trial_id": "abc",
        "hostname": "h",
        "pid": 3,
        "node_ip": "1.2.3.4",
    }


def test_log_config_adds_config_columns_without_the_wandb_entry():
    row, _ = to_row({"config": {"lr": 0.1, "wandb": {"api_key": "x"}}}, log_config=True)
    assert row == {"config/lr": 0.1}


def test_excludes_drop_a_key_and_everything_under_it_but_not_lookalikes():
    row, _ = to_row(
        {"debug": {"a": 1}, "debugger": 2, "m": {"debug": 3}},
        excludes=["debug", "m/debug"],
    )
    assert row == {"debugger": 2}


def test_non_string_long_and_many_keys():
    result = {7: "seven", ("a", 1): 1.0, "k" * 1000: 1}
    result.update({f"metric_{i}": i for i in range(5000)})
    row, _ = to_row(result)
    assert row["7"] == "seven" and row["('a', 1)"] == 1.0
    assert any(k.startswith("kkk") and len(k) <= 256 for k in row)
    assert len(row) == 5003


class Unprintable:
    def __str__(self):
        raise RuntimeError("no str")


@pytest.mark.parametrize(
    "value, expected",
    [
        (np.float64(2.5), 2.5),
        (np.int8(3), 3),
        (np.bool_(True), True),
        (np.array([4.0]), 4.0),
        (b"\xffbytes", "\ufffdbytes"),
        (None, None),
        (float("nan"), pytest.approx(float("nan"), nan_ok=True)),
        (3 + 4j, "(3+4j)"),
        ({1: {2: np.int32(5)}}, {"1": {"2": 5}}),
        ([np.float32(1.5), "s"], [1.5, "s"]),
        (Unprintable(), "<unprintable Unprintable>"),
        (np.array(["a", "b"]), "['a' 'b']"),
    ],
)
def test_values_are_made_loggable_and_never_raise(value, expected):
    assert clean(value) == expected


def test_every_numpy_rank_is_handled():
    assert clean(np.zeros(())) == 0.0
    assert isinstance(clean(np.zeros((3, 3))), np.ndarray)  # histogram/list for W&B
    assert type(clean(np.zeros((4, 4, 3), np.uint8))).__name__ == "Image"
    assert [type(x).__name__ for x in clean(np.zeros((2, 4, 4, 3), np.uint8))] == [
        "Image",
        "Image",
    ]
    assert type(clean(np.zeros((1, 2, 3, 8, 8), np.uint8))).__name__ == "Video"
    assert isinstance(clean(np.zeros((1, 1, 1, 1, 1, 1))), str)


WRITE_RUN = """
import sys, wandb
run = wandb.init(project="p", id="reader", mode="offline", dir=sys.argv[1],
                 config={"a": 1}, settings=wandb.Settings(quiet=True))
for i in range(1, 3001):
    run.log({"i": i, "pad": "x" * 40}, step=i)
run.finish(exit_code=3)
wandb.teardown()
"""


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    subprocess.run(
        [sys.executable, "-c", WRITE_RUN, str(root)],
        check=True,
        env={**__import__("os").environ, "WANDB_SILENT": "true"},
    )
    (path,) = root.glob("wandb/offline-run-*/run-reader.wandb")
    return path


def test_reader_reads_a_run_spanning_many_blocks(big_run):
    assert big_run.stat().st_size > 4 * 32 * 1024
    run = read_run(big_run)
    assert run.run_id == "reader" and run.config["a"] == 1
    assert run.column("i") == list(range(1, 3001))
    assert run.exit_code == 3


def test_reader_rejects_corruption_and_stops_at_a_cut_off_record(big_run, tmp_path):
    data = bytearray(big_run.read_bytes())
    corrupt = tmp_path / "corrupt.wandb"
    data[100] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(read_records(corrupt))
    cut = tmp_path / "cut.wandb"
    cut.write_bytes(big_run.read_bytes()[:50_000])
    rows = read_run(cut).rows
    assert 0 < len(rows) < 3000 and read_run(cut).exit_code is None


def test_reader_rejects_a_file_that_is_not_a_run(tmp_path):
    empty = tmp_path / "run-x.wandb"
    empty.write_bytes(b":W&B")
    with pytest.raises(ValueError, match="no W&B header"):
        read_run(empty)
