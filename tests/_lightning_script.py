"""A standalone Lightning run on 2 CPU processes (DDP), driven by `test_lightning.py`.

Lightning's DDP launcher runs this file again for rank 1, so it must stay a script. It fits three
times in one launch, to pay the start-up once: run A trains 2 epochs; run B trains 1 epoch and
saves a checkpoint; run C resumes B's checkpoint for the second epoch. Each rank writes what it
computed to `<out>/rank<R>.json`; the test compares that with the float64 reference.

Usage: python tests/_lightning_script.py DATA.npz OUT_DIR
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ppl.stateful import Perplexity, TorchmetricsPerplexity

BATCH_SIZE = 4


class PerplexityModule(L.LightningModule):
    """Logits come straight from the data; one scalar parameter gives the optimiser work."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.val_plain = Perplexity()
        self.val_dropin = TorchmetricsPerplexity()
        # Never reset: accumulates over every epoch, so a resume must restore it exactly.
        self.train_running = Perplexity()
        self.records: list[dict] = []

    def training_step(self, batch, batch_idx):
        (logits,) = batch
        # Each epoch sees other distributions, so an epoch lost or counted twice shows.
        self.train_running.update(logits=logits * (1 + self.current_epoch))
        return (self.weight - 1.0) ** 2

    def on_train_epoch_end(self):
        value = self.train_running.compute()
        self.records.append(
            {"name": "train_running", "epoch": self.current_epoch, "value": float(value)}
        )

    def validation_step(self, batch, batch_idx):
        (logits,) = batch
        self.val_plain.update(logits=logits)
        self.val_dropin(logits=logits)
        self.log("val_ppl_dropin", self.val_dropin, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self):
        value = self.val_plain.compute()
        self.log("val_ppl_plain", value)
        self.val_plain.reset()
        self.records.append(
            {"name": "val_plain", "epoch": self.current_epoch, "value": float(value)}
        )

    def on_save_checkpoint(self, checkpoint):
        # Every rank runs this hook but Lightning writes rank 0's checkpoint only: store the
        # state of the whole group there (one all_reduce).
        with self.train_running.sync_context():
            checkpoint["state_dict"].update(self.train_running.state_dict(prefix="train_running."))

    def on_load_checkpoint(self, checkpoint):
        # Every rank reads that file; only rank 0 keeps the group's state, so that each
        # distribution is counted once when the ranks are summed again.
        if self.global_rank != 0:
            checkpoint["state_dict"].update(Perplexity().state_dict(prefix="train_running."))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(max_epochs: int, root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=max_epochs,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(root),
    )


def loader(values: np.ndarray) -> DataLoader:
    return DataLoader(TensorDataset(torch.from_numpy(values)), batch_size=BATCH_SIZE)


def main() -> None:
    data_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    data = np.load(data_path)
    train, val = loader(data["train"]), loader(data["val"])
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results: dict = {}

    module_a = PerplexityModule()
    trainer_a = trainer(2, out_dir)
    trainer_a.fit(module_a, train, val)
    metrics = trainer_a.callback_metrics
    results["a"] = {
        "records": module_a.records,
        "callback": {k: float(metrics[k]) for k in ("val_ppl_plain", "val_ppl_dropin")},
        "callback_dtypes": {k: str(metrics[k].dtype) for k in ("val_ppl_plain", "val_ppl_dropin")},
    }

    checkpoint = out_dir / "after-epoch-0.ckpt"
    module_b = PerplexityModule()
    trainer_b = trainer(1, out_dir)
    trainer_b.fit(module_b, train, val)
    trainer_b.save_checkpoint(checkpoint)
    results["b"] = {"records": module_b.records}

    module_c = PerplexityModule()
    trainer_c = trainer(2, out_dir)
    trainer_c.fit(module_c, train, val, ckpt_path=checkpoint)
    results["c"] = {
        "records": module_c.records,
        "local_count": int(module_c.train_running.num_distributions),
    }

    rank = trainer_c.global_rank
    results["world_size"] = trainer_c.world_size
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
