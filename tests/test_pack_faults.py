"""Bad arguments, bad videos, missing split files: one-line errors or counted failures, never a crash."""

import json
import os
import re

import pyarrow.parquet as pq

from pipeline import read_shard
from pipeline.cli import pack_app, sample_data_app
from tests.conftest import assert_one_line_error, run_cli


def test_bad_arguments_table(tmp_path, small_tree):
    root, _ = small_tree
    empty = tmp_path / "empty"
    empty.mkdir()
    novideo = tmp_path / "novideo"
    (novideo / "clap").mkdir(parents=True)
    (novideo / "clap" / "notes.txt").write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        ((tmp_path / "missing", tmp_path / "o1"), "data folder not found"),
        ((a_file, tmp_path / "o2"), "not a folder"),
        ((empty, tmp_path / "o3"), "empty"),
        ((novideo, tmp_path / "o4"), "no videos found"),
        ((root, a_file), "is a file"),
        ((root, a_file / "sub"), "not writable"),
        ((root, tmp_path / "o5", "--split", "4"), "unknown split 4"),
        ((root, tmp_path / "o6", "--frames", "0"), "frames must be >= 1"),
        (
            (root, tmp_path / "o6b", "--frames", "4097"),
            r"frames must be <= 4096 \(what shard readers accept\), got 4097",
        ),
        (
            (root, tmp_path / "o6c", "--short-side", "8193"),
            r"short-side must be <= 8192 \(what shard readers accept\), got 8193",
        ),
        ((root, tmp_path / "o7", "--part", "3/2"), "--part"),
        ((root, tmp_path / "o8", "--part", "one"), "--part"),
        ((root, tmp_path / "o9", "--decoder", "ffmpeg"), "unknown decoder"),
        ((root, tmp_path / "o10", "--shards", "0"), "shards must be >= 1"),
        ((root, tmp_path / "o11", "--shards", "1000"), "training clips for --shards 1000"),
        ((root, tmp_path / "o12", "--quality", "101"), "quality"),
        ((root, tmp_path / "o13", "--splits-dir", tmp_path / "nosplits"), "split folder not found"),
    ]
    for args, pattern in cases:
        assert_one_line_error(run_cli(pack_app, *args, "--quiet"), pattern)
    assert_one_line_error(run_cli(sample_data_app, a_file), "is a file")
    assert_one_line_error(run_cli(sample_data_app, tmp_path / "s", "--classes", "52"), "classes")


def _add_train_clip(root, cls, name, data):
    (root / "hmdb51_org" / cls / name).write_bytes(data)
    with open(root / "testTrainMulti_7030_splits" / f"{cls}_test_split1.txt", "a") as f:
        f.write(f"{name} 1 \n")


