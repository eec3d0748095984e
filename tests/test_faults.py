"""Issue #6 on real shards: broken shards, remote shards that drop connections, hostile members,
oversized frames, --max-bad. Nothing hangs, nothing is lost without being named, nothing is executed."""

import dataclasses
import io
import json
import os
import pickle
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import httpkit
import numpy as np
import pytest
import simplejpeg
import streamkit
import torch
from conftest import run_cli
from shardmaker import shard_keys

from pipeline import read_shard
from pipeline.cli import train_app
from pipeline.config import StreamConfig, TrainConfig
from pipeline.errors import ShardFormatError, UserError
from pipeline.shardformat import pack_jpegs, unpack_jpegs
from pipeline.stream import clips, plan, sources
from pipeline.train.launch import launch


def cfg_for(folder: Path, **kw) -> StreamConfig:
    kw = {"batch_size": 4, "workers": 2, "crop": 24, "shuffle_buffer": 8, **kw}
    return StreamConfig(shards=(f"{folder}/<000..007>.tar",), **kw)


def train_cfg(folder: Path, log_dir: Path, **kw) -> TrainConfig:
    stream_kw = {k: kw.pop(k) for k in list(kw) if k in StreamConfig.__dataclass_fields__}
    return TrainConfig(
        stream=cfg_for(folder, **stream_kw),
        model="tiny",
        log_dir=str(log_dir),
        progress=False,
        lr=3e-3,
        eval_every=0,
        **kw,
    )


