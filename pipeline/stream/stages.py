"""Raw samples: shards in, {'__key__', 'jpgs', 'cls', ...: bytes} out, with every loss counted.

The stages a worker's stream is made of, each a small generator: `read_samples` (shards -> raw
samples, a broken shard a named fault worth its missing samples), `shuffle` (a seeded buffer),
`fit_to_quota` (exactly the planned number) and `skip_consumed` (a resume). `read_shard` is the
public one-shard reader built on the same parts.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import ShardFormatError, UserError
from pipeline.redact import redact
from pipeline.shardformat import CLS, JPGS, JSON, decode_jpegs, parse_label, split_member_name
from pipeline.storage.readahead import ReadAhead
from pipeline.storage.urls import index_location, is_pack_folder, is_remote, shard_name
from pipeline.stream.sources import Shard, entries, expand_shards, listed, open_shard, read_index, resolve
from pipeline.stream.tar import group_samples, tar_members, tar_samples

STREAM_MEMBERS = (JPGS, CLS)
"""The members a training or evaluation clip is made of; the stream passes over any other member
(its `.json`, a `.pickle`) without keeping it: it costs no memory however large it claims to be."""
RAW_BYTES_HELD = 1 << 30
"""Most bytes of raw samples a worker's shuffle buffer holds, and its refill keeps (each). Ordinary
samples never come near it (256 clips of ~150 KB are 38 MB), but a .tar.gz of a few MB can hold
samples of up to a GiB each (MAX_MEMBER_BYTES of zeros), and 256 of those would be 256 GiB."""


def _not_streamed(name: str) -> bool:
    suffix = split_member_name(name)[1]
    return suffix is None or suffix.lower() not in STREAM_MEMBERS


def nbytes(sample) -> int:
    """Bytes a raw sample holds (0 for anything that is not one)."""
    if not isinstance(sample, dict):
        return 0
    return sum(len(v) for v in sample.values() if isinstance(v, (bytes, bytearray, memoryview)))


class Faults:
    """Bad samples and shards met by one worker, shipped to the consumer with the next batch.

    With a `limit` (train-stream's --max-bad for the rank's epoch), the worker stops as soon as its
    own count passes it, with the faults behind it, instead of when its next batch is complete: a
    worker whose shards are all dead or trickling would otherwise meet every shard's deadline in turn
    (an hour for 32 shards) before the budget could be checked. A worker's count never exceeds its
    rank's, so this never stops a run the rank's own check would have let go on."""

    def __init__(self, limit: int | None = None, budget: str = ""):
        self.pending: list[dict] = []
        self.bad = 0
        self.limit, self.budget = limit, budget

    def add(self, what: str, reason: str, samples: int = 1) -> None:
        # redacted here, where every fault record is made: they reach logs, warnings and user code
        record = {"what": redact(what), "reason": redact(reason), "samples": samples}
        self.pending.append(record)
        self.bad += samples
        if self.limit is not None and self.bad > self.limit:
            raise UserError(
                f"{self.bad} unreadable clips {self.budget} ({self.limit}); last: {record['what']}: {record['reason']}"
            )

    def take(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


READ_AHEAD_SHARDS = 4
"""Most remote shards a worker has opened beyond the one it is reading (storage/readahead.py): on
shards of a few clips each, one request's latency (tens of ms from a real store) is longer than
decoding a shard, so several must be under way at once."""
READ_AHEAD_BYTES = 32 << 20
"""The shards opened ahead hold at most this many bytes between them, by the index's sizes (a
shard of unknown size counts as AHEAD_UNKNOWN_BYTES), except that the next shard is always
opened: an HMDB51 shard of 17-30 MB has one shard under way, never an epoch. Each buffers at most
readahead.BUFFER_BYTES plus its stream's own block. With `resample`, a shard drawn twice in a row
is opened twice; through a cache the second waits for the first's copy (cache.WAIT_STALL_S)."""
AHEAD_UNKNOWN_BYTES = 16 << 20


