"""UCF101 and Kinetics layouts end to end: generated trees, real pack-shards runs, exact frames,
labels and splits as the official lists, classInd.txt and the split folders decide."""

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline import read_shard
from pipeline.cli import inspect_app, pack_app
from pipeline.frames import clip_indices
from pipeline.tools.sampledata import UCF101_CLASSES, make_sample_data, read_code
from tests.conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def ucf_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    return root, make_sample_data(root, classes=4, clips_per_class=5, seed=2, layout="ucf101")


@pytest.fixture(scope="module")
def kinetics_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    return root, make_sample_data(root, classes=4, clips_per_class=4, seed=3, layout="kinetics")


@pytest.fixture(scope="module")
def kinetics_pack(kinetics_tree, tmp_path_factory):
    root, _ = kinetics_tree
    out = tmp_path_factory.mktemp("kinetics-shards")
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2")
    assert result.exit_code == 0, result.output
    return out, result


def _samples(out, pattern):
    return [s for p in sorted(out.glob(pattern)) for s in read_shard(p)]


def _manifest(out):
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _assert_exact(sample, clip):
    """The stored frames are the source frames at round(i(n-1)/(T-1)): each frame carries its index and class."""
    expected = clip_indices(clip.frames, 16)
    assert sample["meta"]["indices"] == expected
    assert [read_code(f) for f in sample["frames"]] == [(i, clip.class_index) for i in expected], clip.source


@pytest.mark.parametrize("split", [1, 2])
def test_ucf101_official_split_classind_labels_exact_frames(ucf_tree, tmp_path, split):
    root, truth = ucf_tree
    result = run_cli(pack_app, root, tmp_path / "out", "--quiet", "--shards", "2", "--split", split)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "ucf101" and index["split_source"] == "official" and index["version"] == 1
    # Labels follow classInd.txt, whose generated order is not the sorted order.
    assert index["classes"] == list(UCF101_CLASSES[:4]) != sorted(UCF101_CLASSES[:4])
    train, test = _samples(out, "[0-9]*.tar"), _samples(out, "test-*.tar")
    by_source = {c.source: c for c in truth}
    assert {s["meta"]["source"] for s in train} == {c.source for c in truth if c.tags[split - 1] == 1}
    assert {s["meta"]["source"] for s in test} == {c.source for c in truth if c.tags[split - 1] == 2}
    for s in train + test:
        c = by_source[s["meta"]["source"]]
        assert s["label"] == c.class_index == index["classes"].index(c.class_name)
        assert s["meta"]["class_name"] == c.class_name and s["meta"]["split_tags"] == list(c.tags)
        _assert_exact(s, c)
    # The folder HandStandPushups is classInd's HandstandPushups: matched ignoring case, and said so.
    quirk = [s for s in train + test if s["meta"]["source"].startswith("HandStandPushups/")]
    assert quirk and all(s["meta"]["class_name"] == "HandstandPushups" and s["label"] == 1 for s in quirk)
    assert "case-insensitively" in result.stderr
    rows = _manifest(out)
    assert {r["layout"] for r in rows} == {"ucf101"} and {r["split_source"] for r in rows} == {"official"}
    assert sorted(r["source"] for r in rows) == sorted(by_source)


def test_ucf101_without_lists_holds_out_whole_groups(ucf_tree, copy_tree, tmp_path):
    root = copy_tree(ucf_tree)
    shutil.rmtree(root / "ucfTrainTestlist")
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert "warning: no UCF101 split lists" in result.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "ucf101" and index["split_source"] == "grouped"
    # Without classInd.txt the labels are the sorted folder names.
    assert index["classes"] == sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = _manifest(out)
    assert len(rows) == len(ucf_tree[1]) and all(r["status"] == "packed" for r in rows)
    for s in range(3):
        sides: dict[str, set] = {}
        for r in rows:
            group = re.search(r"_g(\d+)_c\d+\.avi$", r["source"])[1]
            sides.setdefault(group, set()).add(r["split_tags"][s])
        assert all(len(t) == 1 for t in sides.values()), f"split {s + 1}: a group is on both sides: {sides}"
        n_test = sum(r["split_tags"][s] == 2 for r in rows)
        assert 0.15 * len(rows) <= n_test <= 0.5 * len(rows)
    train = {x["meta"]["source"] for x in _samples(out, "[0-9]*.tar")}
    assert train == {r["source"] for r in rows if r["split_tags"][0] == 1}


