"""Issue #12 (hardening, round 2) on real files, servers and processes: hostile or unlucky input
never runs a command, never allocates what a number claims, never stalls training for ever, never
prints a traceback or a raw escape sequence, and nothing is lost or mixed without a word."""

import contextlib
import copy as copy_module
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import httpkit
import pytest
import torch
from conftest import assert_one_line_error, cli_command, cli_env, run_cli
from shardmaker import make_packed, shard_keys

from pipeline import cli, read_shard
from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.shardformat import MAX_MEMBER_BYTES, parse_index
from pipeline.storage import httpio
from pipeline.stream.sources import Shard
from pipeline.stream.stages import Faults, read_samples

SMALL = ["--model", "tiny", "--crop", "24", "--batch-size", "4", "--workers", "2", "--no-progress"]


@pytest.fixture
def copy(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    return folder


def read_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def reindex(folder: Path) -> None:
    """Make index.json agree with the shards' bytes again (so verify-shards sees only what a test planted)."""
    index = json.loads((folder / "index.json").read_text())
    for split in index["splits"].values():
        for e in split["shards"]:
            data = (folder / e["name"]).read_bytes()
            e["bytes"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "index.json").write_text(json.dumps(index))


def train(folder: Path, log: Path, *extra):
    return run_cli(
        cli.train_app, "--shards", f"{folder}/<000..007>.tar", *SMALL, "--epochs", "1", "--log-dir", log, *extra
    )


def _limited(cmd: list[str], gib: int = 1) -> subprocess.CompletedProcess:
    """Run `cmd` with its address space capped, so that a reader that tries to allocate what a number
    claims fails here instead of taking the machine's memory."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (gib << 30, gib << 30))

    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120, preexec_fn=cap)


def no_traceback(result) -> None:
    assert "Traceback" not in result.output and "\x1b" not in result.output, result.output[-2000:]
    assert not result.exception or isinstance(result.exception, SystemExit), repr(result.exception)


# --- 1. pipe: never runs unless allowed ------------------------------------------------------


def test_read_shard_never_runs_a_pipe_command_unless_allowed(packed, tmp_path):
    marker = tmp_path / "pwned"
    url = f"pipe:touch {marker}; cat {packed}/000.tar"
    with pytest.raises(UserError, match="would run a shell command; set `allow_pipe`"):
        list(read_shard(url))
    assert not marker.exists()
    # the command is live: allowed explicitly, it runs and the shard reads
    assert sorted(s["key"] for s in read_shard(url, allow_pipe=True)) == shard_keys(packed / "000.tar")
    assert marker.exists()


# --- 2. a compressed shard cannot get around the member limit ----------------------------------


def _gzip_tar(path: Path, members: list[tuple[str, bytes | int]]) -> None:
    """A real .tar.gz of `members` (name, bytes or a count of zero bytes), written without holding
    the zeros: each MiB of zeros deflates to the same 1 KB block after a full flush, made once."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    block = None
    crc = total = 0

    def put(f, data: bytes, flush=zlib.Z_FULL_FLUSH):
        nonlocal crc, total
        f.write(c.compress(data) + c.flush(flush))
        crc, total = zlib.crc32(data, crc), total + len(data)

    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, no name, no mtime
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = (data if isinstance(data, int) else len(data)), 0
            put(f, info.tobuf(tarfile.USTAR_FORMAT))
            if isinstance(data, bytes):
                put(f, data + bytes(-len(data) % 512))
                continue
            for _ in range(data >> 20):
                if block is None:
                    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
                f.write(block)
                crc, total = zlib.crc32(mib, crc), total + len(mib)
            put(f, bytes(data & ((1 << 20) - 1)) + bytes(-data % 512))
        put(f, bytes(1024), zlib.Z_FINISH)
        f.write(crc.to_bytes(4, "little") + (total & 0xFFFFFFFF).to_bytes(4, "little"))


def _gzip_tar_claiming(path: Path, size: int) -> None:
    _gzip_tar(path, [("evil.jpgs", size)])


def test_a_gzip_shard_claiming_a_huge_member_fails_before_allocating(tmp_path):
    """The issue's case: a 1.6 MB .tar.gz holding a member of 1.5 GiB made a loader worker grow to
    3.3 GB. Our reader decompresses itself and checks the size field before reading the member."""
    bomb = tmp_path / "bomb.tar.gz"
    _gzip_tar_claiming(bomb, 3 << 29)  # 1.5 GiB
    assert bomb.stat().st_size < 2 << 20
    with tarfile.open(bomb) as tar:  # a real gzip'd tar: the standard library reads its header
        assert tar.next().size == 3 << 29 > MAX_MEMBER_BYTES
    probe = f"""
import json, sys
from pipeline import read_shard
from pipeline.stream.stages import Faults, read_samples
from pipeline.stream.sources import Shard
out = {{}}
try:
    list(read_shard({str(bomb)!r}))
except Exception as e:
    out["read_shard"] = type(e).__name__ + ": " + str(e)
faults = Faults()
list(read_samples([Shard({str(bomb)!r}, 1)], False, faults))
out["faults"] = faults.take()
# the peak of this process (ru_maxrss would carry over the forking test process's peak across exec)
out["maxrss_mb"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", probe], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert (
        out["read_shard"]
        == f"ShardFormatError: tar member of {3 << 29} bytes exceeds the {MAX_MEMBER_BYTES} byte limit"
    )
    assert len(out["faults"]) == 1 and "exceeds the 1073741824 byte limit" in out["faults"][0]["reason"]
    assert out["maxrss_mb"] < 200, out  # the member is 1536 MB


def test_giant_samples_in_a_small_gzip_shard_do_not_pile_up_in_a_worker(tmp_path):
    """Members under the 1 GiB limit can still be hundreds of MB of zeros each, a few KB compressed:
    the stream never keeps a member it does not use (.pickle, .json), and its shuffle buffer and
    refill hold at most RAW_BYTES_HELD of raw samples (lowered here to keep the test small)."""
    shard = tmp_path / "giants.tar.gz"
    members = []
    for i in range(6):
        members += [(f"clip{i}.cls", b"0"), (f"clip{i}.jpgs", 64 << 20), (f"clip{i}.pickle", 256 << 20)]
    _gzip_tar(shard, members)
    assert shard.stat().st_size < 3 << 20
    probe = f"""
import json, sys
import numpy as np
from pipeline.stream import stages as samples
from pipeline.stream.sources import Shard
samples.RAW_BYTES_HELD = 32 << 20
faults = samples.Faults()
raw = samples.read_samples([Shard({str(shard)!r}, 6)], False, faults)
seen = [(s["__key__"], sorted(k for k, v in s.items() if isinstance(v, bytes))) for s in samples.fit_to_quota(samples.shuffle(raw, 256, np.random.default_rng(0)), 8)]
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({{"seen": seen, "faults": faults.take(), "hwm_mb": hwm}}))
"""
    done = _limited([sys.executable, "-c", probe], gib=3)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert sorted(k for k, _ in out["seen"][:6]) == [f"clip{i}" for i in range(6)] and len(out["seen"]) == 8
    assert all(kept == ["cls", "jpgs"] for _, kept in out["seen"]) and out["faults"] == []
    assert out["hwm_mb"] < 600, out["hwm_mb"]  # 6 x 320 MB held at once without the bounds


# --- 3. numbers from the user or a file are bounded before anything is allocated ----------------


@pytest.mark.parametrize(
    "pattern", ["{000000000..999999999}.tar", "<000000..999999999>.tar", "{0000..9999}/{000..999}.tar"]
)
def test_a_huge_shard_range_is_one_line_before_expanding(packed, pattern):
    started = time.monotonic()
    done = _limited(cli_command("inspect_app") + [f"{packed}/{pattern}"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "a pattern may name at most 1,000,000" in done.stderr
    assert time.monotonic() - started < 60
    result = run_cli(cli.train_app, "--shards", f"{packed}/{pattern}")
    assert_one_line_error(result, "shards or more; a pattern may name at most 1,000,000")


def test_verify_and_bench_bound_their_processes(packed):
    assert_one_line_error(
        run_cli(cli.verify_app, packed, "--workers", "100000"), "--workers must be at most 256, got 100,000"
    )
    assert_one_line_error(
        run_cli(cli.bench_app, "--shards", f"{packed}/<000..007>.tar", "--workers", "0,100000"),
        "--workers counts must be at most 256, got 0,100000",
    )


def test_deeply_nested_braces_are_one_line(packed):
    assert_one_line_error(
        run_cli(cli.train_app, "--shards", f"{packed}/" + "{" * 50_000 + "0" + "}" * 50_000),
        "nests braces more than 16 deep",
    )


def test_an_index_claiming_a_trillion_samples_is_refused(copy):
    index = json.loads((copy / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["samples"] = 10**12
    with pytest.raises(UserError, match=r"shard '000.tar' claims 1000000000000 samples \(0..10000000\)"):
        parse_index(json.dumps(index).encode(), "index.json")
    (copy / "index.json").write_text(json.dumps(index))
    assert_one_line_error(train(copy, copy / "run"), "claims 1000000000000 samples")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", str(10**9)], "--batch-size must be at most 65,536, got 1,000,000,000"),
        (["--crop", "100000"], "--crop must be at most 8,192, got 100,000"),
        (["--prefetch", "100000"], "--prefetch must be at most 64, got 100,000"),
        (["--workers", "100000"], "--workers must be at most 256, got 100,000"),
        (["--shuffle-buffer", str(10**9)], "--shuffle-buffer must be at most 1,000,000"),
        (["--epochs", str(10**9)], "--epochs must be at most 100,000"),
        # 4096 clips x 4 frames x 4096 x 4096 x 3: 824 GB for one batch
        (
            ["--batch-size", "4096", "--crop", "4096"],
            r"a batch of --batch-size 4096 x 4 frames x --crop 4096x4096 x 3 bytes is 768.0 GiB, more than the 4 GiB",
        ),
        # 3 GiB a batch fits the limit; 256 workers x 65 of them do not fit any machine
        (
            ["--batch-size", "64", "--crop", "2048", "--prefetch", "64", "--workers", "256", "--resample"],
            r"the loader's batch buffers .* more than this machine's .* GiB of memory",
        ),
    ],
)
def test_sizes_that_would_run_out_of_memory_are_one_line(packed, tmp_path, args, message):
    result = run_cli(
        cli.train_app,
        "--shards",
        f"{packed}/<000..007>.tar",
        "--model",
        "tiny",
        "--no-progress",
        "--epochs",
        "1",
        "--log-dir",
        tmp_path / "run",
        *args,
    )
    assert_one_line_error(result, message)


def test_the_library_bounds_batch_memory_at_loader_construction(packed):
    from pipeline import ClipDataset, ClipLoader

    with pytest.raises(
        UserError, match=r"a batch of `batch_size` 4096 x 4 frames x `crop` 4096x4096 x 3 bytes is 768.0 GiB"
    ):
        ClipLoader(packed, batch_size=4096, crop=4096, workers=1)
    with pytest.raises(
        UserError, match=r"a batch of `batch_size` 4096 x 4 frames x `crop` 4096x4096 x 3 bytes is 768.0 GiB"
    ):
        ClipDataset(packed, batch_size=4096, crop=4096)
    with pytest.raises(UserError, match="`crop` must be at most 8,192"):
        StreamConfig(shards=(str(packed),), crop=9000)


# --- 4. a slow HTTP server cannot stall training ----------------------------------------------


@contextlib.contextmanager
def _trickle(shard: Path, every: float = 0.05):
    """`shard` from a real HTTP server on 127.0.0.1 that trickles it (httpkit.trickle)."""
    with httpkit.trickle(shard.parent, every) as base:
        yield f"{base}/{shard.name}"


def test_a_slow_loris_server_is_cut_off_at_the_shard_deadline(packed, monkeypatch):
    monkeypatch.setattr(httpio, "HTTP_SHARD_DEADLINE_S", 1.5)
    monkeypatch.setattr(httpio, "HTTP_MIN_BYTES_PER_S", 1 << 40)  # the deadline is the 1.5 s alone
    faults, got = Faults(), []
    with _trickle(packed / "000.tar") as url:
        started = time.monotonic()
        reader = threading.Thread(target=lambda: got.extend(read_samples([Shard(url, 6)], False, faults)), daemon=True)
        reader.start()
        reader.join(timeout=20)
        took = time.monotonic() - started
    assert not reader.is_alive(), "the shard read is still running: no deadline"
    assert got == [] and 1.4 < took < 10, took
    [fault] = faults.take()
    assert fault["what"] == url and fault["samples"] == 6 and "not read whole within 2 s" in fault["reason"], fault


def test_the_shard_deadline_grows_with_the_shard_size(packed):
    served = packed / "000.tar"
    with _trickle(served, every=0.001) as url:
        body = httpio.ResumingBody(url)
        try:
            assert body.budget == pytest.approx(
                httpio.HTTP_SHARD_DEADLINE_S + served.stat().st_size / httpio.HTTP_MIN_BYTES_PER_S
            )
        finally:
            body.close()


# --- 6. malformed index and metadata: one line, never a traceback, in every tool ---------------


def _shard0(index, **fields):
    index["splits"]["train"]["shards"][0].update(fields)
    return index


def _without(*path):
    def mutate(index):
        *parents, last = path
        target = index
        for p in parents:
            target = target[p]
        del target[last]
        return index

    return mutate


INDEX_CASES = {
    "classes missing": (_without("classes"), "'classes' must be a list"),
    "splits missing": (_without("splits"), "'splits' must map"),
    "frames missing": (_without("frames_per_clip"), "'frames_per_clip' must be a whole number"),
    "sha256 missing": (_without("splits", "train", "shards", 0, "sha256"), "shard '000.tar' has no valid 'sha256'"),
    "classes a string": (lambda i: {**i, "classes": "brush_hair"}, "'classes' must be a list"),
    "frames a string": (
        lambda i: {**i, "frames_per_clip": "4"},
        r"'frames_per_clip' must be a whole number in 1..4096, got '4'",
    ),
    "samples a string": (lambda i: _shard0(i, samples="6"), "shard '000.tar' claims '6' samples"),
    "bytes negative": (lambda i: _shard0(i, bytes=-1), "shard '000.tar' has no valid 'bytes'"),
    "shards a dict": (lambda i: (i["splits"]["train"].update(shards={}), i)[1], "'splits.train.shards' must be a list"),
    "a shard a list": (
        lambda i: (i["splits"]["train"]["shards"].__setitem__(0, [1]), i)[1],
        "a shard of split train is \\[1\\], not an object",
    ),
    "nested 100k deep": (lambda i: b"[" * 100_000 + b"]" * 100_000, "unreadable index .*recursion"),
    "nested objects": (lambda i: b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "unreadable index .*recursion"),
    "samples 10^12": (lambda i: _shard0(i, samples=10**12), "claims 1000000000000 samples"),
    "shard name ../x": (lambda i: _shard0(i, name="../x"), "shard name '../x' of split train is not a plain file name"),
    "shard name with a newline": (lambda i: _shard0(i, name="a\nb.tar"), r"shard name 'a\\nb.tar'"),
    "not json": (lambda i: b"\xff\xfe garbage", "unreadable index"),
    "a list": (lambda i: [1, 2], "is not a clipstream index of version"),
    "version 99": (lambda i: {**i, "version": 99}, "is not a clipstream index of version"),
}


def _write_index(folder: Path, mutate) -> None:
    index = json.loads((folder / "index.json").read_text())
    raw = mutate(copy_module.deepcopy(index))
    (folder / "index.json").write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_a_malformed_index_is_one_line_in_every_tool(copy, tmp_path, case):
    mutate, message = INDEX_CASES[case]
    _write_index(copy, mutate)
    for result in (
        run_cli(cli.inspect_app, copy, "-q"),
        run_cli(cli.inspect_app, f"{copy}/<000..007>.tar", "-q"),
        run_cli(cli.verify_app, copy, "-q", "--workers", "1"),
        train(copy, tmp_path / "run"),
    ):
        assert_one_line_error(result, message)
        no_traceback(result)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda i: (i["splits"].update(val=5), i)[1],  # a split no reader knows
        lambda i: {**i, "layout": "hmdb51"},  # a layout without its split_source
        lambda i: {**i, "layout": ["x"], "frame_size": 5, "options": "x", "counts": [1]},  # fields no reader relies on
    ],
    ids=["unknown split", "layout alone", "odd optional fields"],
)
def test_index_fields_readers_do_not_rely_on_are_no_traceback(copy, tmp_path, mutate):
    _write_index(copy, mutate)
    result = run_cli(cli.inspect_app, copy, "-q")
    assert result.exit_code == 0 and "48 clips (train 48" not in result.stderr
    no_traceback(result)
    result = run_cli(cli.verify_app, copy, "-q", "--workers", "1")
    assert result.exit_code == 1 and result.stdout.splitlines()[:-1] == ["manifest.parquet: missing"], (
        result.stdout
    )  # the fixture has no manifest
    no_traceback(result)
    result = train(copy, tmp_path / "run", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    no_traceback(result)


def _plant(
    folder: Path, shard: str = "003.tar", *, meta=None, key: str | None = None, jpgs: bytes | None = None
) -> str:
    """Rewrite the first sample of `shard`: its .json bytes, its key, its frames; the index follows."""
    members = read_members(folder / shard)
    victim = members[0][0].split(".", 1)[0]
    out = []
    for name, data in members:
        k, ext = name.split(".", 1)
        if k == victim:
            if ext == "json" and meta is not None:
                data = meta(json.loads(data))
            if ext == "jpgs" and jpgs is not None:
                data = jpgs
            name = f"{key or k}.{ext}"
        out.append((name, data))
    write_members(folder / shard, out)
    reindex(folder)
    return key or victim


def _js(value) -> bytes:
    return json.dumps(value).encode()


META_CASES = {
    # .json bytes -> inspect-shards (None: it summarises; else its one error line), verify-shards' problem
    "meta a number": (lambda m: b"5", "its .json is not an object", r"\.json unreadable \(not an object\)"),
    "meta a list": (lambda m: _js([m]), "its .json is not an object", r"\.json unreadable \(not an object\)"),
    "meta nested 100k deep": (
        lambda m: b"[" * 100_000 + b"]" * 100_000,
        "recursion",
        r"\.json unreadable \(maximum recursion",
    ),
    "meta not utf-8": (lambda m: b'{"a": "\xff"}', "can't decode", r"\.json unreadable"),
    "label a string": (lambda m: _js({**m, "label": str(m["label"])}), None, r"label \d in \.cls but '\d' in \.json"),
    "class_name a list": (lambda m: _js({**m, "class_name": ["x"]}), None, r"'class_name' is \['x'\], not a string"),
    "split a list": (lambda m: _js({**m, "split": ["train"]}), None, r"'split' is \['train'\], not 'train' or 'test'"),
    "frame_size a number": (lambda m: _js({**m, "frame_size": 5}), None, r"'frame_size' is 5, not \[width, height\]"),
    "frame_size three numbers": (lambda m: _js({**m, "frame_size": [1, 2, 3]}), None, r"'frame_size' is \[1, 2, 3\]"),
    "indices a number": (lambda m: _js({**m, "indices": 5}), None, r"'indices' is 5, not 4 frame numbers"),
    "padded a string": (lambda m: _js({**m, "padded": "no"}), None, r"'padded' is 'no', not true or false"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_malformed_sample_metadata_is_named_never_a_traceback(copy, case):
    meta, inspect_error, problem = META_CASES[case]
    key = _plant(copy, meta=meta)
    result = run_cli(cli.inspect_app, copy, "-q")
    no_traceback(result)
    if inspect_error is None:
        assert result.exit_code == 0 and ": 10 shards, 64 clips (train " in result.stdout, result.output
    else:
        assert_one_line_error(result, rf"003.tar: sample {key} is damaged \(.*{inspect_error}")
    result = run_cli(cli.verify_app, copy, "-q", "--workers", "1")
    no_traceback(result)
    lines = result.stdout.splitlines()
    assert result.exit_code == 1 and len(lines) == 3 and lines[1] == "manifest.parquet: missing", result.stdout
    assert lines[0].startswith(f"003.tar: sample {key}: ") and __import__("re").search(problem, lines[0]), lines[0]


# --- 10. names from shards never reach the terminal raw ------------------------------------------


def test_escape_sequences_in_keys_and_metadata_are_printed_escaped(copy, tmp_path):
    evil = "evil\x1b[31mkey"
    _plant(copy, key=evil, meta=lambda m: _js({**m, "class_name": "\x1b[2Jred", "split": "\x1b[31m"}))
    index = json.loads((copy / "index.json").read_text())
    index["classes"][0] = "brush\x1b[31mhair"
    (copy / "index.json").write_text(json.dumps(index))
    results = {
        "inspect": run_cli(cli.inspect_app, copy, "-q", "--sheet", tmp_path / "sheet.png", "-n", "64"),
        "verify": run_cli(cli.verify_app, copy, "-q", "--workers", "1"),
        "inspect no index": None,
    }
    (copy / "index.json").unlink()
    results["inspect no index"] = run_cli(cli.inspect_app, f"{copy}/<000..007>.tar", "-q")
    for name, result in results.items():
        assert "\x1b" not in result.output, (name, result.output)
        no_traceback(result)
    assert "brush\\x1b[31mhair" in results["inspect"].stdout and "\\x1b[2Jred" in results["inspect no index"].stdout
    assert "003.tar: sample evil\\x1b[31mkey: key is not made of ASCII letters" in results["verify"].stdout


def test_escape_sequences_and_newlines_in_a_bad_samples_key_stay_one_escaped_line(copy, tmp_path):
    _plant(copy, key="evil\x1b[31m\nkey", jpgs=b"garbage!")
    result = train(copy, tmp_path / "run", "--max-bad", "1")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "003.tar:evil\\x1b[31m\\nkey: not a JPEG pack" in warnings[0], result.stdout
    assert "\x1b" not in result.output
    result = train(copy, tmp_path / "stop", "--max-bad", "0")
    assert_one_line_error(result, r"003.tar:evil\\x1b\[31m\\nkey: not a JPEG pack")


# --- 5. evaluation on missing or unreadable test shards is loud and bounded ---------------------


def test_a_missing_test_shard_is_one_line_before_training(copy, tmp_path):
    (copy / "test-001.tar").unlink()
    result = train(copy, tmp_path / "run")
    assert_one_line_error(
        result, r"1 of the 2 test shards listed in .*index.json are missing or not files, e.g. '.*/test-001.tar'"
    )
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_unreadable_test_clips_are_warned_about_and_count_against_max_bad(copy, tmp_path):
    _truncate(copy / "test-001.tar")
    result = train(copy, tmp_path / "stop")  # --max-bad 0.01 of 16 test clips: none may be lost
    assert_one_line_error(
        result,
        r"evaluation after epoch 1: \d of 16 test clips unreadable \(.*/test-001.tar\), more than --max-bad 0.01 allows \(0\)",
    )
    assert (tmp_path / "stop" / "checkpoint.pt").is_file()  # the trained epoch is kept
    result = train(copy, tmp_path / "run", "--max-bad", "8")
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stdout.splitlines() if "evaluation after epoch 1 skipped" in line]
    lost = int(warning.split(" skipped ")[1].split()[0])
    assert (
        1 <= lost <= 8
        and warning.startswith("warning: ")
        and "/test-001.tar" in warning
        and f"accuracy is on the other {16 - lost}" in warning
    )
    logged = [json.loads(line) for line in (tmp_path / "run" / "faults-rank0.jsonl").read_text().splitlines()]
    assert sum(f["samples"] for f in logged if f.get("split") == "test") == lost
    record = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ][-1]
    assert record["skipped"] == lost and record["clips"] == 16 - lost


def test_every_class_is_in_the_per_class_line(tmp_path):
    folder = tmp_path / "one"
    index = make_packed(folder, test_per_class=1, test_shards=4)  # one test clip a shard
    [(name, cls)] = [(n, d) for n, d in read_members(folder / "test-002.tar") if n.endswith(".cls")]
    lost_class = index["classes"][int(cls)]
    _plant(folder, "test-002.tar", jpgs=b"garbage!")
    result = train(folder, tmp_path / "run", "--max-bad", "1")
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if line.startswith("epoch 1: test top-1")]
    per_class = line.split("per class: ")[1].split(", ")
    assert [p.rsplit(" ", 1)[0] for p in per_class] == index["classes"]
    assert [p for p in per_class if p.endswith("n/a")] == [f"{lost_class} n/a"]
    assert "on 3 clips" in line and "skipped 1 of 4 test clips" in result.stdout


# --- 7. a message that points at the faults log only when it is written ------------------------


def test_a_worker_giving_up_names_its_clips_in_the_faults_log(copy, tmp_path):
    for i in range(8):
        members = read_members(copy / f"{i:03d}.tar")
        write_members(copy / f"{i:03d}.tar", [(n, b"garbage!" if n.endswith(".jpgs") else d) for n, d in members])
    log = tmp_path / "run"
    result = train(copy, log, "--max-bad", "1000")
    assert_one_line_error(
        result,
        r"every clip of a loader worker's shards is unreadable \((\d+) bad\); named in .*/run/faults-rank0.jsonl",
    )
    bad = int(result.stderr.split("(")[1].split()[0])
    logged = [json.loads(line) for line in (log / "faults-rank0.jsonl").read_text().splitlines()]
    assert sum(f["samples"] for f in logged) >= bad >= 1 and all("not a JPEG pack" in f["reason"] for f in logged)


def test_no_faults_log_when_nothing_was_skipped(packed, tmp_path):
    result = train(packed, tmp_path / "run", "--max-steps", "2")
    assert result.exit_code == 0 and "faults-rank" not in result.output and "skipped" not in result.output
    assert not list((tmp_path / "run").glob("faults-rank*.jsonl"))


# --- 8. Ctrl-C under --nproc-per-node -----------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_of_a_two_process_run_is_one_line_and_exit_130(packed, tmp_path):
    cmd = cli_command("train_app") + [
        "--shards",
        f"{packed}/<000..007>.tar",
        *SMALL,
        "--workers",
        "1",
        "--epochs",
        "1000",
    ]
    cmd += ["--nproc-per-node", "2", "--log-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        first = proc.stdout.readline()  # rank 0 says "training ..." once every rank is up
        assert first.startswith("training tiny"), first + proc.stderr.read()
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines() == ["interrupted"], err[-3000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # no rank or loader worker left behind
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the run outlived it")


# --- 9. a run folder holds one run --------------------------------------------------------------


def test_a_finished_run_folder_is_not_reused_without_resume_and_records_its_options(packed, tmp_path):
    log = tmp_path / "run"
    assert train(packed, log, "--max-steps", "2", "--seed", "7").exit_code == 0
    options = json.loads((log / "options.json").read_text())
    assert (
        options["options"]["stream"]["seed"] == 7
        and options["options"]["stream"]["batch_size"] == 4
        and options["options"]["max_steps"] == 2
    )
    assert options["options"]["model"] == "tiny" and options["world_size"] == 1 and options["command"]
    metrics = (log / "metrics.jsonl").read_bytes()
    checkpoint = (log / "checkpoint.pt").read_bytes()
    result = train(packed, log, "--max-steps", "4")
    assert_one_line_error(
        result, rf"the run folder {log} already holds a run; continue it with --resume {log}, or pass a new --log-dir"
    )
    assert (log / "metrics.jsonl").read_bytes() == metrics and (log / "checkpoint.pt").read_bytes() == checkpoint
    # resuming it is what mixes them, on purpose; each resume records its own options
    assert train(packed, log, "--max-steps", "4", "--seed", "7", "--resume", log).exit_code == 0
    assert json.loads((log / "options-resume-1.json").read_text())["options"]["resume"] == str(log)
    assert json.loads((log / "options.json").read_text()) == options
    # a resume writing into a folder that holds another run
    other = tmp_path / "other"
    assert train(packed, other, "--max-steps", "2").exit_code == 0
    result = train(packed, other, "--max-steps", "6", "--seed", "7", "--resume", log)
    assert_one_line_error(result, rf"the run folder {other} already holds another run")


# --- 11. --resume on what is not our checkpoint -------------------------------------------------


def _text(path):
    path.write_text("not a checkpoint\n")


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.txt", "hello")


def _wrong_fields(path):
    torch.save({"weights": torch.zeros(3), "epoch": 1}, path)


def _version_only(path):
    torch.save({"version": 1, "model": {"w": torch.zeros(3)}}, path)


def _a_tensor(path):
    torch.save(torch.zeros(3), path)


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _an_object(path):
    torch.save({"version": 1, "hook": _Touch(path.with_name("pwned"))}, path)


@pytest.mark.parametrize(
    "make, why",
    [
        (_text, "not a file torch.save wrote"),
        (_zip, "not a file torch.save wrote"),
        (_wrong_fields, "format version None, expected 1"),
        (_version_only, "missing or malformed epoch, opt_step, optimizer, rng, run, step, step_in_epoch"),
        (_a_tensor, "it holds a Tensor"),
        (_an_object, "it holds Python objects, which clipstream never unpickles"),
    ],
)
def test_resume_from_a_file_that_is_not_our_checkpoint_is_one_line(packed, tmp_path, make, why):
    path = tmp_path / "ckpt.pt"
    make(path)
    result = train(packed, tmp_path / "run", "--resume", path)
    assert_one_line_error(result, rf"cannot load checkpoint '{path}': it is not a clipstream checkpoint \({why}\)")
    assert "weights_only" not in result.output and not (tmp_path / "pwned").exists()


# --- 12. more unlucky input ---------------------------------------------------------------------


def test_an_index_that_is_a_device_or_a_fifo_is_one_line_not_a_hang(copy, tmp_path):
    (copy / "index.json").unlink()
    (copy / "index.json").symlink_to("/dev/zero")
    done = _limited(cli_command("inspect_app") + [str(copy), "-q"])
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: cannot read index '{copy}/index.json': not a regular file"
    ], done.stderr[-2000:]
    fifo = tmp_path / "index.fifo"
    os.mkfifo(fifo)
    done = subprocess.run(
        cli_command("train_app") + ["--shards", f"{copy}/<000..007>.tar", "--index", str(fifo)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: cannot read index '{fifo}': not a regular file"
    ], done.stderr[-2000:]


def test_a_2_gb_index_is_refused_unread(copy):
    with open(copy / "index.json", "r+b") as f:
        f.truncate(2 << 30)  # sparse: no disk used
    started = time.monotonic()
    assert_one_line_error(run_cli(cli.inspect_app, copy, "-q"), r"index .* is larger than 268435456 bytes")
    assert time.monotonic() - started < 10


def _shard_a_folder(folder):
    (folder / "003.tar").unlink()
    (folder / "003.tar").mkdir()


def _shard_a_symlink_loop(folder):
    (folder / "003.tar").unlink()
    (folder / "003.tar").symlink_to(folder / "003.tar")


@pytest.mark.parametrize("damage", [_shard_a_folder, _shard_a_symlink_loop])
def test_a_listed_shard_that_is_a_folder_or_a_symlink_loop_is_one_line_at_the_start(copy, tmp_path, damage):
    damage(copy)
    assert_one_line_error(train(copy, tmp_path / "a"), r"1 of 8 shards of .* do not exist, e.g. '.*/003.tar'")
    result = run_cli(
        cli.train_app, "--shards", copy, *SMALL, "--epochs", "1", "--log-dir", tmp_path / "b"
    )  # the packed folder's index lists it
    assert_one_line_error(
        result, r"1 of the 8 training shards listed in .*index.json are missing or not files, e.g. '.*/003.tar'"
    )
    assert_one_line_error(run_cli(cli.inspect_app, copy, "-q"), r"cannot read .*/003.tar: ")
    result = run_cli(cli.verify_app, copy, "-q", "--workers", "1")
    assert result.exit_code == 1 and "003.tar: missing (the index lists it with 6 samples)" in result.stdout
    no_traceback(result)


def _refusing(folder: Path, refuse: set, status: int):
    """httpkit.serve(folder), answering `status` for the names in `refuse`."""

    class Refusing(httpkit.Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.rsplit("/", 1)[-1] in refuse:
                self.send_error(status)
                return
            super().do_GET()

    return httpkit.serve(folder, Refusing)


@pytest.mark.parametrize("status", [403, 404])
def test_http_refusals_are_one_line(packed, tmp_path, status):
    with _refusing(packed, {"index.json"}, status) as base:
        result = run_cli(
            cli.train_app, "--shards", f"{base}/<000..007>.tar", *SMALL, "--epochs", "1", "--log-dir", tmp_path / "a"
        )
        assert_one_line_error(result, rf"cannot read index '{base}/index.json': HTTP Error {status}")
    with _refusing(packed, {"005.tar"}, status) as base:  # a shard refused mid-run: a broken shard
        result = run_cli(
            cli.train_app, "--shards", f"{base}/<000..007>.tar", *SMALL, "--epochs", "1", "--log-dir", tmp_path / "b"
        )
        assert_one_line_error(
            result, rf"more than --max-bad 0.01 allows \(0\); last: {base}/005.tar: cannot open: HTTP Error {status}"
        )


def test_eval_shards_matching_nothing_is_one_line(packed, tmp_path):
    result = run_cli(
        cli.train_app,
        "--shards",
        f"{packed}/<000..007>.tar",
        "--eval-shards",
        f"{tmp_path}/test-<000..001>.tar",
        *SMALL,
        "--log-dir",
        tmp_path / "run",
    )
    assert_one_line_error(result, r"no shards match '.*/test-<000..001>.tar'")


def test_plot_run_on_a_metrics_line_nested_100k_deep_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "step", "step": 1, "loss": 1.0}\n' + "[" * 100_000 + "]" * 100_000 + "\n"
    )
    assert_one_line_error(run_cli(cli.plot_app, tmp_path), r"metrics.jsonl:2: not a JSON line \(nested too deeply\)")
