"""Where shards come from: URL schemes, pattern expansion, the index, and opening one shard.

A shard is a local path, a `file://`, `http(s)://` URL (pre-signed ones included: the query string
is not part of the shard's name), an object-store URL (`s3://`, `gs://`, `az://` and any other
scheme fsspec knows, through the package that serves it: see `pipeline.objectstore`) or, only when
the caller allows it, a `pipe:` command. A pattern may also name a packed folder (a local folder, a
URL ending in `/`, or an object-store prefix): its index lists the shards. Every reader (training,
evaluation, `read_shard`, inspect and verify) resolves shards here.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable
from urllib.parse import urlparse

from pipeline import objectstore, shardformat
from pipeline.errors import UserError
from pipeline.shardformat import INDEX_NAME

HTTP_TIMEOUT_S = 60
HTTP_ATTEMPTS = 3
HTTP_SHARD_DEADLINE_S = 120.0
"""Every HTTP(S) shard must arrive whole within this many seconds plus its size at
HTTP_MIN_BYTES_PER_S (all its connections together): HTTP_TIMEOUT_S bounds one read only, and a
server sending a byte every few seconds would hold a loader worker, and the run, for ever."""
HTTP_MIN_BYTES_PER_S = 64 << 10
HTTP_UNKNOWN_SIZE_DEADLINE_S = 3600.0
"""The deadline of a shard served without Content-Length."""
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    """Local path or URL."""
    samples: int
    """Sample count from the index; -1 when unknown (evaluation shards the index does not list)."""


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The resolved shards of one split, with what the index says about them: what every rank and
    worker computes its plan from."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...]
    frames: int
    """Frames per clip (T)."""
    index: str
    """Where the (first) index was read."""

    @property
    def samples(self) -> int:
        return sum(max(0, s.samples) for s in self.shards)


def scheme(url: str) -> str:
    found = urlparse(url).scheme
    return "" if len(found) <= 1 else found  # "C:\..." is a path


def local_path(url: str) -> Path | None:
    """The file a local path or file:// URL names; None for remote URLs."""
    found = scheme(url)
    if found == "":
        return Path(url)
    if found == "file":
        return Path(urlparse(url).path)
    return None


def is_object_store(url: str) -> bool:
    """True for URLs read through fsspec: every scheme but local paths, file://, http(s):// and pipe:."""
    return scheme(url) not in ("", "file", "http", "https", "pipe")


def _check_scheme(url: str, allow_pipe: bool) -> None:
    found = scheme(url)
    if found == "pipe" and not allow_pipe:
        raise UserError(f"{url!r} would run a shell command; set `allow_pipe` to allow pipe: URLs")
    if is_object_store(url):
        objectstore.filesystem(url)  # UserError for an unknown scheme or a missing extra


