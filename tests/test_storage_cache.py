"""The node-local cache of remote shards (pipeline/storage/cache.py), against real servers only: moto's
S3 server behind a counting TCP proxy, and a local HTTP server counting its shard GETs, all on
127.0.0.1. Two ranks are two real processes; a full disk is a real file-size limit (RLIMIT_FSIZE)."""

import collections
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import httpkit
import pytest
import s3kit
from conftest import cli_command, cli_env

from pipeline import ClipDataset, ClipLoader
from pipeline.errors import UserError
from pipeline.storage.cache import is_entry, open_cache
from pipeline.stream.sources import resolve
from pipeline.stream.stages import Faults, read_samples

LOADER = {"batch_size": 4, "crop": 24, "shuffle_buffer": 8}


def index_of(folder) -> dict:
    return {e["name"]: e for e in json.loads((folder / "index.json").read_text())["splits"]["train"]["shards"]}


def all_entries(folder) -> dict:
    """Every shard of the pack, training and test: name -> its index entry."""
    splits = json.loads((folder / "index.json").read_text())["splits"].values()
    return {e["name"]: e for split in splits for e in split["shards"]}


def copies(cache) -> dict[str, bytes]:
    """The cache's kept copies by file name."""
    return {p.name: p.read_bytes() for p in cache.iterdir() if is_entry(p.name)}


def assert_copies_verified(cache, index: dict, names) -> None:
    """The cache holds exactly the shards `names`, each byte for byte what the index describes."""
    held = copies(cache)
    want = {index[n]["sha256"] for n in names}
    assert {name.split("-", 1)[1].removesuffix(".tar") for name in held} == want
    for data in held.values():
        assert hashlib.sha256(data).hexdigest() in want


class Counting(httpkit.Quiet):
    """Serves a folder and counts the GETs of each path; `delay` seconds before each shard's body."""

    gets: collections.Counter = collections.Counter()
    lock = threading.Lock()
    delay = 0.0

    def do_GET(self):  # noqa: N802 - http.server's name
        with self.lock:
            self.gets[self.path.lstrip("/")] += 1
        if self.path.endswith(".tar") and self.delay:
            time.sleep(self.delay)
        super().do_GET()


@pytest.fixture
def http(packed):
    """(base URL, Counter of GETs by file name) of a fresh counting server of the `packed` folder."""

    class Handler(Counting):
        gets = collections.Counter()

    with httpkit.serve(packed, Handler) as base:
        yield base, Handler


def shard_gets(gets: collections.Counter) -> dict[str, int]:
    return {name.rsplit("/", 1)[-1]: n for name, n in gets.items() if name.endswith(".tar")}


def epoch_keys(loader, epoch: int) -> list[str]:
    return [k for batch in loader.epoch(epoch) for k in batch["key"]]


# ---------------------------------------------------------------------------- the second epoch


@pytest.fixture(scope="module")
def s3(packed):
    """The `packed` folder in a bucket of a moto server, reached through a proxy that counts the
    shard GETs: (s3:// URL of the packed folder, the proxy)."""
    import s3fs

    server = s3kit.MotoServer()
    proxy = s3kit.CuttingProxy(server.port, ".tar", after=0, cuts=0)
    saved = {k: os.environ.get(k) for k in s3kit.client_env(proxy.url)}
    os.environ.update(s3kit.client_env(proxy.url))
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"cache-{uuid.uuid4().hex[:12]}"
    fs = s3kit.s3fs_for(server.url)
    fs.mkdir(bucket)
    for p in sorted(packed.iterdir()):
        fs.put_file(str(p), f"{bucket}/pack/{p.name}")
    yield f"s3://{bucket}/pack/", proxy
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.close()
    server.stop()


def test_s3_second_epoch_requests_no_shard_body(s3, packed, tmp_path):
    url, proxy = s3
    index, cache = index_of(packed), tmp_path / "cache"
    before = collections.Counter(shard_gets(proxy.gets))
    with ClipLoader(url, workers=2, cache_dir=str(cache), **LOADER) as loader:
        first = epoch_keys(loader, 0)
        after_first = collections.Counter(shard_gets(proxy.gets)) - before
        second = epoch_keys(loader, 1)
        after_second = collections.Counter(shard_gets(proxy.gets)) - before
    assert len(set(first)) == len(first) == 48 and sorted(first) == sorted(second)
    assert first != second  # a new order, from the cache
    assert dict(after_first) == {name: 1 for name in index}  # one 16 MB ranged GET a shard
    assert after_second == after_first
    assert_copies_verified(cache, index, index)


