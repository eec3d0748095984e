"""pack-shards end to end on generated HMDB-shaped data: frames, labels, splits, keys, balance, bytes."""

import collections
import json
import re
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import read_shard
from pipeline.cli import pack_app
from pipeline.frames import clip_indices
from pipeline.tools.sampledata import read_code
from tests.conftest import run_cli


@pytest.fixture(scope="session")
def packed(hmdb_tree, tmp_path_factory):
    root, truth = hmdb_tree
    out = tmp_path_factory.mktemp("shards")
    result = run_cli(pack_app, root, out, "--quiet")
    assert result.exit_code == 0, result.output
    return out, result


def _all_samples(out, pattern):
    return [s for p in sorted(out.glob(pattern)) for s in read_shard(p)]


def test_default_layout(packed):
    out, result = packed
    names = sorted(p.name for p in out.glob("*.tar"))
    assert [n for n in names if not n.startswith("test-")] == [f"{i:03d}.tar" for i in range(32)]
    assert len([n for n in names if n.startswith("test-")]) >= 1
    assert (out / "index.json").exists() and (out / "manifest.parquet").exists()
    assert not list(out.glob(".*.partial"))
    assert "packed" in result.stdout and "clips/s" in result.stdout


def test_every_sample_is_frame_exact_and_labelled(packed, hmdb_tree):
    out, _ = packed
    root, truth = hmdb_tree
    classes = sorted({c.class_name for c in truth})
    assert len(classes) == 51
    by_source = {f"hmdb51_org/{c.class_name}/{c.file_name}": c for c in truth}
    samples = _all_samples(out, "*.tar")
    assert samples
    seen_lengths = set()
    for s in samples:
        c = by_source[s["meta"]["source"]]
        t = s["frames"].shape[0]
        assert s["frames"].dtype == np.uint8 and s["frames"].ndim == 4 and s["frames"].shape[3] == 3
        assert t == 16
        assert s["label"] == classes.index(c.class_name) == c.class_index
        expected = clip_indices(c.frames, 16)
        assert s["meta"]["indices"] == expected
        assert s["meta"]["decoded_frames"] == c.frames
        assert s["meta"]["padded"] == (c.frames < 16)
        codes = [read_code(f) for f in s["frames"]]
        assert codes == [(i, c.class_index) for i in expected], c.file_name
        assert min(s["frames"].shape[1:3]) == 128
        seen_lengths.add(c.frames)
    assert 1 in seen_lengths and any(n < 16 for n in seen_lengths - {1})


def test_splits_follow_the_official_files(packed, hmdb_tree):
    out, _ = packed
    root, truth = hmdb_tree
    train = {s["meta"]["source"] for s in _all_samples(out, "[0-9]*.tar")}
    test = {s["meta"]["source"] for s in _all_samples(out, "test-*.tar")}
    src = lambda c: f"hmdb51_org/{c.class_name}/{c.file_name}"  # noqa: E731
    assert train == {src(c) for c in truth if c.tags[0] == 1}
    assert test == {src(c) for c in truth if c.tags[0] == 2}
    unused = {src(c) for c in truth if c.tags[0] == 0}
    assert unused and not (unused & (train | test))
    hard = [s for s in train | test if Path(s).name.startswith("#")]
    dotted = [s for s in train | test if Path(s).stem.count(".")]
    assert hard and dotted, "names with '#' and dots must be packed"
    for s in _all_samples(out, "*.tar"):
        c = next(c for c in truth if src(c) == s["meta"]["source"])
        assert s["meta"]["split_tags"] == list(c.tags)


def test_keys_and_balance(packed):
    out, _ = packed
    index = json.loads((out / "index.json").read_text())
    keys = []
    for split in ("train", "test"):
        counts = []
        for entry in index["splits"][split]["shards"]:
            got = list(read_shard(out / entry["name"]))
            assert len(got) == entry["samples"]
            counts.append(len(got))
            keys += [s["key"] for s in got]
            assert len({s["label"] for s in got}) > 1 or len(got) == 1, "a shard holds one class only"
        assert max(counts) - min(counts) <= 1
        assert sum(counts) == index["splits"][split]["samples"]
    assert len(keys) == len(set(keys))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)