def opened_ahead(
    shards: Iterable[Shard], allow_pipe: bool, cache=None, ahead: int = READ_AHEAD_SHARDS
) -> Iterator[tuple[Shard, ReadAhead | None]]:
    """Each shard in turn with its ReadAhead, started while up to `ahead` shards before it are still
    being read, as far as READ_AHEAD_BYTES allows (see within_budget); None for a local file or a
    pipe, a shard the cache holds a copy of, or for every shard with `ahead` 0: opened at its turn,
    as without read-ahead (no thread).
    Closing the generator closes the shards opened ahead."""
    shards = iter(shards)
    pending: collections.deque = collections.deque()
    """[shard, its ReadAhead or None] of the shard to hand out next, then of those behind it."""
    try:
        while True:
            while len(pending) < 1 + ahead:
                shard = next(shards, None)
                if shard is None:
                    break
                pending.append([shard, None])
            if ahead > 0:
                sizes = [_ahead_bytes(s) if is_remote(s.url) else 0 for s, _ in pending]
                for item in itertools.islice(pending, within_budget(sizes)):
                    if item[1] is None and is_remote(item[0].url):
                        item[1] = _start(item[0], allow_pipe, cache)
            if not pending:
                return
            shard, stream = pending.popleft()
            yield shard, (None if stream is AT_TURN else stream)
    finally:
        opened = [stream for _, stream in pending if stream not in (None, AT_TURN)]
        for stream in opened:
            stream.stop()  # all at once: each may be waiting for its store
        for stream in opened:
            stream.close()


def _ahead_bytes(shard: Shard) -> int:
    return AHEAD_UNKNOWN_BYTES if shard.bytes is None else shard.bytes


def within_budget(sizes: list[int]) -> int:
    """How many of the shards of `sizes` (the one to read next, then those behind it) may be open:
    the next two always, then as long as those behind the first hold at most READ_AHEAD_BYTES."""
    held = 0
    for i, n in enumerate(sizes):
        held += n if i else 0
        if i >= 2 and held > READ_AHEAD_BYTES:
            return i
    return len(sizes)


AT_TURN = "at its turn"
"""opened_ahead's mark for a remote shard the cache holds a copy of: opened when its turn comes
(a local file needs no thread to hide its latency; see ShardCache.holds)."""


def _start(shard: Shard, allow_pipe: bool, cache) -> ReadAhead | str:
    if cache is not None and cache.holds(shard.url, shard.sha256, shard.bytes):
        return AT_TURN
    return ReadAhead(lambda: open_shard(shard.url, allow_pipe, shard.bytes, shard.sha256, cache), shard_name(shard.url))


def read_samples(
    shards: Iterable[Shard], allow_pipe: bool, faults: Faults, cache=None, ahead: int | None = None
) -> Iterator[dict]:
    """Raw samples of each shard in turn (remote ones through `cache`, a storage.cache.ShardCache, when given).

    Remote shards are opened up to `ahead` (default READ_AHEAD_SHARDS) shards before their turn
    (see opened_ahead; 0: each at its turn): the same bytes in the same order, so the same samples
    and faults, as without. A shard that cannot be opened or breaks off is a fault worth its
    missing samples (per the index), not the end of the run; the tar reader does the parsing and
    grouping. Members other than STREAM_MEMBERS are passed over unread (they stand in the sample
    as their tar.Member, no bytes).
    """
    ahead = READ_AHEAD_SHARDS if ahead is None else ahead
    for shard, started in opened_ahead(shards, allow_pipe, cache, ahead):
        seen = 0
        try:
            if started is not None:
                stream = started.wait_open()
            else:
                stream = open_shard(shard.url, allow_pipe, shard.bytes, shard.sha256, cache)
        except Exception as e:
            faults.add(shard.url, f"cannot open: {e}", max(shard.samples, 0))
            continue
        try:
            for sample in group_samples(tar_members(stream, skip=_not_streamed), shard.url):
                seen += 1
                if shard.pack:
                    sample["__pack__"] = shard.pack  # whose labels (ShardSet.label_maps) it carries
                yield sample
        except Exception as e:
            faults.add(shard.url, f"unreadable after {seen} samples: {e}", max(shard.samples - seen, 0))
            continue
        finally:
            try:
                stream.close()
            except Exception as e:  # a pipe: command that failed says so here
                faults.add(shard.url, f"on close: {e}", 0)
        # A shard cut at a header boundary reads as a shorter shard: the index tells the difference.
        if shard.samples >= 0 and seen != shard.samples:
            faults.add(shard.url, f"holds {seen} samples, index says {shard.samples}", max(shard.samples - seen, 0))