def test_broken_videos_are_counted_not_fatal(small_tree, copy_tree, tmp_path):
    root = copy_tree(small_tree)
    good = next((root / "hmdb51_org" / "brush_hair").glob("*.avi")).read_bytes()
    _add_train_clip(root, "brush_hair", "empty_clip_0.avi", b"")
    _add_train_clip(root, "cartwheel", "garbage_clip_0.avi", os.urandom(5000))
    _add_train_clip(root, "catch", "half_a_header_0.avi", good[:300])
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--max-failures", "3")
    assert result.exit_code == 0, result.output
    rows = {r["source"].split("/")[-1]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    for name in ("empty_clip_0.avi", "garbage_clip_0.avi", "half_a_header_0.avi"):
        assert rows[name]["status"] == "failed" and rows[name]["reason"], rows[name]
        assert name in result.stdout
    assert "failed 3" in result.stdout
    index = json.loads((out / "index.json").read_text())
    assert index["counts"]["failed"] == 3
    packed = sum(1 for p in out.glob("*.tar") for _ in read_shard(p))
    assert packed == index["counts"]["packed"] == sum(r["status"] == "packed" for r in rows.values())
    # Above the threshold: the same pack exits 1 with one line naming a failure.
    again = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--max-failures", "0.05")
    assert again.exit_code == 1
    assert "3 of" in again.stderr and "--max-failures" in again.stderr


def test_hung_decoder_costs_one_clip(small_tree, copy_tree, tmp_path):
    """A FIFO named .avi blocks the decoder inside native code forever; the time-out kills it."""
    root = copy_tree(small_tree)
    fifo = root / "hmdb51_org" / "chew" / "stuck_stream_0.avi"
    os.mkfifo(fifo)
    with open(root / "testTrainMulti_7030_splits" / "chew_test_split1.txt", "a") as f:
        f.write("stuck_stream_0.avi 1\n")
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--timeout", "3", "--max-failures", "1")
    assert result.exit_code == 0, result.output
    rows = {r["source"].split("/")[-1]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert rows["stuck_stream_0.avi"]["status"] == "failed"
    assert "time-out" in rows["stuck_stream_0.avi"]["reason"]
    assert json.loads((out / "index.json").read_text())["counts"]["packed"] == len(rows) - 1 - sum(
        r["status"] == "unused" for r in rows.values()
    )


def test_grouped_fallback_split(small_tree, copy_tree, tmp_path):
    import shutil

    root = copy_tree(small_tree)
    shutil.rmtree(root / "testTrainMulti_7030_splits")
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "4")
    assert result.exit_code == 0, result.output
    assert "warning: no official split files found" in result.stderr
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert all(r["status"] == "packed" for r in rows)
    for cls in {r["class_name"] for r in rows}:
        sides = {}
        for r in rows:
            if r["class_name"] == cls:
                group = re.sub(r"_\d+$", "", r["source"].rsplit("/", 1)[1][:-4])
                sides.setdefault(group, set()).add(r["split"])
        assert all(len(s) == 1 for s in sides.values()), f"a source video of {cls} is on both sides"
        n_test = sum(r["split"] == "test" for r in rows if r["class_name"] == cls)
        n_all = sum(r["class_name"] == cls for r in rows)
        assert 1 <= n_test <= n_all // 2
    again = tmp_path / "again"
    assert run_cli(pack_app, root, again, "--quiet", "--shards", "4").exit_code == 0
    assert (again / "000.tar").read_bytes() == (out / "000.tar").read_bytes()


def test_changed_options_need_overwrite(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    assert run_cli(pack_app, root, out, "--quiet", "--shards", "4").exit_code == 0
    assert_one_line_error(
        run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--quality", "80"), r"quality 90 -> 80.*--overwrite"
    )
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "3", "--quality", "80", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("[0-9]*.tar")) == ["000.tar", "001.tar", "002.tar"]
    assert json.loads((out / "index.json").read_text())["options"]["quality"] == 80


def test_foreign_files_are_not_clobbered(small_tree, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    out.mkdir()
    (out / "000.tar").write_bytes(b"somebody else's")
    assert_one_line_error(run_cli(pack_app, root, out, "--quiet", "--shards", "4"), "not written by this pack")
    assert (out / "000.tar").read_bytes() == b"somebody else's"


def _task(x):
    import signal
    import time

    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if x == "hang":
        time.sleep(60)
    return {"value": x}


def test_decoder_pool_replaces_dead_and_hung_workers():
    """Real forked workers: one kills itself, one hangs past the time-out; each costs its own task
    only, and the tasks queued behind them on the same worker still run."""
    from pipeline.pack.pool import DecoderPool

    pool = DecoderPool(2, _task, timeout=2.0, depth=2)
    tasks = ["a", "die", "b", "hang", "c", "d", "e"]
    results, sent = {}, 0
    try:
        while len(results) < len(tasks):
            while pool.idle() and sent < len(tasks):
                pool.submit(sent, (tasks[sent],))
                sent += 1
            for i, r in pool.wait():
                results[i] = r
    finally:
        pool.close()
    assert results[1] == {"error": "decoder process died (exit code -9)"}
    assert results[3] == {"error": "decoding took longer than 2 s (time-out)"}
    assert {i: r for i, r in results.items() if i not in (1, 3)} == {
        i: {"value": t} for i, t in enumerate(tasks) if i not in (1, 3)
    }


def test_a_file_name_that_is_not_utf8_still_gets_an_index_and_a_manifest(small_tree, copy_tree, tmp_path):
    """Linux allows any bytes in a name; Parquet strings are UTF-8. Such a name crashed the pack after
    every clip was decoded, with no index or manifest written (and again on every re-run)."""
    root = copy_tree(small_tree)
    good = next((root / "hmdb51_org" / "brush_hair").glob("*.avi")).read_bytes()
    folder = os.fsencode(root / "hmdb51_org" / "brush_hair")
    with open(folder + b"/strange \xff\xfe name_0.avi", "wb") as f:
        f.write(good)
    with open(os.fsencode(root / "testTrainMulti_7030_splits" / "brush_hair_test_split1.txt"), "ab") as f:
        f.write(b"strange \xff\xfe name_0.avi 1 \n")
    out = tmp_path / "out"
    result = run_cli(pack_app, root, out, "--quiet", "--shards", "4")
    assert result.exit_code == 0, result.output
    assert (out / "index.json").exists()
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    strange = [r for r in rows if "strange" in r["source"]]
    assert [r["source"].rsplit("/", 1)[1] for r in strange] == ["strange \\xff\\xfe name_0.avi"]
    assert strange[0]["status"] == "packed"


def test_a_video_that_failed_and_was_fixed_is_packed_on_the_next_run(small_tree, copy_tree, tmp_path):
    root = copy_tree(small_tree)
    source = next((root / "hmdb51_org" / "chew").glob("*.avi"))
    good = source.read_bytes()
    source.write_bytes(good[:300])  # damaged: the header only
    out = tmp_path / "out"
    first = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--max-failures", "1")
    assert first.exit_code == 0, first.output
    name = source.name

    def status():
        return {
            r["source"].rsplit("/", 1)[1]: r["status"] for r in pq.read_table(out / "manifest.parquet").to_pylist()
        }[name]

    assert status() == "failed"
    unchanged = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--max-failures", "1")
    assert "nothing to do" in unchanged.stdout and status() == "failed"  # still broken: no work
    source.write_bytes(good)  # fixed
    again = run_cli(pack_app, root, out, "--quiet", "--shards", "4", "--max-failures", "1")
    assert again.exit_code == 0, again.output
    assert "nothing to do" not in again.stdout and "1/" in again.stdout  # its shard, packed again
    assert status() == "packed"
    keys = {s["meta"]["source"].rsplit("/", 1)[1] for p in out.glob("*.tar") for s in read_shard(p)}
    assert name in keys


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(small_tree, tmp_path):
    """A file size limit (RLIMIT_FSIZE) makes the kernel refuse the write as a full disk does."""
    import resource
    import signal
    import subprocess

    from tests.conftest import cli_command, cli_env

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [str(small_tree[0]), str(out), "--shards", "2", "--quiet"]
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write ") and "File too large" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not list(out.rglob("*.partial")), "a half-written file was left behind"
