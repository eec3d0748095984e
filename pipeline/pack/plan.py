"""The shard plan: which clip goes to which shard, in which order, and the fingerprint of it all.

The plan depends only on the inputs and the output options (no RNG, no clock, no worker count), so
a re-run, another worker count or another machine packing `--part i/N` plans the same shards.
"""

from __future__ import annotations

import dataclasses
import hashlib

from pipeline.config import PackConfig
from pipeline.errors import UserError
from pipeline.pack.layouts import Catalog, Video
from pipeline.shardformat import FORMAT_VERSION


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    videos: tuple[Video, ...]


def _stable_order(videos: list[Video], seed: int) -> list[Video]:
    """A shuffle that depends only on the keys and the seed (no RNG version can change it)."""
    return sorted(videos, key=lambda v: hashlib.sha1(f"{seed}:{v.key}".encode()).hexdigest())


def plan_shards(catalog: Catalog, cfg: PackConfig) -> list[ShardPlan]:
    s = cfg.split - 1
    train = [v for v in catalog.videos if v.tags[s] == 1]
    test = [v for v in catalog.videos if v.tags[s] == 2]
    if not train:
        raise UserError(f"split {cfg.split} has no training clips")
    if len(train) < cfg.shards:
        raise UserError(
            f"only {len(train)} training clips for --shards {cfg.shards}: use --shards {len(train)} or fewer"
        )
    if cfg.test_shards is not None and cfg.test_shards > len(test):
        raise UserError(f"only {len(test)} test clips for --test-shards {cfg.test_shards}")
    n_test = cfg.test_shards or min(cfg.shards, len(test))
    plans = []
    for split, clips, n, prefix in (("train", train, cfg.shards, ""), ("test", test, n_test, "test-")):
        order = _stable_order(clips, cfg.seed)
        width = max(3, len(str(n - 1)))
        # Round-robin over a shuffled order: sizes differ by at most one, every shard mixes classes.
        for j in range(n):
            plans.append(ShardPlan(f"{prefix}{j:0{width}d}.tar", split, tuple(order[j::n])))
    return plans


def fingerprint(cfg: PackConfig, plans: list[ShardPlan]) -> dict:
    h = hashlib.sha256()
    for p in plans:
        h.update(p.name.encode())
        for v in p.videos:
            h.update(f"\0{v.source}\0{v.label}\0{v.tags}".encode("utf-8", "surrogateescape"))
    return {"format_version": FORMAT_VERSION, "options": cfg.output_options(), "plan_sha256": h.hexdigest()}
