"""pipeline/stream/plan.py: the epoch plan, as tables and as shards split over ranks."""

import pytest
import streamkit
from streamkit import cfg_for

from pipeline.errors import UserError
from pipeline.stream import plan


def test_too_few_shards_for_ranks_and_workers(packed):
    cfg = cfg_for(packed, workers=3)
    ds = streamkit.resolve(cfg)
    plan.check_enough_shards(ds.train.shards, cfg, 2, max(1, cfg.workers or 0))
    with pytest.raises(UserError, match="8 training shards for 3 ranks x 3 workers = 9 readers"):
        plan.check_enough_shards(ds.train.shards, cfg, 3, max(1, cfg.workers or 0))
    plan.check_enough_shards(ds.train.shards, cfg_for(packed, workers=3, resample=True), 3, 3)


def test_steps_per_epoch_table():
    # 8 shards of 6: 48 samples
    even = [6] * 8
    assert plan.steps_per_epoch(even, 4, 1, 0, 0, False) == 12
    assert plan.steps_per_epoch(even, 4, 2, 0, 0, False) == 6
    assert plan.steps_per_epoch(even, 5, 2, 0, 0, False) == 4  # 24 per rank -> 4 batches, 4 clips left
    assert plan.steps_per_epoch(even, 4, 3, 0, 0, False) == 3  # ranks get 3, 3, 2 shards -> min 12 samples
    assert plan.steps_per_epoch(even, 4, 3, 0, 0, True) == 4  # resampling: 48 // 12
    # uneven shard sizes: depends on which shards a rank draws this epoch
    uneven = [10, 1, 1, 1, 1]  # rank 0 reads 3 shards, rank 1 reads 2
    per_epoch = {plan.steps_per_epoch(uneven, 1, 2, 0, e, False) for e in range(20)}
    assert per_epoch == {2, 3}  # rank 0 without the big shard holds 3, with it rank 1 holds 2


@pytest.mark.parametrize(
    "have, total, expected",
    [
        ([12, 12], 24, [12, 12]),
        ([12, 12], 20, [10, 10]),
        ([12, 6], 16, [10, 6]),
        ([12, 6], 10, [5, 5]),
        ([7, 7, 6], 19, [6, 7, 6]),
        ([5], 0, [0]),
    ],
)
def test_worker_quotas_table(have, total, expected):
    assert plan.worker_quotas(have, total) == expected
    assert sum(expected) == total


def test_shard_split_is_disjoint_and_changes_by_epoch():
    for world in (1, 2, 3, 5):
        for epoch in range(3):
            parts = [plan.rank_shards(32, 7, epoch, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(32))
    assert plan.epoch_permutation(32, 7, 0) != plan.epoch_permutation(32, 7, 1)
    assert plan.epoch_permutation(32, 7, 0) == plan.epoch_permutation(32, 7, 0)
