"""The loading pipeline: shard patterns -> per-epoch, per-rank, per-worker shard lists -> uint8 batches.

Everything here is deterministic in (seed, epoch, rank, worker): the shard order of an epoch, which
shards a rank and a worker read, the shuffle buffer, each clip's crop and flip, and which worker's
clips make each step (`step_schedule`). That is what makes a mid-epoch resume exact: a worker
re-reads its stream, drops the samples the schedule says it delivered before decoding them, and
carries on with the same steps and crops it would have produced. The worker processes and their
batch buffers are pipeline/loader.py's.

How many steps a rank runs in an epoch comes from the index alone (see `steps_per_epoch`), so every
rank runs the same number of steps and collectives never wait for a rank whose stream ran dry.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import io
import itertools
import json
import re
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

import cv2
import numpy as np
import torch

from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline import shardformat
from pipeline.shardformat import FORMAT_VERSION, INDEX_NAME, ShardFormatError, jpeg_size, split_member_name, unpack_jpegs

HTTP_TIMEOUT_S = 60
HTTP_ATTEMPTS = 3


# ---------------------------------------------------------------------------------------------
# Shard patterns and the index


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    """Local path or URL."""
    samples: int
    """Sample count from the index; -1 when unknown (evaluation shards given without an index)."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The resolved data source of a run: what every rank computes its plan from."""

    train: tuple[Shard, ...]
    test: tuple[Shard, ...]
    classes: tuple[str, ...]
    frames: int
    """Frames per clip (T)."""

    @property
    def train_samples(self) -> int:
        return sum(s.samples for s in self.train)


def expand_pattern(pattern: str) -> list[str]:
    """Expand one shard pattern into URLs, in order (see shardformat.expand_pattern)."""
    try:
        return shardformat.expand_pattern(pattern)
    except ValueError as e:
        raise UserError(str(e)) from None


def _scheme(url: str) -> str:
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # "C:\..." is a path


def _local_path(url: str) -> Path | None:
    scheme = _scheme(url)
    if scheme == "":
        return Path(url)
    if scheme == "file":
        return Path(urlparse(url).path)
    return None


def expand_shards(patterns: Iterable[str], allow_pipe: bool) -> list[str]:
    """All URLs of the patterns, checked: known schemes only, local files exist, no duplicates."""
    urls: list[str] = []
    for pattern in patterns:
        expanded = expand_pattern(pattern)
        for url in expanded:
            scheme = _scheme(url)
            if scheme == "pipe" and not allow_pipe:
                raise UserError(f"{url!r} would run a shell command; pass --allow-pipe to allow pipe: URLs")
            if scheme not in ("", "file", "http", "https", "pipe"):
                raise UserError(f"unsupported URL scheme {scheme!r} in {url!r} (use a local path, http(s):// or pipe:)")
        local = [u for u in expanded if _local_path(u) is not None]
        missing = [u for u in local if not _local_path(u).is_file()]
        if missing and len(missing) == len(expanded):
            raise UserError(f"no shards match {pattern!r}")
        if missing:
            raise UserError(f"{len(missing)} of {len(expanded)} shards of {pattern!r} do not exist, e.g. {missing[0]!r}")
        urls.extend(expanded)
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise UserError(f"shard {url!r} is listed twice")
        seen.add(url)
    return urls


def shard_name(url: str) -> str:
    """The file name a shard has in the index: the last path segment, without a URL's query string
    (pre-signed URLs carry their signature there)."""
    if _scheme(url) in ("http", "https"):
        url = urlparse(url).path
    return url.rsplit("/", 1)[-1]


def _without_query(url: str) -> str:
    return urlparse(url)._replace(query="", fragment="").geturl() if _scheme(url) in ("http", "https") else url


def index_location(shard_url: str) -> str:
    """Where the index of a shard lives: `index.json` in its folder or beside it under the same base URL."""
    local = _local_path(shard_url)
    if local is not None:
        return str(local.parent / INDEX_NAME)
    if _scheme(shard_url) in ("http", "https"):
        return _without_query(shard_url).rsplit("/", 1)[0] + "/" + INDEX_NAME
    raise UserError(f"cannot tell where the index of {shard_url!r} is; pass --index")


def _sibling(index_url: str, name: str) -> str:
    local = _local_path(index_url)
    if local is not None:
        return str(local.parent / name)
    return index_url.rsplit("/", 1)[0] + "/" + name


def _with_retries(call):
    """`call()` with HTTP_ATTEMPTS tries for connection errors, time-outs and 5xx answers (4xx fail at once)."""
    last: Exception | None = None
    for _ in range(HTTP_ATTEMPTS):
        try:
            return call()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
            last = e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = e
    assert last is not None
    raise last


def _http_get(url: str) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()

    return _with_retries(get)


