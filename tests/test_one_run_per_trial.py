"""Exactly one W&B run per trial when Tune reuses actors.

Tune can set up an actor for a trial and then run that trial on another
(cached) actor; the first actor later serves another trial. A run started in
``setup()`` stayed empty there; wandbtune starts a trial's run only when the
trial first trains or restores in that actor.
"""

from __future__ import annotations

from ray import tune

from tests.raycompat import report
from wandbtune import wandb_trainable


@wandb_trainable(project="reuse")
def _five(config):
    for i in range(5):
        report({"score": config["i"] * 10 + i})


def test_sixty_four_trials_with_reused_actors_make_sixty_four_runs(sweep):
    out = sweep(
        _five,
        {"i": tune.grid_search(list(range(64)))},
        tune_config=tune.TuneConfig(reuse_actors=True),
    )
    assert len(out.results) == 64 and not out.results.errors
    assert out.aborted == []
    assert len(out.runs) == 64  # no second run file for any trial
    trial_ids = {result.metrics["trial_id"] for result in out.results}
    assert set(out.runs) == trial_ids
    for result in out.results:
        run = out.run_for(result)
        i = result.config["i"]
        assert run.column("score") == [i * 10 + k for k in range(5)]
        assert run.exit_code == 0