def _is_file(path: Path) -> bool:
    """Path.is_file, False for any path the system cannot even look up (a name too long for it)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _is_folder(pattern: str) -> bool:
    local = local_path(pattern)
    if local is not None:
        try:
            return local.is_dir()
        except OSError:  # e.g. ENAMETOOLONG: not a folder, and the pattern is checked as a pattern
            return False
    if pattern.endswith("/"):
        return scheme(pattern) in ("http", "https") or is_object_store(pattern)
    # `s3://bucket/hmdb51` names the packed folder as well as `s3://bucket/hmdb51/` does (one
    # request to ask the store); shard names and patterns are not asked about.
    last = pattern.rsplit("/", 1)[-1]
    plain = "." not in last and not any(c in pattern for c in ("{", "<", "::"))
    return is_object_store(pattern) and plain and objectstore.is_folder(pattern)


def expand_pattern(pattern: str) -> list[str]:
    """Expand one shard pattern into URLs, in order (see shardformat.expand_pattern)."""
    try:
        return shardformat.expand_pattern(pattern)
    except ValueError as e:
        raise UserError(str(e)) from None


def expand_shards(patterns: Iterable[str], allow_pipe: bool) -> list[str]:
    """All shard URLs of the patterns (packed folders not included), checked: known schemes only,
    local files exist, no duplicates."""
    urls: list[str] = []
    for pattern in patterns:
        expanded = expand_pattern(pattern)
        for url in expanded:
            _check_scheme(url, allow_pipe)
        local = [u for u in expanded if local_path(u) is not None]
        missing = [u for u in local if not _is_file(local_path(u))]
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
    if scheme(url) in ("http", "https"):
        url = urlparse(url).path
    return url.rsplit("/", 1)[-1]


def _without_query(url: str) -> str:
    return urlparse(url)._replace(query="", fragment="").geturl() if scheme(url) in ("http", "https") else url


def index_location(shard_url: str) -> str:
    """Where the index of a shard lives: `index.json` in its folder, or beside it under the same base URL."""
    local = local_path(shard_url)
    if local is not None:
        return str(local.parent / INDEX_NAME)
    if scheme(shard_url) in ("http", "https") or is_object_store(shard_url):
        return _without_query(shard_url).rsplit("/", 1)[0] + "/" + INDEX_NAME
    raise UserError(f"cannot tell where the index of {shard_url!r} is; pass `index`")


def sibling(index_url: str, name: str) -> str:
    """The URL of file `name` in the folder of `index_url`."""
    local = local_path(index_url)
    if local is not None:
        return str(local.parent / name)
    return index_url.rsplit("/", 1)[0] + "/" + name


def with_retries(call):
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


def _http_get(url: str, limit: int) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            data = response.read(limit + 1)
        if len(data) > limit:
            raise UserError(f"{url} is larger than {limit} bytes")
        return data

    return with_retries(get)


MAX_INDEX_BYTES = 256 << 20
"""An index of a million shards is about 150 MB; anything larger is not an index."""


def read_index(location: str) -> dict:
    """THE index reader for a path, http(s) or object-store URL: fetched here, checked by shardformat.parse_index."""
    try:
        local = local_path(location)
        if local is not None:
            if local.exists() and not local.is_file():  # a folder, a FIFO (open would wait), /dev/zero
                raise UserError(f"cannot read index {location!r}: not a regular file")
            with open(local, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)  # bounded whatever stat says
            if len(raw) > MAX_INDEX_BYTES:
                raise UserError(f"index {location!r} is larger than {MAX_INDEX_BYTES} bytes")
        elif is_object_store(location):
            raw = objectstore.read_bytes(location, MAX_INDEX_BYTES, what="index")
        else:
            raw = _http_get(location, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise UserError(f"cannot read index {location!r}: no such file") from None
    except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
        raise UserError(f"cannot read index {location!r}: {e}") from None
    return shardformat.parse_index(raw, repr(location))


def counts(index: dict, split: str) -> dict[str, int]:
    """Shard name -> sample count of one split of an index."""
    return {e["name"]: e["samples"] for e in index["splits"].get(split, {}).get("shards", [])}


def resolve(patterns: Iterable[str], split: str = "train", index: str | None = None, allow_pipe: bool = False) -> ShardSet:
    """The shards of `split` named by `patterns`, each with its sample count from the index.

    A pattern is a shard pattern (`shards/<000..031>.tar`, `{000..031}`, `::`-lists, URLs) or a
    packed folder (every shard of `split` its index lists). The index is `index` when given, else
    the one beside each shard. Raises UserError for anything a user can fix: patterns matching
    nothing, malformed ranges, a missing or unreadable index, shards the index does not list for
    `split`, indexes that disagree.
    """
    if split not in SPLITS:
        raise UserError(f"`split` must be 'train' or 'test', got {split!r}")
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns)
    if not patterns or not all(str(p).strip() for p in patterns):
        raise UserError(f"`shards` must name at least one shard pattern or packed folder, got {patterns!r}")
    indexes: dict[str, dict] = {}

    def index_for(url: str) -> tuple[str, dict]:
        location = index or index_location(url)
        if location not in indexes:
            indexes[location] = read_index(location)
        return location, indexes[location]

    shards: list[Shard] = []
    for pattern in map(str, patterns):
        if _is_folder(pattern):
            location = index or (str(Path(pattern) / INDEX_NAME) if local_path(pattern) else pattern.rstrip("/") + "/" + INDEX_NAME)
            if location not in indexes:
                indexes[location] = read_index(location)
            shards += [Shard(sibling(location, name), n) for name, n in counts(indexes[location], split).items()]
            continue
        for url in expand_shards([pattern], allow_pipe):
            location, found = index_for(url)
            name, mine = shard_name(url), counts(found, split)
            if name in mine:
                shards.append(Shard(url, mine[name]))
            elif split == "test" and name not in counts(found, "train"):
                shards.append(Shard(url, -1))  # an evaluation shard of one's own: counted as it is read
            else:
                where = "a test shard in" if split == "train" and name in counts(found, "test") else f"not a {'training' if split == 'train' else 'test'} shard of"
                raise UserError(f"{url!r} is {where} index {location!r}")
    if not indexes:
        raise UserError(f"no index found for {patterns!r}")
    first_location, first = next(iter(indexes.items()))
    classes, frames = tuple(first["classes"]), int(first["frames_per_clip"])
    for location, found in indexes.items():
        if tuple(found["classes"]) != classes or int(found["frames_per_clip"]) != frames:
            raise UserError(f"index {location!r} disagrees with {first_location!r} on classes or frames per clip")
    urls = [s.url for s in shards]
    if len(set(urls)) != len(urls):
        raise UserError(f"a shard is named twice by {patterns!r}")
    return ShardSet(tuple(shards), classes, frames, first_location)


def test_beside(train: ShardSet) -> ShardSet:
    """The test shards the training shards' index lists, from the same folder or base URL."""
    index = read_index(train.index)
    shards = tuple(Shard(sibling(train.index, name), n) for name, n in counts(index, "test").items())
    return dataclasses.replace(train, shards=shards)


