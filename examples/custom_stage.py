"""Append webdataset stages of your own to a ClipDataset: keep some classes, add a derived field,
batch, and iterate through a DataLoader.

    python examples/custom_stage.py shards/ --classes 0 1   # a packed folder, or 'shards/<000..031>.tar'

Stages run inside the DataLoader workers, after the clips are decoded and cropped; they are
module-level functions (not lambdas) so that workers started with `spawn` can unpickle them.
Prints one line: the clips kept, the batches, the labels met and the mean motion.
"""

import argparse
import functools

import torch
from torch.utils.data import DataLoader

from pipeline import ClipDataset


def in_classes(sample: dict, classes: frozenset) -> bool:
    return sample["label"] in classes


def add_motion(sample: dict) -> dict:
    """'motion': mean absolute difference of consecutive frames, a float; frames (T, H, W, 3) uint8."""
    frames = sample["frames"].float()
    return {**sample, "motion": (frames[1:] - frames[:-1]).abs().mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", help="packed folder or shard pattern, e.g. 'shards/<000..031>.tar'")
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1], help="class indices to keep")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args()

    dataset = (
        ClipDataset(
            args.shards, crop=args.crop
        )  # single clips: {'key', 'frames' (T, crop, crop, 3) uint8, 'label' int}
        # keep the chosen classes
        .select(functools.partial(in_classes, classes=frozenset(args.classes)))
        # add a derived field
        .map(add_motion)
        # into batches: frames (B, T, crop, crop, 3), label (B,), motion (B,), key list (the last batch of a worker may be short)
        .batched(args.batch_size)
    )
    dataset.set_epoch(0)
    clips, batches, labels, motion = 0, 0, set(), 0.0
    for batch in DataLoader(dataset, batch_size=None, num_workers=args.workers):
        clips, batches = clips + len(batch["key"]), batches + 1
        labels.update(torch.as_tensor(batch["label"]).tolist())
        motion += float(torch.as_tensor(batch["motion"]).sum())
    print(
        f"custom_stage: clips={clips} batches={batches} labels={sorted(labels)} mean_motion={motion / max(clips, 1):.2f}"
    )


if __name__ == "__main__":
    main()