def test_kinetics_split_folders_labels_and_exact_frames(kinetics_pack, kinetics_tree):
    out, result = kinetics_pack
    _, truth = kinetics_tree
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "kinetics" and index["split_source"] == "folders"
    clips = [c for c in truth if c.kind != "missing"]
    # The sorted union of both folders' classes: the third class exists in val/ only.
    assert index["classes"] == sorted({c.class_name for c in clips})
    val_only = {c.class_name for c in clips} - {c.class_name for c in clips if c.source.startswith("train/")}
    assert len(val_only) == 1
    train, test = _samples(out, "[0-9]*.tar"), _samples(out, "test-*.tar")
    assert {s["meta"]["source"] for s in train} == {c.source for c in clips if c.source.startswith("train/")}
    assert {s["meta"]["source"] for s in test} == {c.source for c in clips if c.source.startswith("val/")}
    by_source = {c.source: c for c in clips}
    for s in train + test:
        c = by_source[s["meta"]["source"]]
        assert s["label"] == index["classes"].index(c.class_name) == c.class_index
        assert s["meta"]["split_tags"] == [1 if s["meta"]["split"] == "train" else 2]
        assert re.fullmatch(r"[A-Za-z0-9_-]+", s["key"])
        _assert_exact(s, c)


def test_kinetics_csv_rows_without_a_file_are_reported(kinetics_pack, kinetics_tree):
    out, result = kinetics_pack
    _, truth = kinetics_tree
    gone = {c.source: c for c in truth if c.kind == "missing"}
    assert len(gone) == 4
    rows = _manifest(out)
    missing = [r for r in rows if r["status"] == "missing"]
    assert {r["source"] for r in missing} == set(gone)
    classes = json.loads((out / "index.json").read_text())["classes"]
    for r in missing:
        c = gone[r["source"]]
        assert r["split"] == ("train" if c.tags == (1,) else "test") and r["shard"] is None and r["key"] is None
        assert r["label"] == (classes.index(c.class_name) if c.class_name in classes else None)
        assert re.match(r"listed in annotations/(train|validate)\.csv", r["reason"])
    assert json.loads((out / "index.json").read_text())["counts"]["missing"] == 4
    assert "missing 4 (listed, no file)" in result.stdout
    assert sum(r["status"] == "packed" for r in rows) == sum(c.kind != "missing" for c in truth)


def test_kinetics_test_folder_is_the_test_set_only_without_val(kinetics_tree, copy_tree, tmp_path):
    root = copy_tree(kinetics_tree)
    _, truth = kinetics_tree
    val = {c.source for c in truth if c.kind != "missing" and c.source.startswith("val/")}
    # val/ and test/ both there: val/ fills the test shards, test/ is listed as unused.
    shutil.copytree(root / "val", root / "test")
    out = tmp_path / "both"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert {s["meta"]["source"] for s in _samples(out, "test-*.tar")} == val
    unused = [r for r in _manifest(out) if r["status"] == "unused"]
    assert {r["source"] for r in unused} == {"test/" + s[4:] for s in val}
    assert all("val/ exists" in r["reason"] and r["split_tags"] == [0] for r in unused)
    # Only test/: it fills the test shards.
    shutil.rmtree(root / "val")
    out = tmp_path / "only-test"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2")
    assert result.exit_code == 0, result.output
    assert {s["meta"]["source"] for s in _samples(out, "test-*.tar")} == {"test/" + s[4:] for s in val}


def test_forced_layout_is_used(ucf_tree, small_tree, tmp_path):
    root, truth = ucf_tree
    # --layout folders ignores the UCF lists and classInd.txt: sorted labels, grouped split.
    out = tmp_path / "folders"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2", "--layout", "folders")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "folders" and index["split_source"] == "grouped"
    folders = sorted({c.source.split("/")[0] for c in truth})
    assert index["classes"] == folders
    for s in _samples(out, "*.tar"):
        assert s["label"] == folders.index(s["meta"]["source"].split("/")[0])
    out = tmp_path / "hmdb"
    result = run_cli(pack_app, small_tree[0], out, "--quiet", "--shards", "2", "--layout", "hmdb51")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == "hmdb51" and index["split_source"] == "official"


