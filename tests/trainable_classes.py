"""Class trainables in an importable module (shipped by reference)."""

from __future__ import annotations

from ray import tune

from wandbtune import wandb_trainable


class Counter(tune.Trainable):
    """Reports a = 0, 1, 2...; fails at step `fail_at` if set."""

    def setup(self, config):
        self.i = 0

    def step(self):
        self.i += 1
        if self.i == self.config.get("fail_at"):
            raise ValueError(f"class trainable failed at step {self.i}")
        score = self.config.get("rank", 1) * self.i
        return {"a": self.i - 1, "n": {"x": self.i * 10}, "score": score}

    def save_checkpoint(self, checkpoint_dir):
        if self.config.get("fail_save"):
            raise OSError("disk full while saving")
        with open(f"{checkpoint_dir}/state.txt", "w") as fh:
            fh.write(str(self.i))

    def load_checkpoint(self, checkpoint_dir):
        with open(f"{checkpoint_dir}/state.txt") as fh:
            self.i = int(fh.read())


DecoratedCounter = wandb_trainable(project="classes", upload_checkpoints=True)(Counter)
