"""Train the `tiny` model from torchdata's StatefulDataLoader over a ClipDataset, your own loop, with
an exact mid-epoch resume on the way.

    python examples/train_stateful.py shards/            # a packed folder, or 'shards/<000..031>.tar'

The dataset follows torchdata's `Stateful` protocol in each DataLoader worker, so the loader's
`state_dict()` says where every worker is; after a restore the workers skip the clips already
used before decoding them (no "fast-forwarding"). No `set_epoch`: each pass is the next epoch.
Halfway through epoch 1 it saves what a checkpoint holds (loader, model, optimiser), throws it
all away, rebuilds it from the checkpoint and carries on. Prints one line: steps, clips, distinct
clips per epoch, the step it resumed at, final loss.
"""

import argparse
import io

import torch
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

from pipeline import ClipDataset, ModelInput
from pipeline.train.models import build_model


def start(args, checkpoint=None):
    """Loader, model and optimiser: fresh, or exactly where `checkpoint` left them."""
    common = dict(batch_size=args.batch_size, crop=args.crop, seed=args.seed)
    dataset = ClipDataset(args.shards, num_workers=args.workers, **common)
    loader = StatefulDataLoader(dataset, batch_size=None, num_workers=args.workers)
    torch.manual_seed(args.seed)
    model = build_model("tiny", len(dataset.classes)).to(DEVICE, memory_format=torch.channels_last_3d)
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
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    loader, model, optimiser = start(args)
    to_input = ModelInput(DEVICE, channels_last=True)
    per_epoch = len(loader)  # batches per epoch on this rank, from the index
    interrupt_at = per_epoch + per_epoch // 2  # a step in the middle of epoch 1
    steps, clips, seen, loss = 0, 0, [set() for _ in range(args.epochs)], torch.tensor(float("nan"))
    while steps < args.epochs * per_epoch:
        for batch in loader:  # after a restore: the rest of the interrupted epoch
            loss = F.cross_entropy(model(to_input(batch["frames"])), batch["label"].to(DEVICE))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            seen[steps // per_epoch].update(batch["key"])
            steps, clips = steps + 1, clips + len(batch["key"])
            if steps == interrupt_at:  # simulate a crash: save, throw everything away, restore
                buffer = io.BytesIO()
                torch.save(
                    {"loader": loader.state_dict(), "model": model.state_dict(), "optimiser": optimiser.state_dict()},
                    buffer,
                )
                loader, model, optimiser = start(args, buffer.getvalue())
                break
    distinct = [len(s) for s in seen]
    print(
        f"train_stateful: epochs={args.epochs} steps={steps} clips={clips} distinct={distinct} "
        f"resumed_at_step={interrupt_at} loss={loss.item():.4f}"
    )


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if __name__ == "__main__":
    main()
