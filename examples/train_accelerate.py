"""Train the `tiny` model with Hugging Face accelerate, from a ClipLoader or a DataLoader over a
ClipDataset, in one process or several (`accelerate launch` or `torchrun`).

    python examples/train_accelerate.py shards/                                    # one process
    torchrun --nproc-per-node 2 examples/train_accelerate.py shards/ --route dataloader
    accelerate launch --num_processes 2 examples/train_accelerate.py shards/

Both loaders already give each rank its own disjoint share of every epoch, so accelerate must not
split them again. `accelerator.prepare(model, optimizer, loader)` returns a ClipLoader as it is
(it is not a torch DataLoader); a DataLoader over a ClipDataset is prepared only in a single
process: with several, accelerate would either read the batches on rank 0 and slice them out to
the others (`dispatch_batches`, its default for iterable datasets: rank 0 then reads only its own
half of the clips) or keep every n-th batch of each rank (`IterableDatasetShard`), so it is left
unprepared there, and `ModelInput` moves its batches to `accelerator.device`. Prints one line per
run (rank 0): route, processes, steps, the clips each epoch used in all, the distinct ones.
"""

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from pipeline import ClipDataset, ClipLoader, ModelInput
from pipeline.train.models import build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="packed folder or shard pattern, e.g. 'shards/<000..031>.tar'")
    parser.add_argument(
        "--route",
        choices=("cliploader", "dataloader"),
        default="cliploader",
        help="cliploader: a ClipLoader through prepare(); dataloader: a DataLoader over a ClipDataset",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    common = dict(batch_size=args.batch_size, crop=args.crop, seed=args.seed)
    if args.route == "cliploader":
        loader = ClipLoader(args.shards, workers=args.workers, **common)
        classes = loader.classes
    else:
        dataset = ClipDataset(args.shards, num_workers=args.workers, **common)
        loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)
        classes = dataset.classes
    torch.manual_seed(args.seed)
    model = build_model("tiny", len(classes)).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.route == "cliploader" or accelerator.num_processes == 1:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    else:  # see the docstring: the ranks' shares must not be split again
        model, optimizer = accelerator.prepare(model, optimizer)
    to_input = ModelInput(accelerator.device, channels_last=True)

    steps, used = 0, []
    for epoch in range(args.epochs):
        keys = []
        for batch in loader:
            loss = F.cross_entropy(model(to_input(batch["frames"])), batch["label"].to(accelerator.device))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            steps += 1
            keys += batch["key"]
        used.append(keys)
    # every rank's keys, to count each epoch's clips over the whole job
    everyone = [None] * accelerator.num_processes
    if accelerator.num_processes > 1:
        torch.distributed.all_gather_object(everyone, used)
    else:
        everyone = [used]
    if accelerator.is_main_process:
        per_epoch = [sum(len(ranks[e]) for ranks in everyone) for e in range(args.epochs)]
        distinct = [len({k for ranks in everyone for k in ranks[e]}) for e in range(args.epochs)]
        print(
            f"train_accelerate: route={args.route} processes={accelerator.num_processes} steps={steps} "
            f"clips={per_epoch} distinct={distinct} loss={loss.item():.4f}",
            flush=True,
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
