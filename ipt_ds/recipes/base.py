"""The `Recipe` protocol: everything `loop.train` asks of a run besides the loop itself."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from ipt_ds import checkpoint
from ipt_ds.data.encode import collate

if TYPE_CHECKING:
    from ipt_ds.config import Config
    from ipt_ds.engine import TrainState
    from ipt_ds.model import PromptModel


class Recipe(Protocol):
    """What `train` runs besides the loop: the model and its training data, how batches are made, how the model is
    scored and what it exports. `pretrain/` brings recipes of its own."""

    def build(self, ds_config: dict) -> tuple[PromptModel, list[dict], dict]:
        """(model, encoded training examples, what the export's metadata records besides the config)."""
        ...

    def prepare(self, engine) -> None:
        """Once the engine is built, before the first step (every rank calls it): work done once per run, such as
        the frozen-state cache's precompute pass."""
        ...

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """One batch of encoded examples, padded."""
        ...

    def lengths(self, features: list[dict]) -> list[int]:
        """The sizes that training batches are bucketed by, one per example."""
        ...

    def loss_terms(self, features: list[dict]) -> list[int] | None:
        """The loss terms each example adds when the loss is a mean over tokens; None: one per example."""
        ...

    def evaluate(self, engine) -> dict[str, float]:
        """Metrics on the evaluation data (every rank calls it); the first one selects the best checkpoint."""
        ...

    def export(self, engine, path: Path, meta: dict, rank: int) -> None:
        """Write the shareable artifact of the current weights to `path` (every rank calls it)."""
        ...

    def finish(self, engine, state: TrainState, out: Path, rank: int) -> dict:
        """After the last step: the results, which rank 0 also writes to `out`/results.json."""
        ...


def best_results(engine, cfg: Config, state: TrainState, out: Path, task: str) -> dict:
    """Load the trained tensors of the best export (`out`/best) into `engine` for the final scores; returns the
    results' first entries, which the scores follow."""
    meta, tensors = checkpoint.read_export(out / "best")
    checkpoint.load_trainable(engine.module, tensors, source=str(out / "best"))
    return {"task": task, "method": cfg.method.name, "best_step": state.best_step,
            "skipped_steps": state.num_skipped, "parameters": meta["parameters"]}


class TokenBatches:
    """`collate`, `lengths` and `loss_terms` for examples encoded as token ids; `build` sets `pad_id`."""

    pad_id: int

    def prepare(self, engine) -> None:
        pass

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_id)

    def lengths(self, features: list[dict]) -> list[int]:
        return [len(f["input_ids"]) for f in features]

    def loss_terms(self, features: list[dict]) -> list[int] | None:
        return None  # a mean over examples
