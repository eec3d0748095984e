"""The shards a run trains and evaluates on, and the loader workers it gives them: decided by the
launcher before any process starts (to fail early) and again by every rank (which must agree)."""

from __future__ import annotations

import dataclasses

from pipeline.config import StreamConfig, TrainConfig
from pipeline.device import cores_per_rank
from pipeline.errors import UserError
from pipeline.storage.urls import local_path
from pipeline.stream.plan import auto_workers
from pipeline.stream.sources import Shard, ShardSet, resolve, test_beside


@dataclasses.dataclass(frozen=True)
class RunData:
    """The shards a run trains and evaluates on."""

    train: ShardSet
    test: ShardSet
    """Empty when the index lists no test shards and none are given."""


def resolve_data(sc: StreamConfig) -> RunData:
    """--shards, and --eval-shards or the test shards the training index lists beside them."""
    train = resolve(sc.shards, "train", sc.index, sc.allow_pipe)
    test = (
        resolve(sc.eval_shards, "test", sc.index or train.index, sc.allow_pipe)
        if sc.eval_shards
        else test_beside(train)
    )
    # A shard an index lists (a packed folder given, or the test shards beside) that is gone, or is a
    # folder, would cost its clips in every epoch or evaluation, after hours of training: say so now,
    # as for a shard pattern naming a missing file.
    for kind, shards in (("training", train.shards), ("test", test.shards)):
        missing = _missing_local(shards)
        if missing:
            raise UserError(
                f"{len(missing)} of the {len(shards)} {kind} shards listed in {train.index if kind == 'training' else test.index} are missing or not files, e.g. {missing[0]!r}"
            )
    return RunData(train, test)


def _missing_local(shards: tuple[Shard, ...]) -> list[str]:
    """The URLs of the local shards that are not files (a path the system cannot even look up included)."""
    missing = []
    for s in shards:
        path = local_path(s.url)
        if path is None:
            continue
        try:
            there = path.is_file()
        except OSError:
            there = False
        if not there:
            missing.append(s.url)
    return missing


def with_workers(cfg: TrainConfig, n_shards: int, world_size: int, local_world_size: int) -> TrainConfig:
    """`cfg` with the number of loader workers decided (see plan.auto_workers)."""
    if cfg.stream.workers is not None:
        return cfg
    workers = auto_workers(n_shards, world_size, cores_per_rank(local_world_size), cfg.stream.resample)
    return dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=workers))