def epoch_batches(ds, cfg, epoch=0, rank=0, world=1):
    with streamkit.train_loader(ds, cfg, rank, world, epoch, epochs=epoch + 1, copy=True) as loader:
        return list(loader.epoch(epoch))


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def write_members(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def copy(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    return folder


# --- 1. broken shards -------------------------------------------------------------------------


def _truncate(folder, key):
    data = (folder / "003.tar").read_bytes()
    (folder / "003.tar").write_bytes(data[: len(data) // 2])


def _garbage_member(folder, key):
    m = read_members(folder / "003.tar")
    m[f"{key}.jpgs"] = os.urandom(len(m[f"{key}.jpgs"]))
    write_members(folder / "003.tar", m)


def _missing_member(folder, key):
    m = read_members(folder / "003.tar")
    del m[f"{key}.cls"]
    write_members(folder / "003.tar", m)


def _unreadable_jpeg(folder, key):
    m = read_members(folder / "003.tar")
    frames = [bytes(f) for f in unpack_jpegs(m[f"{key}.jpgs"])]
    frames[2] = frames[2][:20] + b"\x00" * (len(frames[2]) - 20)  # a valid pack holding a JPEG with no header
    m[f"{key}.jpgs"] = pack_jpegs(frames)
    write_members(folder / "003.tar", m)


def _missing_file(folder, key):
    (folder / "003.tar").unlink()


def _garbage_tar_header(folder, key):
    with tarfile.open(folder / "003.tar") as tar:
        header = tar.getmembers()[9].offset  # the first member of the fourth sample
    data = bytearray((folder / "003.tar").read_bytes())
    data[header : header + 512] = os.urandom(512)
    (folder / "003.tar").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, lost, reason",
    [
        (_truncate, None, "unreadable after"),
        (_garbage_tar_header, 3, "unreadable after 3 samples: corrupt tar header"),
        (_garbage_member, 1, "JPEG pack"),
        (_missing_member, 1, "missing member"),
        (_unreadable_jpeg, 1, "unreadable JPEG frame 2"),
        (_missing_file, 6, "cannot open"),
    ],
)
def test_broken_shard_is_skipped_counted_named_and_the_epoch_keeps_its_steps(copy, damage, lost, reason):
    ds = streamkit.resolve(cfg_for(copy))  # before the damage: a shard may vanish after the start
    victim = shard_keys(copy / "003.tar")[0]
    damage(copy, victim)
    got = epoch_batches(ds, cfg_for(copy))
    assert len(got) == 12 and all(len(b["key"]) == 4 for b in got)
    faults = [f for b in got for f in b["faults"]]
    assert faults and all("003.tar" in f["what"] for f in faults), faults
    assert any(__import__("re").search(reason, f["reason"]) for f in faults), faults
    n_lost = sum(f["samples"] for f in faults)
    if lost is not None:
        assert n_lost == lost
    keys = [k for b in got for k in b["key"]]
    assert len(set(keys)) == 48 - n_lost  # every readable clip once; the gap is filled with repeats
    if lost == 1:
        assert victim not in keys and victim in faults[0]["what"]


def test_faults_reach_the_log_and_the_summary_and_max_bad_stops_the_run(copy, tmp_path):
    for shard, key in (("003.tar", 0), ("006.tar", 1)):
        m = read_members(copy / shard)
        m[f"{shard_keys(copy / shard)[key]}.jpgs"] = b"JPGS garbage"
        write_members(copy / shard, m)
    log = tmp_path / "ok"
    summary = launch(train_cfg(copy, log, epochs=1, max_bad=2))  # a count: 2 allowed
    assert summary["bad_samples"] == 2 and summary["steps"] == 12 and summary["fault_logs"] == ["faults-rank0.jsonl"]
    logged = [json.loads(line) for line in (log / "faults-rank0.jsonl").read_text().splitlines()]
    assert sorted(f["what"].split("/")[-1].split(":")[0] for f in logged) == ["003.tar", "006.tar"]
    recorded = json.loads((log / "metrics.jsonl").read_text().splitlines()[-1])
    assert recorded["kind"] == "summary" and recorded["bad_samples"] == 2
    with pytest.raises(
        UserError, match=r"rank 0: 2 unreadable clips in epoch 1, more than --max-bad 1 allows \(1\); last: .*JPEG pack"
    ):
        launch(train_cfg(copy, tmp_path / "count", epochs=1, max_bad=1))
    with pytest.raises(UserError, match=r"more than --max-bad 0.02 allows \(0\)"):  # a fraction: 2 % of 48 clips
        launch(train_cfg(copy, tmp_path / "fraction", epochs=1, max_bad=0.02))
    result = run_cli(
        train_app,
        "--shards",
        f"{copy}/<000..007>.tar",
        "--model",
        "tiny",
        "--crop",
        "24",
        "--batch-size",
        "4",
        "--workers",
        "2",
        "--epochs",
        "1",
        "--no-progress",
        "--max-bad",
        "0",
        "--log-dir",
        tmp_path / "cli",
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines()] == [
        result.stderr.splitlines()[0]
    ] and result.stderr.startswith("error: rank 0: 1 unreadable")


# --- 2. remote shards -------------------------------------------------------------------------


def _server(folder: Path, drop=None):
    """httpkit.serve(folder); `drop` = (shard name, bytes, 'once' | 'always') closes that shard's
    connection after so many bytes of its body."""
    dropped = []

    class Dropping(httpkit.Quiet):
        def copyfile(self, source, outputfile):
            if drop and self.path.endswith("/" + drop[0]) and (drop[2] == "always" or not dropped):
                dropped.append(self.path)
                outputfile.write(source.read(drop[1]))
                outputfile.flush()
                self.close_connection = True
                return
            shutil.copyfileobj(source, outputfile)

    return httpkit.serve(folder, Dropping)


def _keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("drop, faults", [(None, 0), ("once", 0), ("always", 1)])
def test_http_shards_stream_like_local_files_and_survive_dropped_connections(packed, drop, faults):
    local = epoch_batches(streamkit.resolve(cfg_for(packed)), cfg_for(packed))
    size = (packed / "002.tar").stat().st_size
    with _server(packed, drop=("002.tar", size // 2, drop) if drop else None) as base:
        cfg = StreamConfig(shards=(f"{base}/<000..007>.tar",), batch_size=4, workers=2, crop=24, shuffle_buffer=8)
        started = time.monotonic()
        got = epoch_batches(streamkit.resolve(cfg), cfg)
        assert time.monotonic() - started < 60
    found = [f for b in got for f in b["faults"]]
    assert len(found) == faults and len(got) == 12
    if drop != "always":
        assert _keys(got) == _keys(local)  # the same samples in the same order, the same crops
        assert all(a["frames"].equal(b["frames"]) for a, b in zip(got, local))
    else:
        assert found[0]["what"].endswith("/002.tar") and "connection" in found[0]["reason"]
        assert len(set(_keys(got))) == 48 - found[0]["samples"]


def test_a_dropped_connection_is_retried_from_where_it_broke(packed):
    data = (packed / "004.tar").read_bytes()
    with _server(packed, drop=("004.tar", 3000, "once")) as base:
        with sources.open_shard(f"{base}/004.tar", False) as f:
            assert f.read() == data
    with _server(packed, drop=("004.tar", 3000, "always")) as base:
        with pytest.raises(ConnectionError, match="3 connections tried"):
            with sources.open_shard(f"{base}/004.tar", False) as f:
                f.read()


# --- 4. nothing executed ----------------------------------------------------------------------


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_members_are_never_unpickled(copy, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Touch(str(marker)))
    pickle.loads(payload)  # the payload is live: unpickling it creates the marker
    assert marker.exists()
    marker.unlink()
    m = read_members(copy / "001.tar")
    keys = shard_keys(copy / "001.tar")
    hostile = {}
    for name, data in m.items():
        hostile[name] = data
        key = name.split(".")[0]
        hostile[f"{key}.pickle"] = hostile[f"{key}.pyd"] = payload
    write_members(copy / "001.tar", hostile)
    got = epoch_batches(streamkit.resolve(cfg_for(copy)), cfg_for(copy))
    assert not [f for b in got for f in b["faults"]]
    assert set(keys) <= set(_keys(got))  # used, without their pickles
    assert sorted(s["key"] for s in read_shard(copy / "001.tar")) == keys
    assert not marker.exists()


def test_checkpoints_load_weights_only(packed, tmp_path):
    log = tmp_path / "run"
    launch(train_cfg(packed, log, epochs=1, max_steps=2))
    marker = tmp_path / "pwned"
    ckpt = torch.load(log / "checkpoint.pt", weights_only=True)
    ckpt["extra"] = _Touch(str(marker))
    torch.save(ckpt, log / "checkpoint.pt")
    with pytest.raises(UserError, match="cannot load checkpoint .*checkpoint.pt"):
        launch(train_cfg(packed, log, epochs=1, resume=str(log)))
    assert not marker.exists()


def _jpeg_claiming(height: int, width: int) -> bytes:
    jpeg = bytearray(simplejpeg.encode_jpeg(np.zeros((32, 48, 3), np.uint8), colorspace="RGB"))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(jpeg)


def test_frame_and_frame_count_claims_are_bounded_before_allocating(copy):
    """A JPEG header holds 16-bit sizes and libjpeg stops at 65500: a 65500 x 65500 frame (12.9 GB as
    RGB) is the largest claim a shard can make; the .jpgs header's frame count is bounded too."""
    giant = pack_jpegs([_jpeg_claiming(65500, 65500)] * 4)
    tracemalloc.start()
    started = time.monotonic()
    for crop_rng in (None, 12345):
        with pytest.raises(ShardFormatError, match="65500x65500 pixels exceeds the 8192 px limit"):
            clips.crop_clip(giant, 24, crop_rng)
    with pytest.raises(ShardFormatError, match="claims 1000000000 frames"):
        unpack_jpegs(b"JPGS" + (10**9).to_bytes(4, "little") + b"\0" * 64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20 and time.monotonic() - started < 5
    # in a shard: counted as one bad clip, the epoch goes on
    ds = streamkit.resolve(cfg_for(copy))
    m = read_members(copy / "005.tar")
    victim = shard_keys(copy / "005.tar")[2]
    m[f"{victim}.jpgs"] = giant
    write_members(copy / "005.tar", m)
    got = epoch_batches(ds, cfg_for(copy))
    faults = [f for b in got for f in b["faults"]]
    assert (
        len(got) == 12 and len(faults) == 1 and victim in faults[0]["what"] and "8192 px limit" in faults[0]["reason"]
    )


def test_pipe_urls_need_allow_pipe(packed, tmp_path):
    result = run_cli(train_app, "--shards", f"pipe:cat {packed}/000.tar", "--log-dir", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0 and "--allow-pipe" in result.stderr
    cfg = StreamConfig(
        shards=(f"pipe:cat {packed}/<000..007>.tar",),
        index=str(packed / "index.json"),
        batch_size=4,
        workers=2,
        crop=24,
        shuffle_buffer=8,
        allow_pipe=True,
    )
    ds = streamkit.resolve(cfg)
    assert len(epoch_batches(ds, cfg)) == 12  # allowed explicitly, it works
    broken = dataclasses.replace(cfg, shards=(f"pipe:cat {packed}/<000..006>.tar::pipe:cat /nonexistent/007.tar",))
    got = epoch_batches(streamkit.resolve(broken), broken)
    faults = [f for b in got for f in b["faults"]]
    assert (
        len(got) == 12
        and faults
        and faults[0]["what"] == "pipe:cat /nonexistent/007.tar"
        and sum(f["samples"] for f in faults) == 6
    )


# --- 1. one rank's shards broken, two real processes ------------------------------------------


def _two_ranks(copy, log, *extra):
    import subprocess

    from conftest import cli_command, cli_env

    cmd = cli_command("train_app") + [
        "--shards",
        f"{copy}/<000..007>.tar",
        "--model",
        "tiny",
        "--crop",
        "24",
        "--batch-size",
        "4",
    ]
    cmd += [
        "--workers",
        "2",
        "--epochs",
        "1",
        "--eval-every",
        "0",
        "--no-progress",
        "--audit-keys",
        "--nproc-per-node",
        "2",
        "--log-dir",
        str(log),
        *extra,
    ]
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_only_one_ranks_shards_broken_two_processes_neither_hangs_nor_loses_count(copy, tmp_path):
    # epoch 0, seed 0, two ranks: rank 0 reads shards 2, 3, 5, 1 and rank 1 reads 4, 6, 0, 7
    assert plan.rank_shards(8, 0, 0, 1, 2) == [4, 6, 0, 7]
    data = (copy / "004.tar").read_bytes()
    (copy / "004.tar").write_bytes(data[: len(data) // 2])
    m = read_members(copy / "006.tar")
    m[f"{shard_keys(copy / '006.tar')[0]}.jpgs"] = b"JPGS garbage"
    write_members(copy / "006.tar", m)
    log = tmp_path / "run"
    done = _two_ranks(copy, log, "--max-bad", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [(log / "audit" / f"epoch-000-rank-{r}.txt").read_text().splitlines() for r in (0, 1)]
    audits = [[line.split("\t")[0] for line in rank] for rank in lines]
    assert len(audits[0]) == len(audits[1]) == 24  # the same 6 steps on both ranks
    summary = json.loads((log / "metrics.jsonl").read_text().splitlines()[-1])
    logged = [json.loads(line) for line in (log / "faults-rank1.jsonl").read_text().splitlines()]
    assert summary["bad_samples"] == sum(f["samples"] for f in logged) >= 2 and summary["fault_logs"] == [
        "faults-rank1.jsonl"
    ]
    assert {f["what"].split("/")[-1].split(":")[0] for f in logged} == {"004.tar", "006.tar"}
    assert len(set(audits[1])) == 24 - summary["bad_samples"] and not set(audits[0]) & set(audits[1])
    # the clips of the cut shard are made up with repeats, and the audit marks them
    assert sum(line.endswith("\trepeat") for line in lines[1]) >= 1 and not any("\t" in line for line in lines[0])
    assert "unreadable clips replaced or skipped" in done.stdout
    # Above --max-bad on rank 1 only: every rank stops, exit 2, one error line naming the cause.
    done = _two_ranks(copy, tmp_path / "stop", "--max-bad", "1")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1:" in errors[0] and "more than --max-bad 1" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
