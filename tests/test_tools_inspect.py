"""inspect-shards: summaries and contact sheets of a real pack of generated clips."""

import collections
import re
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from shardmaker import index_of, rewrite_shard

from pipeline import read_shard
from pipeline.cli import inspect_app
from pipeline.errors import UserError
from pipeline.shardformat import split_member_name
from pipeline.tools.inspect import (
    GAP,
    LABEL_STRIP,
    choose_samples,
    contact_sheet,
    scan_shards,
    shard_paths,
    write_png,
)
from pipeline.tools.sampledata import read_code
from tests.conftest import assert_one_line_error, run_cli

"""inspect-shards, verify-shards, plot-run and the progress helper, on a real pack of generated clips."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_patterns_expand_like_the_streaming_side(pack):
    train = [pack / f"{i:03d}.tar" for i in range(3)]
    assert shard_paths(f"{pack}/<000..002>.tar") == train
    assert shard_paths(f"{pack}/{{000..002}}.tar") == train
    assert shard_paths(f"{pack}/{{000,002}}.tar") == [train[0], train[2]]
    assert shard_paths(f"{pack}/001.tar::{pack}/test-000.tar") == [train[1], pack / "test-000.tar"]
    assert shard_paths(str(pack / "001.tar")) == [train[1]]
    assert shard_paths(str(pack)) == train + [pack / f"test-{i:03d}.tar" for i in range(3)]
    for bad, message in (
        (f"{pack}/<000..009>.tar", "7 of 10 shards"),
        (f"{pack}/<100..102>.tar", "no shards match"),
        (f"{pack}/<0a..2>.tar", "malformed range <0a..2>"),
        (f"{pack}/{{000..002.tar", "malformed range"),
    ):
        with pytest.raises(UserError, match=message):
            shard_paths(bad)


def test_member_names_split_like_webdataset():
    from webdataset.tariterators import base_plus_ext

    for name in (
        "a-1.jpgs",
        "a.b.c",
        "dir/key.json",
        "dir.x/key.cls",
        "noext",
        "dir/",
        ".hidden",
        "k.",
        "x/y.z/w.tar.gz",
    ):
        assert split_member_name(name) == base_plus_ext(name), name


def test_summary_counts_equal_manifest_and_index(pack):
    result = run_cli(inspect_app, pack, "--quiet")
    assert result.exit_code == 0, result.output
    out = result.stdout
    index = index_of(pack)
    rows = pq.read_table(pack / "manifest.parquet").to_pylist()
    packed = [r for r in rows if r["status"] == "packed"]

    expected = {c: collections.Counter() for c in index["classes"]}
    for r in packed:
        expected[r["class_name"]][r["split"]] += 1
    table = {}
    for line in out.splitlines():
        m = re.fullmatch(r"(\S+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m:
            table[m[1]] = tuple(int(x) for x in m.groups()[1:])
    for c in index["classes"]:
        tr, te = expected[c]["train"], expected[c]["test"]
        assert table[c] == (tr, te, tr + te), c
    total = (index["splits"]["train"]["samples"], index["splits"]["test"]["samples"])
    assert table["all"] == (*total, sum(total)) == (*total, len(packed))

    n_padded = sum(bool(r["padded"]) for r in packed)
    assert n_padded >= 1
    assert re.search(rf"padded clips .*: {n_padded} \(", out)
    assert f"{len(rows)} videos, {len(packed)} packed, 1 failed, {index['counts']['unused']} unused" in out
    assert re.search(r"^failed: hmdb51_org/catch/broken_clip_0\.avi: \S", out, re.M)
    sizes = re.search(r"^frame sizes: (.*)$", out, re.M)[1]
    assert sum(int(n) for n in re.findall(r"\((\d+) clips\)", sizes)) == len(packed)
    assert f"6 shards, {len(packed)} clips" in out and "warning" not in out


def test_summary_of_some_shards_counts_only_those(pack):
    result = run_cli(inspect_app, f"{pack}/<000..001>.tar", "--quiet")
    assert result.exit_code == 0, result.output
    entries = index_of(pack)["splits"]["train"]["shards"][:2]
    n = sum(e["samples"] for e in entries)
    assert f": 2 of 6 shards, {n} clips (train {n}, test 0)" in result.stdout
    assert re.search(rf"^all\s+{n}\s+0\s+{n}$", result.stdout, re.M)


def test_summary_of_shards_without_index_or_manifest(pack, tmp_path):
    for name in ("001.tar", "002.tar"):
        shutil.copy(pack / name, tmp_path / name)
        # Without class 0 the classes present are not the pack's class list: names must come from the metadata.
        first = {s["key"] for s in read_shard(tmp_path / name) if s["label"] == 0}
        rewrite_shard(tmp_path / name, lambda key, ext, data: None if key in first else data)  # noqa: B023 (called at once)
    result = run_cli(inspect_app, f"{tmp_path}/<001..002>.tar", "--quiet")
    assert result.exit_code == 0, result.output
    expected = collections.Counter(
        s["meta"]["class_name"] for p in ("001.tar", "002.tar") for s in read_shard(tmp_path / p)
    )
    got = {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)\s+0\s+\d+$", result.stdout, re.M)}
    assert got == {**expected, "all": sum(expected.values())}
    assert "warning: no index.json beside the shards" in result.stdout
    assert "no manifest.parquet beside the shards" in result.stdout


def _by_key(pack):
    return {s["key"]: s for p in sorted(pack.glob("*.tar")) for s in read_shard(p)}


@pytest.mark.parametrize("frame_height", [128, 64])
def test_contact_sheet_is_exact_png_of_the_drawn_clips(pack, tmp_path, frame_height):
    n = 3
    rows = choose_samples(scan_shards(shard_paths(str(pack)), quiet=True), n, seed=5)
    assert len({(r.shard, r.key) for r in rows}) == n
    sheet = contact_sheet(rows, frame_height)
    path = tmp_path / "sheet.png"
    write_png(sheet.image, path)

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[..., ::-1]
    truth = _by_key(pack)
    clips = [truth[r.key] for r in rows]
    t = clips[0]["frames"].shape[0]
    widths = [round(c["frames"].shape[2] * frame_height / c["frames"].shape[1]) for c in clips]
    cell = max(widths)
    assert png.shape == (n * (LABEL_STRIP + frame_height), t * cell + (t - 1) * GAP, 3)
    assert len(set(widths)) > 1 or frame_height != 128, "the draw should mix frame widths"

    for r, (clip, w) in enumerate(zip(clips, widths)):
        y = r * (LABEL_STRIP + frame_height)
        strip = png[y : y + LABEL_STRIP]
        assert (strip > 128).any(), "label text missing"
        for i in range(t):
            x = i * (cell + GAP) + (cell - w) // 2
            got = png[y + LABEL_STRIP : y + LABEL_STRIP + frame_height, x : x + w]
            if frame_height == clip["frames"].shape[1]:
                assert np.array_equal(got, clip["frames"][i]), (clip["key"], i)
            assert read_code(got) == (clip["meta"]["indices"][i], clip["label"]), (clip["key"], i)


def test_sheet_from_the_cli(pack, tmp_path):
    path = tmp_path / "out" / "sheet.png"
    a = run_cli(inspect_app, f"{pack}/<000..002>.tar", "--sheet", path, "--samples", "2", "--seed", "1", "--quiet")
    assert a.exit_code == 0, a.output
    first = path.read_bytes()
    assert first[:8] == PNG_SIGNATURE
    h, w = cv2.imread(str(path)).shape[:2]
    assert f"contact sheet: {path} (2 clips, {w}x{h} px)" in a.stdout
    assert h == 2 * (LABEL_STRIP + 128)
    again = run_cli(inspect_app, f"{pack}/<000..002>.tar", "--sheet", path, "--samples", "2", "--seed", "1", "--quiet")
    assert again.exit_code == 0 and path.read_bytes() == first, "same seed, same sheet"
    every = run_cli(inspect_app, pack / "001.tar", "--sheet", path, "--samples", "50", "--quiet")
    k = index_of(pack)["splits"]["train"]["shards"][1]["samples"]
    assert every.exit_code == 0 and f"({k} clips (the shards hold only {k})" in every.stdout
    assert cv2.imread(str(path)).shape[0] == k * (LABEL_STRIP + 128)


def test_inspect_bad_arguments(pack, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file.png").mkdir()
    cases = [
        ((f"{pack}/<100..101>.tar",), "no shards match"),
        ((f"{pack}/<a..b>.tar",), "malformed range"),
        ((empty,), "no index.json in"),
        ((pack, "--samples", "0"), "--samples must be >= 1"),
        ((pack, "--frame-height", "2"), "--frame-height"),
        ((pack, "--sheet", tmp_path / "file.png"), "must name a file"),
    ]
    for args, pattern in cases:
        assert_one_line_error(run_cli(inspect_app, *args, "--quiet"), pattern)


def test_summary_warns_when_shards_disagree_with_index_and_manifest(damaged):
    keys = rewrite_shard(damaged / "001.tar", lambda key, ext, data: data)
    rewrite_shard(damaged / "001.tar", lambda key, ext, data: None if key == keys[-1] else data)
    shutil.copy(damaged / "000.tar", damaged / "017.tar")
    result = run_cli(inspect_app, f"{damaged}/{{000,001,017}}.tar", "--quiet")
    assert result.exit_code == 0, result.output
    n = index_of(damaged)["splits"]["train"]["shards"][1]["samples"]
    m = index_of(damaged)["splits"]["train"]["shards"][0]["samples"]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: 001.tar holds {n - 1} samples, index.json says {n}: run verify-shards {damaged}",
        "warning: 017.tar is not in index.json",
        f"warning: 001.tar holds {n - 1} samples, manifest.parquet lists {n}",
        f"warning: 017.tar holds {m} samples, manifest.parquet lists 0",
    ]
