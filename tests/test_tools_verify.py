"""verify-shards: a clean pack passes, every kind of damage is named."""

import hashlib
import json
import re
import shutil
import tarfile

import pyarrow.parquet as pq
from shardmaker import index_of, rewrite_shard

from pipeline.cli import verify_app
from tests.conftest import assert_one_line_error, run_cli


def _problems(result):
    lines = result.stdout.strip().splitlines()
    return lines[:-1], lines[-1]


def test_verify_passes_on_a_clean_pack(pack):
    result = run_cli(verify_app, pack, "--quiet")
    assert result.exit_code == 0, result.output
    problems, summary = _problems(result)
    n = index_of(pack)["counts"]["packed"]
    assert problems == [] and re.fullmatch(rf"checked 6 shards, {n} clips, .* clips/s\): all well", summary)
    assert result.stderr == ""
    serial = run_cli(verify_app, pack, "--workers", "1")  # not a terminal: a plain progress line or two
    assert serial.exit_code == 0 and serial.stdout.endswith("all well\n")
    bar = serial.stderr.splitlines()
    assert (
        "\r" not in serial.stderr
        and bar[0].startswith("verify:   0% 0/")
        and bar[-1].startswith(f"verify: 100% {n}/{n} [")
    )


def _member(path, suffix, which=0):
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(suffix)][which]


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_names_the_shard_after_a_byte_flip_in_a_jpeg(damaged):
    shard = damaged / "001.tar"
    m = _member(shard, ".jpgs", 1)
    payload = shard.read_bytes()[m.offset_data : m.offset_data + m.size]
    scan = payload.index(b"\xff\xda")  # start of the first frame's entropy-coded data
    _flip(shard, m.offset_data + scan + 400)
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, summary = _problems(result)
    assert problems and all(p.startswith("001.tar: ") for p in problems), problems
    assert re.fullmatch(r"001\.tar: sha256 mismatch \(index [0-9a-f]{16}\.\.\., file [0-9a-f]{16}\.\.\.\)", problems[0])
    assert summary.endswith("in 1 file(s)")


def test_verify_names_the_shard_after_a_byte_flip_in_a_tar_header(damaged):
    shard = damaged / "002.tar"
    m = _member(shard, ".cls", 1)  # the second sample's first header
    _flip(shard, m.offset + 20)
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, _ = _problems(result)
    assert all(p.startswith("002.tar: ") for p in problems), problems
    assert any("sha256 mismatch" in p for p in problems)
    assert (
        f"002.tar: unreadable after 1 samples (corrupt tar header (bad checksum) at byte {m.offset}); readers lose the rest of the shard"
        in problems
    )
    assert any(re.fullmatch(r"002\.tar: 1 sample, index says \d+", p) for p in problems)


def test_verify_names_a_deleted_shard_and_a_stray_one(damaged):
    (damaged / "test-001.tar").unlink()
    shutil.copy(damaged / "000.tar", damaged / "017.tar")
    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, summary = _problems(result)
    n = index_of(damaged)["splits"]["test"]["shards"][1]["samples"]
    assert problems[0] == f"test-001.tar: missing (the index lists it with {n} samples)"
    assert problems[1:] == ["017.tar: not in index.json (left over from another pack?)"]
    assert summary.endswith("2 problem(s) in 2 file(s)")


def test_verify_checks_samples_inside_a_well_hashed_shard(damaged):
    """A shard rewritten with bad members, its index entry updated: only the sample checks can tell."""
    shard = damaged / "000.tar"
    keys = rewrite_shard(shard, lambda key, ext, data: data)
    bad_label, no_json, bad_pack = keys[0], keys[1], keys[2]

    def edit(key, ext, data):
        if key == bad_label and ext == "cls":
            return b"99"
        if key == no_json and ext == "json":
            return None
        if key == bad_pack and ext == "jpgs":
            return b"XXXX" + data[4:]
        return data

    rewrite_shard(shard, edit)
    index = index_of(damaged)
    data = shard.read_bytes()
    index["splits"]["train"]["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (damaged / "index.json").write_text(json.dumps(index))

    result = run_cli(verify_app, damaged, "--quiet")
    assert result.exit_code == 1, result.output
    problems, _ = _problems(result)
    assert problems == [
        f"000.tar: sample {bad_label}: label 99 outside 0..3",
        f"000.tar: sample {bad_label}: label 99 in .cls but {index['classes'].index(_class_of(damaged, bad_label))} in .json",
        f"000.tar: sample {no_json}: no .json",
        f"000.tar: sample {bad_pack}: frames do not decode (not a JPEG pack (bad magic))",
    ]


def _class_of(pack, key):
    rows = pq.read_table(pack / "manifest.parquet").to_pylist()
    return next(r["class_name"] for r in rows if r["key"] == key)


def test_verify_bad_arguments(pack, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(verify_app, tmp_path / "missing"), "folder not found")
    assert_one_line_error(run_cli(verify_app, empty), "no index.json in")
    assert_one_line_error(run_cli(verify_app, pack / "000.tar"), "not a folder")
    assert_one_line_error(run_cli(verify_app, pack, "--workers", "0"), "--workers must be >= 1")
