"""The re-sharding math of a resumed epoch (pipeline/stream/reshard.py): literal tables, the chain
property (every clip once over any sequence of topologies), and the simulation checked against the
clips a real ClipLoader delivered."""

from __future__ import annotations

import itertools

import pytest
from shardmaker import shard_keys

from pipeline import ClipLoader
from pipeline.config import StreamConfig
from pipeline.stream import reshard
from pipeline.stream.plan import step_schedule, worker_parts
from pipeline.stream.reshard import Segment
from pipeline.stream.stages import read_shard

ARGS = dict(crop=24, seed=5, shuffle_buffer=8)

CFG = StreamConfig(shards=("unused",), batch_size=4, shuffle_buffer=8, seed=5)


def fresh_and_repeats(counts, cfg, epoch, history, seg):
    """Run segment `seg` to its end on the plan the module gives: (fresh positions, repeats, steps per rank)."""
    ranks = reshard.segment_parts(counts, cfg, epoch, history, seg)
    k = len(history)
    fresh, repeats, steps = [], 0, []
    for r, parts in enumerate(ranks):
        schedule = step_schedule([p.quota for p in parts], seg.batch_size)
        steps.append(len(schedule))
        for w, part in enumerate(parts):
            done = worker_parts(schedule, w, seg.steps if seg.steps else len(schedule))[0]
            items = [(i, p) for i, keep in zip(part.shards, part.keep) for p in keep]
            got = (
                [] if part.repeat_only else reshard.delivered(items, done, cfg, reshard.shuffle_rng(5, epoch, r, w, k))
            )
            fresh += got
            repeats += done - len(got)
    return fresh, repeats, steps


def test_remainder_parts_table():
    """10 positions left of 3 shards of 4, on 2 ranks x 2 workers, batch 3: runs of 5 and 5 in the
    epoch's shard order, 2 steps a rank, one marked repeat each (pad)."""
    counts = [4, 4, 4]
    left = {(0, 1), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)}
    order = reshard.epoch_permutation(3, 5, 0)
    ranks = reshard.remainder_parts(counts, left, 5, 0, 2, 2, 3)
    runs = [[(i, p) for part in parts for i, keep in zip(part.shards, part.keep) for p in keep] for parts in ranks]
    canonical = [(i, p) for i in order for p in range(4) if (i, p) in left]
    assert runs == [canonical[:5], canonical[5:]]
    assert [[p.quota for p in parts] for parts in ranks] == [[3, 3], [3, 3]]
    assert [[p.held for p in parts] for parts in ranks] == [[2, 3], [2, 3]]


def test_fewer_clips_left_than_ranks_gives_marked_repeats():
    ranks = reshard.remainder_parts([4], {(0, 2)}, 0, 0, 3, 1, 2)
    assert [parts[0].quota for parts in ranks] == [2, 2, 2]
    assert [parts[0].repeat_only for parts in ranks] == [True, True, False]
    assert all(parts[0].keep == ((2,),) for parts in ranks)


@pytest.mark.parametrize("fill", ["pad", "drop"])
@pytest.mark.parametrize(
    "chain",
    [
        [(2, 2, 4, 3), (1, 2, 4, 0)],  # 2 ranks stopped at step 3, then 1 rank
        [(1, 2, 4, 5), (2, 2, 4, 0)],  # 1 rank, then 2
        [(1, 2, 4, 4), (1, 1, 4, 0)],  # 2 workers, then 1
        [(2, 2, 4, 2), (3, 1, 5, 1), (1, 3, 2, 0)],  # three topologies, batch size changing too
        [(2, 1, 5, 4), (4, 2, 3, 0)],  # pad's repeats already in the first segment
    ],
)
def test_every_clip_once_over_a_chain_of_topologies(chain, fill):
    """48 clips in 8 shards of 6: each epoch, over the segments of any chain of topologies, every
    clip is delivered fresh exactly once (the first segment's `drop` surplus included: the later
    segments take every clip left), each segment with equal steps on every rank."""
    counts = [6] * 8
    cfg = StreamConfig(shards=("unused",), batch_size=4, shuffle_buffer=8, seed=5, epoch_fill=fill)
    for epoch in (0, 1):
        history, seen = (), []
        for world, workers, batch, steps in chain:
            seg = Segment(world, workers, batch, steps)
            fresh, _, per_rank = fresh_and_repeats(counts, cfg, epoch, history, seg)
            assert len(set(per_rank)) == 1  # equal steps per rank
            seen += fresh
            history += (seg if steps else Segment(world, workers, batch, per_rank[0]),)
        assert len(seen) == len(set(seen))
        assert sorted(seen) == sorted((i, p) for i in range(8) for p in range(6))
        assert not reshard.unused(counts, cfg, epoch, history)