def test_forced_layout_that_does_not_fit_is_a_one_line_error(ucf_tree, kinetics_tree, small_tree, copy_tree, tmp_path):
    ucf, kin, hmdb = ucf_tree[0], kinetics_tree[0], small_tree[0]
    cases = [
        ((ucf, "--layout", "kinetics"), r"--layout kinetics does not fit .*no train/, val/ or test/"),
        ((hmdb, "--layout", "ucf101"), r"--layout ucf101 does not fit .*no classInd\.txt"),
        ((hmdb / "hmdb51_org", "--layout", "ucf101"), r"--layout ucf101 does not fit .*not v_<Class>_gNN_cNN"),
        ((kin, "--layout", "hmdb51"), r"--layout hmdb51 does not fit .*no hmdb51_org/"),
        ((kin, "--layout", "folders"), r"no videos found in"),
        ((kin, "--split", "2"), r"--split 2 does not apply to the kinetics layout"),
        ((ucf, "--layout", "ucf"), r"unknown layout 'ucf'"),
    ]
    for i, (args, pattern) in enumerate(cases):
        assert_one_line_error(run_cli(pack_app, args[0], tmp_path / f"o{i}", "--quiet", *args[1:]), pattern)
    assert not any((tmp_path / f"o{i}" / "index.json").exists() for i in range(len(cases)))


def test_damaged_ucf_lists_are_one_line_errors(ucf_tree, copy_tree, tmp_path):
    root = copy_tree(ucf_tree)
    lists = root / "ucfTrainTestlist"
    train1 = (lists / "trainlist01.txt").read_bytes()
    (lists / "trainlist01.txt").write_bytes(train1.replace(b".avi 1\r\n", b".avi 3\r\n", 1))
    assert_one_line_error(
        run_cli(pack_app, root, tmp_path / "o1", "--quiet"),
        r"trainlist01\.txt:\d+: class id 3 but classInd\.txt gives ApplyEyeMakeup id 1",
    )
    (lists / "trainlist01.txt").write_bytes(train1)
    (lists / "testlist02.txt").unlink()
    assert_one_line_error(
        run_cli(pack_app, root, tmp_path / "o2", "--quiet", "--split", "2"), r"split 2 has no testlist02\.txt"
    )
    (lists / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n3 Archery\r\n")
    assert_one_line_error(
        run_cli(pack_app, root, tmp_path / "o3", "--quiet"), r"classInd\.txt: class ids must be 1\.\.N"
    )


def test_ucf_lists_beside_the_data_folder_and_splits_dir(ucf_tree, tmp_path):
    """The official archives unpack to UCF-101/ and ucfTrainTestlist/ side by side."""
    root, truth = ucf_tree
    data = tmp_path / "UCF-101"
    shutil.copytree(root, data, ignore=shutil.ignore_patterns("ucfTrainTestlist"))
    shutil.copytree(root / "ucfTrainTestlist", tmp_path / "ucfTrainTestlist")
    for args in ((), ("--splits-dir", tmp_path / "ucfTrainTestlist")):
        out = tmp_path / f"out{len(args)}"
        result = run_cli(pack_app, data, out, "--quiet", "--shards", "2", *args)
        assert result.exit_code == 0, result.output
        index = json.loads((out / "index.json").read_text())
        assert index["split_source"] == "official" and index["classes"] == list(UCF101_CLASSES[:4])
        assert {s["meta"]["source"] for s in _samples(out, "test-*.tar")} == {c.source for c in truth if c.tags[0] == 2}


def test_inspect_shows_layout_and_missing(kinetics_pack):
    out, _ = kinetics_pack
    result = run_cli(inspect_app, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "layout kinetics, folders split" in result.stdout
    assert "16 videos, 16 packed, 0 failed, 0 unused, 4 missing (listed, no file)" in result.stdout


def test_hmdb51_listed_clip_without_a_file_is_a_missing_row(small_tree, copy_tree, tmp_path):
    root = copy_tree(small_tree)
    with open(root / "testTrainMulti_7030_splits" / "brush_hair_test_split1.txt", "a") as f:
        f.write("#ghost_(2009)_brush_hair_h_nm_np1_fr_goo_0.avi 1 \n")
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "2")
    assert result.exit_code == 0, result.output
    missing = [r for r in _manifest(out) if r["status"] == "missing"]
    assert [(r["source"], r["split"], r["label"], r["split_tags"]) for r in missing] == [
        ("hmdb51_org/brush_hair/#ghost_(2009)_brush_hair_h_nm_np1_fr_goo_0.avi", "train", 0, [1, 0, 0])
    ]
    assert "missing 1 (listed, no file)" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["counts"]["missing"] == 1 and index["layout"] == "hmdb51"
