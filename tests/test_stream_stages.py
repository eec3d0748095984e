"""stream/stages.py's read-ahead across shards (issue 27): remote shards are requested while the
shard before them is read, with the same samples, in the same order, and the same faults as when
each is opened at its turn; nothing is left running or half-cached when a reader stops early. Against
a real HTTP server on 127.0.0.1 that delays every shard GET."""

import contextlib
import hashlib
import shutil
import threading
import time

import httpkit
import pytest

from pipeline.storage.cache import open_cache
from pipeline.stream import stages
from pipeline.stream.sources import resolve
from pipeline.stream.stages import Faults, read_samples

DELAY = 0.15


def readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("clipstream-readahead")]


@contextlib.contextmanager
def slow_server(folder, cut: str | None = None):
    """`folder` served with DELAY before every shard's answer; `requests` records (time, path) of
    each GET as it arrives. `cut`: that file's body always stops half-way (its connection closed)."""
    requests: list[tuple[float, str]] = []

    class Slow(httpkit.Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append((time.monotonic(), self.path))
            if self.path.endswith(".tar"):
                time.sleep(DELAY)
            if cut and self.path.endswith(cut):
                data = (folder / cut).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
            super().do_GET()

    with httpkit.serve(folder, Slow) as base:
        yield base, requests


def shards_at(base: str):
    return resolve([f"{base}/<000..007>.tar"]).shards


def read_all(shards, ahead, faults=None, cache=None):
    """(key, the sample's member bytes, time it arrived) of every raw sample."""
    faults = Faults() if faults is None else faults
    out = []
    for s in read_samples(shards, False, faults, cache, ahead=ahead):
        out.append((s["__key__"], {k: v for k, v in s.items() if isinstance(v, bytes)}, time.monotonic()))
    return out


def test_the_next_shards_are_requested_while_the_current_one_is_read(packed):
    with slow_server(packed) as (base, requests):
        shards = shards_at(base)
        start = time.monotonic()
        at_its_turn = read_all(shards, ahead=0)
        plain = time.monotonic() - start
        del requests[:]
        start = time.monotonic()
        ahead = read_all(shards, ahead=stages.READ_AHEAD_SHARDS)
        early = time.monotonic() - start
    assert [(k, m) for k, m, _ in ahead] == [(k, m) for k, m, _ in at_its_turn]  # same samples, same order
    assert plain >= 8 * DELAY  # each shard waits for its answer
    assert early < 0.6 * plain  # 8 delays, at most 5 at once: about 2 of them
    # the server saw shard 001's GET before the reader had shard 000's last sample
    asked = {path.rsplit("/", 1)[-1]: t for t, path in requests}
    first_keys = [k for k, _, _ in at_its_turn[:6]]
    last_of_000 = max(t for k, _, t in ahead if k in first_keys)
    assert asked["001.tar"] < last_of_000
    assert asked["004.tar"] < last_of_000  # READ_AHEAD_SHARDS (4) behind the one being read


def test_faults_are_the_same_with_and_without_read_ahead(packed, tmp_path):
    folder = tmp_path / "pack"
    shutil.copytree(packed, folder)
    (folder / "002.tar").unlink()  # cannot be opened (404)
    with open(folder / "005.tar", "r+b") as f:  # not the size the index says: refused at open
        f.truncate(f.seek(0, 2) - 512)
    with slow_server(folder, cut="006.tar") as (base, _):  # breaks off half-way, on every retry
        shards = shards_at(base)
        runs = []
        for ahead in (0, stages.READ_AHEAD_SHARDS):
            faults = Faults()
            samples = read_all(shards, ahead, faults)
            runs.append(([k for k, _, _ in samples], [(f["what"], f["reason"], f["samples"]) for f in faults.take()]))
    assert runs[0] == runs[1]
    keys, faults = runs[1]
    assert [what.rsplit("/", 1)[-1] for what, _, _ in faults] == ["002.tar", "005.tar", "006.tar"]
    assert [n for _, _, n in faults][:2] == [6, 6] and "cannot open" in faults[0][1]
    assert len(keys) == 5 * 6 + (6 - faults[2][2])


def copies(folder) -> dict[str, str]:
    """The cache's files (its locks aside): name -> sha256 of the content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != ".locks"}


def test_a_reader_stopped_early_leaves_no_thread_and_nothing_half_cached(packed, tmp_path):
    cache = open_cache(tmp_path / "cache", None)
    with slow_server(packed) as (base, _):
        shards = shards_at(base)
        samples = read_samples(shards, False, Faults(), cache)
        for _ in range(8):  # into the second shard: the next ones are under way
            next(samples)
        assert readahead_threads()
        samples.close()
        assert not readahead_threads()
        # a copy is kept only whole and verified (the shards read ahead to their end are), never partial
        stopped = copies(tmp_path / "cache")
        assert stopped and all(name.endswith(f"-{digest}.tar") for name, digest in stopped.items()), stopped
        # read through the cache with read-ahead: every shard teed in the thread, verified and kept
        read_all(shards, stages.READ_AHEAD_SHARDS, cache=cache)
    kept = copies(tmp_path / "cache")
    assert sorted(kept) == sorted(cache_name(s) for s in shards) and not readahead_threads()
    assert all(name.endswith(f"-{digest}.tar") for name, digest in kept.items())


def test_shards_the_cache_holds_are_opened_at_their_turn_without_a_thread(packed, tmp_path):
    cache = open_cache(tmp_path / "cache", None)
    started = []
    real = stages.ReadAhead

    def counted(*args, **kwargs):
        started.append(args)
        return real(*args, **kwargs)

    with slow_server(packed) as (base, requests):
        shards = shards_at(base)
        first = read_all(shards, stages.READ_AHEAD_SHARDS, cache=cache)  # fills the cache
        (tmp_path / "cache" / cache_name(shards[3])).write_bytes(b"\0" * shards[3].bytes)  # same size, corrupt
        del requests[:]
        stages.ReadAhead = counted
        try:
            again = read_all(shards, stages.READ_AHEAD_SHARDS, cache=cache)
        finally:
            stages.ReadAhead = real
    assert [(k, m) for k, m, _ in again] == [(k, m) for k, m, _ in first]
    # seven copies held: no thread, no request; the corrupt one is seen at its turn and fetched again
    assert [p.rsplit("/", 1)[-1] for _, p in requests] == ["003.tar"]
    assert started == [] and not readahead_threads()
    assert cache_name(shards[3]) in copies(tmp_path / "cache")


def cache_name(shard) -> str:
    from pipeline.storage.cache import entry_name

    return entry_name(shard.url, shard.sha256)


@pytest.mark.parametrize(
    ("sizes", "opened"),
    [
        ([500_000] * 5, 5),  # small shards: the one to read next and READ_AHEAD_SHARDS behind it
        ([30 << 20] * 5, 2),  # HMDB51-sized: the next one only (32 MB between those behind)
        ([10 << 20] * 5, 4),  # 10 + 10 + 10 <= 32 MB, the 4th would pass it
        ([16 << 20] * 5, 3),  # a shard of unknown size counts as 16 MB: two behind
        ([500_000, 40 << 20, 500_000], 2),  # a big one behind: it is opened, nothing behind it
        ([40 << 20, 500_000, 500_000], 3),  # the one to read next does not count
        ([0, 0, 0, 0, 0], 5),  # local files (opened at their turn) hold nothing ahead
    ],
)
def test_read_ahead_is_bounded_by_bytes(sizes, opened):
    assert stages.READ_AHEAD_BYTES == 32 << 20 and stages.AHEAD_UNKNOWN_BYTES == 16 << 20
    assert stages.within_budget(sizes) == opened