def test_segment_zero_is_the_normal_plan_and_the_chain_counts():
    history = (Segment(2, 2, 4, 3), Segment(1, 2, 4, 2))
    assert reshard.clips_used(history) == 2 * 4 * 3 + 4 * 2
    assert [reshard.audit_lines_kept(history, r) for r in (0, 1, 2)] == [20, 12, 0]
    assert len(reshard.unused([6] * 8, CFG, 0, history)) == 48 - 32
    with pytest.raises(ValueError, match="ran 99 steps"):
        reshard.unused([6] * 8, CFG, 0, (Segment(2, 2, 4, 99),))
    with pytest.raises(ValueError, match="not an epoch segment"):
        Segment.from_dict({"world_size": 0, "workers": 1, "batch_size": 4, "steps": 1})
    assert Segment.from_dict(history[0].as_dict()) == history[0]


@pytest.mark.parametrize("world, workers, stop", [(1, 2, 5), (2, 2, 3), (2, 1, 4)])
def test_the_simulation_names_the_clips_a_real_loader_delivered(packed, world, workers, stop):
    """What `unused` says segment 0 left of epoch 1 is exactly what real loaders had not delivered
    by step `stop`: positions mapped to keys through the shards themselves."""
    args = dict(batch_size=4, workers=workers, crop=24, seed=5, shuffle_buffer=8)
    delivered = set()
    for rank in range(world):
        with ClipLoader(packed, rank=rank, world_size=world, **args) as loader:
            for _ in loader.epoch(0):
                pass
            delivered |= {k for b in itertools.islice(loader.epoch(1), stop) for k in b["key"]}
    keys = [[s["key"] for s in read_shard(packed / f"{i:03d}.tar")] for i in range(8)]
    left = reshard.unused([6] * 8, CFG, 1, (Segment(world, workers, 4, stop),))
    assert {keys[i][p] for i, p in left} == {k for ks in keys for k in ks} - delivered
    assert len(delivered) == world * 4 * stop


@pytest.mark.parametrize("old, new", [((2, 2, 4), (1, 1, 4)), ((1, 2, 4), (2, 2, 3)), ((1, 2, 4), (1, 1, 4))])
def test_a_loader_state_from_another_topology_continues_with_the_clips_left(packed, old, new):
    """ClipLoader.load_state_dict: epoch 1 stopped at step 3 on `old` (ranks, workers, batch size),
    continued on `new`: every clip once (repeats marked), equal steps per rank; epoch 2 is `new`'s own plan."""
    (world, workers, batch), (world2, workers2, batch2) = old, new
    first = []
    for rank in range(world):
        with ClipLoader(packed, rank=rank, world_size=world, batch_size=batch, workers=workers, **ARGS) as loader:
            for _ in loader.epoch(0):
                pass
            first += [k for b in itertools.islice(loader.epoch(1), 3) for k in b["key"]]
            state = loader.state_dict()
    assert state["step"] == 3
    rest, repeats, steps = [], [], set()
    for rank in range(world2):
        with ClipLoader(packed, rank=rank, world_size=world2, batch_size=batch2, workers=workers2, **ARGS) as loader:
            loader.load_state_dict(state)
            batches = list(loader.epoch(1))
            steps.add(len(batches))
            assert len(batches) == loader.steps(1) and loader.state_dict()["step"] == 0
            for b in batches:
                rest += [k for k, r in zip(b["key"], b["repeat"].tolist()) if not r]
                repeats += [k for k, r in zip(b["key"], b["repeat"].tolist()) if r]
            assert loader.steps(2) == sum(p.quota for p in train_plan_of(loader, 2)) // batch2
    everything = sorted(k for i in range(8) for k in shard_keys(packed / f"{i:03d}.tar"))
    assert sorted(first + rest) == everything and len(steps) == 1
    assert set(repeats) <= set(rest)


def train_plan_of(loader, epoch):
    from pipeline.stream.plan import train_plan

    return train_plan(loader.source.shards, loader.cfg, epoch, loader.rank, loader.world_size, loader.n_workers)
