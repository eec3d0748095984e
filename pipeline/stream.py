"""The loading pipeline: shard patterns -> per-epoch, per-rank, per-worker shard lists -> uint8 batches.

Everything here is deterministic in (seed, epoch, rank, worker): the shard order of an epoch, which
shards a rank and a worker read, the shuffle buffer, and each clip's crop and flip. That is what makes
a mid-epoch resume exact: a worker re-reads its stream, drops the samples already consumed before
decoding them, and carries on with the same crops it would have drawn.

How many steps a rank runs in an epoch comes from the index alone (see `steps_per_epoch`), so every
rank runs the same number of steps and collectives never wait for a rank whose stream ran dry.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import itertools
import json
import math
import re
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

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


def index_location(shard_url: str) -> str:
    """Where the index of a shard lives: `index.json` in its folder or beside it under the same base URL."""
    local = _local_path(shard_url)
    if local is not None:
        return str(local.parent / INDEX_NAME)
    if _scheme(shard_url) in ("http", "https"):
        return shard_url.rsplit("/", 1)[0] + "/" + INDEX_NAME
    raise UserError(f"cannot tell where the index of {shard_url!r} is; pass --index")


def _sibling(index_url: str, name: str) -> str:
    local = _local_path(index_url)
    if local is not None:
        return str(local.parent / name)
    return index_url.rsplit("/", 1)[0] + "/" + name


def _http_get(url: str) -> bytes:
    last: Exception | None = None
    for _ in range(HTTP_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
            last = e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = e
    assert last is not None
    raise last


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
        name = url.rsplit("/", 1)[-1]
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
        test = [Shard(url, known.get(url.rsplit("/", 1)[-1], -1)) for url in expand_shards(cfg.eval_shards, cfg.allow_pipe)]
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
    skip: int
    """Leading samples already consumed before a resume; dropped before decoding."""


def train_plan(dataset: Dataset, cfg: StreamConfig, epoch: int, rank: int, world_size: int, skip: list[int] | None = None) -> list[WorkerPlan]:
    """One WorkerPlan per worker (one for workers=0) of `rank` in `epoch`."""
    counts = [s.samples for s in dataset.train]
    steps = steps_per_epoch(counts, cfg.batch_size, world_size, cfg.seed, epoch, cfg.resample)
    n_workers = max(1, cfg.workers or 0)
    skip = skip or [0] * n_workers
    if len(skip) != n_workers:
        raise ValueError(f"skip has {len(skip)} entries for {n_workers} workers")
    total = steps * cfg.batch_size
    if cfg.resample:
        quotas = [total // n_workers + (w < total % n_workers) for w in range(n_workers)]
        return [WorkerPlan(dataset.train, quotas[w], skip[w]) for w in range(n_workers)]
    mine = [dataset.train[i] for i in rank_shards(len(counts), cfg.seed, epoch, rank, world_size)]
    per_worker = [tuple(mine[w::n_workers]) for w in range(n_workers)]
    quotas = worker_quotas([sum(s.samples for s in shards) for shards in per_worker], total)
    return [WorkerPlan(per_worker[w], quotas[w], skip[w]) for w in range(n_workers)]


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


def worker_identity() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker, (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


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
    """urlopen with HTTP_ATTEMPTS tries for connection errors and 5xx answers (4xx fail at once)."""
    last: Exception | None = None
    for _ in range(HTTP_ATTEMPTS):
        try:
            return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise
            last = e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            last = e
    raise last  # type: ignore[misc]


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


def fit_to_quota(src: Iterable[dict], quota: int) -> Iterator[tuple[int, dict]]:
    """Exactly `quota` (position, raw sample) pairs: surplus cut; a shortfall (lost shards) filled by
    cycling over the samples already delivered, so the rank still runs its planned steps."""
    delivered: list[dict] = []
    for position, sample in zip(range(quota), src):
        delivered.append(sample)
        yield position, sample
    if len(delivered) == quota or not delivered:
        return
    for position, sample in zip(range(len(delivered), quota), itertools.cycle(delivered)):
        yield position, sample


def skip_consumed(src: Iterable[tuple[int, dict]], skip: int) -> Iterator[tuple[int, dict]]:
    """Drop the samples a resumed run already trained on, before paying for their decoding."""
    return itertools.islice(src, skip, None)


def clip_rng(seed: int, epoch: int, rank: int, worker: int, position: int) -> np.random.Generator:
    """The generator of one clip's augmentation: the same clip position always gets the same crop."""
    return np.random.default_rng([seed, epoch, rank, worker, position])


