"""Weighted mixes of packs (pipeline/stream/mix.py): the epoch's draw as pure math, then two real
packs with different classes, frame sizes and stored frames mixed 0.7 / 0.3 through ClipLoader and
ClipDataset on 2 ranks."""

from __future__ import annotations

import collections
import dataclasses

import pytest
from shardmaker import make_packed, make_temporal_pack

from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.stream import mix
from pipeline.stream.mix import epoch_draw, epoch_shards, pack_counts, share_tolerance
from pipeline.stream.plan import train_plan
from pipeline.stream.sources import Pack, Shard, ShardSet, resolve

# ---------------------------------------------------------------------------------------------
# The draw, pure


@pytest.mark.parametrize(
    "weights, total, expected",
    [
        ((0.7, 0.3), 48, [34, 14]),
        ((0.5, 0.5), 7, [4, 3]),
        ((1, 1, 1), 10, [4, 3, 3]),
        ((2, 1), 9, [6, 3]),
        ((0.1, 0.9), 1, [0, 1]),
    ],
)
def test_pack_counts_table(weights, total, expected):
    assert pack_counts(weights, total) == expected


def _set(sizes: list[list[int]]) -> ShardSet:
    shards = tuple(
        Shard(f"p{p}/{i:03d}.tar", n, pack=p) for p, counts in enumerate(sizes) for i, n in enumerate(counts)
    )
    packs = tuple(Pack(f"p{p}/index.json", ("a",), (0,)) for p in range(len(sizes)))
    return ShardSet(shards, ("a",), 4, "p0/index.json", None, packs)


SIZES = [[5, 4, 5, 4, 5, 4, 5, 4], [2, 2, 2, 2, 2, 2]]  # 36 clips in 8 shards, 12 in 6


def test_without_weights_the_epoch_is_the_set():
    source = _set(SIZES)
    cfg = StreamConfig(shards=("x",))
    assert epoch_shards(source, cfg, 3) is source.shards


def test_every_shard_of_a_pack_once_per_pass():
    counts, wanted = tuple(SIZES[1]), 14  # more than the pack holds: more than one pass an epoch
    drawn = [i for e in range(7) for i in epoch_draw(counts, wanted, 5, 1, e)]
    passes = [drawn[k : k + len(counts)] for k in range(0, len(drawn) - len(counts) + 1, len(counts))]
    assert len(passes) >= 7
    for p in passes:
        assert sorted(p) == list(range(len(counts)))
    # each epoch holds at least its clips, and stops at the first shard that gets there
    for e in range(7):
        got = [counts[i] for i in epoch_draw(counts, wanted, 5, 1, e)]
        assert sum(got) >= wanted and sum(got) - got[-1] < wanted


def test_draw_is_a_function_of_seed_and_epoch():
    source, cfg = _set(SIZES), StreamConfig(shards=("x",), weights=(0.7, 0.3), seed=3)
    first = [epoch_shards(source, cfg, e) for e in range(6)]
    mix._CURSORS.clear()  # the memo is not what makes it the same
    assert [epoch_shards(source, cfg, e) for e in (5, 2, 0, 4, 1, 3)] == [first[e] for e in (5, 2, 0, 4, 1, 3)]
    assert len(set(first)) > 1  # epochs differ
    assert epoch_shards(source, dataclasses.replace(cfg, seed=4), 1) != first[1]


BIG = [[50, 49] * 8, [20, 21] * 5]  # 792 and 205 clips


