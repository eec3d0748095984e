"""The per-epoch plan: pure index math, the same on every rank and worker.

Per epoch the shards are shuffled with (seed, epoch), dealt to ranks (every world_size-th), then to a
rank's workers (every n_workers-th). How many steps a rank runs comes from the index alone (see
`steps_per_epoch`), so every rank runs the same number of steps and collectives never wait for a
rank whose stream ran dry. `step_schedule` says which worker's clips make each step: a pure function
of the quotas, which is what makes a mid-epoch resume exact by construction.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.stream.sources import Shard


def auto_workers(n_shards: int, world_size: int, cores_per_rank: int, resample: bool) -> int:
    """Loader workers per rank when not given: a core each, one core left for the trainer, at most 8,
    and (without resampling) no more than each rank has shards."""
    workers = min(8, max(1, cores_per_rank - 1))
    return workers if resample else max(1, min(workers, n_shards // world_size))


def check_enough_shards(shards: tuple[Shard, ...], cfg: StreamConfig, world_size: int, n_workers: int) -> None:
    """Every (rank, worker) must read at least one shard each epoch, unless shards are resampled."""
    readers = world_size * max(1, n_workers)
    if not cfg.resample and len(shards) < readers:
        raise UserError(
            f"{len(shards)} training shards for {world_size} ranks x {max(1, n_workers)} workers = {readers} readers; "
            "pack more shards, use fewer workers or ranks, or set `resample`"
        )
    samples = sum(s.samples for s in shards)
    if samples < world_size * cfg.batch_size:
        raise UserError(
            f"{samples} training clips do not fill one batch of {cfg.batch_size} on each of {world_size} ranks"
        )


def epoch_permutation(n_shards: int, seed: int, epoch: int) -> list[int]:
    """This epoch's shard order; the same on every rank."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def rank_shards(n_shards: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards rank `rank` reads in `epoch`: every world_size-th of the shuffled order."""
    return epoch_permutation(n_shards, seed, epoch)[rank::world_size]


