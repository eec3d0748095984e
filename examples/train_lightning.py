"""Train the `tiny` model with Lightning's Trainer, from a ClipLoader or from torchdata's
StatefulDataLoader over a ClipDataset; both resume exactly mid-epoch from Lightning's checkpoint.

    python examples/train_lightning.py shards/ --route cliploader         # or --route stateful
    python examples/train_lightning.py shards/ --devices 2                # DDP, 2 processes (gloo on CPU)
    python examples/train_lightning.py shards/ --resume runs/last.ckpt    # carries on mid-epoch

The loaders are made in `train_dataloader()` / `val_dataloader()` (they read their rank when they
start, so making them earlier, in a DataModule's __init__, is fine too). Lightning saves the train
loader's `state_dict()` in its checkpoints and restores it on `fit(ckpt_path=...)`; both loaders
have a `len()` (batches per rank, from the index), which gives Lightning its totals and keeps it
from fetching a batch ahead. `--stop-at-step N` saves a checkpoint after step N and kills the process
there (SIGKILL, as a preemption would), for the tests. `--record DIR` writes the keys each rank
trained and validated on. Prints one line: route, steps, epochs, final loss.
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from pipeline import ClipDataset, ClipLoader, ModelInput
from pipeline.train.models import build_model


class ClipClassifier(L.LightningModule):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = None
        self.to_input = None
        self.val_keys: list[str] = []
        # --early: made here, before Lightning starts the process group (as in a DataModule's
        # __init__); they read their rank when iteration starts, so this is as right as later
        self.early = {split: self._loader(split) for split in ("train", "test")} if args.early else {}

    def _loader(self, split: str):
        a = self.args
        common = dict(split=split, batch_size=a.batch_size, crop=a.crop, seed=a.seed)
        if a.route == "cliploader":
            return ClipLoader(a.shards, workers=a.workers, **common)
        from torchdata.stateful_dataloader import StatefulDataLoader

        # the dataset batches; it is told the DataLoader's num_workers, for len()
        dataset = ClipDataset(a.shards, num_workers=a.workers, **common)
        return StatefulDataLoader(dataset, batch_size=None, num_workers=a.workers)

    def train_dataloader(self):
        return self.early["train"] if self.early else self._loader("train")

    def val_dataloader(self):
        return self.early["test"] if self.early else self._loader("test")

    def configure_model(self):
        if self.model is None:
            torch.manual_seed(self.args.seed)
            self.model = build_model("tiny", self.args.classes).to(memory_format=torch.channels_last_3d)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.args.lr)

    def forward(self, frames):
        if self.to_input is None:
            self.to_input = ModelInput(self.device, channels_last=True)
        return self.model(self.to_input(frames))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["frames"]), batch["label"])
        self._record("train", {"step": self.global_step, "epoch": self.current_epoch, "keys": list(batch["key"])})
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        if batch["frames"] is not None:
            self.val_keys += list(batch["key"])

    def on_validation_epoch_end(self):
        self._record("val", {"epoch": self.current_epoch, "keys": self.val_keys})
        self.val_keys = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.args.stop_at_step and self.global_step == self.args.stop_at_step:
            self.trainer.save_checkpoint(self.args.checkpoint)  # every rank takes part; rank 0 writes
            os.kill(os.getpid(), signal.SIGKILL)

    def _record(self, kind: str, entry: dict) -> None:
        if self.args.record:
            path = Path(self.args.record) / f"{kind}-rank{self.global_rank}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="packed folder or shard pattern, e.g. 'shards/<000..031>.tar'")
    parser.add_argument(
        "--route",
        choices=("cliploader", "stateful"),
        default="cliploader",
        help="cliploader: a ClipLoader; stateful: torchdata's StatefulDataLoader over a ClipDataset",
    )
    parser.add_argument("--devices", type=int, default=1, help="processes; more than 1 runs DDP")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="runs/lightning.ckpt", help="where --stop-at-step saves")
    parser.add_argument("--stop-at-step", type=int, default=0, help="save a checkpoint after this step, then die")
    parser.add_argument("--resume", default=None, help="a Lightning checkpoint to carry on from")
    parser.add_argument("--record", default=None, help="folder for the keys each rank used (JSON lines)")
    parser.add_argument("--early", action="store_true", help="make the loaders before the process group exists")
    args = parser.parse_args()
    args.classes = len(ClipLoader(args.shards, crop=args.crop).classes)
    if args.record:
        Path(args.record).mkdir(parents=True, exist_ok=True)

    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )
    module = ClipClassifier(args)
    trainer.fit(module, ckpt_path=args.resume)
    # No loader is closed here on purpose: the process still exits by itself.
    if trainer.is_global_zero:
        loss = trainer.callback_metrics.get("loss", torch.tensor(float("nan")))
        print(
            f"train_lightning: route={args.route} devices={args.devices} steps={trainer.global_step} "
            f"epochs={trainer.current_epoch} loss={float(loss):.4f} fit_returned={time.time():.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
