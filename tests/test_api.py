"""The library: ClipDataset under a plain DataLoader follows ClipLoader's plan rules and gives a clip
the same pixels in an epoch; ClipLoader resumes exactly from state_dict and keeps copied batches."""

from __future__ import annotations

import itertools

import pytest
import torch
import webdataset as wds
from shardmaker import shard_keys

from pipeline import ClipDataset, ClipLoader
from pipeline.errors import UserError
from pipeline.stream.plan import steps_per_epoch

ARGS = dict(crop=24, seed=5, shuffle_buffer=8)


def _dataloader(ds: ClipDataset, workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def _loader_pixels(packed, epoch: int, rank: int, world: int) -> dict:
    """key -> frames of every clip ClipLoader gives `rank` in `epoch`."""
    with ClipLoader(packed, batch_size=4, rank=rank, world_size=world, workers=2, **ARGS) as loader:
        for e in range(epoch):
            for _ in loader.epoch(e):
                pass
        return {k: f for b in loader.epoch(epoch) for k, f in zip(b["key"], b["frames"])}


def test_clip_dataset_is_a_webdataset_pipeline_with_fluid_methods(packed):
    ds = ClipDataset(packed, batch_size=4, **ARGS)
    assert isinstance(ds, wds.DataPipeline) and isinstance(ds, torch.utils.data.IterableDataset)
    small = ClipDataset(packed, **ARGS).select(lambda s: s["label"] == 1).map(lambda s: {**s, "double": 2 * s["label"]})
    got = list(small)
    assert got and all(s["label"] == 1 and s["double"] == 2 for s in got)
    assert all(tuple(s["frames"].shape) == (4, 24, 24, 3) and s["frames"].dtype == torch.uint8 for s in got)
    assert ds.classes == tuple(sorted(ds.classes)) and len(ds.classes) == 4 and ds.frames == 4


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_dataloader_epochs_are_disjoint_across_ranks_equal_in_length_and_pixel_exact(packed, workers):
    world, batch = 2, 4
    counts = [6] * 8
    # one dataset per simulated rank, as each rank of a job would build it
    sets = [ClipDataset(packed, batch_size=batch, rank=r, world_size=world, **ARGS) for r in range(world)]
    loaders = [_dataloader(ds, workers) for ds in sets]
    orders = []
    for epoch in range(2):
        per_rank = []
        for ds, dl in zip(sets, loaders):
            ds.set_epoch(epoch)
            batches = list(dl)
            assert all(
                tuple(b["frames"].shape) == (batch, 4, 24, 24, 3) and b["label"].dtype == torch.int64 for b in batches
            )
            per_rank.append(batches)
        expected = steps_per_epoch(counts, batch, world, 5, epoch, False, separate_workers=max(1, workers))
        assert [len(b) for b in per_rank] == [expected] * world  # every rank runs the same steps
        keys = [[k for b in batches for k in b["key"]] for batches in per_rank]
        flat = [k for ks in keys for k in ks]
        assert len(flat) == len(set(flat)), "a clip was read twice in one epoch"
        orders.append(flat)
        # the same pixels as ClipLoader gives that clip in that epoch (crop and flip from seed, epoch, key)
        for rank in range(world):
            reference = _loader_pixels(packed, epoch, rank, world)
            shared = [(k, f) for b in per_rank[rank] for k, f in zip(b["key"], b["frames"]) if k in reference]
            assert len(shared) >= batch
            assert all(torch.equal(f, reference[k]) for k, f in shared)
    assert orders[0] != orders[1], "epochs must differ in order"


def test_set_epoch_reaches_persistent_workers_and_without_it_passes_count_as_epochs(packed):
    ds = ClipDataset(packed, batch_size=4, **ARGS)
    dl = _dataloader(ds, 2)
    ds.set_epoch(3)
    first = [b["key"] for b in dl]
    ds.set_epoch(3)
    again = [b["key"] for b in dl]
    assert first == again  # the workers live on, and follow the epoch set in the main process
    ds.set_epoch(4)
    assert [b["key"] for b in dl] != first
    plain = ClipDataset(packed, batch_size=4, **ARGS)
    passes = [[b["key"] for b in plain] for _ in range(2)]
    reference = ClipDataset(packed, batch_size=4, **ARGS)
    reference.set_epoch(1)
    assert passes[1] == [b["key"] for b in reference] and passes[0] != passes[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_test_split_gives_every_test_clip_once_across_ranks_and_workers(packed, workers):
    expected = sorted(k for name in ("test-000.tar", "test-001.tar") for k in shard_keys(packed / name))
    for world in (1, 2, 3):  # 3 ranks > 2 test shards: split by key
        got = []
        for rank in range(world):
            ds = ClipDataset(packed, split="test", batch_size=3, rank=rank, world_size=world, **ARGS)
            for b in _dataloader(ds, workers):
                assert b["frames"].shape[1:] == (4, 24, 24, 3) and len(b["key"]) == len(b["label"]) <= 3
                got += b["key"]
        assert sorted(got) == expected, world


def test_test_split_crops_are_centred_and_equal_to_cliploader(packed):
    ds = ClipDataset(packed, split="test", **ARGS)
    mine = {s["key"]: s["frames"] for s in ds}
    with ClipLoader(packed, split="test", batch_size=4, workers=0, **ARGS) as loader:
        theirs = {k: f for b in loader.epoch(0) for k, f in zip(b["key"], b["frames"])}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_parameters_are_checked_with_their_names(packed):
    with pytest.raises(UserError, match="`batch_size` must be"):
        ClipDataset(packed, batch_size=0)
    with pytest.raises(UserError, match="`split` must be 'train' or 'test'"):
        ClipDataset(packed, split="val")
    with pytest.raises(UserError, match="`crop` must be >= 1"):
        ClipLoader(packed, crop=0)
    with pytest.raises(UserError, match="`rank` must be in 0..world_size-1"):
        ClipLoader(packed, rank=2, world_size=2)
    with pytest.raises(UserError, match="`allow_pipe`"):
        ClipDataset("pipe:cat 000.tar")


# --- ClipLoader ------------------------------------------------------------------------------


def _epoch(loader, epoch):
    return [(b["key"], b["frames"].clone()) for b in loader.epoch(epoch)]


@pytest.mark.parametrize("batch, workers, stop", [(4, 3, 3), (5, 2, 8)])
def test_state_dict_resume_is_exact_at_an_ordinary_and_at_a_merged_step(packed, batch, workers, stop):
    """Batch 5 with 2 workers (23 + 22 clips): the last step merges the workers' remainders, and the
    resume at step 8 lands right on it."""
    args = dict(batch_size=batch, workers=workers, epoch_fill="drop", **ARGS)
    with ClipLoader(packed, **args) as loader:
        _epoch(loader, 0)
        whole = _epoch(loader, 1)
        assert len(whole) == loader.steps(1)
    with ClipLoader(packed, **args) as loader:
        _epoch(loader, 0)
        batches = loader.epoch(1)
        head = [(b["key"], b["frames"].clone()) for b in itertools.islice(batches, stop)]
        state = loader.state_dict()
    assert state["epoch"] == 1 and state["step"] == stop
    with ClipLoader(packed, **args) as resumed:
        resumed.load_state_dict(state)
        tail = _epoch(resumed, 1)
    assert [k for k, _ in head + tail] == [k for k, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + tail, whole))
    merged = [len(set(b["worker"].tolist())) > 1 for b in _batches_with_workers(packed, args, 1)]
    assert merged[stop] == (batch == 5)


def _batches_with_workers(packed, args, epoch):
    with ClipLoader(packed, **args) as loader:
        for e in range(epoch):
            for _ in loader.epoch(e):
                pass
        return list(loader.epoch(epoch))


def test_a_mid_epoch_state_needs_the_same_plan(packed):
    with ClipLoader(packed, batch_size=4, workers=2, **ARGS) as loader:
        next(iter(loader))
        state = loader.state_dict()
    other = ClipLoader(packed, batch_size=4, workers=1, **ARGS)
    with pytest.raises(ValueError, match="needs the same workers"):
        other.load_state_dict(state)


def test_a_batch_kept_while_the_next_is_fetched_is_unchanged_with_copy(packed):
    with ClipLoader(packed, batch_size=4, workers=2, prefetch=1, **ARGS) as loader:
        kept = []
        for batch in loader.epoch(0):
            kept.append((batch["frames"], batch["frames"].clone()))
        assert all(torch.equal(a, b) for a, b in kept)
    with ClipLoader(packed, batch_size=4, workers=2, prefetch=1, copy=False, **ARGS) as loader:
        views = [(b["frames"], b["frames"].clone()) for b in loader.epoch(0)]
        # zero-copy views are reused slots: some kept view no longer holds its batch
        assert not all(torch.equal(a, b) for a, b in views)


def test_epochs_beyond_the_loaders_epochs_are_a_clear_error(packed):
    with ClipLoader(packed, batch_size=4, workers=1, epochs=1, **ARGS) as loader:
        _epoch(loader, 0)
        with pytest.raises(ValueError, match="`epochs`=1"):
            loader.epoch(1)


def test_stream_options_are_declared_once_in_stream_config(packed):
    """ClipLoader's and ClipDataset's options, train-stream's and bench-stream's flags, and
    docs/API.md all follow StreamConfig's fields: a new field reaches each of them."""
    import dataclasses
    import inspect
    from pathlib import Path

    import typer.main

    from pipeline.cli import bench_app, train_app
    from pipeline.config import StreamConfig

    fields = {f.name for f in dataclasses.fields(StreamConfig)}
    library = fields - {"shards", "eval_shards", "max_bad"}
    api = (Path(__file__).parent.parent / "docs" / "API.md").read_text()
    assert not [name for name in library if f"`{name}`" not in api]
    train_flags = {p.name for p in typer.main.get_command(train_app).params}
    assert fields <= train_flags
    assert fields - {"workers", "eval_shards", "test_views", "max_bad"} <= {
        p.name for p in typer.main.get_command(bench_app).params
    }
    for cls in (ClipLoader, ClipDataset):
        assert inspect.signature(cls).parameters["options"].kind == inspect.Parameter.VAR_KEYWORD
    with pytest.raises(UserError, match=r"ClipLoader takes no option `crops`; its options: .*crop"):
        ClipLoader(packed, crops=112)
    with pytest.raises(UserError, match=r"ClipDataset takes no option `workers`"):
        ClipDataset(packed, workers=2)
