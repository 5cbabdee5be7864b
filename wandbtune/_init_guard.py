"""While a decorated trial's run is open, ``wandb.init`` returns that run.

Code written for Ray's integration calls ``setup_wandb`` (which calls
``wandb.init(reinit=True)``) or ``wandb.init(reinit="finish_previous")``
itself. Either would finish the trial's run: every result mirrored after that
goes to a finished run and is lost. So while the guard is on, ``wandb.init``
from the trial's code returns the trial's run (its arguments ignored, with one
note), and ``finish()`` on it, or ``wandb.finish()``, is a no-op until the
trial ends. Only an explicit ``reinit="create_new"`` makes a second run.

Installed by the W&B thread once the run has started and removed before the
run is finished (``_mixin``), symmetric and idempotent as wrapt patches are:
resolve, then apply; restore the original on removal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Optional

import wrapt

logger = logging.getLogger("wandbtune")

__all__ = ["TrialRunView", "install", "remove", "wants_new_run"]


class TrialRunView(wrapt.ObjectProxy):  # type: ignore[misc,type-arg]
    """The trial's run as user code gets it: everything but ``finish``."""

    def finish(self, *args: Any, **kwargs: Any) -> None:
        _note(
            "finish",
            "run.finish() inside a @wandb_trainable trial is ignored: wandbtune "
            "finishes the trial's run when the trial ends, after its last result.",
        )


def wants_new_run(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """True if a ``wandb.init`` call explicitly asks for a second run."""
    if kwargs.get("reinit") == "create_new":
        return True
    settings = kwargs.get("settings")
    if isinstance(settings, Mapping):
        return settings.get("reinit") == "create_new"
    return getattr(settings, "reinit", None) == "create_new"


class _Guard:
    def __init__(self, run: Any, owner: Optional[threading.Thread]) -> None:
        self.view = TrialRunView(run)
        self.run = run
        self.owner = owner  # wandbtune's W&B thread: its own calls pass through

    def init(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if threading.current_thread() is self.owner or wants_new_run(args, kwargs):
            return wrapped(*args, **kwargs)
        _note(
            "init",
            "wandb.init() inside a @wandb_trainable trial returns the trial's run "
            "(its arguments are ignored); a second run would end it and lose the "
            "results mirrored after. Pass reinit='create_new' for a separate run.",
        )
        return self.view

    def finish(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if threading.current_thread() is self.owner:
            return wrapped(*args, **kwargs)
        import wandb

        if wandb.run is not None and wandb.run is not self.run:
            return wrapped(*args, **kwargs)  # another run of the user's
        return self.view.finish()


_lock = threading.Lock()
_guard: Optional[_Guard] = None
_saved: list[tuple[Any, str, Any]] = []
_noted: set[str] = set()


def install(run: Any, *, owner: Optional[threading.Thread] = None) -> None:
    """Guard ``wandb.init`` and ``wandb.finish`` for ``run``; calls from the
    ``owner`` thread (wandbtune's own, if any) pass through."""
    global _guard
    import wandb

    with _lock:
        _restore()
        _guard = _Guard(run, owner)
        for name, wrapper in (("init", _guard.init), ("finish", _guard.finish)):
            parent, attribute, original = wrapt.resolve_path(wandb, name)
            _saved.append((parent, attribute, original))
            wrapt.apply_patch(
                parent, attribute, wrapt.FunctionWrapper(original, wrapper)
            )


def remove() -> None:
    """Restore ``wandb.init`` and ``wandb.finish``; a no-op if not guarded."""
    with _lock:
        _restore()


def _restore() -> None:
    global _guard
    _guard = None
    while _saved:
        parent, attribute, original = _saved.pop()
        setattr(parent, attribute, original)


def _note(what: str, message: str) -> None:
    if what not in _noted:
        _noted.add(what)
        logger.warning("wandbtune: %s", message)