def test_index_and_manifest(packed, hmdb_tree):
    import hashlib

    out, _ = packed
    root, truth = hmdb_tree
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "clipstream" and index["version"] == 1
    assert index["layout"] == "hmdb51" and index["split_source"] == "official" and index["counts"]["missing"] == 0
    assert index["classes"] == sorted({c.class_name for c in truth})
    assert index["frames_per_clip"] == 16 and index["frame_size"] == {"short_side": 128}
    for split in ("train", "test"):
        for e in index["splits"][split]["shards"]:
            data = (out / e["name"]).read_bytes()
            assert e["bytes"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == len(truth)
    status = collections.Counter(r["status"] for r in rows)
    assert (
        status["packed"]
        == index["counts"]["packed"]
        == index["splits"]["train"]["samples"] + index["splits"]["test"]["samples"]
    )
    assert status["unused"] == sum(c.tags[0] == 0 for c in truth)
    assert all(r["shard"] for r in rows if r["status"] == "packed")
    assert {(r["layout"], r["split_source"]) for r in rows} == {("hmdb51", "official")}


def test_frames_match_a_second_decoder(packed, hmdb_tree):
    """Stored frames equal PyAV's sequential decode at the stored indices, resized the same way,
    on the clips built to mislead (B-frames, overstated and truncated headers)."""
    import cv2

    out, _ = packed
    root, truth = hmdb_tree
    tricky = {f"hmdb51_org/{c.class_name}/{c.file_name}": c for c in truth if c.kind != "plain"}
    assert {c.kind for c in tricky.values()} == {"bframes", "overstated", "truncated"}
    checked = 0
    for s in _all_samples(out, "*.tar"):
        if s["meta"]["source"] not in tricky:
            continue
        with av.open(str(root / s["meta"]["source"])) as c:
            seq = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(seq) == s["meta"]["decoded_frames"]
        w, h = s["meta"]["frame_size"]
        for frame, i in zip(s["frames"], s["meta"]["indices"]):
            ref = cv2.resize(seq[i], (w, h), interpolation=cv2.INTER_AREA)
            assert read_code(frame) == read_code(ref)
            assert np.abs(frame.astype(int) - ref.astype(int)).mean() < 4.0  # JPEG q90 noise only
        checked += 1
    assert checked >= 20
    rows = {r["source"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    truncated = [s for s, c in tricky.items() if c.kind == "truncated" and rows[s]["status"] == "packed"]
    assert truncated and all(rows[s]["decoded_frames"] == tricky[s].frames for s in truncated)


def test_rerun_is_byte_identical(packed, hmdb_tree, tmp_path):
    out, _ = packed
    root, _ = hmdb_tree
    again = tmp_path / "again"
    result = run_cli(pack_app, root, again, "--quiet", "--workers", "1")
    assert result.exit_code == 0, result.output
    for p in sorted(out.glob("*.tar")) + [out / "index.json", out / "manifest.parquet"]:
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_rerun_over_finished_dir_is_a_noop(packed, hmdb_tree):
    out, _ = packed
    root, _ = hmdb_tree
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    result = run_cli(pack_app, root, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def test_other_split_frame_count_and_original_size(small_tree, tmp_path):
    root, truth = small_tree
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "3", "--split", "2", "--frames", "5", "--keep-size")
    assert result.exit_code == 0, result.output
    by_source = {f"hmdb51_org/{c.class_name}/{c.file_name}": c for c in truth}
    train = [s for p in sorted(out.glob("[0-9]*.tar")) for s in read_shard(p)]
    assert {s["meta"]["source"] for s in train} == {k for k, c in by_source.items() if c.tags[1] == 1}
    for s in train:
        c = by_source[s["meta"]["source"]]
        assert s["frames"].shape == (5, c.size[1], c.size[0], 3)
        assert [read_code(f)[0] for f in s["frames"]] == clip_indices(c.frames, 5)
    index = json.loads((out / "index.json").read_text())
    assert index["frame_size"] == {"original": True} and index["frames_per_clip"] == 5


def test_pack_imports_nothing_it_does_not_use(small_tree, tmp_path):
    """Each of these was measured in a pack's start-up here: torch through webdataset's TarWriter
    (1.5 s), pydantic through typer 0.29 (0.11 s), http.client to name the output folder
    (15 ms), tqdm for a bar that --quiet does not draw (30 ms). And numpy runs with one OpenBLAS
    thread (a spinning thread per core cost 0.04 s)."""
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env

    root, _ = small_tree
    code = (
        "import sys; from pipeline.cli import pack_app\n"
        "try:\n    pack_app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "import os; print(os.environ.get('OPENBLAS_NUM_THREADS'))\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'webdataset', 'pebble', 'pydantic', 'http.client', 'tqdm') if m in sys.modules))"
    )
    args = [str(root), str(tmp_path / "out"), "--quiet", "--shards", "4", "--workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    *_, threads, imported = proc.stdout.strip().splitlines()
    assert imported == "[]" and threads == "1", proc.stdout
