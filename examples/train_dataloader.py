"""Train the `tiny` model from a plain torch DataLoader over a ClipDataset (the route for Lightning,
the HF Trainer or any code that expects a DataLoader).

    python examples/train_dataloader.py shards/            # a packed folder, or 'shards/<000..031>.tar'

The dataset batches (each DataLoader worker delivers whole batches of its own), so the DataLoader
gets batch_size=None; set_epoch(e) before each epoch gives epoch e's shard order, shuffle, crops
and flips in every persistent worker. Prints one line: steps, clips, distinct clips, final loss.
"""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline import ClipDataset, ModelInput
from pipeline.train.models import build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="packed folder or shard pattern, e.g. 'shards/<000..031>.tar'")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    dataset = ClipDataset(args.shards, batch_size=args.batch_size, crop=args.crop, seed=args.seed)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(args.seed)
    model = build_model("tiny", len(dataset.classes)).to(device, memory_format=torch.channels_last_3d)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr)
    to_input = ModelInput(device, channels_last=True)

    steps, clips, seen, loss = 0, 0, set(), torch.tensor(float("nan"))
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            loss = F.cross_entropy(model(to_input(batch["frames"])), batch["label"].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps, clips = steps + 1, clips + len(batch["key"])
            seen.update(batch["key"])
    print(
        f"train_dataloader: epochs={args.epochs} steps={steps} clips={clips} distinct={len(seen)} loss={loss.item():.4f}"
    )


if __name__ == "__main__":
    main()
