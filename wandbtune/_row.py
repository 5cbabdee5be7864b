"""Turning one Tune result into one W&B row: the single path shared by the
decorator and the callback.

Rules, decided once:
- nested dicts are flattened with ``/``; non-string keys become strings;
- ``excludes`` drop a key and everything under it (``"a"`` drops ``a``, ``a/b``);
- Tune's control keys (``done``, ``should_checkpoint``, ``date``...) are never
  logged;
- identity keys that do not change within a trial (``trial_id``, ``hostname``,
  ``pid``, ``node_ip``, ``experiment_tag``...) go to the run config,
  not to rows (as in Ray's callback);
- the trial ``config`` inside a result is logged as ``config/...`` columns only
  with ``log_config=True``;
- values are made loggable the way Ray's callback does it (numpy scalars to
  Python numbers, HWC arrays to images, NHWC to lists of images, 5-D arrays to
  videos, unknown objects to their string form) but never raise: whatever W&B
  cannot take becomes a string.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

TRAINING_ITERATION = "training_iteration"

#: Tune's control flags: never logged.
CONTROL_KEYS = frozenset(
    {
        "done",
        "should_checkpoint",
        "__duplicate__",
        "checkpoint_dir_name",
        # a wall-clock string that changes every second; W&B keeps _timestamp
        "date",
    }
)

#: Keys that identify the trial rather than measure it: sent to config once.
CONFIG_KEYS = frozenset(
    {"trial_id", "experiment_tag", "node_ip", "experiment_id", "hostname", "pid"}
)

_MAX_KEY_LEN = 256  # W&B rejects very long keys; keep them readable instead


def flatten(result: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def is_excluded(key: str, excludes: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + "/") for e in excludes)


def to_row(
    result: Mapping[str, Any],
    *,
    excludes: Iterable[str] = (),
    log_config: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a Tune result into (row to log, config entries to set)."""
    excludes = tuple(excludes)
    row: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for key, value in result.items():
        key = str(key)
        if key in CONTROL_KEYS or is_excluded(key, excludes):
            continue
        if key in CONFIG_KEYS:
            config[key] = clean(value)
            continue
        if key == "config":
            if not log_config or not isinstance(value, Mapping):
                continue
            value = {k: v for k, v in value.items() if k != "wandb"}
        if isinstance(value, Mapping) and value:
            for sub, v in flatten(value, key + "/").items():
                if not is_excluded(sub, excludes):
                    row[_short(sub)] = clean(v)
        else:
            row[_short(key)] = clean(value)
    return row, config


def _short(key: str) -> str:
    return key if len(key) <= _MAX_KEY_LEN else key[: _MAX_KEY_LEN - 3] + "..."


def clean(value: Any) -> Any:
    """A value W&B can log; never raises."""
    try:
        return _clean(value, depth=0)
    except Exception:  # noqa: BLE001 - a strange value must not stop training
        return _as_text(value)


def _clean(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    np = _numpy()
    if np is not None and isinstance(value, np.generic):
        value = value.item()  # numpy scalar -> Python bool, int, float, str...
    if isinstance(value, numbers.Number) and not isinstance(value, complex):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if np is not None and isinstance(value, np.ndarray):
        return _clean_array(np, value)
    if _is_wandb_value(value):
        return value
    if isinstance(value, Mapping):
        if depth > 8:
            return _as_text(value)
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if depth > 8:
            return _as_text(value)
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    return _fallback(value)


def _clean_array(np: Any, arr: Any) -> Any:
    if arr.size == 1 and arr.ndim <= 1 and arr.dtype.kind in "biuf":
        return arr.item()
    if arr.ndim in (3, 4, 5) and arr.dtype.kind in "biuf" and arr.size:
        import wandb

        if arr.ndim == 3:  # one image, (H, W, C)
            return wandb.Image(arr)
        if arr.ndim == 4:  # a batch of images, (N, H, W, C)
            images = [wandb.Image(a) for a in arr]
            return images[0] if len(images) == 1 else images
        # a batch of videos (N, T, C, H, W); wandb >= 0.31 wants the format
        videos = [wandb.Video(a, format="gif") for a in arr]
        return videos[0] if len(videos) == 1 else videos
    if arr.dtype.kind in "biuf" and arr.ndim <= 2:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return arr.tolist()  # W&B's histograms reject NaN and inf
        return arr  # W&B turns numeric arrays into histograms or lists
    return _as_text(arr)


def _fallback(value: Any) -> Any:
    text = _as_text(value)
    for convert in (int, float):
        try:
            number = convert(text)
        except (TypeError, ValueError):
            continue
        if isinstance(number, float) and math.isnan(number) and text != "nan":
            continue
        return number
    return text


def _as_text(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001
        return f"<unprintable {type(value).__name__}>"


def _numpy() -> Any:
    import sys

    return sys.modules.get("numpy")


def _is_wandb_value(value: Any) -> bool:
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None:
        return False
    base = getattr(getattr(wandb, "sdk", None), "data_types", None)
    wb_value = getattr(
        getattr(getattr(base, "base_types", None), "wb_value", None), "WBValue", None
    )
    return wb_value is not None and isinstance(value, wb_value)
