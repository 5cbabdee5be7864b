"""``@wandb_trainable``: one decorator, one complete W&B run per trial."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional, TypeVar, overload

from wandbtune import _compat, _mixin, _train
from wandbtune._settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["wandb_trainable"]


@overload
def wandb_trainable(fn: F, /) -> F: ...


@overload
def wandb_trainable(
    fn: None = None,
    /,
    *,
    project: Optional[str] = None,
    group: Optional[str] = None,
    api_key_file: Optional[str] = None,
    api_key: Optional[str] = None,
    excludes: Optional[Sequence[str]] = None,
    log_config: bool = False,
    upload_checkpoints: bool = False,
    strict: bool = False,
    all_ranks: bool = False,
    **wandb_init_kwargs: Any,
) -> Callable[[F], F]: ...


def wandb_trainable(
    fn: Optional[F] = None,
    /,
    *,
    project: Optional[str] = None,
    group: Optional[str] = None,
    api_key_file: Optional[str] = None,
    api_key: Optional[str] = None,
    excludes: Optional[Sequence[str]] = None,
    log_config: bool = False,
    upload_checkpoints: bool = False,
    strict: bool = False,
    all_ranks: bool = False,
    **wandb_init_kwargs: Any,
) -> Any:
    """Log every trial of a Ray Tune trainable as one W&B run.

    Use bare (``@wandb_trainable``) or with the arguments of Ray's
    ``WandbLoggerCallback``: ``project``, ``group``, ``api_key_file``,
    ``api_key``, ``excludes``, ``log_config``, ``upload_checkpoints``; any other
    keyword goes to ``wandb.init``. If W&B cannot start a trial's run (an
    outage, a bad key), the trial trains on without W&B after one warning;
    ``strict=True`` fails the trial instead. On a Ray Train training loop,
    ``all_ranks=True`` has every rank join rank 0's run (W&B's shared mode,
    online only). A ``"wandb"`` dict in a trial's config
    overrides these for that trial and is never logged as config.

    Each trial gets a run with id = trial id, name = trial name, group =
    experiment name and config = trial config. Every result Tune receives from
    the trial is logged as one row at W&B step = ``training_iteration``. The
    run is finished when the trial returns (exit code 0), raises (exit code 1;
    the exception reaches Tune unchanged) or is stopped by a scheduler
    (exit code 0), and its data is on disk before the trial's process exits.

    A ``tune.Trainable`` subclass can be decorated too: results of ``step()``
    are logged, the run is finished in ``cleanup``.
    """
    settings = Settings.from_arguments(
        "@wandb_trainable",
        project=project,
        group=group,
        api_key_file=api_key_file,
        api_key=api_key,
        excludes=() if excludes is None else excludes,
        log_config=log_config,
        upload_checkpoints=upload_checkpoints,
        strict=strict,
        all_ranks=all_ranks,
        **wandb_init_kwargs,
    )
    settings.check_init_kwargs("@wandb_trainable")
    settings.check_all_ranks("@wandb_trainable")
    if fn is None:
        return functools.partial(_decorate, settings=settings)
    return _decorate(fn, settings)


def _decorate(fn: F, settings: Settings) -> F:
    if inspect.isclass(fn):
        return _decorate_class(fn, settings)  # type: ignore[return-value]
    if not callable(fn):
        raise TypeError(
            f"@wandb_trainable needs a function, got {type(fn).__name__}. "
            "Write @wandb_trainable or @wandb_trainable(project=...) directly "
            "above `def train_fn(config):`."
        )
    _check_signature(fn)
    mixins = tuple(getattr(fn, "__mixins__", ()))
    if any(issubclass(m, _mixin.WandbTrainableMixin) for m in mixins):
        raise TypeError(
            f"{_name(fn)} is decorated with @wandb_trainable twice; keep one."
        )

    if inspect.isgeneratorfunction(fn):

        def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
            with _trial_scope(fn, settings, config):
                return (yield from fn(config, *args, **kwargs))

    else:

        def wrapper(config: Any, *args: Any, **kwargs: Any) -> Any:
            with _trial_scope(fn, settings, config):
                return fn(config, *args, **kwargs)

    functools.update_wrapper(wrapper, fn)  # name, docs, __dict__ (_resources...)
    wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    wrapper.__mixins__ = (_mixin.mixin_for(settings),) + mixins  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _decorate_class(cls: type, settings: Settings) -> type:
    """A subclass of a ``tune.Trainable`` with the same instrumentation."""
    from ray.tune import Trainable

    if not issubclass(cls, Trainable):
        raise TypeError(
            f"@wandb_trainable takes a Tune function trainable or a tune.Trainable "
            f"subclass; {cls.__name__} is neither. For any other Tune setup, log "
            "with tune.RunConfig(callbacks=[wandbtune.WandbLoggerCallback(...)])."
        )
    if issubclass(cls, _mixin.WandbTrainableMixin):
        raise TypeError(f"{cls.__name__} is decorated with @wandb_trainable twice.")
    return type(
        cls.__name__,
        (_mixin.mixin_for(settings), cls),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__wrapped__": cls,
        },
    )


@contextmanager
def _trial_scope(
    fn: Callable[..., Any], settings: Settings, config: Any
) -> Iterator[None]:
    """While the trainable runs in a Tune trial: check that the actor part is
    there, and let ``ray.train.report`` reach Tune. In a Ray Train worker:
    the training run's W&B run (``_train``)."""
    if _compat.in_train_worker():
        with _train.training_loop_run(settings, config or {}):
            yield
        return
    if not _compat.in_tune_function_trial():
        yield  # called outside Tune (a unit test, a debugger): run it as is
        return
    if not _mixin.instrumented():
        raise RuntimeError(
            f"@wandb_trainable on {_name(fn)} is not active in this trial: "
            "something between the decorator and Tune dropped the function's "
            "__mixins__ attribute (a decorator without functools.wraps, or a "
            "lambda around the trainable). Put @wandb_trainable outermost, or use "
            "functools.wraps in the other decorator."
        )
    with _compat.train_api_forwarded_to_tune():
        yield


def _check_signature(fn: Callable[..., Any]) -> None:
    """Tune calls ``fn(config)`` (``tune.with_parameters`` adds keywords)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: let Tune judge
    params = list(sig.parameters.values())
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if not positional:
        raise TypeError(
            f"{_name(fn)}{sig} cannot be a Tune trainable: Tune calls it with the "
            "trial config as its one positional argument. Write it as "
            f"`def {getattr(fn, '__name__', 'train_fn')}(config): ...`."
        )
    first = positional[0]
    required_after = [
        p
        for p in params[params.index(first) + 1 :]
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required_after and not all(
        p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in required_after
    ):
        raise TypeError(
            f"{_name(fn)}{sig}: the parameters after `config` can only be filled "
            "by tune.with_parameters(...) if they can be passed by keyword."
        )


def _name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", fn))
