"""The shards a run trains and evaluates on, and the loader workers it gives them: decided by the
launcher before any process starts (to fail early) and again by every rank (which must agree)."""

from __future__ import annotations

import dataclasses

from pipeline.config import StreamConfig, TrainConfig
from pipeline.device import cores_per_rank
from pipeline.errors import UserError
from pipeline.shardformat import INDEX_NAME
from pipeline.storage.urls import expand_pattern, index_location, is_file, is_pack_folder, local_path
from pipeline.stream.plan import auto_workers
from pipeline.stream.sources import Shard, ShardSet, read_index, resolve, test_beside


@dataclasses.dataclass(frozen=True)
class RunData:
    """The shards a run trains and evaluates on."""

    train: ShardSet
    test: ShardSet
    """Empty when the index lists no test shards and none are given."""
    test_labels: tuple[int, ...] | None = None
    """The model's label of each of the test shards' classes (mapped by name), when their index lists
    other classes than the training index (a subset, or another order); None when they are the same."""


def resolve_data(sc: StreamConfig) -> RunData:
    """--shards, and --eval-shards or the test shards the training index lists beside them."""
    train = resolve(sc.shards, "train", sc.index, sc.allow_pipe)
    test = _eval_set(sc, train) if sc.eval_shards else test_beside(train)
    # A shard an index lists (a packed folder given, or the test shards beside) that is gone, or is a
    # folder, would cost its clips in every epoch or evaluation, after hours of training: say so now,
    # as for a shard pattern naming a missing file.
    for kind, shards in (("training", train.shards), ("test", test.shards)):
        missing = _missing_local(shards)
        if missing:
            raise UserError(
                f"{len(missing)} of the {len(shards)} {kind} shards listed in {train.index if kind == 'training' else test.index} are missing or not files, e.g. {missing[0]!r}"
            )
    return RunData(train, test, label_map(train, test))


def _eval_set(sc: StreamConfig, train: ShardSet) -> ShardSet:
    """--eval-shards, read against their own index when one is beside them (another pack: its labels
    index its own classes), else against --index or the training index."""
    own = None if sc.index else _index_beside(sc.eval_shards[0])
    if own is None or own == train.index:
        return resolve(sc.eval_shards, "test", sc.index or train.index, sc.allow_pipe)
    return resolve(sc.eval_shards, "test", None, sc.allow_pipe)


def _index_beside(pattern: str) -> str | None:
    """Where the index of the shards `pattern` names is, when there is one there."""
    try:
        if is_pack_folder(pattern):
            local = local_path(pattern)
            location = str(local / INDEX_NAME) if local is not None else pattern.rstrip("/") + "/" + INDEX_NAME
        else:
            location = index_location(expand_pattern(pattern)[0])
        local = local_path(location)
        if local is not None:
            return location if is_file(local) else None
        read_index(location)
        return location
    except UserError:  # a pipe: URL, or no index there: the training index is the one to read
        return None


def label_map(train: ShardSet, test: ShardSet) -> tuple[int, ...] | None:
    """The model's label of each class of the test shards, by name (None: the same class list).
    A class the model was not trained on is an error: its clips would be scored against a wrong name."""
    if not test.shards or test.classes == train.classes:
        return None
    unknown = [c for c in test.classes if c not in train.classes]
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UserError(
            f"the evaluation shards' index {test.index!r} lists classes the model was not trained on: {shown} "
            f"({len(test.classes)} classes there, {len(train.classes)} in {train.index!r}); evaluate on shards of the training classes"
        )
    return tuple(train.classes.index(c) for c in test.classes)


def mapping_note(data: RunData) -> str | None:
    """What rank 0 says when the test shards' classes were mapped by name onto the model's."""
    if data.test_labels is None:
        return None
    order = "" if list(data.test_labels) == sorted(data.test_labels) else ", in another order"
    return (
        f"evaluation shards' classes mapped by name onto the model's: their index {data.test.index!r} lists "
        f"{len(data.test.classes)} of its {len(data.train.classes)} classes{order}"
    )


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