def crop_box(height: int, width: int, crop: int, rng: np.random.Generator | None) -> tuple[int, int, bool]:
    """(top, left, flip) of the clip's crop: random with `rng`, centred without."""
    if height < crop or width < crop:
        raise ShardFormatError(f"frames of {width}x{height} are smaller than the {crop} px crop")
    if rng is None:
        return (height - crop) // 2, (width - crop) // 2, False
    top = int(rng.integers(height - crop + 1))
    left = int(rng.integers(width - crop + 1))
    return top, left, bool(rng.integers(2))


def decode_clip(pack: bytes, crop: int, rng: np.random.Generator | None) -> np.ndarray:
    """Decode a `.jpgs` pack and cut one crop (and flip) out of every frame: (T, crop, crop, 3) uint8.

    One crop box and one flip decision for the whole clip, so motion stays coherent.
    """
    jpegs = unpack_jpegs(pack)
    height, width = jpeg_size(jpegs[0])
    top, left, flip = crop_box(height, width, crop, rng)
    return crop_clip(decode_frames(jpegs, height, width), top, left, crop, flip)


def decode_frames(jpegs: list, height: int, width: int) -> np.ndarray:
    """Decode T JPEGs of one size straight into one (T, height, width, 3) uint8 RGB array (libjpeg-turbo)."""
    import simplejpeg

    frames = np.empty((len(jpegs), height, width, 3), np.uint8)
    for t, jpeg in enumerate(jpegs):
        try:
            if simplejpeg.decode_jpeg_header(jpeg)[:2] != (height, width):
                raise ShardFormatError("frames of one clip differ in size")
            simplejpeg.decode_jpeg(jpeg, colorspace="RGB", buffer=frames[t])
        except ValueError as e:
            raise ShardFormatError(f"unreadable JPEG frame {t}: {e}") from None
    return frames


def crop_clip(frames: np.ndarray, top: int, left: int, crop: int, flip: bool) -> np.ndarray:
    """(T, H, W, 3) -> (T, crop, crop, 3) uint8, contiguous: one window (mirrored if `flip`) for all frames."""
    import cv2

    window = frames[:, top : top + crop, left : left + crop]
    if not flip:
        return np.ascontiguousarray(window)
    # numpy copies a reversed axis of 3-byte pixels element by element (1.4 ms a 16-frame clip);
    # OpenCV's flip does the same mirror in 0.06 ms.
    out = np.empty((len(frames), crop, crop, frames.shape[3]), np.uint8)
    for t in range(len(frames)):
        cv2.flip(window[t], 1, dst=out[t])
    return out


def parse_label(raw: bytes, num_classes: int) -> int:
    try:
        label = int(raw)
    except ValueError:
        raise ShardFormatError(f"class {raw[:20]!r} is not a number") from None
    if not 0 <= label < num_classes:
        raise ShardFormatError(f"class {label} outside 0..{num_classes - 1}")
    return label


def decode_train(src, crop: int, num_classes: int, seeds: tuple[int, int, int, int], faults: Faults) -> Iterator[dict]:
    """Raw (position, sample) -> {'key', 'label', 'video' (T, crop, crop, 3) uint8, 'worker'}.

    An unreadable sample is replaced by the worker's previous good clip (or the next one, if none yet)
    so the count stays as planned; every replacement is a named fault.
    """
    seed, epoch, rank, worker = seeds
    last_good: dict | None = None
    owed = 0
    for position, raw in src:
        key = raw.get("__key__", "?")
        try:
            if "jpgs" not in raw or "cls" not in raw:
                raise ShardFormatError(f"missing member(s): has {sorted(k for k in raw if not k.startswith('__'))}")
            clip = {
                "key": key,
                "label": parse_label(raw["cls"], num_classes),
                "video": decode_clip(raw["jpgs"], crop, clip_rng(seed, epoch, rank, worker, position)),
            }
        except ShardFormatError as e:
            # The trainer counts faults against --max-bad for the whole rank (see train.py).
            faults.add(f"{raw.get('__url__', '?')}:{key}", str(e))
            if last_good is None:
                owed += 1
                continue
            clip = last_good
        for _ in range(owed + 1):
            yield clip
        owed, last_good = 0, clip


