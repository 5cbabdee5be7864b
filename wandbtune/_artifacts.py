"""Checkpoints as W&B artifacts, for the decorator and the callback alike.

Each checkpoint Tune persists becomes a new version of the ``model`` artifact
``checkpoint-<trial id>`` on the trial's run, with ``training_iteration`` in its
metadata. A checkpoint on the local filesystem is uploaded; one on remote
storage (``s3://``, ``gs://``, ...) becomes a reference artifact pointing at it.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

logger = logging.getLogger("wandbtune")

# pyarrow filesystem type names -> URI schemes W&B references understand
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}


def checkpoint_uri(filesystem: Any, path: str) -> Optional[str]:
    """A URI for ``path`` on a non-local pyarrow filesystem, or None if the
    filesystem has no URI scheme W&B can reference."""
    import pyarrow.fs

    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return "file://" + path
    if isinstance(filesystem, pyarrow.fs.SubTreeFileSystem):
        base = filesystem.base_path.rstrip("/")
        return checkpoint_uri(filesystem.base_fs, f"{base}/{path.lstrip('/')}")
    scheme = _SCHEMES.get(getattr(filesystem, "type_name", ""))
    if scheme is None and isinstance(filesystem, pyarrow.fs.PyFileSystem):
        protocol = getattr(getattr(filesystem.handler, "fs", None), "protocol", None)
        if isinstance(protocol, (tuple, list)):
            protocol = protocol[0] if protocol else None
        scheme = protocol if isinstance(protocol, str) else None
    return f"{scheme}://{path.lstrip('/')}" if scheme else None


def log_checkpoint(run: Any, checkpoint: Any, *, trial_id: str, iteration: Any) -> bool:
    """Log one Tune checkpoint as an artifact version of ``run``.

    Returns True if logged; never raises (a failed upload must not stop
    training): problems are logged as warnings.
    """
    try:
        import pyarrow.fs
        import wandb

        path = checkpoint.path
        filesystem = checkpoint.filesystem
        local = isinstance(filesystem, pyarrow.fs.LocalFileSystem)
        uri = None if local else checkpoint_uri(filesystem, path)
        if not local and uri is None:
            logger.warning(
                "wandbtune: checkpoint %s is on a %s filesystem that W&B cannot "
                "reference; it is not logged as an artifact.",
                path,
                getattr(filesystem, "type_name", type(filesystem).__name__),
            )
            return False
        metadata = {"training_iteration": iteration, "path": uri or path}
        artifact = wandb.Artifact(
            name=f"checkpoint-{trial_id}", type="model", metadata=metadata
        )
        if uri is None:
            artifact.add_dir(path)
        else:
            artifact.add_reference(uri)
        aliases = ["latest"]
        if isinstance(iteration, int):
            aliases.append(f"iteration-{iteration}")
        run.log_artifact(artifact, aliases=aliases)
        return True
    except Exception as exc:  # noqa: BLE001 - never stop training for this
        logger.warning("wandbtune: checkpoint not logged to W&B: %r", exc)
        return False
