"""Train the `tiny` model with ClipLoader, your own loop, and an exact mid-epoch resume on the way.

    python examples/train_cliploader.py shards/            # a packed folder, or 'shards/<000..031>.tar'

Halfway through the first epoch it saves what a checkpoint holds (loader position, model and
optimiser), stops the loader's workers, rebuilds everything from the checkpoint and carries on: the
epoch still uses every planned clip exactly once. Prints one line: steps, clips, distinct clips of
epoch 0, final loss.
"""

import argparse
import io

import torch
import torch.nn.functional as F

from pipeline import ClipLoader, ModelInput
from pipeline.train.models import build_model


def start(args, checkpoint=None):
    """Loader, model and optimiser: fresh, or exactly where `checkpoint` left them."""
    loader = ClipLoader(args.shards, batch_size=args.batch_size, crop=args.crop, seed=args.seed, workers=args.workers)
    torch.manual_seed(args.seed)
    model = build_model("tiny", len(loader.classes)).to(DEVICE, memory_format=torch.channels_last_3d)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if checkpoint is not None:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        loader.load_state_dict(state["loader"])
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
    return loader, model, optimiser


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="packed folder or shard pattern, e.g. 'shards/<000..031>.tar'")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: one per core, at most 8)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    loader, model, optimiser = start(args)
    to_input = ModelInput(DEVICE, channels_last=True)
    interrupt_at = len(loader) // 2  # a step in the middle of epoch 0
    steps, clips, seen_in_epoch0, loss = 0, 0, set(), torch.tensor(float("nan"))
    # The loader knows where it is: after a restore, epoch() carries on mid-epoch.
    while (epoch := loader.state_dict()["epoch"]) < args.epochs:
        for batch in loader.epoch(epoch):
            loss = F.cross_entropy(model(to_input(batch["frames"])), batch["label"].to(DEVICE))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            steps, clips = steps + 1, clips + len(batch["key"])
            if epoch == 0:
                seen_in_epoch0.update(batch["key"])
            if steps == interrupt_at:  # simulate a crash: save, throw everything away, restore
                buffer = io.BytesIO()
                torch.save(
                    {"loader": loader.state_dict(), "model": model.state_dict(), "optimiser": optimiser.state_dict()},
                    buffer,
                )
                loader.close()
                loader, model, optimiser = start(args, buffer.getvalue())
                break
    loader.close()
    print(
        f"train_cliploader: epochs={args.epochs} steps={steps} clips={clips} epoch0_distinct={len(seen_in_epoch0)} resumed_at_step={interrupt_at} loss={loss.item():.4f}"
    )


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if __name__ == "__main__":
    main()
