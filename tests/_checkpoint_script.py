"""A Lightning run on CPU that crashes mid-epoch and is resumed, driven by `test_checkpoints.py`.

Usage: python tests/_checkpoint_script.py crash|resume-and-uninterrupted OUT_DIR

`crash` trains with a checkpoint after every step and ends the process abruptly (`os._exit`) at
the start of step `CRASH_AFTER_STEPS`, in the middle of the second epoch. The next mode resumes
from the last checkpoint, then trains the same module once more without interruption, and
writes what both computed to `OUT_DIR/results.json`. Two metrics that are never reset, a
`Perplexity` and a `TorchmetricsPerplexity`, accumulate over both epochs, so a batch lost or
counted twice on resume changes their values.

The training data loader is resumable (`state_dict` / `load_state_dict`, as Lightning asks of a
loader for a mid-epoch resume): it skips the batches of the epoch that the checkpoint had seen.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from ppl.stateful import Perplexity, TorchmetricsPerplexity

EPOCHS = 2
BATCHES_PER_EPOCH = 6
BATCH_SIZE = 4
VOCAB = 5
# The crash comes before the 10th step: 3 batches into the second epoch.
CRASH_AFTER_STEPS = BATCHES_PER_EPOCH + 3
CRASH_EXIT_CODE = 23


def make_data() -> np.ndarray:
    """The float32 logits of one epoch, `[BATCHES_PER_EPOCH * BATCH_SIZE, VOCAB]`."""
    rng = np.random.default_rng(66)
    return (2.0 * rng.standard_normal((BATCHES_PER_EPOCH * BATCH_SIZE, VOCAB))).astype(np.float32)


class ResumableLoader(DataLoader):
    """A `DataLoader` that remembers how many batches of the epoch it served, and can skip them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = skip
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["served"])


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.plain = Perplexity()
        self.dropin = TorchmetricsPerplexity()
        # torchmetrics keeps metric states out of checkpoints unless they are made persistent.
        self.dropin.persistent(True)
        self.batches_seen: list[list[int]] = []
        self.epoch_values: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        indices, logits = batch
        self.batches_seen.append([self.current_epoch, int(indices[0]) // BATCH_SIZE])
        # Each epoch sees other distributions, so that an epoch's batch counted twice shows.
        scaled = logits * (1 + self.current_epoch)
        self.plain.update(logits=scaled)
        self.dropin.update(logits=scaled)
        return (self.weight - 1.0) ** 2

    def on_train_epoch_end(self) -> None:
        self.epoch_values.append(float(self.plain.compute()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Crash(Callback):
    """Ends the process, as a kill or a node failure would, before step `CRASH_AFTER_STEPS`."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == CRASH_AFTER_STEPS:
            sys.stdout.flush()
            os._exit(CRASH_EXIT_CODE)


def trainer(out_dir: Path, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        callbacks=callbacks,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=False,
        use_distributed_sampler=False,
        default_root_dir=str(out_dir),
    )


def loader() -> ResumableLoader:
    data = torch.from_numpy(make_data())
    indices = torch.arange(len(data))
    return ResumableLoader(TensorDataset(indices, data), batch_size=BATCH_SIZE)


def summary(module: Module) -> dict[str, Any]:
    return {
        "batches_seen": module.batches_seen,
        "epoch_values": module.epoch_values,
        "final": {"plain": float(module.plain.compute()), "dropin": float(module.dropin.compute())},
        "count": {
            "plain": int(module.plain.num_distributions),
            "dropin": int(module.dropin.num_distributions),
        },
    }


def main() -> None:
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    checkpoints = out_dir / "checkpoints"
    if mode == "crash":
        every_step = ModelCheckpoint(
            dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=-1
        )
        trainer(out_dir, [every_step, Crash()]).fit(Module(), loader())
        raise SystemExit("the crash did not happen")

    last = checkpoints / f"step={CRASH_AFTER_STEPS}.ckpt"
    saved = torch.load(last, weights_only=False)
    resumed = Module()
    trainer(out_dir, []).fit(resumed, loader(), ckpt_path=last)
    uninterrupted = Module()
    trainer(out_dir, []).fit(uninterrupted, loader())
    results = {
        "checkpoint": {
            "epoch": saved["epoch"],
            "batch_in_epoch": saved["global_step"] - saved["epoch"] * BATCHES_PER_EPOCH,
        },
        "resumed": summary(resumed),
        "uninterrupted": summary(uninterrupted),
    }
    (out_dir / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
