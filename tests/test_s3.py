"""Issue 14: shards in an S3 bucket, against a real S3-API server (moto's server mode, its own
process on 127.0.0.1) and, for dropped connections, a real TCP proxy in front of it.

Every comparison is with the same shards read, or the same videos packed, locally: bytes, keys and
frames must be equal."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3kit
import streamkit
from conftest import assert_one_line_error, cli_command, cli_env, run_cli

from pipeline import ClipDataset, ClipLoader, read_shard
from pipeline.cli import pack_app, train_app
from pipeline.config import StreamConfig

PACK_ARGS = ["--quiet", "--shards", "5", "--test-shards", "3", "--workers", "2"]
TRAIN_ARGS = [
    "--model",
    "tiny",
    "--crop",
    "24",
    "--batch-size",
    "4",
    "--workers",
    "2",
    "--shuffle-buffer",
    "8",
    "--no-progress",
]


@pytest.fixture(scope="module")
def server():
    """One moto server for the module; this process and every CLI subprocess reach it through the
    standard variables (AWS_ENDPOINT_URL, dummy AWS keys)."""
    import s3fs

    srv = s3kit.MotoServer()
    saved = {k: os.environ.get(k) for k in s3kit.client_env(srv.url)}
    os.environ.update(s3kit.client_env(srv.url))
    s3fs.S3FileSystem.clear_instance_cache()
    yield srv
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()
    srv.stop()


@pytest.fixture
def bucket(server):
    """A fresh, empty bucket."""
    name = f"clips-{uuid.uuid4().hex[:12]}"
    s3kit.s3fs_for(server.url).mkdir(name)
    return name


@pytest.fixture(scope="module")
def local_pack(small_tree, tmp_path_factory):
    """The reference: the small tree packed into a local folder."""
    out = tmp_path_factory.mktemp("local-pack")
    result = run_cli(pack_app, small_tree[0], out, *PACK_ARGS)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def uploaded(server, packed):
    """The `packed` fixture's shards, index and manifest-less folder uploaded to s3://<bucket>/pack/."""
    fs = s3kit.s3fs_for(server.url)
    name = f"up-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    for p in sorted(packed.iterdir()):
        fs.put_file(str(p), f"{name}/pack/{p.name}")
    return f"s3://{name}/pack"


def objects(server, url: str) -> dict[str, bytes]:
    """Every object under an s3:// prefix, by name relative to it (the pack's state included)."""
    fs = s3kit.s3fs_for(server.url)
    root = url.removeprefix("s3://").rstrip("/")
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in fs.find(root)}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def published(found: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in found.items() if not k.startswith(".clipstream/")}


def assert_same_state(found: dict[str, bytes], local: dict[str, bytes]) -> None:
    """The bucket holds the local pack's files, and the local pack's state objects (plan and
    per-shard state) byte for byte."""
    assert published(found) == published(local)
    ours = {k for k in local if k.startswith(".clipstream/")}
    assert {k for k in found if k.startswith(".clipstream/")} == ours
    for k in ours:
        assert found[k] == local[k], k


# ---------------------------------------------------------------- packing into a bucket


