"""Read an offline W&B run file: what ``wandb sync`` would send.

wandbtune reads earlier attempts of a retried trial with it (to log no row
twice), and ``wandbtune.testing`` builds test helpers on it.

An offline run is a ``run-<id>.wandb`` file: a 7-byte W&B header, then the
LevelDB log format (32 KiB blocks; each chunk has a 7-byte header of CRC-32,
length and type: 1 full, 2 first, 3 middle, 4 last), each record a
``wandb.proto.wandb_internal_pb2.Record``.  :func:`read_run` turns one into a
:class:`RunFile` with the rows, config, summary, run identity and exit code.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunFile", "find_run_files", "read_records", "read_run"]

_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")  # masked crc32c, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _checksum(chunk_type: int, data: bytes) -> int:
    # W&B's writer uses zlib's CRC-32 (not LevelDB's masked crc32c) over the
    # type byte, then the data.
    return zlib.crc32(data, zlib.crc32(bytes([chunk_type])))


def read_records(path: str | os.PathLike[str]) -> Iterator[Any]:
    """Yield every ``Record`` in an offline run file, checking each checksum.

    An empty file (W&B's service stopped before it wrote the header) has no
    records. Raises ``ValueError`` on a bad header or a corrupt chunk, after
    the records before it. A record cut off at the end of the file (a run still
    being written, or a killed one) is not yielded.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as fh:
        data = fh.read()
    if not data:  # W&B's service was stopped before it wrote anything
        return
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: {len(data)} bytes, no W&B header")
    ident, magic, _version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B run file")
    pos = _HEADER.size
    pending = b""
    while pos + _CHUNK.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK.size:  # trailer padding
            pos += left_in_block
            continue
        crc, length, chunk_type = _CHUNK.unpack_from(data, pos)
        if length == 0 and chunk_type == 0 and crc == 0:  # zero padding
            pos += left_in_block
            continue
        start = pos + _CHUNK.size
        payload = data[start : start + length]
        if len(payload) < length:
            return  # cut off: the writer has not finished this record
        if _checksum(chunk_type, payload) != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos = start + length
        if chunk_type in (_FULL, _FIRST):
            pending = payload
        elif chunk_type in (_MIDDLE, _LAST):
            pending += payload
        else:
            raise ValueError(f"{path}: unknown chunk type {chunk_type} at {pos}")
        if chunk_type in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
            record.ParseFromString(pending)
            yield record
            pending = b""


def _items(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        value = json.loads(item.value_json)
        if not item.nested_key:
            out[item.key] = value
            continue
        # media and other dict values arrive one leaf at a time
        *parents, leaf = item.nested_key
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@dataclass
class RunFile:
    """What one offline run holds, as W&B would receive it."""

    path: str
    run_id: str = ""
    name: str = ""
    group: str = ""
    project: str = ""
    entity: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    job_type: str = ""
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[Any] = field(default_factory=list)
    artifacts: list[Any] = field(default_factory=list)
    exit_code: int | None = None
    #: Why reading stopped early (``read_run(..., partial=True)``), or None.
    damaged: str | None = None

    @property
    def finished(self) -> bool:
        """True when the run's exit record was written."""
        return self.exit_code is not None

    def column(self, key: str) -> list[Any]:
        """The values of ``key`` in the rows that have it, in order."""
        return [row[key] for row in self.rows if key in row]


def read_run(path: str | os.PathLike[str], *, partial: bool = False) -> RunFile:
    """Read an offline ``run-*.wandb`` file into a :class:`RunFile`.

    A corrupt file raises ``ValueError``; with ``partial=True`` what was read
    before the damage is returned instead (``RunFile.damaged`` says so).
    """
    run = RunFile(path=os.fspath(path))
    try:
        _read_into(run, read_records(path))
    except ValueError as exc:
        if not partial:
            raise
        run.damaged = str(exc)
    return run


class _Node(dict[str, Any]):
    """A summary value made of nested keys. A dict set as one value (one
    key, no ``nested_key``) stays a plain dict: a leaf, as in wandb-core's
    summary tree, replaced whole by a later nested update through it."""


def _summary_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _apply_summary(node: _Node, summary: Any) -> None:
    """Apply one summary record as wandb-core does: each update sets one leaf
    (keeping its siblings), then each removed path is dropped."""
    for item in summary.update:
        *parents, leaf = _summary_path(item)
        target = node
        for part in parents:
            child = target.get(part)
            if not isinstance(child, _Node):
                child = target[part] = _Node()
            target = child
        target[leaf] = json.loads(item.value_json)
    for item in summary.remove:
        *parents, leaf = _summary_path(item)
        target = node
        for part in parents:
            child = target.get(part)
            if not isinstance(child, _Node):
                break
            target = child
        else:
            target.pop(leaf, None)


def _plain(value: Any) -> Any:
    if isinstance(value, _Node):
        return {key: _plain(child) for key, child in value.items()}
    return value


def _read_into(run: RunFile, records: Iterator[Any]) -> None:
    summary = _Node()
    try:
        _read_records(run, records, summary)
    finally:  # also what was read before damage (partial=True)
        run.summary = _plain(summary)


def _read_records(run: RunFile, records: Iterator[Any], summary: _Node) -> None:
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group = r.run_id, r.display_name, r.run_group
            run.job_type = r.job_type
            run.project, run.resumed = r.project, r.resumed
            run.entity, run.tags, run.notes = r.entity, list(r.tags), r.notes
            run.config.update(_config(r.config.update))
        elif kind == "config":
            run.config.update(_config(record.config.update))
            for item in record.config.remove:
                run.config.pop(item.key, None)
        elif kind == "history":
            run.rows.append(_items(record.history.item))
        elif kind == "summary":
            _apply_summary(summary, record.summary)
        elif kind == "metric":
            run.metrics.append(record.metric)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code


def _config(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in _items(items).items():
        # Older writers wrap each entry as {"value": ..., "desc": ...}; a
        # user's {"value": x} is not unwrapped (W&B keeps it as logged).
        wrapped = isinstance(value, dict) and set(value) == {"value", "desc"}
        out[key] = value["value"] if wrapped else value
    return out


def find_run_files(root: str | os.PathLike[str]) -> list[str]:
    """Every ``run-*.wandb`` file below ``root``, sorted (each once: W&B's
    ``latest-run`` links are skipped)."""
    pattern = os.path.join(os.fspath(root), "**", "run-*.wandb")
    return sorted(
        path
        for path in glob.glob(pattern, recursive=True)
        if "latest-run" not in path.split(os.sep)
    )
