"""An interrupted epoch continued on another topology: pure index math over the index's counts.

An epoch is run in segments, each on one topology (ranks, workers per rank, batch size per rank):
segment 0 follows the normal plan (plan.train_plan); a resume on another topology starts a new
segment. Which clips a segment has used is known from the plan alone: a worker's stream is its
shards' samples in plan order, through the seeded shuffle buffer, cut to its quota, and the step
schedule says how many of them it delivered by a given step (`worker_parts`). So the samples used
are computed as positions (shard index, sample number in the shard), by running the real `shuffle`
over positions instead of samples: it draws the same random numbers for either.

The rest of the epoch (every position not yet used) is laid out in a canonical order (the epoch's
shard order, then sample number), cut into near-equal contiguous runs, one per rank, then one per
worker of the rank; every rank runs ceil(largest run / batch size) steps and the shorter ones are
topped up with marked repeats (the `pad` rule), so every clip of the epoch is used exactly once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pipeline.config import StreamConfig
from pipeline.stream.plan import epoch_permutation, padded_quotas, rank_shards, step_schedule, train_plan, worker_parts
from pipeline.stream.sources import Shard
from pipeline.stream.stages import shuffle

TOPOLOGY_KEYS = ("world_size", "workers", "batch_size")
"""What may differ between the run that wrote a mid-epoch state and the one resuming it."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """A part of one epoch run on one topology."""

    world_size: int
    workers: int
    """Loader workers per rank."""
    batch_size: int
    """Clips per step on each rank."""
    steps: int
    """Steps every rank ran in this segment."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Segment:
        try:
            seg = cls(*(int(d[k]) for k in (*TOPOLOGY_KEYS, "steps")))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not an epoch segment: {d!r:.200}") from None
        if min(seg.world_size, seg.workers, seg.batch_size) < 1 or seg.steps < 0:
            raise ValueError(f"not an epoch segment: {d!r:.200}")
        return seg


@dataclasses.dataclass(frozen=True)
class Part:
    """What one worker of one rank delivers in a segment after the first."""

    shards: tuple[int, ...]
    """Indices of the shards it reads, in reading order."""
    keep: tuple[tuple[int, ...], ...]
    """Per shard, the sample numbers it delivers (ascending); the others were used before."""
    quota: int
    """Samples it delivers: the kept ones, then repeats of them (pad)."""
    repeat_only: bool = False
    """Its one kept clip is a repeat (fewer clips were left than ranks)."""

    @property
    def held(self) -> int:
        return sum(len(k) for k in self.keep)


def shuffle_rng(seed: int, epoch: int, rank: int, worker: int, segment: int) -> np.random.Generator:
    """The shuffle buffer's generator of one worker in one segment (segment 0: the normal plan's)."""
    key = [seed, epoch, rank, worker, 1] if segment == 0 else [seed, epoch, rank, worker, 1, segment]
    return np.random.default_rng(key)


def delivered(items: list[tuple[int, int]], quota: int, cfg: StreamConfig, rng: np.random.Generator) -> list:
    """The order in which a worker delivers `items` (in reading order): the shuffle buffer's, cut
    to `quota` (repeats beyond the items are not listed)."""
    return list(shuffle(items, cfg.shuffle_buffer, rng))[:quota]


def _first_parts(counts: list[int], cfg: StreamConfig, epoch: int, rank: int, seg: Segment) -> list[Part]:
    """Segment 0 of `rank` (the normal plan), as Parts over shard indices."""
    plan_cfg = dataclasses.replace(cfg, batch_size=seg.batch_size, resample=False)
    shards = tuple(Shard(str(i), n) for i, n in enumerate(counts))
    plans = train_plan(shards, plan_cfg, epoch, rank, seg.world_size, seg.workers)
    mine = rank_shards(len(counts), cfg.seed, epoch, rank, seg.world_size)
    parts = []
    for w, p in enumerate(plans):
        idx = tuple(mine[w :: seg.workers])
        parts.append(Part(idx, tuple(tuple(range(counts[i])) for i in idx), p.quota))
    return parts