@pytest.mark.parametrize("epoch_fill, sizes, bound", [("pad", SIZES, 0.15), ("pad", BIG, 0.08), ("drop", BIG, 0.22)])
def test_shares_within_tolerance_and_equal_steps(epoch_fill, sizes, bound):
    source = _set(sizes)
    cfg = StreamConfig(shards=("x",), weights=(0.7, 0.3), batch_size=4, epoch_fill=epoch_fill, shuffle_buffer=1)
    tolerance = share_tolerance(source, cfg, 2)
    assert tolerance < bound  # the bound is (largest shards + what drop leaves) / N: small beside the weights
    wanted = pack_counts(cfg.weights, sum(map(sum, sizes)))
    for epoch in range(8):
        shards = epoch_shards(source, cfg, epoch)
        held = collections.Counter()
        for s in shards:
            held[s.pack] += s.samples
        assert held[0] >= wanted[0] and held[1] >= wanted[1]
        plans = [train_plan(shards, cfg, epoch, r, 2, 2) for r in range(2)]
        steps = {sum(p.quota for p in ps) // cfg.batch_size for ps in plans}
        assert len(steps) == 1  # equal steps on both ranks
        # clips delivered per pack (pad: all of the list; drop: each worker's first `quota` shards'
        # clips at most, and shuffle_buffer=1 keeps reading order, so count them in order)
        got = collections.Counter()
        for ps in plans:
            for p in ps:
                left = min(p.quota, sum(s.samples for s in p.shards))
                for s in p.shards:
                    take = min(left, s.samples)
                    got[s.pack] += take
                    left -= take
        total = sum(got.values())
        for pack, weight in ((0, 0.7), (1, 0.3)):
            assert abs(got[pack] / total - weight) <= tolerance, (epoch, got)


def test_weights_checked():
    with pytest.raises(UserError, match="positive finite"):
        StreamConfig(shards=("x",), weights=(0.7, float("nan")))
    with pytest.raises(UserError, match="positive finite"):
        StreamConfig(shards=("x",), weights=(1.0, 0.0))
    with pytest.raises(UserError, match="resample"):
        StreamConfig(shards=("x",), weights=(1.0, 2.0), resample=True)
    assert StreamConfig(shards=("x",), weights=[1, 3]).weights == (1.0, 3.0)
    assert StreamConfig(shards=("x",), weights="0.7,0.3").weights == (0.7, 0.3)  # --weights 0.7,0.3
    with pytest.raises(UserError, match="separated by commas"):
        StreamConfig(shards=("x",), weights="0.7;0.3")
    with pytest.raises(UserError, match=r"3 `weights` for 2 packs .*one weight per pack"):
        mix.check_mix(_set(SIZES), StreamConfig(shards=("x",), weights=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------
# Two real packs

CLASSES_A = ["catch", "chew", "clap"]
CLASSES_B = ["brush_hair", "chew"]
UNION = ("brush_hair", "catch", "chew", "clap")


@pytest.fixture(scope="module")
def two_packs(tmp_path_factory):
    """Pack A: 3 classes, 36 training clips in 8 shards, 4 stored frames of 32 px height. Pack B:
    2 classes (one, 'chew', shared), 12 training clips in 6 shards, 7 stored frames of 40x48."""
    root = tmp_path_factory.mktemp("mix")
    make_packed(root / "a", names=CLASSES_A, train_per_class=12, train_shards=8, test_per_class=2, height=32)
    make_temporal_pack(root / "b", [9, 10, 11, 12, 13, 14], frames=4, stored=7, names=CLASSES_B, width=48, height=40)
    return root / "a", root / "b"


def truth(pack_dir, pack_classes) -> dict[str, str]:
    """key -> class name, from the stored labels and the pack's own class list."""
    from pipeline import read_shard

    return {s["key"]: pack_classes[s["label"]] for s in read_shard(str(pack_dir) + "/")}


def test_label_space_by_name(two_packs):
    a, b = two_packs
    source = resolve([str(a) + "/", str(b) + "/"])
    assert source.classes == UNION
    assert source.label_maps == ((1, 2, 3), (0, 2))
    assert [s.pack for s in source.shards] == [0] * 8 + [1] * 6
    # one pack alone keeps its own labels
    assert resolve(str(b) + "/").label_maps == ((0, 1),)


def test_mismatched_frames_is_one_line(two_packs, tmp_path):
    make_packed(tmp_path / "t5", frames=5)
    with pytest.raises(UserError) as e:
        resolve([str(two_packs[0]) + "/", str(tmp_path / "t5") + "/"])
    message = str(e.value)
    assert "\n" not in message and "frames per clip" in message and "has 4" in message and "has 5" in message


def test_a_pack_too_small_for_the_crop_is_one_line(two_packs, tmp_path):
    from pipeline import ClipLoader

    make_packed(tmp_path / "small", height=16)
    with pytest.raises(UserError, match=r"larger than the frames .* 16 px .*small") as e:
        ClipLoader([str(two_packs[0]) + "/", str(tmp_path / "small") + "/"], crop=24, rank=0, world_size=1)
    assert "\n" not in str(e.value)


def _loader(two_packs, rank, world, **kw):
    from pipeline import ClipLoader

    a, b = two_packs
    options = dict(weights=(0.7, 0.3), batch_size=4, crop=24, workers=1, seed=2, shuffle_buffer=4)
    return ClipLoader([str(a) + "/", str(b) + "/"], rank=rank, world_size=world, **{**options, **kw})


def _rows(batch) -> list[tuple[int, str, int, bool]]:
    return list(
        zip(batch["pack"].tolist(), batch["key"], batch["label"].tolist(), batch["repeat"].tolist(), strict=True)
    )


def test_cliploader_mix_on_two_ranks(two_packs):
    a, b = two_packs
    names = {0: truth(a, CLASSES_A), 1: truth(b, CLASSES_B)}
    loaders = [_loader(two_packs, r, 2) for r in range(2)]
    tolerance = share_tolerance(loaders[0].source, loaders[0].cfg, 2)
    try:
        for epoch in range(3):
            steps = [loader.steps(epoch) for loader in loaders]
            assert steps[0] == steps[1]
            rows = []
            for loader in loaders:
                batches = list(loader.epoch(epoch))
                assert len(batches) == steps[0]
                rows += [r for batch in batches for r in _rows(batch)]
            for pack, key, label, _ in rows:
                assert loaders[0].classes[label] == names[pack][key]  # labels by name
            fresh = collections.Counter((p, k) for p, k, _, repeat in rows if not repeat)
            # exactly the clips of this epoch's draw, a shard drawn twice giving its clips twice
            listed = collections.Counter()
            for s in epoch_shards(loaders[0].source, loaders[0].cfg, epoch):
                for key in _keys(s.url):
                    listed[(s.pack, key)] += 1
            assert fresh == listed
            total = sum(fresh.values())
            for pack, weight in ((0, 0.7), (1, 0.3)):
                share = sum(n for (p, _), n in fresh.items() if p == pack) / total
                assert abs(share - weight) <= tolerance, (epoch, share)
    finally:
        for loader in loaders:
            loader.close()


def _keys(url: str) -> list[str]:
    from pipeline import read_shard

    return [s["key"] for s in read_shard(url)]


def test_cliploader_mix_resumes_mid_epoch(two_packs):
    whole = _loader(two_packs, 1, 2)
    with whole:
        expected = [_rows(b) for e in range(2) for b in whole.epoch(e)]
    first = _loader(two_packs, 1, 2)
    with first:
        got = [_rows(b) for b in _take(first.epoch(0), 3)]
        state = first.state_dict()
    assert state["step"] == 3 and state["plan"]["weights"] == [0.7, 0.3]
    second = _loader(two_packs, 1, 2)
    second.load_state_dict(state)
    with second:
        got += [_rows(b) for e in range(2) for b in second.epoch(e)]
    assert got == expected
    # other weights: refused mid-epoch
    other = _loader(two_packs, 1, 2, weights=(0.5, 0.5))
    with pytest.raises(ValueError, match="weights"):
        other.load_state_dict(state)


def test_cliploader_mix_resumes_on_another_world_size(two_packs):
    first = [_loader(two_packs, r, 2) for r in range(2)]
    used = collections.Counter()
    for loader in first:
        with loader:
            for batch in _take(loader.epoch(0), 2):
                used.update((p, k) for p, k, _, repeat in _rows(batch) if not repeat)
    state = first[0].state_dict()
    rest = _loader(two_packs, 0, 1)
    rest.load_state_dict(state)
    with rest:
        for batch in rest.epoch(0):
            used.update((p, k) for p, k, _, repeat in _rows(batch) if not repeat)
    listed = collections.Counter()
    for s in epoch_shards(rest.source, rest.cfg, 0):
        listed.update((s.pack, key) for key in _keys(s.url))
    assert used == listed  # every clip of the epoch's draw once, none lost or repeated


def _take(batches, n):
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_clipdataset_mix(two_packs):
    from torch.utils.data import DataLoader

    from pipeline import ClipDataset

    a, b = two_packs
    names = {0: truth(a, CLASSES_A), 1: truth(b, CLASSES_B)}
    options = dict(weights=(0.7, 0.3), batch_size=4, crop=24, seed=2, shuffle_buffer=4, num_workers=0)
    lengths, packs = [], collections.Counter()
    for rank in range(2):
        dataset = ClipDataset([str(a) + "/", str(b) + "/"], rank=rank, world_size=2, **options)
        assert dataset.classes == UNION
        planned = len(dataset)  # epoch 0's; with a mix each epoch has its own
        batches = list(DataLoader(dataset, batch_size=None, num_workers=0))
        assert len(batches) == planned
        lengths.append(len(batches))
        for batch in batches:
            for pack, key, label, _ in _rows(batch):
                assert UNION[label] == names[pack][key]
                packs[pack] += 1
        # a mid-epoch state resumes exactly
        again = ClipDataset([str(a) + "/", str(b) + "/"], rank=rank, world_size=2, **options)
        it = iter(again)
        head = [_rows(next(it)) for _ in range(2)]
        state = again.state_dict()
        resumed = ClipDataset([str(a) + "/", str(b) + "/"], rank=rank, world_size=2, **options)
        resumed.load_state_dict(state)
        assert head + [_rows(x) for x in resumed] == [_rows(x) for x in batches]
    assert lengths[0] == lengths[1]
    assert set(packs) == {0, 1}


# ---------------------------------------------------------------------------------------------
# train-stream on 2 ranks


def _train(two_packs, log, *extra):
    import subprocess

    from conftest import cli_command, cli_env

    a, b = two_packs
    args = ["--shards", f"{a}/", "--shards", f"{b}/", "--weights", "0.7,0.3", "--model", "tiny", "--crop", "24"]
    args += ["--batch-size", "4", "--shuffle-buffer", "4", "--no-progress", "--eval-every", "0", "--audit-keys"]
    args += ["--log-every", "1", "--threads", "1", "--workers", "1", "--seed", "2", "--log-dir", str(log)]
    cmd = cli_command("train_app") + args + list(extra)
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)


def _audit(log, epoch) -> list[list[str]]:
    return [p.read_text().splitlines() for p in sorted((log / "audit").glob(f"epoch-{epoch:03d}-rank-*.txt"))]


@pytest.mark.slow
def test_train_stream_mix_on_two_ranks_resumes_exactly(two_packs, tmp_path):
    import json

    import torch

    whole = _train(two_packs, tmp_path / "whole", "--epochs", "2", "--nproc-per-node", "2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    first = _train(two_packs, cut, "--epochs", "2", "--nproc-per-node", "2", "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    refused = _train(two_packs, cut, "--resume", str(cut), "--weights", "0.5,0.5", "--nproc-per-node", "2")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "weights" in refused.stderr
    second = _train(two_packs, cut, "--resume", str(cut), "--nproc-per-node", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    for epoch in (0, 1):
        ranks = _audit(tmp_path / "whole", epoch)
        assert len(ranks) == 2 and len(ranks[0]) == len(ranks[1])  # equal steps
        assert _audit(cut, epoch) == ranks  # the resumed run used the same clips, in the same order
        assert all(line.split(":", 1)[0] in ("0", "1") for lines in ranks for line in lines)  # pack named
    a, b = (torch.load(log / "checkpoint.pt", weights_only=True) for log in (tmp_path / "whole", cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["run"]["weights"] == [0.7, 0.3] and a["run"]["classes"] == list(UNION)
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    mixes = [r for r in records if r["kind"] == "mix"]
    assert [r["epoch"] for r in mixes] == [1, 2]
    for r in mixes:
        assert abs(r["share"][0] - 0.7) <= 0.15 and abs(r["share"][1] - 0.3) <= 0.15  # the pad tolerance here: 7/48
    (final,) = [r for r in records if r["kind"] == "eval"]
    assert set(final["per_pack"]) == {f"{p}/index.json" for p in two_packs}
    assert sum(p["clips"] for p in final["per_pack"].values()) == final["clips"] == 6 + 12


def test_cli_mismatched_frames_and_weights_are_one_line(two_packs, tmp_path):
    from conftest import assert_one_line_error, run_cli

    from pipeline.cli import bench_app, train_app

    a, b = two_packs
    make_packed(tmp_path / "t5", frames=5)
    common = ["--model", "tiny", "--crop", "24", "--log-dir", tmp_path / "run"]
    result = run_cli(train_app, "--shards", f"{a}/", "--shards", f"{tmp_path / 't5'}/", "--weights", "1,1", *common)
    assert_one_line_error(result, r"frames per clip \(T\).* has 4, .* has 5")
    result = run_cli(train_app, "--shards", f"{a}/", "--shards", f"{b}/", "--weights", "0.7,0.2,0.1", *common)
    assert_one_line_error(result, r"3 `?(weights|--weights)`? for 2 packs")
    result = run_cli(bench_app, "--shards", f"{a}/", "--shards", f"{b}/", "--weights", "0.7,x")
    assert_one_line_error(result, r"separated by commas")
