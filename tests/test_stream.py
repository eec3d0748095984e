import json
import shutil
from pathlib import Path

import httpkit
import numpy as np
import pytest
import simplejpeg
import streamkit
from shardmaker import shard_keys, write_tar

from pipeline import read_shard
from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.frames import clip_draw, crop_box
from pipeline.shardformat import pack_jpegs
from pipeline.storage import urls
from pipeline.stream import clips, plan, sources


def cfg_for(folder: Path, **kw) -> StreamConfig:
    kw = {"batch_size": 4, "workers": 2, "crop": 24, "shuffle_buffer": 8, **kw}
    return StreamConfig(shards=(f"{folder}/<000..007>.tar",), **kw)


def epoch_batches(ds, cfg, epoch, rank, world, start_step=0, start_method=None):
    """One epoch of one rank from a fresh TrainLoader (batches copied out of the workers' slots)."""
    with streamkit.train_loader(
        ds, cfg, rank, world, epoch, start_step, epochs=epoch + 1, copy=True, start_method=start_method
    ) as loader:
        return list(loader.epoch(epoch))


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("s/<000..002>.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("s/{000..002}.tar", ["s/000.tar", "s/001.tar", "s/002.tar"]),
        ("s/{8..10}.tar", ["s/8.tar", "s/9.tar", "s/10.tar"]),
        ("a.tar::b/<01..02>.tar", ["a.tar", "b/01.tar", "b/02.tar"]),
        ("s/{a,b}.tar", ["s/a.tar", "s/b.tar"]),
        ("http://h:8/x/<0..1>.tar", ["http://h:8/x/0.tar", "http://h:8/x/1.tar"]),
    ],
)
def test_expand_pattern(pattern, expected):
    assert urls.expand_pattern(pattern) == expected


@pytest.mark.parametrize(
    "pattern", ["s/<000..03x>.tar", "s/{000..}.tar", "s/<0..3.tar", "s/{0..3.tar", "s/0..3>.tar", "a.tar::"]
)
def test_malformed_patterns_are_user_errors(pattern):
    with pytest.raises(UserError, match="malformed|empty entry"):
        urls.expand_pattern(pattern)


def test_expand_shards_checks_existence_pipes_and_duplicates(packed):
    with pytest.raises(UserError, match="no shards match"):
        sources.expand_shards([f"{packed}/<100..103>.tar"], allow_pipe=False)
    with pytest.raises(UserError, match=r"1 of 9 shards .* do not exist, e.g. '.*008.tar'"):
        sources.expand_shards([f"{packed}/<000..008>.tar"], allow_pipe=False)
    with pytest.raises(UserError, match="`allow_pipe`"):
        sources.expand_shards(["pipe:cat 000.tar"], allow_pipe=False)
    assert sources.expand_shards(["pipe:cat 000.tar"], allow_pipe=True) == ["pipe:cat 000.tar"]
    with pytest.raises(UserError, match="listed twice"):
        sources.expand_shards([f"{packed}/000.tar::{packed}/000.tar"], allow_pipe=False)


def test_resolve_dataset_reads_counts_and_test_shards_from_the_index(packed):
    ds = streamkit.resolve(cfg_for(packed))
    index = json.loads((packed / "index.json").read_text())
    assert [s.samples for s in ds.train.shards] == [e["samples"] for e in index["splits"]["train"]["shards"]]
    assert ds.train.samples == 48 and ds.train.frames == 4 and len(ds.train.classes) == 4
    assert [Path(s.url).name for s in ds.test.shards] == ["test-000.tar", "test-001.tar"]
    assert [s.samples for s in ds.test.shards] == [8, 8]
    # given explicitly
    ds = streamkit.resolve(cfg_for(packed, eval_shards=(f"{packed}/test-000.tar",)))
    assert [Path(s.url).name for s in ds.test.shards] == ["test-000.tar"]