def test_pack_into_a_bucket_gives_the_local_pack_byte_for_byte(server, bucket, small_tree, local_pack, tmp_path):
    url = f"s3://{bucket}/hmdb51/"
    done = subprocess.run(
        cli_command("pack_app") + [str(small_tree[0]), url, *PACK_ARGS],
        env=cli_env(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "8/8 shards written this run" in done.stdout
    assert not list(tmp_path.iterdir()), "nothing may be written locally (the old s3:/ folder bug)"
    found = objects(server, url)
    assert_same_state(found, files(local_pack))
    again = run_cli(pack_app, small_tree[0], url, *PACK_ARGS)
    assert again.exit_code == 0 and f"nothing to do: {url} is already complete" in again.stdout
    assert objects(server, url) == found


def test_overwrite_in_a_bucket_leaves_only_the_new_pack(server, bucket, small_tree, tmp_path):
    url = f"s3://{bucket}/hmdb51/"
    assert run_cli(pack_app, small_tree[0], url, *PACK_ARGS).exit_code == 0
    changed = ["--quiet", "--shards", "4", "--test-shards", "2", "--workers", "2"]
    refused = run_cli(pack_app, small_tree[0], url, *changed)
    assert_one_line_error(
        refused, r"was packed with different inputs or options \(shards 5 -> 4, test_shards 3 -> 2\); pass --overwrite"
    )
    assert run_cli(pack_app, small_tree[0], url, *changed, "--overwrite").exit_code == 0
    local = tmp_path / "local"
    assert run_cli(pack_app, small_tree[0], local, *changed).exit_code == 0
    assert_same_state(objects(server, url), files(local))  # 004.tar, test-002.tar and their state are gone


@pytest.mark.parametrize("point", ["after-shards:1", "mid-write:002.tar", "before-index", "mid-write:index.json"])
def test_kill_9_mid_pack_then_resume_gives_identical_objects(point, server, bucket, small_tree, local_pack):
    url = f"s3://{bucket}/hmdb51/"
    cmd = cli_command("pack_app") + [str(small_tree[0]), url, *PACK_ARGS]
    crashed = subprocess.run(cmd, env=cli_env(CLIPSTREAM_FAILPOINT=point), capture_output=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr.decode()
    local = files(local_pack)
    partial = objects(server, url)
    assert "index.json" not in partial
    for name, data in published(partial).items():
        assert data == local[name], f"{name} is in the bucket but is not the complete file"
    resumed = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(objects(server, url), local)


def test_parts_on_machines_sharing_only_the_bucket_assemble_one_index(server, bucket, small_tree, local_pack, tmp_path):
    url = f"s3://{bucket}/hmdb51/"
    runs = []
    for i in (1, 2):
        machine = tmp_path / f"machine-{i}"  # each part runs in a folder of its own: nothing shared but the bucket
        machine.mkdir()
        cmd = cli_command("pack_app") + [str(small_tree[0]), url, *PACK_ARGS, "--part", f"{i}/2"]
        runs.append(subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, cwd=machine, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr
        assert not list(machine.iterdir())
    assert "every part has finished" in runs[0].stdout
    assert "4/8 shards written this run" in runs[0].stdout and "4/8 shards written this run" in runs[1].stdout
    assert_same_state(objects(server, url), files(local_pack))


# ---------------------------------------------------------------- reading from a bucket


def _keys_by_epoch(loader: ClipLoader, epochs: int) -> list[list[str]]:
    with loader:
        return [[k for b in loader.epoch(e) for k in b["key"]] for e in range(epochs)]


def test_two_ranks_stream_the_keys_and_frames_they_stream_locally(server, uploaded, packed):
    for rank in (0, 1):
        remote = ClipLoader(
            uploaded + "/", batch_size=4, crop=24, rank=rank, world_size=2, workers=2, shuffle_buffer=8, epochs=2
        )
        local = ClipLoader(
            str(packed), batch_size=4, crop=24, rank=rank, world_size=2, workers=2, shuffle_buffer=8, epochs=2
        )
        assert [s.samples for s in remote.source.shards] == [s.samples for s in local.source.shards]
        with remote, local:
            for epoch in (0, 1):
                r, loc = list(remote.epoch(epoch)), list(local.epoch(epoch))
                assert [b["key"] for b in r] == [b["key"] for b in loc] and len(r) == 6
                assert all(a["frames"].equal(b["frames"]) for a, b in zip(r, loc))
                assert not [f for b in r for f in b["faults"]]


def test_every_reader_takes_a_bucket(server, uploaded, packed):
    # a pattern of shard URLs (index beside them), the prefix without a slash, and read_shard
    cfg = StreamConfig(shards=(f"{uploaded}/<000..007>.tar",), batch_size=4, workers=0, crop=24, shuffle_buffer=8)
    data = streamkit.resolve(cfg)
    assert data.train.index == f"{uploaded}/index.json"
    assert [s.url for s in data.test.shards] == [f"{uploaded}/test-000.tar", f"{uploaded}/test-001.tar"]
    assert ClipLoader(uploaded, batch_size=4, crop=24).source.samples == 48
    remote = list(read_shard(f"{uploaded}/003.tar"))
    local = list(read_shard(packed / "003.tar"))
    assert [s["key"] for s in remote] == [s["key"] for s in local] and len(remote) == 6
    assert all((a["frames"] == b["frames"]).all() and a["meta"] == b["meta"] for a, b in zip(remote, local))
    # ClipDataset: the DataPipeline reads the same clips
    remote_ds = ClipDataset(uploaded + "/", batch_size=4, crop=24, rank=0, world_size=1, shuffle_buffer=8)
    local_ds = ClipDataset(str(packed), batch_size=4, crop=24, rank=0, world_size=1, shuffle_buffer=8)
    assert [b["key"] for b in remote_ds] == [b["key"] for b in local_ds]


@pytest.mark.slow
def test_train_stream_from_a_bucket_consumes_the_local_keys(server, uploaded, packed, tmp_path):
    logs = {}
    for where, shards in (("s3", uploaded + "/"), ("local", str(packed))):
        logs[where] = tmp_path / where
        cmd = cli_command("train_app") + [
            "--shards",
            shards,
            *TRAIN_ARGS,
            "--epochs",
            "2",
            "--audit-keys",
            "--log-dir",
            str(logs[where]),
        ]
        done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "epoch 2: test top-1" in done.stdout
    for epoch in (0, 1):
        name = f"audit/epoch-{epoch:03d}-rank-0.txt"
        keys = (logs["s3"] / name).read_text().split()
        assert keys == (logs["local"] / name).read_text().split() and len(keys) == 48
    evals = [
        [json.loads(line) for line in (logs[w] / "metrics.jsonl").read_text().splitlines() if '"eval"' in line][-1]
        for w in ("s3", "local")
    ]
    assert evals[0]["clips"] == evals[1]["clips"] == 16


def test_bench_stream_reports_time_to_first_batch_from_a_bucket(server, uploaded):
    from pipeline.cli import bench_app

    result = run_cli(
        bench_app,
        "--shards",
        uploaded + "/",
        "--workers",
        "2",
        "--batches",
        "3",
        "--warmup",
        "1",
        "--batch-size",
        "4",
        "--crop",
        "24",
        "--no-stages",
        "--json",
    )
    assert result.exit_code == 0, result.output
    (run,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert run["clips"] == 12 and run["clips_per_s"] > 0 and 0 < run["first_batch_s"] < 60


# ---------------------------------------------------------------- faults


@pytest.fixture
def proxied(server, uploaded, monkeypatch):
    """Clients of this process reach the server through a CuttingProxy (made by the test)."""
    import s3fs

    made = []

    def make(suffix: str, after: int, cuts: int, delay: float = 0.0) -> s3kit.CuttingProxy:
        proxy = s3kit.CuttingProxy(server.port, suffix, after, cuts, delay)
        made.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    yield make
    for p in made:
        p.close()
    s3fs.S3FileSystem.clear_instance_cache()  # the next test's clients go to the server again


def test_a_dropped_connection_resumes_and_loses_nothing(proxied, uploaded, packed):
    proxy = proxied("/005.tar", after=5000, cuts=1)
    remote = list(read_shard(f"{uploaded}/005.tar"))
    assert proxy.cut_count == 1
    local = list(read_shard(packed / "005.tar"))
    assert [s["key"] for s in remote] == [s["key"] for s in local]
    assert all((a["frames"] == b["frames"]).all() for a, b in zip(remote, local))
    # and in the stream, through forked workers
    proxy2 = proxied("/002.tar", after=3000, cuts=1)
    got = _keys_by_epoch(ClipLoader(uploaded + "/", batch_size=4, crop=24, workers=2, shuffle_buffer=8, epochs=1), 1)[0]
    assert proxy2.cut_count == 1
    assert sorted(got) == sorted(
        _keys_by_epoch(ClipLoader(str(packed), batch_size=4, crop=24, workers=2, shuffle_buffer=8, epochs=1), 1)[0]
    )


def test_a_connection_dropped_on_every_retry_makes_the_shard_a_fault(proxied, uploaded):
    proxy = proxied("/006.tar", after=3000, cuts=-1)
    loader = ClipLoader(uploaded + "/", batch_size=4, crop=24, workers=2, shuffle_buffer=8, epochs=1)
    with loader:
        batches = list(loader.epoch(0))
    faults = [f for b in batches for f in b["faults"]]
    assert len(batches) == 12 and proxy.cut_count >= 2
    assert [f["what"] for f in faults] == [f"{uploaded}/006.tar"] and faults[0]["samples"] == 6
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == 42  # the other shards' clips, every one; repeats fill the planned steps


def test_the_next_shards_are_requested_while_one_is_read(proxied, uploaded, packed):
    """Issue 27: 0.15 s added to every request; read ahead, the 8 shards' GETs overlap (about 2
    delays in all instead of 8), with the same samples in the same order as each shard at its turn."""
    import threading
    import time

    from pipeline.stream.sources import resolve
    from pipeline.stream.stages import Faults, read_samples

    proxied(".tar", after=0, cuts=0, delay=0.15)
    shards = resolve([uploaded + "/"]).shards
    runs = {}
    for ahead in (0, None):
        start = time.monotonic()
        faults = Faults()
        keys = [(s["__key__"], s["jpgs"]) for s in read_samples(shards, False, faults, ahead=ahead)]
        runs[ahead] = (keys, time.monotonic() - start, faults.bad)
    assert runs[0][0] == runs[None][0] and len(runs[0][0]) == 48 and runs[0][2] == runs[None][2] == 0
    assert runs[0][1] >= 8 * 0.15 and runs[None][1] < 0.6 * runs[0][1], (runs[0][1], runs[None][1])
    assert not [t for t in threading.enumerate() if t.name.startswith("clipstream-readahead")]


@pytest.fixture(scope="module")
def denying_server():
    """A second moto server that checks credentials on every request: the dummy keys are refused."""
    srv = s3kit.MotoServer(INITIAL_NO_AUTH_ACTION_COUNT="0")
    yield srv
    srv.stop()


def test_a_denied_request_is_one_line_without_the_keys(denying_server, small_tree):
    env = cli_env(**s3kit.client_env(denying_server.url))
    for cmd in (
        cli_command("train_app") + ["--shards", "s3://clips/hmdb51/", *TRAIN_ARGS],
        cli_command("pack_app") + [str(small_tree[0]), "s3://clips/hmdb51/", *PACK_ARGS],
        cli_command("bench_app") + ["--shards", "s3://clips/hmdb51/000.tar"],
        cli_command("verify_app") + ["s3://clips/hmdb51/"],
        cli_command("inspect_app") + ["s3://clips/hmdb51/"],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "access denied" in lines[0], done.stderr
        assert "s3://clips/hmdb51" in lines[0]
        for secret in s3kit.DUMMY_ENV.values():
            assert secret not in done.stdout + done.stderr


def test_a_missing_bucket_or_object_is_one_line(server, bucket, small_tree, uploaded, tmp_path):
    result = run_cli(train_app, "--shards", "s3://zz-nothing-here/hmdb51/", *TRAIN_ARGS)
    assert_one_line_error(result, r"cannot read index 's3://zz-nothing-here/hmdb51/index\.json': no such bucket")
    result = run_cli(train_app, "--shards", f"s3://{bucket}/nothing-here/<000..003>.tar", *TRAIN_ARGS)
    assert_one_line_error(result, rf"cannot read index 's3://{bucket}/nothing-here/index\.json': no such object")
    result = run_cli(pack_app, small_tree[0], "s3://zz-nothing-here/hmdb51/", *PACK_ARGS)
    assert_one_line_error(result, r"output folder is not writable: s3://zz-nothing-here/hmdb51/ \(no such bucket\)")
    # a shard the index lists but the bucket lacks is a fault of the stream, named, not a crash
    fs = s3kit.s3fs_for(os.environ["AWS_ENDPOINT_URL"])
    copy = f"{bucket}/pack"
    for name in fs.ls(uploaded.removeprefix("s3://")):
        if not name.endswith("/004.tar"):
            fs.copy(name, f"{copy}/{name.rsplit('/', 1)[-1]}")
    loader = ClipLoader(f"s3://{copy}/", batch_size=4, crop=24, workers=2, shuffle_buffer=8, epochs=1)
    with loader:
        faults = [f for b in loader.epoch(0) for f in b["faults"]]
    assert [(f["what"], f["samples"]) for f in faults] == [(f"s3://{copy}/004.tar", 6)]
    assert faults[0]["reason"] == "unreadable after 0 samples: no such object"


# ---------------------------------------------------------------- schemes, extras, the s3:/ bug (no server needed)


def test_without_the_s3_extra_an_s3_url_is_one_line(tmp_path):
    # s3fs made unimportable in a fresh process, as on an installation without the extra
    code = "import sys; sys.modules['s3fs'] = None; from pipeline.cli import {app}; {app}()"
    for app, args in (
        ("train_app", ["--shards", "s3://clips/hmdb51/"]),
        ("pack_app", [str(tmp_path), "s3://clips/hmdb51/"]),
    ):
        done = subprocess.run(
            [sys.executable, "-c", code.format(app=app), *args],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2
        assert done.stderr.strip() == "error: s3:// needs the s3 extra: pip install 'clipstream[s3]'"


def test_an_unknown_scheme_is_one_line(small_tree, tmp_path):
    result = run_cli(train_app, "--shards", "nosuch://x/<000..003>.tar", *TRAIN_ARGS)
    assert_one_line_error(result, r"unsupported URL scheme 'nosuch'")
    result = run_cli(pack_app, small_tree[0], "nosuch://x/y/", *PACK_ARGS)
    assert_one_line_error(result, r"unsupported URL scheme 'nosuch'")


def test_an_s3_url_that_lost_a_slash_is_refused_not_made_a_local_folder(small_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(pack_app, small_tree[0], "s3:/clips/hmdb/", *PACK_ARGS)
    assert_one_line_error(result, r"looks like a URL with a slash missing; did you mean 's3://clips/hmdb'")
    assert not list(tmp_path.iterdir())


def test_inspect_and_verify_read_a_bucket_in_place(server, bucket, small_tree, local_pack, tmp_path):
    from pipeline.cli import inspect_app, verify_app

    url = f"s3://{bucket}/hmdb51"
    assert run_cli(pack_app, small_tree[0], url, *PACK_ARGS).exit_code == 0
    remote, local = (
        run_cli(inspect_app, url, "--quiet", "--sheet", tmp_path / "s3.png"),
        run_cli(inspect_app, local_pack, "--quiet", "--sheet", tmp_path / "local.png"),
    )
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output
    assert remote.stdout.replace(url, "FOLDER").replace(str(tmp_path / "s3.png"), "PNG") == local.stdout.replace(
        str(local_pack), "FOLDER"
    ).replace(str(tmp_path / "local.png"), "PNG")
    assert (tmp_path / "s3.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    pattern = run_cli(inspect_app, f"{url}/<000..001>.tar", "--quiet")
    assert pattern.exit_code == 0 and pattern.stdout.startswith(f"{url}: 2 of 8 shards")
    checked = run_cli(verify_app, url + "/", "--quiet", "--workers", "2")
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip().endswith("all well") and "checked 8 shards, 17 clips" in checked.stdout
    # a damaged object is found, named, and the exit code says so
    fs = s3kit.s3fs_for(server.url)
    data = fs.cat_file(f"{bucket}/hmdb51/001.tar")
    fs.pipe_file(f"{bucket}/hmdb51/001.tar", data[:-3000] + bytes(3000))
    fs.rm_file(f"{bucket}/hmdb51/test-002.tar")
    damaged = run_cli(verify_app, url, "--quiet", "--workers", "1")
    assert damaged.exit_code == 1
    assert "001.tar: sha256 mismatch" in damaged.stdout and "test-002.tar: missing" in damaged.stdout