def read_shard(url, allow_pipe: bool = False, cache_dir=None, cache_bytes=None) -> Iterator[dict]:
    """Yield every sample of the shards `url` names as {'key', 'frames' (T, H, W, 3) uint8, 'label'
    int, 'meta' dict}, shard after shard in stored order.

    `url` takes what train-stream's --shards takes: one shard (a local path, an http(s):// or an
    object-store URL), a pattern (`<000..031>`, `{000..031}`, `::`-lists), a packed folder (the
    training shards its index lists, then the test shards), or a list of these; anything else is
    one UserError. A `pipe:` command runs only with `allow_pipe=True`. Members are read as bytes and
    decoded here; nothing is unpickled. A damaged shard raises ShardFormatError (a ValueError)
    naming the sample, after yielding the samples before it.

    `cache_dir` (and `cache_bytes`): read remote shards through the node's shard cache, as
    ClipLoader does (see StreamConfig.cache_dir): a shard the index beside it describes is kept
    there once read whole and verified, and read from there the next time.
    """
    shards = _shards_of(url, allow_pipe, cache_dir is not None)
    cache = None
    if cache_dir is not None and any(is_remote(s.url) for s in shards):
        from pipeline.config import checked_cache
        from pipeline.storage.cache import open_cache

        cache = open_cache(*checked_cache(cache_dir, cache_bytes))
    for shard in shards:
        yield from _read_one_shard(shard, allow_pipe, cache)


def _shards_of(url, allow_pipe: bool, described: bool) -> list[Shard]:
    """The shards `url` names; `described`: with the sha256 and size their index gives (the index
    beside each remote shard is read for it), so that a cache can verify them."""
    patterns = [url] if isinstance(url, (str, Path)) else list(url)
    if not patterns:
        raise UserError("`url` names no shard: give a shard, a pattern, a packed folder or a list of them")
    shards: list[Shard] = []
    indexes: dict[str, dict] = {}
    for pattern in map(str, patterns):
        if is_pack_folder(pattern):
            shards += [s for split in ("train", "test") for s in resolve([pattern], split, None, allow_pipe).shards]
            continue
        for one in expand_shards([pattern], allow_pipe):
            entry = _listed_entry(one, indexes) if described and is_remote(one) else None
            shards.append(Shard(one, -1) if entry is None else listed(one, entry))
    return shards


def _listed_entry(url: str, indexes: dict[str, dict]) -> dict | None:
    """The entry of the index beside `url` for it (either split), or None (no readable index, not listed)."""
    location = index_location(url)
    if location not in indexes:
        try:
            indexes[location] = read_index(location)
        except UserError:
            indexes[location] = {"splits": {}}
    index = indexes[location]
    return (entries(index, "train") | entries(index, "test")).get(shard_name(url))