def steps_per_epoch(
    counts: list[int],
    batch_size: int,
    world_size: int,
    seed: int,
    epoch: int,
    resample: bool,
    separate_workers: int = 0,
    pad: bool = False,
) -> int:
    """Batches every rank runs in `epoch`.

    Without resampling (`drop`): the smallest rank's floor(samples / batch_size), where a rank's
    samples are those of the shards it reads this epoch. Ranks with more samples leave their surplus
    unread (at most one batch's worth plus the difference of one shard); when the shards split
    evenly and the batch size divides a rank's share, every clip is used exactly once.
    `pad`: the largest rank's ceil(samples / batch_size): every rank reads all its clips, and the
    ranks with fewer top their last batches up with repeats of this epoch's clips.
    `separate_workers` = W > 0: each of a rank's W workers delivers whole batches of its own (under a
    torch DataLoader, which cannot merge the workers' remainders into shared batches): the sum of
    `worker_batches`.
    With resampling: floor(total / (world_size * batch_size)).
    """
    if resample:
        return sum(counts) // (world_size * batch_size)
    if separate_workers:
        return sum(worker_batches(counts, batch_size, world_size, seed, epoch, separate_workers, pad))
    batches = (lambda n: math.ceil(n / batch_size)) if pad else (lambda n: n // batch_size)
    per_rank = [
        batches(sum(counts[i] for i in rank_shards(len(counts), seed, epoch, r, world_size))) for r in range(world_size)
    ]
    return max(per_rank) if pad else min(per_rank)


def worker_batches(
    counts: list[int], batch_size: int, world_size: int, seed: int, epoch: int, n_workers: int, pad: bool
) -> list[int]:
    """Whole batches each of a rank's `n_workers` DataLoader workers delivers in `epoch`: for worker w
    the same number on every rank, the largest rank's ceil(samples of its worker w / batch_size) with
    `pad` (the others top up with repeats), else the smallest rank's floor. The same on every rank
    because a DataLoader takes its workers' batches in turn: equal counts make the n-th batch of a
    step come from the same worker everywhere, so one rank's loader state (all Lightning saves)
    holds every rank's position."""
    batches = (lambda n: math.ceil(n / batch_size)) if pad else (lambda n: n // batch_size)
    held = []
    for r in range(world_size):
        mine = [counts[i] for i in rank_shards(len(counts), seed, epoch, r, world_size)]
        held.append([batches(sum(mine[w::n_workers])) for w in range(n_workers)])
    pick = max if pad else min
    return [pick(h[w] for h in held) for w in range(n_workers)]


def worker_quotas(worker_samples: list[int], total: int) -> list[int]:
    """How many samples each worker of a rank delivers so that together they deliver `total`.

    Each worker is capped at what it has; the surplus is taken one sample at a time from the worker
    with the most left (lowest index on ties), so the workers stay balanced.
    """
    if total > sum(worker_samples):
        raise ValueError(f"workers hold {sum(worker_samples)} samples, {total} needed")
    quotas = list(worker_samples)
    surplus = sum(quotas) - total
    while surplus > 0:
        top = max(range(len(quotas)), key=lambda w: (quotas[w], -w))
        # Take as much as keeps `top` at or above the runner-up in one go.
        runner_up = max((q for w, q in enumerate(quotas) if w != top), default=0)
        take = max(1, min(surplus, quotas[top] - runner_up))
        quotas[top] -= take
        surplus -= take
    return quotas


def padded_quotas(worker_samples: list[int], total: int) -> list[int]:
    """`pad`: every worker delivers all it holds, and the `total - sum` extra (repeats) go one at a
    time to the worker with the fewest so far (lowest index on ties) among those holding any."""
    if total < sum(worker_samples):
        raise ValueError(f"workers hold {sum(worker_samples)} samples, only {total} wanted")
    quotas = list(worker_samples)
    able = [w for w, n in enumerate(worker_samples) if n > 0] or list(range(len(quotas)))
    for _ in range(total - sum(quotas)):
        quotas[min(able, key=lambda w: (quotas[w], w))] += 1
    return quotas


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank reads in one epoch."""

    shards: tuple[Shard, ...]
    """In reading order (resampling: the pool drawn from)."""
    quota: int
    """Samples it delivers (surplus dropped, shortfall from bad shards filled with repeats)."""


def train_plan(
    shards: tuple[Shard, ...],
    cfg: StreamConfig,
    epoch: int,
    rank: int,
    world_size: int,
    n_workers: int,
    separate: bool = False,
) -> list[WorkerPlan]:
    """One WorkerPlan per worker of `rank` in `epoch` (n_workers >= 1). `separate`: every worker's
    quota is whole batches (see steps_per_epoch's `separate_workers`)."""
    counts = [s.samples for s in shards]
    batch, pad = cfg.batch_size, cfg.epoch_fill == "pad"
    steps = steps_per_epoch(counts, batch, world_size, cfg.seed, epoch, cfg.resample, n_workers if separate else 0, pad)
    if cfg.resample:
        unit, total = (batch, steps) if separate else (1, steps * batch)
        return [WorkerPlan(shards, unit * (total // n_workers + (w < total % n_workers))) for w in range(n_workers)]
    mine = [shards[i] for i in rank_shards(len(counts), cfg.seed, epoch, rank, world_size)]
    per_worker = [tuple(mine[w::n_workers]) for w in range(n_workers)]
    if separate:
        quotas = [batch * q for q in worker_batches(counts, batch, world_size, cfg.seed, epoch, n_workers, pad)]
    else:
        held = [sum(s.samples for s in ws) for ws in per_worker]
        quotas = (padded_quotas if pad else worker_quotas)(held, steps * batch)
    return [WorkerPlan(per_worker[w], quotas[w]) for w in range(n_workers)]


def step_schedule(quotas: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Which worker's clips make each step of an epoch: a list of steps, each a list of (worker, clips).

    First the whole batches, one per worker in turn (round robin over the workers that have whole
    batches left); then the workers' remainders, in worker order, cut into steps. A pure function of
    the quotas: every step's clips are known before any is read, so a resume at step s carries on
    with exactly the steps an uninterrupted run would have taken.
    """
    full = [q // batch_size for q in quotas]
    steps = [[(w, batch_size)] for k in range(max(full, default=0)) for w in range(len(quotas)) if full[w] > k]
    current: list[tuple[int, int]] = []
    room = batch_size
    for w, q in enumerate(quotas):
        left = q % batch_size
        while left:
            take = min(left, room)
            current.append((w, take))
            left, room = left - take, room - take
            if room == 0:
                steps.append(current)
                current, room = [], batch_size
    if current:
        raise ValueError(f"quotas {quotas} do not fill whole batches of {batch_size}")
    return steps


def worker_parts(schedule: list[list[tuple[int, int]]], worker: int, start_step: int) -> tuple[int, list[int]]:
    """(clips `worker` delivered before step `start_step`, the sizes of its parts from there on)."""
    done = sum(n for step in schedule[:start_step] for w, n in step if w == worker)
    return done, [n for step in schedule[start_step:] for w, n in step if w == worker]


def eval_plan(
    shards: tuple[Shard, ...], n_workers: int, rank: int, world_size: int
) -> tuple[list[tuple[Shard, ...]], bool]:
    """Test shards per worker of `rank`, and whether to keep only this rank's share of keys.

    With at least as many test shards as ranks, ranks read disjoint shards; with fewer, every rank
    reads all and keeps the keys whose crc32 falls to it. Either way each test clip counts once.
    At most one worker per shard: the list may be shorter than n_workers.
    """
    by_key = len(shards) < world_size
    mine = shards if by_key else shards[rank::world_size]
    n = max(1, min(max(1, n_workers), len(mine)))
    return [tuple(mine[w::n]) for w in range(n)], by_key


def key_rank(key: str, world_size: int) -> int:
    return zlib.crc32(key.encode()) % world_size
