"""Evaluation on the test shards: top-1, top-5 and per-class accuracy, each test clip counted once
across ranks (K x C views averaged), and the test clips it could not read, held against --max-bad."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.device import DistEnv, ModelInput
from pipeline.errors import UserError
from pipeline.stream.loader import ClipLoader
from pipeline.stream.sources import ShardSet
from pipeline.train.meter import BadClipBudget


def evaluate(
    model,
    test: ShardSet,
    cfg: TrainConfig,
    env: DistEnv,
    device,
    channels_last: bool,
    autocast,
    classes: tuple[str, ...] | None = None,
    labels: tuple[int, ...] | None = None,
) -> dict:
    """Top-1, top-5 and per-class accuracy on the test shards; each test clip counted once across ranks.

    With K x C test views (--test-views) a clip's softmax scores are averaged over its views
    ('top1', 'top5', 'per_class'); 'single_top1' / 'single_top5' score view 0 alone (the fixed
    frames and the centre crop: the 1x1 figures). A clip's views all come from one worker of one
    rank, so each rank scores whole clips.

    `classes`: the model's (default: the test shards'); `labels`: the model's label of each test
    class when the test shards come from a pack with other classes (data.label_map)."""
    classes = tuple(classes or test.classes)
    num_classes = len(classes)
    k = min(5, num_classes)
    clips: dict[tuple[int, str], list] = {}  # (pack, key) -> [label, summed softmax, view-0 logits]
    packs = list(test.pack_indexes)
    skipped, faults = 0, []
    was_training = model.training
    model_input = ModelInput(device, channels_last)
    model.eval()
    with torch.no_grad():
        loader = ClipLoader.from_config(
            test, cfg.stream, env.rank, env.world_size, split="test", pin_memory=device.type == "cuda", copy=False
        )
        for batch in loader.epoch(0):
            skipped += sum(f["samples"] for f in batch["faults"])
            faults += batch["faults"]
            if batch["frames"] is None:
                continue
            with autocast:
                logits = model(model_input(batch["frames"])).float()
            probs, logits = logits.softmax(dim=1).cpu(), logits.cpu()
            rows = zip(batch["key"], batch["label"].tolist(), batch["view"].tolist(), batch["pack"].tolist())
            for j, (key, label, view, pack) in enumerate(rows):
                label = label if labels is None else labels[label]
                entry = clips.setdefault((pack, key), [label, torch.zeros(num_classes, dtype=torch.float64), None])
                entry[1] += probs[j]
                if view == 0:
                    entry[2] = logits[j]
    model.train(was_training)
    # per pack; rows: clips, top-1 hits, top-5 hits (views averaged), the same for view 0 alone; columns: true class
    by_pack = torch.zeros(len(packs), 5, num_classes, dtype=torch.float64)
    for (pack, _), (label, summed, single) in clips.items():
        by_pack[pack, 0, label] += 1
        for row, scores in ((1, summed), (3, summed if single is None else single)):
            top = scores.topk(k).indices
            by_pack[pack, row, label] += float(top[0] == label)
            by_pack[pack, row + 1, label] += float(bool((top == label).any()))
    by_pack = by_pack.to(device)
    extra = torch.tensor([skipped], dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(by_pack)
        dist.all_reduce(extra)
    counts = by_pack.sum(dim=0)
    total = counts.sum(dim=1).tolist()
    n = int(total[0])
    per_class = {
        name: (counts[1, c].item() / counts[0, c].item() if counts[0, c] > 0 else None)
        for c, name in enumerate(classes)
    }
    views = cfg.stream.test_views
    return {
        "top1": total[1] / n if n else None,
        "top5": total[2] / n if n else None,
        "single_top1": total[3] / n if n else None,
        "single_top5": total[4] / n if n else None,
        "views": f"{views[0]}x{views[1]}",
        "per_class": per_class,
        "clips": n,
        **({"per_pack": _per_pack(by_pack, packs)} if len(packs) > 1 else {}),
        "skipped": int(extra.item()),
        "faults": faults,
    }


def _per_pack(by_pack: torch.Tensor, packs: list[str]) -> dict:
    """A mix's evaluation pack by pack (its index's location): top-1, top-5 and clips."""
    out = {}
    for name, counts in zip(packs, by_pack.sum(dim=2).tolist()):
        n = int(counts[0])
        out[name] = {"top1": counts[1] / n if n else None, "top5": counts[2] / n if n else None, "clips": n}
    return out


def check_eval_faults(
    result: dict,
    faults: list[dict],
    test: ShardSet,
    cfg: TrainConfig,
    bad_clips: BadClipBudget,
    log_dir: Path,
    epoch: int,
    step: int,
    say,
) -> None:
    """Test clips an evaluation could not read: written to the rank's faults log, warned about in one
    line (an accuracy over a subset is not the accuracy), and held against --max-bad as in training.
    `result["skipped"]` is summed over ranks, so every rank decides alike (no rank left waiting)."""
    bad_clips.write(faults, epoch - 1, step, split="test")
    skipped = result["skipped"]
    if not skipped:
        return
    planned = test.samples if all(s.samples >= 0 for s in test.shards) else result["clips"] + skipped
    what = sorted({f["what"] for f in faults if f["samples"]})  # shards, or shard:key for single clips
    named = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "") if what else "on other ranks"
    where = f"{log_dir}/faults-rank*.jsonl"
    limit = cfg.bad_limit(planned)
    if skipped > limit:
        raise UserError(
            f"evaluation after epoch {epoch}: {skipped} of {planned} test clips unreadable ({named}), more than --max-bad "
            f"{cfg.stream.max_bad:g} allows ({limit}); accuracy on the rest would mislead (all in {where})"
        )
    say(
        f"warning: evaluation after epoch {epoch} skipped {skipped} of {planned} test clips ({named}): accuracy is on the other {result['clips']}; named in {where}"
    )


def evaluation_message(epoch: int, result: dict) -> str:
    """The line an evaluation prints: accuracy, over how many views and clips, and every class's (one
    without any test clip left shows, not drops out)."""
    per_class = ", ".join(f"{n} {'n/a' if a is None else f'{a:.0%}'}" for n, a in result["per_class"].items())
    views = (
        ""
        if result["views"] == "1x1"
        else (
            f" over {result['views']} views (one view: top-1 {result['single_top1']:.1%}, top-5 {result['single_top5']:.1%})"
        )
    )
    return (
        f"epoch {epoch}: test top-1 {result['top1']:.1%}, top-5 {result['top5']:.1%}{views} "
        f"on {result['clips']} clips; per class: {per_class}"
    )
