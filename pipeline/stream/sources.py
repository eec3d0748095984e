"""Where shards come from: patterns checked into shard URLs, the index, and opening one shard.

URL schemes and pattern expansion are `pipeline.storage.urls`'s. A pattern may also name a packed
folder (a local folder, a URL ending in `/`, or an object-store prefix): its index lists the shards. Every reader (training,
evaluation, `read_shard`, inspect and verify) resolves shards here; HTTP(S) is read through
`httpio`, imported only for such URLs (http.client and ssl: 15 ms of every pack's start-up).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from pathlib import Path

from pipeline import shardformat
from pipeline.errors import UserError
from pipeline.shardformat import INDEX_NAME
from pipeline.storage import objectstore
from pipeline.storage.urls import (
    check_scheme,
    expand_pattern,
    index_location,
    is_file,
    is_object_store,
    is_pack_folder,
    is_remote,
    local_path,
    scheme,
    shard_name,
    sibling,
)

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    """Local path or URL."""
    samples: int
    """Sample count from the index; -1 when unknown (evaluation shards the index does not list)."""
    sha256: str | None = None
    """The shard's sha256 from the index (its content identity); None when the index does not list it."""
    bytes: int | None = None
    """The shard's size from the index; None when the index does not list it."""
    pack: int = 0
    """Which pack of its ShardSet (`ShardSet.packs`) the shard belongs to: its labels are that pack's."""


@dataclasses.dataclass(frozen=True)
class Pack:
    """One packed set of a ShardSet: the shards that share one index."""

    index: str
    """Where its index was read."""
    classes: tuple[str, ...]
    """Its own class names, in its own label order."""
    labels: tuple[int, ...]
    """The ShardSet's label of each of its classes (by name): its stored label l is labels[l]."""
    short_side: int | None = None
    """Its frames' shorter side in px, as its index says; None: not said."""


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
    short_side: int | None = None
    """The frames' shorter side in px, as the index says (the smallest of several packs); None:
    frames kept at their original sizes, or an index that does not say."""
    packs: tuple[Pack, ...] = ()
    """The packs the shards come from, in the order they were first named (a Shard's `pack` indexes
    them); empty: one pack whose labels are the set's own."""

    @property
    def pack_indexes(self) -> tuple[str, ...]:
        """Where each pack's index was read, in pack order (`Shard.pack` numbers them); one pack: the set's own."""
        return tuple(p.index for p in self.packs) or (self.index,)

    @property
    def label_maps(self) -> tuple[tuple[int, ...], ...]:
        """Per pack, the set's label of each stored label: what a worker applies to a sample of the pack."""
        return tuple(p.labels for p in self.packs) or (tuple(range(len(self.classes))),)

    @property
    def remote(self) -> bool:
        """Whether any shard is read over the network (object store or HTTP(S)): what a cache is for."""
        return any(is_remote(s.url) for s in self.shards)

    @property
    def samples(self) -> int:
        return sum(max(0, s.samples) for s in self.shards)


def expand_shards(patterns: Iterable[str], allow_pipe: bool) -> list[str]:
    """All shard URLs of the patterns (packed folders not included), checked: known schemes only,
    local files exist, no duplicates."""
    urls: list[str] = []
    for pattern in patterns:
        expanded = expand_pattern(pattern)
        for url in expanded:
            check_scheme(url, allow_pipe)
        local = [u for u in expanded if local_path(u) is not None]
        missing = [u for u in local if not is_file(local_path(u))]
        if missing and len(missing) == len(expanded):
            raise UserError(f"no shards match {pattern!r}")
        if missing:
            raise UserError(
                f"{len(missing)} of {len(expanded)} shards of {pattern!r} do not exist, e.g. {missing[0]!r}"
            )
        urls.extend(expanded)
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise UserError(f"shard {url!r} is listed twice")
        seen.add(url)
    return urls


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
            from pipeline.storage import httpio

            raw = httpio.get(location, MAX_INDEX_BYTES)
    except FileNotFoundError:
        raise UserError(f"cannot read index {location!r}: no such file") from None
    except OSError as e:
        raise UserError(f"cannot read index {location!r}: {e}") from None
    return shardformat.parse_index(raw, repr(location))


def counts(index: dict, split: str) -> dict[str, int]:
    """Shard name -> sample count of one split of an index."""
    return {e["name"]: e["samples"] for e in index["splits"].get(split, {}).get("shards", [])}


def entries(index: dict, split: str) -> dict[str, dict]:
    """Shard name -> its entry (samples, bytes, sha256) in one split of an index."""
    return {e["name"]: e for e in index["splits"].get(split, {}).get("shards", [])}


def listed(url: str, entry: dict) -> Shard:
    """The Shard at `url` as its index entry describes it: sample count, sha256 and size."""
    return Shard(url, entry["samples"], entry["sha256"], entry["bytes"])


def content_of(shards: Iterable[Shard]) -> dict[str, str | None]:
    """Shard name -> sha256 from the index: what a resume compares to know it is on the same pack
    (names alone say nothing when a folder was packed again with other clips). The names of a
    mix's later packs are prefixed with the pack's number (`1:000.tar`): packs share names."""
    return {(f"{s.pack}:" if s.pack else "") + shard_name(s.url): s.sha256 for s in shards}


