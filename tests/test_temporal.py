"""Temporal sampling: packs that store S >= T frames per clip, one frame per segment in training,
the evaluation frames exactly, and K x C evaluation views."""

from __future__ import annotations

import itertools

import pytest
import torch
from shardmaker import make_temporal_pack

from pipeline import ClipDataset, ClipLoader
from pipeline.frames import clip_indices, segment_positions, view_positions
from pipeline.tools.sampledata import read_code

T = 4


# --- the index math, as literal tables -----------------------------------------------------------


def test_view_zero_is_every_m_th_stored_frame():
    assert view_positions(4, 4) == [0, 1, 2, 3]  # S = T
    assert view_positions(7, 4) == [0, 2, 4, 6]  # S = 2T - 1
    assert view_positions(13, 4) == [0, 4, 8, 12]  # S = 4T - 3
    assert view_positions(13, 4, 1, 2) == [2, 6, 10, 12]  # view 1 of 2: half a step on, the last clamped
    assert view_positions(13, 4, 1, 3) == [1, 5, 9, 12] and view_positions(13, 4, 2, 3) == [3, 7, 11, 12]


@pytest.mark.parametrize("n", [1, 2, 7, 16, 61, 200, 1234])
@pytest.mark.parametrize("stored", ["T", "2T-1", "4T-3", "all"])
def test_evaluation_frames_are_the_source_frames_of_the_formula(n, stored):
    """Stored frame j is source frame round(j(n-1)/(S-1)); view 0 picks stored positions whose
    source frames are exactly round(i(n-1)/(T-1)), for every S the packer allows."""
    t = 16
    cap = 61  # `all` stores every frame up to the cap (cap - 1 a multiple of T - 1), longer clips at the cap
    s = {"T": t, "2T-1": 2 * t - 1, "4T-3": 4 * t - 3, "all": n if n <= cap else cap}[stored]
    source_of = clip_indices(n, s)
    assert [source_of[p] for p in view_positions(s, t)] == clip_indices(n, t)


def test_segments_give_one_frame_each_and_change_with_the_epoch():
    s, t = 61, 16
    bounds = [(i * s // t, (i + 1) * s // t) for i in range(t)]
    draws = {e: segment_positions(s, t, 0, e, "clip") for e in range(4)}
    for positions in draws.values():
        assert all(lo <= p < hi for p, (lo, hi) in zip(positions, bounds))
    assert len({tuple(p) for p in draws.values()}) == 4
    assert segment_positions(s, t, 0, 2, "clip") == draws[2]  # deterministic in (seed, epoch, key)
    assert segment_positions(s, t, 1, 2, "clip") != draws[2] and segment_positions(s, t, 0, 2, "other") != draws[2]
    assert segment_positions(t, t, 0, 5, "clip") == list(range(t))  # S = T: the evaluation frames
    assert segment_positions(3, 4, 0, 0, "short") == [0, 0, 1, 2]  # fewer stored frames than T: repeats


# --- the stream --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def temporal(tmp_path_factory):
    """Clips of 1, 7 and 40 frames, 2 classes; S = 4T - 3 = 13 stored frames each."""
    out = tmp_path_factory.mktemp("temporal")
    make_temporal_pack(out, [1, 7, 40], T, 4 * T - 3)
    return out


def _source_frames(sample) -> list[int]:
    return [read_code(f.numpy())[0] for f in sample["frames"]]


def test_training_frames_come_one_from_each_segment_and_differ_across_epochs(temporal):
    ds = ClipDataset(temporal, crop=None, seed=3)
    seen = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        for sample in ds:
            frames = _source_frames(sample)
            meta_n = 40 if max(frames) > 7 else (7 if max(frames) > 0 else 1)
            stored = clip_indices(meta_n, 4 * T - 3)
            segments = [set(stored[i * 13 // T : (i + 1) * 13 // T]) for i in range(T)]
            assert all(f in seg for f, seg in zip(frames, segments)), (sample["key"], frames)
            assert read_code(sample["frames"][0].numpy())[1] == sample["label"]
            seen.setdefault(sample["key"], []).append(tuple(frames))
    long_clips = [v for v in seen.values() if max(max(v)) > 7]
    assert long_clips and all(len(set(v)) > 1 for v in long_clips), "a 40-frame clip got the same frames every epoch"
    ds.set_epoch(1)
    again = {s["key"]: tuple(_source_frames(s)) for s in ds}
    assert all(again[k] == v[1] for k, v in seen.items())  # identical for the same (seed, epoch)


def test_fixed_and_test_frames_are_the_evaluation_frames(temporal):
    for ds in (ClipDataset(temporal, crop=None, temporal="fixed"), ClipDataset(temporal, split="test", crop=None)):
        for sample in ds:
            frames = _source_frames(sample)
            n = 40 if max(frames) > 7 else (7 if max(frames) > 0 else 1)
            assert frames == clip_indices(n, T), sample["key"]


def test_temporal_draws_survive_a_resume_exactly(temporal):
    args = dict(batch_size=2, crop=48, workers=2, seed=9, shuffle_buffer=4)
    with ClipLoader(temporal, **args) as loader:
        list(loader.epoch(0))
        whole = [(b["key"], b["frames"].clone()) for b in loader.epoch(1)]
    with ClipLoader(temporal, **args) as loader:
        list(loader.epoch(0))
        batches = loader.epoch(1)
        head = [(b["key"], b["frames"].clone()) for b in itertools.islice(batches, 1)]
        state = loader.state_dict()
    with ClipLoader(temporal, **args) as resumed:
        resumed.load_state_dict(state)
        tail = [(b["key"], b["frames"].clone()) for b in resumed.epoch(1)]
    assert [k for k, _ in head + tail] == [k for k, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + tail, whole))


@pytest.mark.parametrize("views", [(1, 1), (2, 3), (3, 1)])
def test_test_views_cover_each_clip_exactly_once_on_two_ranks(temporal, views):
    k, c = views
    got = {}
    for rank in range(2):
        with ClipLoader(
            temporal, split="test", batch_size=4, crop=48, workers=2, rank=rank, world_size=2, test_views=views
        ) as loader:
            for b in loader.epoch(0):
                for key, view in zip(b["key"], b["view"].tolist()):
                    got.setdefault(key, []).append((rank, view))
    assert len(got) == 6  # every test clip
    for key, seen in got.items():
        assert sorted(v for _, v in seen) == list(range(k * c)), key  # all its views, once each
        assert len({r for r, _ in seen}) == 1, key  # on one rank


def test_multi_view_evaluation_scores_every_clip_once_and_view_zero_is_the_one_view_figure(temporal):
    from contextlib import nullcontext

    from pipeline.config import StreamConfig, TrainConfig
    from pipeline.device import DistEnv
    from pipeline.train.data import resolve_data
    from pipeline.train.evaluate import evaluate
    from pipeline.train.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", 2)
    results = {}
    for views in ((1, 1), (2, 3)):
        sc = StreamConfig(shards=(str(temporal),), batch_size=4, crop=48, workers=1, test_views=views)
        cfg = TrainConfig(stream=sc, model="tiny")
        data = resolve_data(sc)
        results[views] = evaluate(model, data.test, cfg, DistEnv(), torch.device("cpu"), False, nullcontext())
    one, many = results[(1, 1)], results[(2, 3)]
    assert one["clips"] == many["clips"] == 6 and many["views"] == "2x3"
    assert (one["top1"], one["top5"]) == (one["single_top1"], one["single_top5"])
    assert (many["single_top1"], many["single_top5"]) == (one["top1"], one["top5"])