# ---------------------------------------------------------------------------------------------
# Opening one shard


def open_shard(url: str, allow_pipe: bool = False):
    """A binary stream of one shard: a local file, an HTTP(S) response, an object-store file read
    ahead in large blocks, or (when allowed) a pipe."""
    local = local_path(url)
    if local is not None:
        return open(local, "rb")
    found = scheme(url)
    if found in ("http", "https"):
        return io.BufferedReader(_ResumingHTTPBody(url), buffer_size=1 << 20)
    if is_object_store(url):
        return objectstore.open_read(url)
    if found == "pipe":
        if not allow_pipe:
            raise UserError(f"{url!r} would run a shell command; set `allow_pipe` to allow pipe: URLs")
        import webdataset as wds

        return wds.gopen(url)
    raise UserError(f"unsupported URL scheme {found!r} in {url!r}")


def _urlopen(request: urllib.request.Request):
    """urlopen with retries (see with_retries)."""
    return with_retries(lambda: urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S))


class ShardDeadline(ConnectionError):
    """An HTTP(S) shard did not arrive within its deadline (see HTTP_SHARD_DEADLINE_S)."""


class _ResumingHTTPBody(io.RawIOBase):
    """The body of one HTTP(S) shard, surviving dropped connections: a read that fails, or ends
    before Content-Length, re-requests the rest (HTTP_ATTEMPTS connections in all) with a Range
    header, or, from a server that ignores Range, re-reads and drops the bytes already delivered.
    After that the error reaches read_samples, which counts the shard's missing samples."""

    def __init__(self, url: str):
        self.url, self.pos, self.attempts = url, 0, 1
        started = time.monotonic()
        self.response = _urlopen(urllib.request.Request(url))
        length = self.response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        budget = HTTP_SHARD_DEADLINE_S + self.length / HTTP_MIN_BYTES_PER_S if self.length is not None else HTTP_UNKNOWN_SIZE_DEADLINE_S
        self.budget, self.deadline = budget, started + budget

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

    def _read_some(self, buffer) -> int:
        """One socket read's worth (read1, not readinto, which waits until the buffer is full), so
        the deadline is checked between reads; the read itself is bounded by what is left of it."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ShardDeadline(f"{self.url}: not read whole within {self.budget:.0f} s ({self.pos} of {self.length or '?'} bytes arrived)")
        sock = getattr(getattr(getattr(self.response, "fp", None), "raw", None), "_sock", None)
        if sock is not None:
            sock.settimeout(min(HTTP_TIMEOUT_S, max(left, 0.01)))
        data = self.response.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self._read_some(buffer)
                if n == 0 and len(buffer) and self.length is not None and self.pos < self.length:
                    raise ConnectionError(f"connection closed after {self.pos} of {self.length} bytes")
                self.pos += n
                return n
            except ShardDeadline:
                raise
            except (OSError, http.client.HTTPException) as e:
                if time.monotonic() >= self.deadline:
                    raise ShardDeadline(f"{self.url}: not read whole within {self.budget:.0f} s ({self.pos} of {self.length or '?'} bytes arrived)") from None
                if self.attempts >= HTTP_ATTEMPTS:
                    raise ConnectionError(f"{e} ({self.attempts} connections tried)") from None
                self.attempts += 1
                self._reopen()

    def close(self) -> None:
        self.response.close()
        super().close()