def test_index_problems_are_user_errors(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    (folder / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable index"):
        streamkit.resolve(cfg_for(folder))
    (folder / "index.json").unlink()
    with pytest.raises(UserError, match="cannot read index"):
        streamkit.resolve(cfg_for(folder))
    index = json.loads((packed / "index.json").read_text())
    index["splits"]["train"]["shards"] = index["splits"]["train"]["shards"][:7]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="007.tar' is not a training shard"):
        streamkit.resolve(cfg_for(folder))


def test_too_few_shards_for_ranks_and_workers(packed):
    cfg = cfg_for(packed, workers=3)
    ds = streamkit.resolve(cfg)
    plan.check_enough_shards(ds.train.shards, cfg, 2, max(1, cfg.workers or 0))
    with pytest.raises(UserError, match="8 training shards for 3 ranks x 3 workers = 9 readers"):
        plan.check_enough_shards(ds.train.shards, cfg, 3, max(1, cfg.workers or 0))
    plan.check_enough_shards(ds.train.shards, cfg_for(packed, workers=3, resample=True), 3, 3)


# --- plan math --------------------------------------------------------------------------------


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


# --- the stream, with injected rank and world size ---------------------------------------------


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 2), (2, 0), (4, 2)])
def test_ranks_read_disjoint_keys_covering_the_epoch(packed, world, workers):
    cfg = cfg_for(packed, workers=workers)
    ds = streamkit.resolve(cfg)
    all_keys = sorted(k for s in ds.train.shards for k in shard_keys(Path(s.url)))
    steps = plan.steps_per_epoch([s.samples for s in ds.train.shards], 4, world, cfg.seed, 0, False)
    per_rank = []
    for rank in range(world):
        got = epoch_batches(ds, cfg, 0, rank, world)
        assert len(got) == steps
        assert all(b["frames"].shape == (4, 4, 24, 24, 3) and str(b["frames"].dtype) == "torch.uint8" for b in got)
        per_rank.append([k for b in got for k in b["key"]])
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)), "a key was read twice"
    assert sorted(flat) == all_keys  # 8 shards of 6 split evenly in all these cases


def test_uneven_split_uses_the_smallest_ranks_steps(packed):
    cfg = cfg_for(packed, workers=1, epoch_fill="drop")
    ds = streamkit.resolve(cfg)
    keys = [[k for b in epoch_batches(ds, cfg, 0, r, 3) for k in b["key"]] for r in range(3)]
    assert [len(k) for k in keys] == [12, 12, 12]  # ranks hold 18, 18, 12 samples
    flat = [k for ks in keys for k in ks]
    assert len(set(flat)) == len(flat) == 36