def decode_eval(src, crop: int, num_classes: int, faults: Faults) -> Iterator[dict]:
    """Raw samples -> centre-cropped clips; unreadable ones are skipped (and counted), never repeated."""
    for raw in src:
        key = raw.get("__key__", "?")
        try:
            if "jpgs" not in raw or "cls" not in raw:
                raise ShardFormatError("missing member(s)")
            yield {"key": key, "label": parse_label(raw["cls"], num_classes), "video": decode_clip(raw["jpgs"], crop, None)}
        except ShardFormatError as e:
            faults.add(f"{raw.get('__url__', '?')}:{key}", str(e))


def batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; inside a loader worker, allocated in shared memory, so that
    handing it to the trainer moves a file handle instead of copying the batch (as default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def batches(src: Iterable[dict], batch_size: int, worker: int, faults: Faults) -> Iterator[dict]:
    """Whole batches, built in the worker: 'video' (B, T, H, W, 3) uint8, 'label' (B,) int64, 'key'
    list, 'worker' (B,) int64, 'faults' list. The last batch may be partial (merged by `rebatch`)."""

    def emit(clips):
        video = batch_buffer((len(clips), *clips[0]["video"].shape))
        np.stack([c["video"] for c in clips], out=video.numpy())
        return {
            "video": video,
            "label": torch.tensor([c["label"] for c in clips], dtype=torch.int64),
            "key": [c["key"] for c in clips],
            "worker": torch.full((len(clips),), worker, dtype=torch.int64),
            "faults": faults.take(),
        }

    held: list[dict] = []
    for clip in src:
        held.append(clip)
        if len(held) == batch_size:
            yield emit(held)
            held = []
    if held:
        yield emit(held)
    elif faults.pending:
        yield {"video": None, "label": None, "key": [], "worker": None, "faults": faults.take()}


# ---------------------------------------------------------------------------------------------
# Datasets and loaders


class TrainStream(torch.utils.data.IterableDataset):
    """The training stream of one rank in one epoch: whole uint8 batches (see `batches`).

    Picklable (plain fields), so it works with any worker start method.
    """

    def __init__(self, dataset: Dataset, cfg: StreamConfig, epoch: int, rank: int, world_size: int, skip: list[int] | None = None):
        self.dataset, self.cfg, self.epoch, self.rank, self.world_size = dataset, cfg, epoch, rank, world_size
        self.plans = train_plan(dataset, cfg, epoch, rank, world_size, skip)

    def __iter__(self):
        worker, n_workers = worker_identity()
        if n_workers != len(self.plans):
            raise RuntimeError(f"planned for {len(self.plans)} workers, running in {n_workers}")
        return _fatal_as_batch(self.pipeline(worker))

    def pipeline(self, worker: int):
        import webdataset as wds

        cfg, epoch, rank, plan = self.cfg, self.epoch, self.rank, self.plans[worker]
        faults = Faults()
        shard_rng = np.random.default_rng([cfg.seed, epoch, rank, worker, 0])
        shards = resampled_shards(plan.shards, shard_rng) if cfg.resample else plan.shards
        return wds.DataPipeline(
            # this worker's shards for the epoch (resampling: drawn with replacement, endless)
            lambda: iter(shards),
            # raw samples: tar headers read and grouped into KEY.jpgs / KEY.cls / KEY.json (as webdataset groups)
            lambda src: read_samples(src, cfg.allow_pipe, faults),
            # sample shuffle buffer, seeded by (seed, epoch, rank, worker)
            lambda src: shuffle(src, cfg.shuffle_buffer, np.random.default_rng([cfg.seed, epoch, rank, worker, 1])),
            # exactly the planned number of samples, numbered
            lambda src: fit_to_quota(src, plan.quota),
            # on resume: drop what was already trained on, before decoding
            lambda src: skip_consumed(src, plan.skip),
            # decode with libjpeg-turbo, one random crop and flip per clip
            lambda src: decode_train(src, cfg.crop, len(self.dataset.classes), (cfg.seed, epoch, rank, worker), faults),
            # whole uint8 batches
            lambda src: batches(src, cfg.batch_size, worker, faults),
        )


class EvalStream(torch.utils.data.IterableDataset):
    """This rank's share of the test set, centre-cropped, as uint8 batches; `workers` is how many
    loader workers it splits into (at most one per test shard)."""

    def __init__(self, dataset: Dataset, cfg: StreamConfig, rank: int, world_size: int):
        self.dataset, self.cfg, self.rank, self.world_size = dataset, cfg, rank, world_size
        self.per_worker, self.by_key = eval_plan(dataset, cfg.workers, rank, world_size)
        self.workers = len(self.per_worker) if cfg.workers else 0

    def __iter__(self):
        worker, n_workers = worker_identity()
        if n_workers != len(self.per_worker):
            raise RuntimeError(f"planned for {len(self.per_worker)} workers, running in {n_workers}")
        return _fatal_as_batch(self.pipeline(worker))

    def pipeline(self, worker: int):
        import webdataset as wds

        cfg, rank, world_size, by_key = self.cfg, self.rank, self.world_size, self.by_key
        faults = Faults()
        return wds.DataPipeline(
            # this worker's test shards, in order
            lambda: iter(self.per_worker[worker]),
            # raw samples
            lambda src: read_samples(src, cfg.allow_pipe, faults),
            # with fewer test shards than ranks: only this rank's keys
            lambda src: (s for s in src if not by_key or key_rank(s.get("__key__", ""), world_size) == rank),
            # decode, centre crop
            lambda src: decode_eval(src, cfg.crop, len(self.dataset.classes), faults),
            # whole uint8 batches
            lambda src: batches(src, cfg.batch_size, worker, faults),
        )


def _fatal_as_batch(src: Iterable[dict]) -> Iterator[dict]:
    """A UserError in a worker ends its stream with a batch carrying the message, so the trainer can
    stop with one line instead of a worker traceback."""
    try:
        yield from src
    except UserError as e:
        yield {"video": None, "label": None, "key": [], "worker": None, "faults": [], "fatal": str(e)}


def loader(stream, workers: int, pin_memory: bool, prefetch: int) -> torch.utils.data.DataLoader:
    """A plain DataLoader passing the workers' whole batches through.

    Workers are forked on Linux even where the process's default is spawn (as in processes started
    by `--nproc-per-node`): a spawned worker re-imports torch, about 1.5 s each per epoch on 2 cores;
    a forked one starts in milliseconds. Workers never touch CUDA, so forking after CUDA is fine.
    """
    if workers > 0:
        # Imported here, once, so that forked workers inherit them instead of each paying ~50 ms a epoch.
        import cv2  # noqa: F401
        import simplejpeg  # noqa: F401
        import webdataset  # noqa: F401
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context="fork" if workers > 0 and sys.platform == "linux" else None,
    )