def read_index(location: str) -> dict:
    """Read and check an index.json given as a path or an http(s) URL."""
    try:
        local = _local_path(location)
        raw = local.read_bytes() if local is not None else _http_get(location)
    except (OSError, urllib.error.URLError) as e:
        raise UserError(f"cannot read index {location!r}: {e}") from None
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable index {location!r}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != "clipstream" or index.get("version") != FORMAT_VERSION:
        raise UserError(f"{location!r} is not a clipstream v{FORMAT_VERSION} index")
    try:
        for split in ("train", "test"):
            for entry in index["splits"].get(split, {}).get("shards", []):
                if not isinstance(entry["name"], str) or not isinstance(entry["samples"], int) or entry["samples"] < 0:
                    raise ValueError(entry)
        if not index["classes"] or not all(isinstance(c, str) for c in index["classes"]):
            raise ValueError("classes")
        int(index["frames_per_clip"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"unreadable index {location!r}: missing or bad field ({e})") from None
    return index


def _counts(index: dict, split: str) -> dict[str, int]:
    return {e["name"]: e["samples"] for e in index["splits"].get(split, {}).get("shards", [])}


def resolve_dataset(cfg: StreamConfig) -> Dataset:
    """Expand the patterns, read the index (or indexes), and attach a sample count to every shard.

    Raises UserError for anything a user can fix: patterns matching nothing, malformed ranges,
    missing or unreadable index, shards the index does not list, too few shards.
    """
    train_urls = expand_shards(cfg.shards, cfg.allow_pipe)
    indexes: dict[str, dict] = {}

    def index_for(url: str) -> tuple[str, dict]:
        location = cfg.index or index_location(url)
        if location not in indexes:
            indexes[location] = read_index(location)
        return location, indexes[location]

    train: list[Shard] = []
    for url in train_urls:
        location, index = index_for(url)
        name = shard_name(url)
        counts = _counts(index, "train")
        if name not in counts:
            where = "a test shard in" if name in _counts(index, "test") else "not a training shard of"
            raise UserError(f"{url!r} is {where} index {location!r}")
        train.append(Shard(url, counts[name]))
    first_location, first = index_for(train_urls[0])
    classes, frames = tuple(first["classes"]), int(first["frames_per_clip"])
    for location, index in indexes.items():
        if tuple(index["classes"]) != classes or int(index["frames_per_clip"]) != frames:
            raise UserError(f"index {location!r} disagrees with {first_location!r} on classes or frames per clip")
    if cfg.eval_shards:
        known: dict[str, int] = {}
        for index in indexes.values():
            known.update(_counts(index, "test"))
        test = [Shard(url, known.get(shard_name(url), -1)) for url in expand_shards(cfg.eval_shards, cfg.allow_pipe)]
    else:
        test = [Shard(_sibling(first_location, name), n) for name, n in _counts(first, "test").items()]
    return Dataset(tuple(train), tuple(test), classes, frames)


def auto_workers(n_shards: int, world_size: int, cores_per_rank: int, resample: bool) -> int:
    """Loader workers per rank when not given: a core each, one core left for the trainer, at most 8,
    and (without resampling) no more than each rank has shards."""
    workers = min(8, max(1, cores_per_rank - 1))
    return workers if resample else max(1, min(workers, n_shards // world_size))


def check_enough_shards(dataset: Dataset, cfg: StreamConfig, world_size: int) -> None:
    """Every (rank, worker) must read at least one shard each epoch, unless shards are resampled."""
    workers = max(1, cfg.workers or 0)
    readers = world_size * workers
    if not cfg.resample and len(dataset.train) < readers:
        raise UserError(
            f"{len(dataset.train)} training shards for {world_size} ranks x {workers} workers = {readers} readers; "
            "pack more shards, use fewer workers or ranks, or pass --resample"
        )
    if dataset.train_samples < world_size * cfg.batch_size:
        raise UserError(
            f"{dataset.train_samples} training clips do not fill one batch of {cfg.batch_size} on each of {world_size} ranks"
        )


# ---------------------------------------------------------------------------------------------
# The per-epoch plan: pure index math


def epoch_permutation(n_shards: int, seed: int, epoch: int) -> list[int]:
    """This epoch's shard order; the same on every rank."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def rank_shards(n_shards: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices of the shards rank `rank` reads in `epoch`: every world_size-th of the shuffled order."""
    return epoch_permutation(n_shards, seed, epoch)[rank::world_size]


def steps_per_epoch(counts: list[int], batch_size: int, world_size: int, seed: int, epoch: int, resample: bool) -> int:
    """Batches every rank runs in `epoch`.

    Without resampling: the smallest rank's floor(samples / batch_size), where a rank's samples are
    those of the shards it reads this epoch. Ranks with more samples leave their surplus unread (at
    most one batch's worth plus the difference of one shard); when the shards split evenly and the
    batch size divides a rank's share, every clip is used exactly once.
    With resampling: floor(total / (world_size * batch_size)).
    """
    if resample:
        return sum(counts) // (world_size * batch_size)
    per_rank = [sum(counts[i] for i in rank_shards(len(counts), seed, epoch, r, world_size)) for r in range(world_size)]
    return min(per_rank) // batch_size


def worker_quotas(worker_samples: list[int], total: int) -> list[int]:
    """How many samples each worker of a rank delivers so that together they deliver `total`.

    Each worker is capped at what it has; the surplus is taken one sample at a time from the worker
    with the most left (lowest index on ties), so the workers stay balanced.
    """
    if total > sum(worker_samples):
        raise ValueError(f"workers hold {sum(worker_samples)} samples, {total} needed")
    quotas = list(worker_samples)
    surplus = sum(quotas) - total
    while surplus > 0:
        top = max(range(len(quotas)), key=lambda w: (quotas[w], -w))
        # Take as much as keeps `top` at or above the runner-up in one go.
        runner_up = max((q for w, q in enumerate(quotas) if w != top), default=0)
        take = max(1, min(surplus, quotas[top] - runner_up))
        quotas[top] -= take
        surplus -= take
    return quotas


@dataclasses.dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank reads in one epoch."""

    shards: tuple[Shard, ...]
    """In reading order (resampling: the pool drawn from)."""
    quota: int
    """Samples it delivers (surplus dropped, shortfall from bad shards filled with repeats)."""


def train_plan(dataset: Dataset, cfg: StreamConfig, epoch: int, rank: int, world_size: int) -> list[WorkerPlan]:
    """One WorkerPlan per worker (one for workers=0) of `rank` in `epoch`."""
    counts = [s.samples for s in dataset.train]
    steps = steps_per_epoch(counts, cfg.batch_size, world_size, cfg.seed, epoch, cfg.resample)
    n_workers = max(1, cfg.workers or 0)
    total = steps * cfg.batch_size
    if cfg.resample:
        quotas = [total // n_workers + (w < total % n_workers) for w in range(n_workers)]
        return [WorkerPlan(dataset.train, quotas[w]) for w in range(n_workers)]
    mine = [dataset.train[i] for i in rank_shards(len(counts), cfg.seed, epoch, rank, world_size)]
    per_worker = [tuple(mine[w::n_workers]) for w in range(n_workers)]
    quotas = worker_quotas([sum(s.samples for s in shards) for shards in per_worker], total)
    return [WorkerPlan(per_worker[w], quotas[w]) for w in range(n_workers)]


def step_schedule(quotas: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """Which worker's clips make each step of an epoch: a list of steps, each a list of (worker, clips).

    First the whole batches, one per worker in turn (round robin over the workers that have whole
    batches left); then the workers' remainders, in worker order, cut into steps. A pure function of
    the quotas: every step's clips are known before any is read, so a resume at step s carries on
    with exactly the steps an uninterrupted run would have taken.
    """
    full = [q // batch_size for q in quotas]
    steps = [[(w, batch_size)] for k in range(max(full, default=0)) for w in range(len(quotas)) if full[w] > k]
    current: list[tuple[int, int]] = []
    room = batch_size
    for w, q in enumerate(quotas):
        left = q % batch_size
        while left:
            take = min(left, room)
            current.append((w, take))
            left, room = left - take, room - take
            if room == 0:
                steps.append(current)
                current, room = [], batch_size
    if current:
        raise ValueError(f"quotas {quotas} do not fill whole batches of {batch_size}")
    return steps


def worker_parts(schedule: list[list[tuple[int, int]]], worker: int, start_step: int) -> tuple[int, list[int]]:
    """(clips `worker` delivered before step `start_step`, the sizes of its parts from there on)."""
    done = sum(n for step in schedule[:start_step] for w, n in step if w == worker)
    return done, [n for step in schedule[start_step:] for w, n in step if w == worker]


def eval_plan(dataset: Dataset, workers: int, rank: int, world_size: int) -> tuple[list[tuple[Shard, ...]], bool]:
    """Test shards per worker of `rank`, and whether to keep only this rank's share of keys.

    With at least as many test shards as ranks, ranks read disjoint shards; with fewer, every rank
    reads all and keeps the keys whose crc32 falls to it. Either way each test clip counts once.
    """
    shards = dataset.test
    by_key = len(shards) < world_size
    mine = shards if by_key else shards[rank::world_size]
    n_workers = max(1, min(max(1, workers), len(mine)))
    return [tuple(mine[w::n_workers]) for w in range(n_workers)], by_key


def key_rank(key: str, world_size: int) -> int:
    return zlib.crc32(key.encode()) % world_size


# ---------------------------------------------------------------------------------------------
# Pipeline stages: small generators, composed in `train_dataset` / `eval_dataset`


class Faults:
    """Bad samples and shards met by one worker, shipped to the trainer with the next batch."""

    def __init__(self):
        self.pending: list[dict] = []
        self.bad = 0

    def add(self, what: str, reason: str, samples: int = 1) -> None:
        self.pending.append({"what": what, "reason": reason, "samples": samples})
        self.bad += samples

    def take(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


def open_shard(url: str, allow_pipe: bool):
    """A binary stream of one shard: a local file, an HTTP(S) response, or (when allowed) a pipe."""
    local = _local_path(url)
    if local is not None:
        return open(local, "rb")
    scheme = _scheme(url)
    if scheme in ("http", "https"):
        return io.BufferedReader(_ResumingHTTPBody(url), buffer_size=1 << 20)
    if scheme == "pipe" and allow_pipe:
        import webdataset as wds

        return wds.gopen(url)
    raise ValueError(f"refusing to open {url!r}")


def _urlopen(request: urllib.request.Request):
    """urlopen with retries (see _with_retries)."""
    return _with_retries(lambda: urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S))


class _ResumingHTTPBody(io.RawIOBase):
    """The body of one HTTP(S) shard, surviving dropped connections: a read that fails, or ends
    before Content-Length, re-requests the rest (HTTP_ATTEMPTS connections in all) with a Range
    header, or, from a server that ignores Range, re-reads and drops the bytes already delivered.
    After that the error reaches read_samples, which counts the shard's missing samples."""

    def __init__(self, url: str):
        self.url, self.pos, self.attempts = url, 0, 1
        self.response = _urlopen(urllib.request.Request(url))
        length = self.response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self.response.close()
        self.response = _urlopen(urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-"}))
        if self.response.status != 206:
            left = self.pos
            while left:
                chunk = self.response.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"{self.url} ended after {self.pos - left} bytes on a retry")
                left -= len(chunk)

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self.response.readinto(buffer)
                if n == 0 and len(buffer) and self.length is not None and self.pos < self.length:
                    raise ConnectionError(f"connection closed after {self.pos} of {self.length} bytes")
                self.pos += n
                return n
            except (OSError, http.client.HTTPException) as e:
                if self.attempts >= HTTP_ATTEMPTS:
                    raise ConnectionError(f"{e} ({self.attempts} connections tried)") from None
                self.attempts += 1
                self._reopen()

    def close(self) -> None:
        self.response.close()
        super().close()


def read_samples(shards: Iterable[Shard], allow_pipe: bool, faults: Faults) -> Iterator[dict]:
    """Raw samples {'__key__', 'jpgs', 'cls', ...: bytes} of each shard in turn.

    A shard that cannot be opened or breaks off is a fault worth its missing samples (per the index),
    not the end of the run; `tar_samples` does the parsing and grouping.
    """
    for shard in shards:
        seen = 0
        try:
            stream = open_shard(shard.url, allow_pipe)
        except Exception as e:
            faults.add(shard.url, f"cannot open: {e}", max(shard.samples, 0))
            continue
        try:
            for sample in tar_samples(stream, shard.url):
                seen += 1
                yield sample
        except Exception as e:
            faults.add(shard.url, f"unreadable after {seen} samples: {e}", max(shard.samples - seen, 0))
            continue
        finally:
            try:
                stream.close()
            except Exception as e:  # a pipe: command that failed says so here
                faults.add(shard.url, f"on close: {e}", 0)
        # tarfile takes a damaged header for the end of the archive: the index tells the difference.
        if shard.samples >= 0 and seen != shard.samples:
            faults.add(shard.url, f"holds {seen} samples, index says {shard.samples}", max(shard.samples - seen, 0))


_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
_TAR_META = re.compile(r"__[^/]*__($|/)")


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Raw samples of one tar stream, grouped by key exactly as webdataset groups them: members are
    split at the first dot of their base name into key and lower-cased suffix, consecutive members of
    one key make a sample {'__key__', '__url__', suffix: bytes}; directories, links and `__meta__`
    members are skipped.

    A lean reader of 512-byte headers: 0.03 ms a sample where webdataset's tarfile-based iteration
    takes 0.25 ms (a quarter of the JPEG decoding of a 16-frame clip). Compressed tars go through
    webdataset. Raises ShardFormatError for a truncated or corrupt stream, before yielding the sample
    it was reading.
    """
    head = _read_exactly(stream, 512, "header", allow_eof=True)
    if head is None:
        raise ShardFormatError("empty file")
    if head.startswith(_COMPRESSED):
        yield from _webdataset_samples(io.BytesIO(head + stream.read()), url)
        return
    current: dict | None = None
    long_name: str | None = None
    while head is not None and any(head):
        try:
            if sum(head[:148]) + 256 + sum(head[156:]) != _tar_number(head[148:156]):
                raise ShardFormatError(f"corrupt tar header (bad checksum) after {current['__key__'] if current else 'the start'}")
            size = _tar_number(head[124:136])
            if size > shardformat.MAX_MEMBER_BYTES:
                raise ShardFormatError(f"tar member of {size} bytes exceeds the {shardformat.MAX_MEMBER_BYTES} byte limit")
        except ShardFormatError:
            if current is not None:
                yield current  # read whole before the damage; a member it lacks is the decoder's fault to count
            raise
        kind = head[156:157]
        body = _read_exactly(stream, size, "member", allow_eof=False)
        _read_exactly(stream, -size % 512, "padding", allow_eof=False)
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name: the name of the next member
            long_name = _pax_path(body) if kind == b"x" else body.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0"):
            name = long_name or _ustar_name(head)
            long_name = None
            key, suffix = split_member_name(name)
            if key is not None and not ("/" not in name and name.startswith("__") and name.endswith("__")) and not _TAR_META.match(name):
                suffix = suffix.lower()
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__url__": url}
                if suffix in current:
                    raise ShardFormatError(f"{name}: duplicate file name in tar file")
                current[suffix] = body
        else:
            long_name = None if kind != b"g" else long_name
        head = _read_exactly(stream, 512, "header", allow_eof=True)
    if current is not None:
        yield current


def _read_exactly(stream, n: int, what: str, allow_eof: bool) -> bytes | None:
    data = stream.read(n) if n else b""
    if len(data) == n:
        return data
    if allow_eof and not data:
        return None
    raise ShardFormatError(f"unexpected end of data in a tar {what}")


def _tar_number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU), for huge sizes
        raise ShardFormatError("tar member larger than 8 GiB")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ShardFormatError(f"corrupt tar header (number {field!r})") from None


def _ustar_name(head: bytes) -> str:
    name = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if head[257:262] == b"ustar":
        prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            return prefix + "/" + name
    return name


def _pax_path(body: bytes) -> str | None:
    pos = 0
    while pos < len(body):
        length = int(body[pos : body.index(b" ", pos)])
        record = body[pos : pos + length]
        key, _, value = record[record.index(b" ") + 1 : -1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def _webdataset_samples(fileobj, url: str) -> Iterator[dict]:
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander([{"url": url, "stream": fileobj}], handler=wds.reraise_exception)
    yield from group_by_keys(files, handler=wds.reraise_exception)


def resampled_shards(shards: tuple[Shard, ...], rng: np.random.Generator) -> Iterator[Shard]:
    """Shards drawn with replacement, for ever."""
    while True:
        yield shards[int(rng.integers(len(shards)))]


def shuffle(src: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Reservoir shuffle: fill `buffer` items, then emit a random one for every one read."""
    held: list = []
    for item in src:
        if len(held) < buffer:
            held.append(item)
            continue
        i = int(rng.integers(buffer))
        held[i], item = item, held[i]
        yield item
    while held:
        yield held.pop(int(rng.integers(len(held))))


REFILL_KEPT = 256
"""Raw samples a worker keeps to fill a shortfall with (about 150 KB each)."""


def fit_to_quota(src: Iterable[dict], quota: int) -> Iterator[tuple[int, dict]]:
    """Exactly `quota` (position, raw sample) pairs: surplus cut; a shortfall (lost shards) filled by
    cycling over the last REFILL_KEPT samples delivered, so the rank still runs its planned steps
    (and a worker's memory does not grow with its share of the epoch)."""
    recent: collections.deque = collections.deque(maxlen=REFILL_KEPT)
    delivered = 0
    for position, sample in zip(range(quota), src):
        recent.append(sample)
        delivered += 1
        yield position, sample
    if delivered == quota or not recent:
        return
    for position, sample in zip(range(delivered, quota), itertools.cycle(list(recent))):
        yield position, sample


def skip_consumed(src: Iterable[tuple[int, dict]], skip: int) -> Iterator[tuple[int, dict]]:
    """Drop the samples a resumed run already trained on, before paying for their decoding."""
    return itertools.islice(src, skip, None)


def clip_draw(seed: int, epoch: int, rank: int, worker: int, position: int) -> int:
    """One clip's 64 random bits for its augmentation: the same clip position always gets the same
    crop. A keyed hash (1 us) rather than a seeded numpy Generator (25 us a clip, 2 % of decoding)."""
    digest = hashlib.blake2b(struct.pack("<5q", seed, epoch, rank, worker, position), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def crop_box(height: int, width: int, crop: int, draw: int | None) -> tuple[int, int, bool]:
    """(top, left, flip) of the clip's crop: from the 64 random bits `draw` (top from the low 24
    bits, left from the next 24, flip from bit 48), centred without."""
    if height < crop or width < crop:
        raise ShardFormatError(f"frames of {width}x{height} are smaller than the {crop} px crop")
    if draw is None:
        return (height - crop) // 2, (width - crop) // 2, False
    top = (draw & 0xFFFFFF) % (height - crop + 1)
    left = ((draw >> 24) & 0xFFFFFF) % (width - crop + 1)
    return top, left, bool((draw >> 48) & 1)


def decode_clip(pack: bytes, crop: int, draw: int | None, out: np.ndarray | None = None, scratch: dict | None = None) -> np.ndarray:
    """Decode a `.jpgs` pack and cut one crop (and flip) out of every frame: (T, crop, crop, 3) uint8,
    written into `out` when given (a row of a batch slot: no allocation, no copy afterwards).

    One crop box and one flip decision for the whole clip, so motion stays coherent. Each frame is
    decoded into a one-frame buffer and cropped at once, while it is still in the CPU's cache (5 %
    faster than decoding the whole clip first). `scratch`, a dict kept by the caller, holds that
    buffer from clip to clip.
    """
    jpegs = unpack_jpegs(pack)
    if out is not None and len(jpegs) != len(out):
        raise ShardFormatError(f"clip has {len(jpegs)} frames, the index says {len(out)}")
    height, width = jpeg_size(jpegs[0])
    top, left, flip = crop_box(height, width, crop, draw)
    frame = frame_buffer(height, width, scratch)
    window = frame[top : top + crop, left : left + crop]  # the same view for every frame
    if out is None:
        out = np.empty((len(jpegs), crop, crop, 3), np.uint8)
    for t, jpeg in enumerate(jpegs):
        decode_frame(jpeg, t, frame)
        crop_frame(window, flip, out[t])
    return out


def frame_buffer(height: int, width: int, scratch: dict | None) -> np.ndarray:
    """A (height, width, 3) uint8 buffer, kept in `scratch` for the next clip of that size."""
    if scratch is None:
        return np.empty((height, width, 3), np.uint8)
    frame = scratch.get((height, width))
    if frame is None:
        scratch.clear()  # one size at a time: the clips of one dataset share it
        frame = scratch[(height, width)] = np.empty((height, width, 3), np.uint8)
    return frame


def decode_frame(jpeg, t: int, out: np.ndarray) -> None:
    """Decode frame `t` of a clip into `out` (libjpeg-turbo), which has frame 0's size; a frame of
    another size is a ShardFormatError. simplejpeg returns the decoded image's own shape (a smaller
    frame fills part of the buffer) and refuses a larger one, so the check costs no header parse."""
    import simplejpeg

    try:
        decoded = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=out)
    except ValueError as e:
        if "too small" in str(e):
            raise ShardFormatError(f"frames of one clip differ in size (frame {t}: {e})") from None
        raise ShardFormatError(f"unreadable JPEG frame {t}: {e}") from None
    if decoded.shape != out.shape:
        raise ShardFormatError(
            f"frames of one clip differ in size (frame {t} is {decoded.shape[1]}x{decoded.shape[0]}, frame 0 {out.shape[1]}x{out.shape[0]})"
        )


def crop_frame(window: np.ndarray, flip: bool, out: np.ndarray) -> None:
    """Copy a frame's crop window (a view of the frame buffer), mirrored if `flip`, into `out`."""
    if flip:
        # numpy copies a reversed axis of 3-byte pixels element by element (1.4 ms a 16-frame clip);
        # OpenCV's flip does the same mirror in 0.04 ms.
        cv2.flip(window, 1, dst=out)
    else:
        np.copyto(out, window)


def parse_label(raw: bytes, num_classes: int) -> int:
    try:
        label = int(raw)
    except ValueError:
        raise ShardFormatError(f"class {raw[:20]!r} is not a number") from None
    if not 0 <= label < num_classes:
        raise ShardFormatError(f"class {label} outside 0..{num_classes - 1}")
    return label


def decode_sample(raw: dict, crop: int, num_classes: int, draw: int | None, row: np.ndarray, scratch: dict) -> int:
    """Check a raw sample's members and label, decode its clip into `row` (see decode_clip); returns
    the label. Anything unreadable is a ShardFormatError."""
    if "jpgs" not in raw or "cls" not in raw:
        raise ShardFormatError(f"missing member(s): has {sorted(k for k in raw if not k.startswith('__'))}")
    label = parse_label(raw["cls"], num_classes)
    decode_clip(raw["jpgs"], crop, draw, row, scratch)
    return label


class TrainClips:
    """Decodes training clips straight into the rows of batch slots, in stream order.

    `src` gives (position, raw sample) pairs; a clip's crop and flip come from its position. An
    unreadable clip's row gets the worker's previous good clip instead (decoded again: the same
    crop), or, before any good clip, the next good one; every replacement is a named fault, and the
    count stays as planned.
    """

    def __init__(self, src: Iterable[tuple[int, dict]], crop: int, num_classes: int, seeds: tuple[int, int, int, int], faults: Faults):
        self.src, self.crop, self.num_classes, self.seeds, self.faults = iter(src), crop, num_classes, seeds, faults
        self.scratch: dict = {}
        self.last_good: tuple[int, dict, int] | None = None  # (position, raw, label)
        self.repeat: tuple[np.ndarray, str, int, int] | None = None  # (clip, key, label, rows still owed)

    def _decode(self, position: int, raw: dict, row: np.ndarray) -> int:
        return decode_sample(raw, self.crop, self.num_classes, clip_draw(*self.seeds, position), row, self.scratch)

    def fill(self, rows: np.ndarray) -> tuple[list[str], list[int]]:
        """Write len(rows) clips into `rows`; returns their keys and labels."""
        keys: list[str] = []
        labels: list[int] = []
        for row in rows:
            if self.repeat is not None:
                clip, key, label, owed = self.repeat
                row[...] = clip
                self.repeat = (clip, key, label, owed - 1) if owed > 1 else None
                keys.append(key)
                labels.append(label)
                continue
            owed = 0
            for position, raw in self.src:
                key = raw.get("__key__", "?")
                try:
                    label = self._decode(position, raw, row)
                    self.last_good = (position, raw, label)
                except ShardFormatError as e:
                    # The trainer counts faults against --max-bad for the whole rank (see train.py).
                    self.faults.add(f"{raw.get('__url__', '?')}:{key}", str(e))
                    if self.last_good is None:
                        owed += 1
                        continue
                    position, raw, label = self.last_good
                    key = raw["__key__"]
                    self._decode(position, raw, row)
                break
            else:
                raise UserError(f"every clip of a loader worker's shards is unreadable ({self.faults.bad} bad); see the faults log")
            if owed:
                self.repeat = (row.copy(), key, label, owed)
            keys.append(key)
            labels.append(label)
        return keys, labels


# ---------------------------------------------------------------------------------------------
# Producers (what a loader worker runs) and the loaders the trainer iterates


@dataclasses.dataclass(frozen=True)
class TrainProducer:
    """What loader worker `w` of one rank runs: epoch after epoch, its parts of every step of the
    schedule, each decoded into a free slot of its ring. Picklable (plain fields)."""

    dataset: Dataset
    cfg: StreamConfig
    rank: int
    world_size: int
    start_epoch: int = 0
    start_step: int = 0
    epochs: int | None = None
    """Stop after this epoch number; None: for ever."""

    def schedule(self, epoch: int) -> tuple[list[WorkerPlan], list[list[tuple[int, int]]]]:
        plans = train_plan(self.dataset, self.cfg, epoch, self.rank, self.world_size)
        return plans, step_schedule([p.quota for p in plans], self.cfg.batch_size)

    def first_step(self, epoch: int) -> int:
        return self.start_step if epoch == self.start_epoch else 0

    def raw_samples(self, plan: WorkerPlan, epoch: int, worker: int, faults: Faults) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) pairs of this worker's epoch: shards read in plan order (or drawn,
        resampling), tar members grouped, shuffled in a buffer, cut or padded to the quota."""
        cfg, rank = self.cfg, self.rank
        shards = resampled_shards(plan.shards, np.random.default_rng([cfg.seed, epoch, rank, worker, 0])) if cfg.resample else plan.shards
        raw = read_samples(shards, cfg.allow_pipe, faults)
        mixed = shuffle(raw, cfg.shuffle_buffer, np.random.default_rng([cfg.seed, epoch, rank, worker, 1]))
        return fit_to_quota(mixed, plan.quota)

    def __call__(self, worker: int, ring) -> Iterator[dict]:
        epochs = itertools.count(self.start_epoch) if self.epochs is None else range(self.start_epoch, self.epochs)
        try:
            for epoch in epochs:
                plans, schedule = self.schedule(epoch)
                skip, sizes = worker_parts(schedule, worker, self.first_step(epoch))
                if not sizes:
                    continue
                faults = Faults()
                # On resume: drop what was already trained on, before decoding it.
                src = skip_consumed(self.raw_samples(plans[worker], epoch, worker, faults), skip)
                clips = TrainClips(src, self.cfg.crop, len(self.dataset.classes), (self.cfg.seed, epoch, self.rank, worker), faults)
                for n in sizes:
                    slot, rows = ring.take()
                    keys, labels = clips.fill(rows[:n])
                    yield {"slot": slot, "n": n, "epoch": epoch, "key": keys, "label": labels, "faults": faults.take()}
        except UserError as e:
            yield {"fatal": str(e)}


class TrainLoader:
    """The training batches of one rank, epoch after epoch, from loader workers that live for the
    whole run (see pipeline/loader.py): no re-forking and no refilled shuffle buffers at epoch
    boundaries; the workers run into the next epoch as soon as their slots free up.

    `epoch(e)` yields the batches of epoch e in schedule order: 'video' (B, T, crop, crop, 3) uint8,
    'label' (B,) int64, 'key' list, 'worker' (B,) int64 (which worker read each clip), 'faults' list.
    A batch's video is a view of a worker's slot, valid until the next batch is asked for (`copy=True`
    clones it); with `pin_memory`, a background thread copies each batch into pinned memory.
    Epochs must be asked for in order, from `start_epoch`; `start_step` resumes inside it.
    """

    def __init__(
        self,
        dataset: Dataset,
        cfg: StreamConfig,
        rank: int,
        world_size: int,
        start_epoch: int = 0,
        start_step: int = 0,
        epochs: int | None = None,
        pin_memory: bool = False,
        copy: bool = False,
        start_method: str | None = None,
    ):
        from pipeline.loader import WorkerPool

        self.producer = TrainProducer(dataset, cfg, rank, world_size, start_epoch, start_step, epochs)
        self.cfg, self.pin_memory, self.copy = cfg, pin_memory, copy
        self.next_epoch = start_epoch
        self.merged: torch.Tensor | None = None
        shape = (cfg.batch_size, dataset.frames, cfg.crop, cfg.crop, 3)
        _preload_decoders()
        self.pool = WorkerPool(self.producer, cfg.workers or 0, shape, cfg.prefetch + 1, start_method)

    def epoch(self, epoch: int) -> Iterator[dict]:
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked for; the workers are at epoch {self.next_epoch}")
        self.next_epoch += 1
        batches = self._batches(epoch)
        return _pinning(batches) if self.pin_memory else batches

    def _batches(self, epoch: int) -> Iterator[dict]:
        _, schedule = self.producer.schedule(epoch)
        held: list[tuple[int, dict]] = []
        try:
            for parts in schedule[self.producer.first_step(epoch) :]:
                got = [(w, self._get(w, epoch, n)) for w, n in parts]
                if len(got) == 1:
                    video = got[0][1]["video"]
                    held = got
                else:  # the workers' remainders, at the end of the epoch: one copy, into a reused buffer
                    if self.merged is None:
                        self.merged = torch.empty(self.pool.slot_shape, dtype=torch.uint8)
                    video = torch.cat([m["video"] for _, m in got], out=self.merged)
                    for w, m in got:
                        self.pool.release(w, m)
                if self.copy:
                    video = video.clone()
                yield {
                    "video": video,
                    "label": torch.tensor([label for _, m in got for label in m["label"]], dtype=torch.int64),
                    "key": [k for _, m in got for k in m["key"]],
                    "worker": torch.tensor([w for w, m in got for _ in range(m["n"])], dtype=torch.int64),
                    "faults": [f for _, m in got for f in m["faults"]],
                }
                for w, m in held:
                    self.pool.release(w, m)
                held = []
        finally:
            for w, m in held:
                self.pool.release(w, m)

    def _get(self, worker: int, epoch: int, n: int) -> dict:
        message = self.pool.get(worker)
        if "fatal" in message:
            raise UserError(message["fatal"])
        if message.get("epoch") != epoch or message.get("n") != n:
            raise RuntimeError(f"loader worker {worker} sent {message.get('n')} clips of epoch {message.get('epoch')}; expected {n} of epoch {epoch}")
        return message

    def pids(self) -> list[int]:
        return self.pool.pids()

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class EvalProducer:
    """What evaluation worker `w` runs: its test shards once, centre-cropped clips in batch slots;
    unreadable clips are skipped (and counted), never repeated."""

    dataset: Dataset
    cfg: StreamConfig
    rank: int
    world_size: int
    per_worker: tuple[tuple[Shard, ...], ...]
    by_key: bool

    def __call__(self, worker: int, ring) -> Iterator[dict]:
        cfg, faults, scratch = self.cfg, Faults(), {}
        raw = read_samples(self.per_worker[worker], cfg.allow_pipe, faults)
        if self.by_key:  # fewer test shards than ranks: only this rank's keys
            raw = (s for s in raw if key_rank(s.get("__key__", ""), self.world_size) == self.rank)
        num_classes = len(self.dataset.classes)
        slot, rows, keys, labels = None, None, [], []
        for sample in raw:
            key = sample.get("__key__", "?")
            if slot is None:
                slot, rows = ring.take()
            try:
                label = decode_sample(sample, cfg.crop, num_classes, None, rows[len(keys)], scratch)
            except ShardFormatError as e:
                faults.add(f"{sample.get('__url__', '?')}:{key}", str(e))
                continue
            keys.append(key)
            labels.append(label)
            if len(keys) == len(rows):
                yield {"slot": slot, "n": len(keys), "key": keys, "label": labels, "faults": faults.take()}
                slot, keys, labels = None, [], []
        if keys:
            yield {"slot": slot, "n": len(keys), "key": keys, "label": labels, "faults": faults.take()}
        elif faults.pending:
            yield {"n": 0, "key": [], "label": [], "faults": faults.take()}


def eval_batches(dataset: Dataset, cfg: StreamConfig, rank: int, world_size: int, pin_memory: bool = False, copy: bool = False) -> Iterator[dict]:
    """This rank's share of the test set, centre-cropped, as uint8 batches (the last of each worker
    may be partial; a batch of only faults has 'video' None). Workers: one per test shard at most."""
    from pipeline.loader import WorkerPool

    per_worker, by_key = eval_plan(dataset, cfg.workers, rank, world_size)
    workers = len(per_worker) if cfg.workers else 0
    producer = EvalProducer(dataset, cfg, rank, world_size, tuple(per_worker), by_key)
    shape = (cfg.batch_size, dataset.frames, cfg.crop, cfg.crop, 3)

    def batches() -> Iterator[dict]:
        _preload_decoders()
        with WorkerPool(producer, workers, shape, cfg.prefetch + 1) as pool:
            active = list(range(max(1, workers)))
            while active:
                for w in list(active):
                    message = pool.get(w)
                    if "done" in message:
                        active.remove(w)
                        continue
                    video = message.get("video")
                    yield {
                        "video": video.clone() if copy and video is not None else video,
                        "label": torch.tensor(message["label"], dtype=torch.int64) if message["n"] else None,
                        "key": message["key"],
                        "faults": message["faults"],
                    }
                    pool.release(w, message)

    return _pinning(batches()) if pin_memory else batches()


def _pinning(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches` with each video copied into pinned memory by a background thread (for non-blocking
    copies to this rank's GPU), which releases the worker's slot as soon as the copy is made."""
    from pipeline.loader import threaded

    device = torch.cuda.current_device()
    return threaded(batches, _pinned, init=lambda: torch.cuda.set_device(device))


def _pinned(batch: dict) -> dict:
    return batch if batch["video"] is None else {**batch, "video": batch["video"].pin_memory()}


def _preload_decoders() -> None:
    """Import simplejpeg once in the parent, so that forked workers inherit it (cv2 is imported with
    this module)."""
    import simplejpeg  # noqa: F401