def test_verify_shards_reads_each_shard_once_and_fills_the_cache_training_then_reads(s3, packed, tmp_path):
    from conftest import run_cli

    from pipeline.cli import verify_app

    url, proxy = s3
    every = all_entries(packed)
    cache = tmp_path / "cache"
    before = collections.Counter(shard_gets(proxy.gets))
    result = run_cli(verify_app, url, "--quiet", "--workers", "2", "--cache-dir", str(cache), "--cache-size", "1GB")
    # every shard well (the fixture's pack is made without a manifest)
    assert result.stdout.splitlines()[:-1] == ["manifest.parquet: missing"], result.output
    verified = collections.Counter(shard_gets(proxy.gets)) - before
    assert dict(verified) == {name: 1 for name in every}  # hashed while read: one download a shard, not two
    assert_copies_verified(cache, every, every)
    with ClipLoader(url, workers=2, cache_dir=str(cache), **LOADER) as loader:
        assert len(epoch_keys(loader, 0)) == 48
    assert collections.Counter(shard_gets(proxy.gets)) - before == verified  # training read none from the store
    # verify never trusts the cache: a second run reads the store again (and finds the copies good)
    again = run_cli(verify_app, url, "--quiet", "--workers", "1", "--cache-dir", str(cache))
    assert (
        again.stdout.splitlines()[:-1] == ["manifest.parquet: missing"]
        and collections.Counter(shard_gets(proxy.gets)) - before == verified + verified
    )


def test_http_second_epoch_requests_no_shard_body_with_clipdataset(http, packed, tmp_path):
    from torch.utils.data import DataLoader

    base, handler = http
    index, cache = index_of(packed), tmp_path / "cache"
    dataset = ClipDataset(base + "/", batch_size=4, crop=24, num_workers=2, cache_dir=str(cache))
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    first = [k for batch in loader for k in batch["key"]]
    after_first = shard_gets(handler.gets)
    second = [k for batch in loader for k in batch["key"]]
    assert len(set(first)) == 48 and sorted(set(second)) == sorted(set(first))
    assert after_first == {name: 1 for name in index}
    assert shard_gets(handler.gets) == after_first
    assert_copies_verified(cache, index, index)


def test_read_shard_reads_through_the_cache(http, packed, tmp_path):
    from pipeline import read_shard

    (base, handler), cache, every = http, str(tmp_path / "cache"), all_entries(packed)
    plain = [(s["key"], s["frames"].tobytes()) for s in read_shard(base + "/")]
    assert shard_gets(handler.gets) == {name: 1 for name in every}
    first = [(s["key"], s["frames"].tobytes()) for s in read_shard(base + "/", cache_dir=cache)]
    second = [(s["key"], s["frames"].tobytes()) for s in read_shard(base + "/", cache_dir=cache)]
    one = [s["key"] for s in read_shard(f"{base}/<000..001>.tar", cache_dir=cache)]  # a pattern: the index beside it
    assert first == second == plain and one == [k for k, _ in plain][: len(one)] and one
    assert shard_gets(handler.gets) == {name: 2 for name in every}  # read once more to fill it, then never
    assert_copies_verified(tmp_path / "cache", every, every)


def test_local_shards_do_not_use_the_cache(packed, tmp_path):
    cache = tmp_path / "cache"
    dataset = ClipDataset(packed, batch_size=4, crop=24, cache_dir=str(cache))
    assert len([k for batch in dataset for k in batch["key"]]) == 48
    assert dataset.cache is None and not cache.exists()


def test_a_cache_size_needs_a_folder_and_a_sane_value(packed):
    with pytest.raises(UserError, match=r"needs `cache_dir`"):
        ClipDataset(packed, cache_bytes="50GB")
    with pytest.raises(UserError, match=r"`cache_bytes` must be a size like 50GB"):
        ClipDataset(packed, cache_dir="/tmp/x", cache_bytes="fifty")
    with pytest.raises(UserError, match=r"`cache_dir` must be a local folder"):
        ClipDataset(packed, cache_dir="s3://bucket/cache")
    assert ClipDataset(packed, crop=24, cache_dir="/tmp/x", cache_bytes="1.5GiB").cfg.cache_bytes == 3 << 29


# ---------------------------------------------------------------------------- corruption, eviction


def read_all(base: str, cache, names=None) -> list[str]:
    """Keys of the training shards (or those `names`), read through `cache`; no fault allowed."""
    shards = resolve([base + "/"], "train").shards
    if names is not None:
        shards = [s for s in shards if s.url.rsplit("/", 1)[-1] in names]
    faults = Faults()
    keys = [s["__key__"] for s in read_samples(shards, False, faults, cache)]
    assert not faults.pending, faults.pending
    return keys


def test_a_corrupted_copy_is_detected_and_fetched_again(http, packed, tmp_path, caplog):
    base, handler = http
    index, folder = index_of(packed), tmp_path / "cache"
    cache = open_cache(folder, None)
    keys = read_all(base, cache)
    assert shard_gets(handler.gets) == {name: 1 for name in index}
    held = sorted(p for p in folder.iterdir() if is_entry(p.name))
    flipped, cut = held[0], held[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, one bad byte
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1000])
    bad = {n for n, e in index.items() if e["sha256"] in (flipped.name[17:-4], cut.name[17:-4])}
    assert read_all(base, cache) == keys
    assert shard_gets(handler.gets) == {name: 1 + (name in bad) for name in index}
    assert sum("is corrupt" in r.getMessage() for r in caplog.records) == 2
    assert_copies_verified(folder, index, index)
    assert read_all(base, cache) == keys  # and now from the cache again
    assert shard_gets(handler.gets) == {name: 1 + (name in bad) for name in index}