def remainder_parts(
    counts: list[int], left: set[tuple[int, int]], seed: int, epoch: int, world_size: int, workers: int, batch_size: int
) -> list[list[Part]]:
    """Every rank's Parts for the positions `left` of `epoch` on a new topology (see the module)."""
    order = epoch_permutation(len(counts), seed, epoch)
    items = [(i, p) for i in order for p in range(counts[i]) if (i, p) in left]
    n = len(items)
    per_rank = []
    for r in range(world_size):
        run, repeat = items[r * n // world_size : (r + 1) * n // world_size], False
        if not run and items:
            run, repeat = [items[r % n]], True
        per_rank.append((run, repeat))
    steps = math.ceil(max((len(run) for run, _ in per_rank), default=0) / batch_size)
    result = []
    for run, repeat in per_rank:
        chunks = [run[w * len(run) // workers : (w + 1) * len(run) // workers] for w in range(workers)]
        quotas = padded_quotas([len(c) for c in chunks], steps * batch_size) if run else [0] * workers
        result.append([_part(chunk, q, repeat) for chunk, q in zip(chunks, quotas)])
    return result


def _part(chunk: list[tuple[int, int]], quota: int, repeat_only: bool) -> Part:
    shards: list[int] = []
    keep: list[list[int]] = []
    for i, p in chunk:
        if not shards or shards[-1] != i:
            shards.append(i)
            keep.append([])
        keep[-1].append(p)
    return Part(tuple(shards), tuple(map(tuple, keep)), quota, repeat_only)


def segment_parts(
    counts: list[int], cfg: StreamConfig, epoch: int, history: tuple[Segment, ...], seg: Segment
) -> list[list[Part]]:
    """Every rank's Parts in the segment after `history` on topology `seg` (its `steps` unused)."""
    if not history:
        return [_first_parts(counts, cfg, epoch, r, seg) for r in range(seg.world_size)]
    left = unused(counts, cfg, epoch, history)
    return remainder_parts(counts, left, cfg.seed, epoch, seg.world_size, seg.workers, seg.batch_size)


def unused(counts: list[int], cfg: StreamConfig, epoch: int, history: tuple[Segment, ...]) -> set[tuple[int, int]]:
    """Positions (shard index, sample number) of `epoch` that the segments of `history` did not use."""
    left = {(i, p) for i, n in enumerate(counts) for p in range(n)}
    for k, seg in enumerate(history):
        ranks = (
            [_first_parts(counts, cfg, epoch, r, seg) for r in range(seg.world_size)]
            if k == 0
            else remainder_parts(counts, left, cfg.seed, epoch, seg.world_size, seg.workers, seg.batch_size)
        )
        for r, parts in enumerate(ranks):
            schedule = step_schedule([p.quota for p in parts], seg.batch_size)
            if seg.steps > len(schedule):
                raise ValueError(f"segment {k} of epoch {epoch} ran {seg.steps} steps; its plan has {len(schedule)}")
            for w, part in enumerate(parts):
                if part.repeat_only:
                    continue
                done = worker_parts(schedule, w, seg.steps)[0]
                items = [(i, p) for i, keep in zip(part.shards, part.keep) for p in keep]
                left.difference_update(delivered(items, done, cfg, shuffle_rng(cfg.seed, epoch, r, w, k)))
    return left


def clips_used(history: tuple[Segment, ...]) -> int:
    """Clips delivered in the epoch so far over all ranks (repeats included)."""
    return sum(s.world_size * s.batch_size * s.steps for s in history)


def audit_lines_kept(history: tuple[Segment, ...], rank: int) -> int:
    """Lines of rank `rank`'s audit file of the epoch that the segments of `history` wrote."""
    return sum(s.batch_size * s.steps for s in history if rank < s.world_size)