def changed_content(before: dict, after: dict) -> list[str]:
    """The shard names `before` and `after` (content_of records) both hold with different sha256,
    sorted: the same name packed again with other clips. Unknown sha256s (None) are not compared."""
    return sorted(n for n, h in after.items() if h is not None and before.get(n) not in (None, h))


def resolve(
    patterns: Iterable[str], split: str = "train", index: str | None = None, allow_pipe: bool = False
) -> ShardSet:
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
    where: dict[str, str] = {}  # shard URL -> the location of the index that lists it
    for pattern in map(str, patterns):
        if is_pack_folder(pattern):
            location = index or (
                str(Path(pattern) / INDEX_NAME) if local_path(pattern) else pattern.rstrip("/") + "/" + INDEX_NAME
            )
            if location not in indexes:
                indexes[location] = read_index(location)
            found = [listed(sibling(location, name), e) for name, e in entries(indexes[location], split).items()]
            where.update((s.url, location) for s in found)
            shards += found
            continue
        for url in expand_shards([pattern], allow_pipe):
            location, found = index_for(url)
            name, mine = shard_name(url), entries(found, split)
            where[url] = location
            if name in mine:
                shards.append(listed(url, mine[name]))
            elif split == "test" and name not in counts(found, "train"):
                shards.append(Shard(url, -1))  # an evaluation shard of one's own: counted as it is read
            else:
                what = (
                    "a test shard in"
                    if split == "train" and name in counts(found, "test")
                    else f"not a {'training' if split == 'train' else 'test'} shard of"
                )
                raise UserError(f"{url!r} is {what} index {location!r}")
    if not indexes:
        raise UserError(f"no index found for {patterns!r}")
    urls = [s.url for s in shards]
    if len(set(urls)) != len(urls):
        raise UserError(f"a shard is named twice by {patterns!r}")
    frames, classes, packs = pack_space(indexes)
    if len(packs) > 1:
        number = {p.index: i for i, p in enumerate(packs)}
        shards = [dataclasses.replace(s, pack=number[where[s.url]]) for s in shards]
    sides = [p.short_side for p in packs]
    short_side = None if None in sides else min(sides)
    return ShardSet(tuple(shards), classes, frames, packs[0].index, short_side, packs if len(packs) > 1 else ())


def pack_space(indexes: dict[str, dict]) -> tuple[int, tuple[str, ...], tuple[Pack, ...]]:
    """(frames per clip, the label space, the packs) of the indexes read, by location in the order
    first named. The label space: the packs' common class list when they all list the same one (a
    single pack keeps its own order, UCF101's classInd.txt included), else the sorted union of their
    class names (the same name is the same class). Frames per clip must agree: one line naming both."""
    (first_location, first), *_ = indexes.items()
    frames = int(first["frames_per_clip"])
    for location, found in indexes.items():
        if int(found["frames_per_clip"]) != frames:
            raise UserError(
                f"packs disagree on frames per clip (T): {first_location!r} has {frames}, "
                f"{location!r} has {int(found['frames_per_clip'])}; mix packs of the same T"
            )
    lists = [tuple(found["classes"]) for found in indexes.values()]
    classes = lists[0] if all(c == lists[0] for c in lists) else tuple(sorted(set().union(*lists)))
    position = {c: i for i, c in enumerate(classes)}
    packs = tuple(
        Pack(location, own, tuple(position[c] for c in own), _short_side(found))
        for (location, found), own in zip(indexes.items(), lists)
    )
    return frames, classes, packs


def _short_side(index: dict) -> int | None:
    size = index.get("frame_size")
    side = size.get("short_side") if isinstance(size, dict) else None
    return side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None


def test_beside(train: ShardSet) -> ShardSet:
    """The test shards the training shards' index lists (each pack's, when several), from the same
    folder or base URL, in the training set's label space."""
    shards: list[Shard] = []
    for number, location in enumerate(train.pack_indexes):
        found = entries(read_index(location), "test")
        shards += [dataclasses.replace(listed(sibling(location, n), e), pack=number) for n, e in found.items()]
    return dataclasses.replace(train, shards=tuple(shards))


# ---------------------------------------------------------------------------------------------
# Opening one shard


def open_shard(url: str, allow_pipe: bool = False, size: int | None = None, sha256: str | None = None, cache=None):
    """A binary stream of one shard: a local file, an HTTP(S) response, an object-store file read
    ahead in large blocks, or (when allowed) a pipe. `size` (the index's bytes, when known) is what
    an HTTP(S) answer must have. With a `cache` (storage.cache.ShardCache) a remote shard whose
    `sha256` and `size` the index gives is read through it; local files and pipes never are."""
    local = local_path(url)
    if local is not None:
        return open(local, "rb")
    if cache is not None and (scheme(url) in ("http", "https") or is_object_store(url)):
        return cache.open(url, sha256, size, lambda: _open_remote(url, allow_pipe, size))
    return _open_remote(url, allow_pipe, size)


def _open_remote(url: str, allow_pipe: bool, size: int | None):
    found = scheme(url)
    if found in ("http", "https"):
        from pipeline.storage import httpio

        return io.BufferedReader(httpio.ResumingBody(url, size), buffer_size=1 << 20)
    if is_object_store(url):
        return objectstore.open_read(url)
    if found == "pipe":
        if not allow_pipe:
            raise UserError(f"{url!r} would run a shell command; set `allow_pipe` to allow pipe: URLs")
        import webdataset as wds

        return wds.gopen(url)
    raise UserError(f"unsupported URL scheme {found!r} in {url!r}")