def test_eviction_keeps_the_cache_under_its_size_least_recently_used_first(http, packed, tmp_path):
    base, handler = http
    index, folder = index_of(packed), tmp_path / "cache"
    names = sorted(index)
    size = sum(index[n]["bytes"] for n in names[:3]) + 100  # room for three shards
    cache = open_cache(folder, size)
    for name in names:
        read_all(base, cache, {name})
        assert cache.used() <= size
    assert_copies_verified(folder, index, names[-3:])
    read_all(base, cache, {names[-3]})  # a hit: now the most recently used
    read_all(base, cache, {names[0]})  # evicts the least recently used, names[-2]
    assert_copies_verified(folder, index, [names[-3], names[-1], names[0]])
    gets = shard_gets(handler.gets)
    assert gets[names[-3]] == 1 and gets[names[0]] == 2


def test_a_shard_larger_than_the_cache_is_streamed_not_kept(http, packed, tmp_path):
    base, handler = http
    folder = tmp_path / "cache"
    keys = read_all(base, open_cache(folder, 1000))
    assert len(keys) == 48 and not copies(folder)


# ---------------------------------------------------------------------------- ranks on one node

RANK_SCRIPT = """
import json, sys
from pipeline import ClipLoader
base, cache, rank, world, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with ClipLoader(base + "/", rank=rank, world_size=world, workers=1, batch_size=4, crop=24, shuffle_buffer=8,
                cache_dir=cache) as loader:
    print(json.dumps([[k for b in loader.epoch(e) for k in b["key"]] for e in range(epochs)]))
"""


def run_ranks(base: str, cache, world: int, epochs: int) -> list[list[list[str]]]:
    """Start the ranks' processes at once; each one's keys per epoch."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, base, str(cache), str(r), str(world), str(epochs)],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        assert "warning" not in stderr, stderr
        out.append(json.loads(stdout))
    return out


def test_two_ranks_on_one_node_download_each_shard_once(http, packed, tmp_path):
    base, handler = http
    index = index_of(packed)
    ranks = run_ranks(base, tmp_path / "cache", world=2, epochs=2)
    for epoch in range(2):
        keys = ranks[0][epoch] + ranks[1][epoch]
        assert len(set(keys)) == 48, epoch
    assert shard_gets(handler.gets) == {name: 1 for name in index}
    assert_copies_verified(tmp_path / "cache", index, index)


READ_SCRIPT = """
import json, sys
from pipeline.storage.cache import open_cache
from pipeline.stream.sources import resolve
from pipeline.stream.stages import Faults, read_samples
faults = Faults()
cache = open_cache(sys.argv[2], None)
print(json.dumps([s["__key__"] for s in read_samples(resolve([sys.argv[1] + "/"]).shards, False, faults, cache)]))
assert not faults.pending, faults.pending
"""


def test_two_processes_reading_one_shard_at_once_download_it_once(http, packed, tmp_path):
    base, handler = http
    handler.delay = 0.2  # each download takes a while: the second process meets it under way
    index = index_of(packed)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READ_SCRIPT, base, str(tmp_path / "cache")],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    both = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0 and not stderr, stderr
        both.append(json.loads(stdout))
    assert both[0] == both[1] and len(set(both[0])) == 48  # the same shards in the same order, at once
    assert shard_gets(handler.gets) == {name: 1 for name in index}
    assert_copies_verified(tmp_path / "cache", index, index)


# ---------------------------------------------------------------------------- a cache that cannot be used

FULL_SCRIPT = """
import json, resource, signal, sys
from pipeline import ClipLoader
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # no file may grow past 20 kB: a full disk
with ClipLoader(sys.argv[1] + "/", workers=2, batch_size=4, crop=24, cache_dir=sys.argv[2]) as loader:
    print(json.dumps([len({k for b in loader.epoch(e) for k in b["key"]}) for e in range(2)]))
"""


def test_a_full_cache_is_bypassed_with_one_warning(http, packed, tmp_path):
    base, handler = http
    done = subprocess.run(
        [sys.executable, "-c", FULL_SCRIPT, base, str(tmp_path / "cache")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [48, 48]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "shard cache" in warnings[0] and "reading shards without it" in warnings[0], warnings
    assert not copies(tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]
    # the workers read past the cache: both epochs fetched every shard
    assert sum(shard_gets(handler.gets).values()) > len(index_of(packed))


def test_an_unwritable_cache_is_bypassed_with_one_warning_by_train_stream(http, packed, tmp_path):
    base, handler = http
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's parent folder should be")
    done = subprocess.run(
        cli_command("train_app")
        + ["--shards", base + "/", "--cache-dir", str(blocker / "cache"), "--cache-size", "500MB"]
        + ["--model", "tiny", "--crop", "24", "--batch-size", "4", "--workers", "2", "--shuffle-buffer", "8"]
        + ["--epochs", "2", "--no-progress", "--log-dir", str(tmp_path / "run")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "shard cache" in warnings[0] and "not-a-folder" in warnings[0], done.stderr
    assert "Traceback" not in done.stderr
    assert shard_gets(handler.gets)["000.tar"] == 2  # two epochs, no cache