@pytest.mark.parametrize("workers, batch", [(1, 4), (2, 5), (0, 7)])
def test_pad_uses_every_clip_once_plus_marked_repeats_with_equal_steps(packed, workers, batch):
    """3 ranks hold 18, 18 and 12 clips: pad runs the largest rank's ceil(18 / batch) steps on
    every rank; each rank reads all its clips once, and only clips marked as repeats come again."""
    cfg = cfg_for(packed, workers=workers, batch_size=batch)
    ds = streamkit.resolve(cfg)
    all_keys = sorted(k for s in ds.train.shards for k in shard_keys(Path(s.url)))
    steps = -(-18 // batch)
    firsts, lengths = [], []
    for rank in range(3):
        got = epoch_batches(ds, cfg, 0, rank, 3)
        lengths.append(len(got))
        keys = [k for b in got for k in b["key"]]
        repeat = [r for b in got for r in b["repeat"].tolist()]
        first = [k for k, r in zip(keys, repeat) if not r]
        assert len(first) == len(set(first)), "a clip not marked as a repeat came twice"
        assert set(k for k, r in zip(keys, repeat) if r) <= set(first), "a repeat of a clip this rank never read"
        firsts += first
    assert lengths == [steps] * 3
    assert sorted(firsts) == all_keys  # every training clip exactly once across the ranks


def test_labels_match_frames_and_epochs_differ(packed):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    e0 = epoch_batches(ds, cfg, 0, 0, 1)
    for b in e0:
        for key, label in zip(b["key"], b["label"].tolist()):
            assert key.startswith(ds.train.classes[label] + "_clip")
    order0 = [k for b in e0 for k in b["key"]]
    order0_again = [k for b in epoch_batches(ds, cfg, 0, 0, 1) for k in b["key"]]
    order1 = [k for b in epoch_batches(ds, cfg, 1, 0, 1) for k in b["key"]]
    assert order0 == order0_again
    assert order1 != order0 and sorted(order1) == sorted(order0)
    assert [b["frames"] for b in epoch_batches(ds, cfg, 0, 0, 1)][0].equal(e0[0]["frames"])


@pytest.mark.parametrize("workers, batch_size, start", [(2, 4, 3), (3, 5, 1), (3, 5, 3), (0, 4, 5)])
def test_a_resume_at_step_s_gives_exactly_the_remaining_steps(packed, workers, batch_size, start):
    """Resuming at step s yields the uninterrupted epoch's steps s.. : same keys, same crops, same
    order, including the steps merged from several workers' remainders (batch 5: 24 clips a rank)."""
    cfg = cfg_for(packed, workers=workers, batch_size=batch_size)
    ds = streamkit.resolve(cfg)
    full = epoch_batches(ds, cfg, 1, 0, 2)
    rest = epoch_batches(ds, cfg, 1, 0, 2, start_step=start)
    assert len(rest) == len(full) - start
    for a, b in zip(full[start:], rest):
        assert a["key"] == b["key"] and a["worker"].equal(b["worker"]) and a["frames"].equal(b["frames"])
    # the schedule's count of what each worker delivered before step s is what the batches say
    plans = plan.train_plan(ds.train.shards, cfg, 1, 0, 2, max(1, cfg.workers or 0))
    schedule = plan.step_schedule([p.quota for p in plans], batch_size)
    for w in range(max(1, workers)):
        delivered = sum(int((b["worker"] == w).sum()) for b in full[:start])
        assert plan.worker_parts(schedule, w, start)[0] == delivered


def test_resample_gives_the_planned_steps_even_with_one_shard(packed):
    cfg = StreamConfig(shards=(f"{packed}/000.tar",), batch_size=2, workers=2, crop=24, resample=True)
    ds = streamkit.resolve(cfg)
    for rank in range(2):
        got = epoch_batches(ds, cfg, 0, rank, 2)
        assert len(got) == 6 // (2 * 2) == 1


# --- augmentation -----------------------------------------------------------------------------


def _still_clip(frames=6, width=60, height=40):
    """A clip whose frames are all the same random-texture image: any per-frame crop would differ."""
    img = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    img = np.kron(img[::4, ::4], np.ones((4, 4, 1), np.uint8))  # 4x4 blocks survive JPEG
    pack = pack_jpegs([simplejpeg.encode_jpeg(img, quality=100, colorspace="RGB")] * frames)
    return pack, simplejpeg.decode_jpeg(pack_jpegs_first(pack), colorspace="RGB")


def pack_jpegs_first(pack):
    from pipeline.shardformat import unpack_jpegs

    return unpack_jpegs(pack)[0]


def test_one_crop_and_one_flip_per_clip():
    pack, full = _still_clip()
    boxes = set()
    for seed in range(40):
        clip = clips.crop_clip(pack, 24, clip_draw(seed, 0, "k"))
        top, left, flip = crop_box(40, 60, 24, clip_draw(seed, 0, "k"))
        boxes.add((top, left, flip))
        expected = full[top : top + 24, left : left + 24]
        expected = expected[:, ::-1] if flip else expected
        for t in range(clip.shape[0]):
            assert np.array_equal(clip[t], expected), f"frame {t} was cropped differently"
    assert len({b[:2] for b in boxes}) > 10 and {b[2] for b in boxes} == {False, True}


def test_eval_crop_is_centred_and_unflipped():
    pack, full = _still_clip()
    clip = clips.crop_clip(pack, 24, None)
    assert all(np.array_equal(f, full[8:32, 18:42]) for f in clip)


def test_streamed_clips_are_the_source_frames_in_order_under_one_crop(packed):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    source = {s["key"]: s for shard in ds.train.shards for s in read_shard(shard.url)}
    checked = 0
    for b in epoch_batches(ds, cfg, 0, 0, 1)[:3]:
        for key, clip, label in zip(b["key"], b["frames"].numpy(), b["label"].tolist()):
            frames = source[key]["frames"]
            assert label == source[key]["label"]
            t, h, w, _ = frames.shape
            matches = [
                (top, left, flip)
                for top in range(h - 24 + 1)
                for left in range(w - 24 + 1)
                for flip in (False, True)
                if np.array_equal(clip, _crop(frames, top, left, flip))
            ]
            assert len(matches) == 1, f"{key}: no single crop box explains all frames"
            checked += 1
    assert checked == 12


def _crop(frames, top, left, flip):
    out = frames[:, top : top + 24, left : left + 24]
    return out[:, :, ::-1] if flip else out


# --- evaluation split -------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_counts_every_test_clip_once(packed, world):
    cfg = cfg_for(packed)
    ds = streamkit.resolve(cfg)
    keys = []
    for rank in range(world):
        for b in streamkit.eval_batches(ds, cfg, rank, world):
            keys.extend(b["key"])
    expected = sorted(k for s in ds.test.shards for k in shard_keys(Path(s.url)))
    assert sorted(keys) == expected and len(expected) == 16


# --- faults and remote shards -----------------------------------------------------------------


def test_a_corrupt_sample_is_replaced_counted_and_named(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    victim = shard_keys(folder / "003.tar")[0]
    samples = []
    import tarfile

    with tarfile.open(folder / "003.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted({n.split(".")[0] for n in members}):
        jpgs = b"JPGS garbage" if key == victim else members[f"{key}.jpgs"]
        samples.append({"key": key, "label": int(members[f"{key}.cls"]), "jpgs": jpgs, "meta": {}})
    write_tar(folder / "003.tar", samples)
    cfg = cfg_for(folder, max_bad=0.5)
    ds = streamkit.resolve(cfg)
    got = epoch_batches(ds, cfg, 0, 0, 1)
    assert len(got) == 12
    faults = [f for b in got for f in b["faults"]]
    assert len(faults) == 1 and victim in faults[0]["what"] and "JPEG pack" in faults[0]["reason"]
    keys = [k for b in got for k in b["key"]]
    assert victim not in keys and len(keys) == 48 and len(set(keys)) == 47


def test_streams_over_http(packed):
    with httpkit.serve(packed) as base:
        cfg = StreamConfig(shards=(f"{base}/<000..007>.tar",), batch_size=4, workers=2, crop=24)
        ds = streamkit.resolve(cfg)
        assert ds.test.shards[0].url == f"{base}/test-000.tar"
        remote = [k for b in epoch_batches(ds, cfg, 0, 0, 1) for k in b["key"]]
        local_ds = streamkit.resolve(cfg_for(packed, shuffle_buffer=256))
        local = [k for b in epoch_batches(local_ds, cfg_for(packed, shuffle_buffer=256), 0, 0, 1) for k in b["key"]]
        assert remote == local
        with pytest.raises(UserError, match="cannot read index"):
            streamkit.resolve(StreamConfig(shards=(f"{base}/nothere/000.tar",)))


def test_a_truncated_shard_costs_its_missing_clips_not_the_epoch(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    data = (folder / "005.tar").read_bytes()
    (folder / "005.tar").write_bytes(data[: len(data) // 2])
    cfg = cfg_for(folder, max_bad=0.5)
    ds = streamkit.resolve(cfg)
    got = epoch_batches(ds, cfg, 0, 0, 1)
    assert len(got) == 12 and all(len(b["key"]) == 4 for b in got)
    faults = [f for b in got for f in b["faults"]]
    assert len(faults) == 1 and faults[0]["what"].endswith("005.tar") and 1 <= faults[0]["samples"] <= 6
    keys = [k for b in got for k in b["key"]]
    assert len(set(keys)) == 48 - faults[0]["samples"]


@pytest.mark.parametrize("other", [(32, 48), (48, 72)])
def test_a_frame_of_another_size_is_a_fault_not_garbage(other):
    """A smaller frame would fit the clip's buffer and a larger one would not: both are named."""
    from pipeline.shardformat import ShardFormatError

    rng = np.random.default_rng(0)
    frames = [
        simplejpeg.encode_jpeg(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), colorspace="RGB") for _ in range(4)
    ]
    frames[2] = simplejpeg.encode_jpeg(rng.integers(0, 256, (*other, 3), dtype=np.uint8), colorspace="RGB")
    with pytest.raises(ShardFormatError, match="frames of one clip differ in size"):
        clips.crop_clip(pack_jpegs(frames), 24, None)


def test_pre_signed_urls_are_matched_to_the_index_by_their_path(packed):
    """Pre-signed object-store URLs carry their signature in the query string: the shard's name in
    the index is its path's last segment, and index.json is looked for beside the path."""

    class Signed(httpkit.Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0].endswith(".tar") and "sig=" not in self.path:
                self.send_error(403, "unsigned")
                return
            super().do_GET()

    with httpkit.serve(packed, Signed) as base:
        cfg = StreamConfig(shards=(f"{base}/<000..007>.tar?sig=a%2Fb&X-Expires=60",), batch_size=4, workers=2, crop=24)
        assert urls.index_location(cfg.shards[0]) == f"{base}/index.json"
        ds = streamkit.resolve(cfg)
        assert [s.samples for s in ds.train.shards] == [6] * 8
        signed = epoch_batches(ds, cfg, 0, 0, 1)
        assert not [f for b in signed for f in b["faults"]]
        local_cfg = cfg_for(packed, shuffle_buffer=256)
        local = epoch_batches(streamkit.resolve(local_cfg), local_cfg, 0, 0, 1)
        assert [b["key"] for b in signed] == [b["key"] for b in local]
        assert all(a["frames"].equal(b["frames"]) for a, b in zip(signed, local))
