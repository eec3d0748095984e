"""What one worker reads in one pass, shared by both loaders: ClipLoader's persistent workers and
ClipDataset under a DataLoader take the same stages, so a clip is the same clip whichever delivers it.

`stream_config` checks the library's keyword arguments as a StreamConfig; `worker_samples` is a
training worker's raw samples of an epoch, `test_samples` an evaluation worker's, and `eval_clips`
decodes test clips into the K x C view rows of a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.config import StreamConfig
from pipeline.errors import ShardFormatError, UserError
from pipeline.frames import view_positions
from pipeline.stream.clips import decode_sample
from pipeline.stream.mix import epoch_shards
from pipeline.stream.plan import WorkerPlan, key_rank
from pipeline.stream.reshard import Part, shuffle_rng
from pipeline.stream.sources import ShardSet
from pipeline.stream.stages import Faults, fit_to_quota, kept_samples, read_samples, resampled_shards, shuffle


def stream_config(shards, takes: str, ignored: frozenset[str] = frozenset(), **options) -> StreamConfig:
    """The library's keyword arguments as a checked StreamConfig: its fields are the options of
    ClipLoader and ClipDataset (declared once, there), less the `ignored` ones that `takes` (the
    class's name, for the message) has no use for. Errors name the parameters."""
    from dataclasses import fields

    known = {f.name for f in fields(StreamConfig)} - {"shards", "eval_shards", "max_bad"} - ignored
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"{takes} takes no option `{unknown[0]}`; its options: {', '.join(sorted(known))}")
    patterns = (str(shards),) if isinstance(shards, (str, Path)) else tuple(map(str, shards))
    if "test_views" in options:
        options["test_views"] = tuple(options["test_views"])
    return StreamConfig(shards=patterns, **options)


def shard_cache(cfg: StreamConfig, source: ShardSet):
    """The node's cache of remote shards (storage.cache.ShardCache) when `cache_dir` asks for one and
    `source` has remote shards; None otherwise, or (with a warning) when it cannot be used."""
    if cfg.cache_dir is None or not source.remote:
        return None
    from pipeline.storage.cache import open_cache

    return open_cache(cfg.cache_dir, cfg.cache_bytes)


def worker_samples(
    source: ShardSet,
    cfg: StreamConfig,
    plan: WorkerPlan,
    epoch: int,
    rank: int,
    worker: int,
    faults: Faults,
    cache=None,
) -> Iterator[dict]:
    """The raw samples one worker delivers in one epoch, read top to bottom."""
    rng = lambda stream: np.random.default_rng([cfg.seed, epoch, rank, worker, stream])  # noqa: E731
    # this epoch's shards, in plan order (resampling: drawn with replacement)
    shards = resampled_shards(plan.shards, rng(0)) if cfg.resample else plan.shards
    # raw samples: our tar reader, a broken shard a counted fault
    raw = read_samples(shards, cfg.allow_pipe, faults, cache)
    # shuffled in a seeded buffer
    mixed = shuffle(raw, cfg.shuffle_buffer, shuffle_rng(cfg.seed, epoch, rank, worker, 0))
    # exactly the planned number (surplus cut, lost samples made up with repeats)
    return fit_to_quota(mixed, plan.quota)


def part_samples(
    source: ShardSet,
    cfg: StreamConfig,
    part: Part,
    epoch: int,
    rank: int,
    worker: int,
    segment: int,
    faults: Faults,
    cache=None,
) -> Iterator[dict]:
    """The raw samples one worker delivers in segment `segment` >= 1 of an epoch resumed on another
    topology (see stream/reshard.py), read top to bottom."""
    # the shards it shares in, each cut to the samples the epoch has not used yet
    shards = epoch_shards(source, cfg, epoch)
    raw = kept_samples([shards[i] for i in part.shards], part.keep, cfg.allow_pipe, faults, cache)
    # shuffled in a buffer seeded for this segment
    mixed = shuffle(raw, cfg.shuffle_buffer, shuffle_rng(cfg.seed, epoch, rank, worker, segment))
    # fewer clips left than ranks: this rank's one clip is a repeat
    if part.repeat_only:
        mixed = ({**s, "__repeat__": True} for s in mixed)
    # exactly the planned number (the pad rule's repeats, lost samples made up)
    return fit_to_quota(mixed, part.quota)


def test_samples(
    shards, allow_pipe: bool, faults: Faults, by_key: bool, rank: int, world_size: int, cache=None
) -> Iterator[dict]:
    """The raw test samples a worker of `rank` reads from `shards` (see plan.eval_plan): all of them,
    or with fewer test shards than ranks (`by_key`) only the keys that hash to this rank."""
    raw = read_samples(shards, allow_pipe, faults, cache)
    if by_key:
        raw = (s for s in raw if key_rank(s.get("__key__", ""), world_size) == rank)
    return raw


def eval_clips(
    raw: Iterable[dict],
    crop: int,
    label_maps: tuple[tuple[int, ...], ...],
    faults: Faults,
    rows_for,
    views: tuple[int, int] = (1, 1),
) -> Iterator[tuple]:
    """Test clips decoded into rows handed out by `rows_for()` -> (handle, rows), K x C rows a clip
    for `views` (K temporal, C spatial; view 0 is the fixed frames and the centre crop): yields
    (handle, keys, labels, view numbers, packs) for every full set of rows and for the last, partial one.
    A clip's views follow each other (they may straddle two sets). Unreadable clips are skipped and
    counted, never repeated."""
    temporal, spatial = views
    handle, rows, keys, labels, numbers, packs, scratch = None, None, [], [], [], [], {}
    for sample in raw:
        key = sample.get("__key__", "?")
        decoded = 0
        try:
            for v in range(temporal * spatial):
                k, c = divmod(v, spatial)
                if handle is None:
                    handle, rows = rows_for()
                row = rows[len(keys)]
                choose = lambda stored, k=k, t=len(row): view_positions(stored, t, k, temporal)  # noqa: B008 (bound per view, on purpose)
                label = decode_sample(sample, crop, label_maps, None, row, scratch, choose, c)
                keys.append(key)
                labels.append(label)
                numbers.append(v)
                packs.append(sample.get("__pack__", 0))
                decoded += 1
                if len(keys) == len(rows):
                    yield handle, keys, labels, numbers, packs
                    handle, keys, labels, numbers, packs = None, [], [], [], []
        except ShardFormatError as e:
            # A frame only a later view uses can fail after earlier views were delivered: the clip
            # then counts on those views, and the fault is named but not counted as a lost clip.
            reason = f"{e} (evaluated on {decoded} view(s))" if decoded else str(e)
            faults.add(f"{sample.get('__url__', '?')}:{key}", reason, 0 if decoded else 1)
    if keys:
        yield handle, keys, labels, numbers, packs