def _read_one_shard(shard: Shard, allow_pipe: bool, cache=None) -> Iterator[dict]:
    url = shard.url
    with open_shard(url, allow_pipe, shard.bytes, shard.sha256, cache) as stream:
        for raw in tar_samples(stream, url):
            key = raw["__key__"]
            missing = [m for m in (JPGS, CLS, JSON) if m not in raw]
            if missing:
                raise ShardFormatError(f"{url}: sample {key} has no {', '.join('.' + m for m in missing)}")
            try:
                label, meta = parse_label(raw[CLS]), json.loads(raw[JSON])
            except (ValueError, RecursionError) as e:
                raise ShardFormatError(f"{url}: sample {key}: unreadable label or metadata ({e})") from None
            yield {"key": key, "frames": decode_jpegs(raw[JPGS]), "label": label, "meta": meta}


def resampled_shards(shards: tuple[Shard, ...], rng: np.random.Generator) -> Iterator[Shard]:
    """Shards drawn with replacement, for ever."""
    while True:
        yield shards[int(rng.integers(len(shards)))]


def shuffle(src: Iterable, buffer: int, rng: np.random.Generator, max_bytes: int | None = None) -> Iterator:
    """Reservoir shuffle: fill `buffer` items, then emit a random one for every one read; while the
    raw samples held exceed `max_bytes` (default RAW_BYTES_HELD), emit random ones instead of
    holding them (ordinary samples never get there, so their order is as without the bound)."""
    max_bytes = RAW_BYTES_HELD if max_bytes is None else max_bytes
    held: list = []
    size = 0
    for item in src:
        if len(held) < buffer:
            held.append(item)
            size += nbytes(item)
        else:
            i = int(rng.integers(buffer))
            held[i], item = item, held[i]
            size += nbytes(held[i]) - nbytes(item)
            yield item
        while size > max_bytes and len(held) > 1:
            out = held.pop(int(rng.integers(len(held))))
            size -= nbytes(out)
            yield out
    while held:
        yield held.pop(int(rng.integers(len(held))))


REFILL_KEPT = 256
"""Raw samples a worker keeps to fill a shortfall with (about 150 KB each)."""


def fit_to_quota(src: Iterable[dict], quota: int) -> Iterator[dict]:
    """Exactly `quota` raw samples: surplus cut; a shortfall (`pad`'s top-up, lost shards) filled by
    cycling over the last REFILL_KEPT samples delivered (at most RAW_BYTES_HELD of them), each
    marked '__repeat__', so the rank still runs its planned steps (and a worker's memory does not
    grow with its share of the epoch)."""
    recent: collections.deque = collections.deque()
    kept = delivered = 0
    for sample in itertools.islice(src, quota):
        recent.append(sample)
        kept += nbytes(sample)
        while len(recent) > REFILL_KEPT or (kept > RAW_BYTES_HELD and len(recent) > 1):
            kept -= nbytes(recent.popleft())
        delivered += 1
        yield sample
    if delivered == quota or not recent:
        return
    for sample in itertools.islice(itertools.cycle(list(recent)), quota - delivered):
        yield {**sample, "__repeat__": True}


def skip_consumed(src: Iterable[dict], skip: int) -> Iterator[dict]:
    """Drop the samples a resumed run already trained on, before paying for their decoding."""
    return itertools.islice(src, skip, None)


def kept_samples(
    shards: Iterable[Shard], keep: Iterable[tuple[int, ...]], allow_pipe: bool, faults: Faults, cache=None
) -> Iterator[dict]:
    """Raw samples of each shard in turn, only those whose number in their shard is in its `keep`
    (ascending): the clips an epoch resumed on another topology has left (see stream/reshard.py).
    A shard is read only as far as its last kept sample."""
    for shard, numbers in zip(shards, keep):
        if not numbers:
            continue
        wanted, last = set(numbers), numbers[-1]
        samples = read_samples((shard,), allow_pipe, faults, cache)
        try:
            for n, sample in enumerate(samples):
                if n in wanted:
                    yield sample
                if n >= last:
                    break
        finally:
            samples.close()  # the shard's stream, now rather than when collected
