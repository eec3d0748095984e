"""A weighted mix of packs: which shards make each epoch, pure index math over the index's counts.

Without `weights` an epoch is every training shard once (`epoch_shards` returns the set's shards
as they are). With weights w_p (normalised) over the packs of a ShardSet, an epoch holds
N = the packs' training clips in all, of which pack p contributes n_p = w_p * N (largest-remainder
rounding). Pack p's clips come from an endless sequence of passes over its shards, pass k in an
order drawn from (seed, p, k); each epoch takes whole shards from where the previous epoch stopped
until it holds at least n_p clips of the pack. So a shard appears once per pass (every clip of a
pack is drawn at most once per pass of that pack), a pack weighted above its own share is passed
through more than once an epoch (a shard may then stand twice in one epoch's list, from two passes),
and where an epoch starts is a pure function of (seed, epoch). Everything downstream (the rank and
worker split, the steps, the schedule, a resume on another topology) works on the epoch's list as
it does on an unweighted set: by position in it, never by URL.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.stream.plan import check_enough_shards
from pipeline.stream.sources import Shard, ShardSet

MIX_STREAM = 0x6D6978
"""Part of the key of a pass's shard order, so that it is drawn from its own random stream."""


def pack_sizes(source: ShardSet) -> tuple[tuple[int, ...], ...]:
    """Per pack, the sample counts of its training shards in the set's order."""
    packs = len(source.pack_indexes)
    return tuple(tuple(max(0, s.samples) for s in source.shards if s.pack == p) for p in range(packs))


def pack_counts(weights: tuple[float, ...], total: int) -> list[int]:
    """Clips of each pack in an epoch of `total`: weights * total (normalised), rounded by largest
    remainder (ties to the earlier pack), summing to `total`."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda p: (-(exact[p] - counts[p]), p))
    for p in by_remainder[: total - sum(counts)]:
        counts[p] += 1
    return counts


def check_mix(source: ShardSet, cfg: StreamConfig, readers: int = 1) -> None:
    """The weights fit the packs: one per pack, each pack with training clips, and (without
    resampling) every epoch's list has at least `readers` shards. UserError in one line otherwise."""
    if cfg.weights is None:
        return
    names = source.pack_indexes
    if len(cfg.weights) != len(names):
        raise UserError(
            f"{len(cfg.weights)} `weights` for {len(names)} packs ({', '.join(map(repr, names))}): "
            "give one weight per pack, in the order the packs are named"
        )
    sizes = pack_sizes(source)
    for name, counts in zip(names, sizes):
        if sum(counts) == 0:
            raise UserError(f"pack {name!r} has no training clips to mix")
    fewest = sum(_fewest(counts, n) for counts, n in zip(sizes, pack_counts(cfg.weights, sum(map(sum, sizes)))))
    if fewest < readers:
        raise UserError(
            f"a weighted epoch may hold only {fewest} training shards, fewer than the {readers} readers "
            "(ranks x workers); pack more shards or use fewer workers or ranks"
        )


def checked_epoch_shards(
    source: ShardSet, cfg: StreamConfig, world_size: int, n_workers: int, epoch: int = 0
) -> tuple[Shard, ...]:
    """epoch_shards(epoch), after the checks every training reader makes before it plans: the
    weights fit the packs (check_mix) and the epoch has shards for world_size x n_workers readers
    (plan.check_enough_shards)."""
    check_mix(source, cfg, world_size * max(1, n_workers))
    shards = epoch_shards(source, cfg, epoch)
    check_enough_shards(shards, cfg, world_size, n_workers)
    return shards


def _fewest(counts: tuple[int, ...], wanted: int) -> int:
    """The fewest shards of `counts` that can hold `wanted` clips (the largest ones)."""
    held, k = 0, 0
    for n in sorted(counts, reverse=True) * (wanted // max(1, sum(counts)) + 1):
        if held >= wanted:
            break
        held, k = held + n, k + 1
    return k


def epoch_shards(source: ShardSet, cfg: StreamConfig, epoch: int) -> tuple[Shard, ...]:
    """The shards epoch `epoch` is planned from: the set's own without weights, else this epoch's
    draw from every pack (see the module), pack after pack. What every planning step calls."""
    if cfg.weights is None:
        return source.shards
    by_pack = [[s for s in source.shards if s.pack == p] for p in range(len(source.pack_indexes))]
    sizes = pack_sizes(source)
    wanted = pack_counts(cfg.weights, sum(map(sum, sizes)))
    drawn: list[Shard] = []
    for p, (shards, n) in enumerate(zip(by_pack, wanted)):
        drawn += [shards[i] for i in epoch_draw(sizes[p], n, cfg.seed, p, epoch)]
    return tuple(drawn)


def pass_order(n_shards: int, seed: int, pack: int, k: int) -> list[int]:
    """Pass `k` over pack `pack`'s shards: their positions in this pass's order."""
    return [int(i) for i in np.random.default_rng([seed, MIX_STREAM, pack, k]).permutation(n_shards)]


_CURSORS: dict[tuple, list[tuple[int, int]]] = {}
"""(counts, wanted, seed, pack) -> the (pass, position) each epoch starts at, as far as computed:
a memo of a pure function (epoch e's start is found by walking the epochs before it)."""


def epoch_draw(counts: tuple[int, ...], wanted: int, seed: int, pack: int, epoch: int) -> list[int]:
    """Positions (in the pack's shard list) of the shards pack `pack` gives epoch `epoch`: whole
    shards from where epoch - 1 stopped, pass after pass, until they hold >= `wanted` clips."""
    key = (counts, wanted, seed, pack)
    starts = _CURSORS.setdefault(key, [(0, 0)])
    while len(starts) <= epoch:
        starts.append(_take(counts, wanted, seed, pack, starts[-1])[1])
    return _take(counts, wanted, seed, pack, starts[epoch])[0]


def _take(
    counts: tuple[int, ...], wanted: int, seed: int, pack: int, start: tuple[int, int]
) -> tuple[list[int], tuple[int, int]]:
    k, i = start
    order, taken, held = pass_order(len(counts), seed, pack, k), [], 0
    while held < wanted:
        taken.append(order[i])
        held += counts[order[i]]
        i += 1
        if i == len(order):
            k, i = k + 1, 0
            order = pass_order(len(counts), seed, pack, k)
    return taken, (k, i)


def share_tolerance(source: ShardSet, cfg: StreamConfig, world_size: int) -> float:
    """How far a pack's realised share of an epoch's (non-repeat) clips may lie from its weight.

    An epoch's list holds n_p + o_p clips of pack p with 0 <= o_p < the pack's largest shard, and
    n_p is within 1 of w_p * N; so |share_p - w_p| < (sum of the packs' largest shards) / N. With
    `epoch_fill="drop"` each rank also leaves at most one batch plus one shard unread, which moves a
    share by at most their sum over N more."""
    sizes = pack_sizes(source)
    total = sum(map(sum, sizes))
    largest = sum(max(c, default=0) for c in sizes)
    dropped = 0 if cfg.epoch_fill == "pad" else world_size * (cfg.batch_size + max(map(max, sizes)))
    return largest / total + dropped / max(1, total - dropped)