def rebatch(src: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Full batches from the workers' stream: workers' final partial batches are merged here.

    Faults ride along on the next batch yielded (or on an empty batch at the end).
    """
    parts: list[dict] = []
    faults: list[dict] = []
    held = 0
    for batch in src:
        if batch.get("fatal"):
            raise UserError(batch["fatal"])
        faults.extend(batch["faults"])
        if batch["video"] is None:
            continue
        n = len(batch["key"])
        if n == batch_size and not parts:
            yield {**batch, "faults": faults}
            faults = []
            continue
        parts.append(batch)
        held += n
        while held >= batch_size:
            merged = _cat(parts)
            yield {**_slice(merged, 0, batch_size), "faults": faults}
            faults = []
            rest = _slice(merged, batch_size, held)
            held -= batch_size
            parts = [rest] if held else []
    if held or faults:
        out = _cat(parts) if parts else {"video": None, "label": None, "key": [], "worker": None}
        yield {**out, "faults": faults}


def _cat(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {
        "video": torch.cat([p["video"] for p in parts]),
        "label": torch.cat([p["label"] for p in parts]),
        "key": [k for p in parts for k in p["key"]],
        "worker": torch.cat([p["worker"] for p in parts]),
    }


def _slice(batch: dict, start: int, stop: int) -> dict:
    return {
        "video": batch["video"][start:stop],
        "label": batch["label"][start:stop],
        "key": batch["key"][start:stop],
        "worker": batch["worker"][start:stop],
    }
