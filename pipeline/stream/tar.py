"""THE tar reader: every tool that reads a shard (training, evaluation, `read_shard`,
`inspect-shards`, `verify-shards`) reads it here, so all of them agree on every shard.

Why not tarfile (and webdataset, which iterates tarfile): a lean reader of 512-byte headers takes
0.02-0.03 ms a sample where webdataset's tarfile-based iteration takes 0.08-0.25 ms (a quarter of
the JPEG decoding of a 16-frame clip), measured on the sample pack (benchmarks/bench_loaders.py,
"raw tar reading"). tests/test_stream_tar.py proves it groups exactly as webdataset does.

The rules (webdataset's):
- a member name splits at the first dot of its base name into key and lower-cased suffix;
- consecutive members with one key make a sample {'__key__', '__url__', suffix: bytes};
- directories, links and other non-regular members, `__meta__`-style names and names without a
  dot are skipped;
- a suffix repeated within one sample is an error (the shard is damaged from there on);
- ustar prefixes, GNU long names and PAX `path` records name the next member.
gzip, bzip2 and xz shards are decompressed on the fly and read by the same parser, so every
bound below holds for them too (a 1.6 MB .tar.gz can hold a member that claims 1.5 GiB).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

from pipeline.errors import ShardFormatError
from pipeline.shardformat import MAX_MEMBER_BYTES, split_member_name

_COMPRESSED = {b"\x1f\x8b": gzip.GzipFile, b"BZh": bz2.BZ2File, b"\xfd7zXZ": lzma.LZMAFile}
_ZSTD = b"\x28\xb5\x2f\xfd"
_TAR_META = re.compile(r"__[^/]*__($|/)")


class Member(NamedTuple):
    name: str
    offset: int
    """Byte offset of the member's data in the (decompressed) stream."""
    size: int
    data: bytes | None
    """None when the caller asked to skip it (see `tar_members`)."""


class _Prefixed:
    """A stream with bytes already read from it put back in front (for the compression sniff)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def tar_members(stream, skip: Callable[[str], bool] | None = None) -> Iterator[Member]:
    """Every regular file member of a tar stream, in order. `skip(name)` -> True passes over a
    member's data without keeping it (seeking where the stream can). Raises ShardFormatError for a
    truncated, corrupt or oversized member, after yielding every member before it."""
    head = _read_exactly(stream, 512, "header", allow_eof=True)
    if head is None:
        raise ShardFormatError("empty file")
    if head.startswith(_ZSTD):
        raise ShardFormatError("zstd-compressed shard: recompress it with gzip, or store it uncompressed")
    opener = next((o for magic, o in _COMPRESSED.items() if head.startswith(magic)), None)
    if opener is not None:
        stream = opener(fileobj=_Prefixed(head, stream)) if opener is gzip.GzipFile else opener(_Prefixed(head, stream))
        try:
            head = _read_exactly(stream, 512, "header", allow_eof=True)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ShardFormatError(f"damaged compressed shard: {e}") from None
        if head is None:
            raise ShardFormatError("empty file")
    seekable = opener is None and getattr(stream, "seekable", lambda: False)()
    pos = 512
    long_name: str | None = None
    while head is not None and any(head):
        if sum(head[:148]) + 256 + sum(head[156:]) != _tar_number(head[148:156]):
            raise ShardFormatError(f"corrupt tar header (bad checksum) at byte {pos - 512}")
        size = _tar_number(head[124:136])
        if size > MAX_MEMBER_BYTES:
            raise ShardFormatError(f"tar member of {size} bytes exceeds the {MAX_MEMBER_BYTES} byte limit")
        kind = head[156:157]
        name = long_name or _ustar_name(head) if kind in (b"0", b"\0") else None
        padded = size + (-size % 512)
        try:
            if name is not None and skip is not None and skip(name):
                if seekable:
                    stream.seek(padded, 1)
                else:
                    _discard(stream, padded)
                body = None
            else:
                body = _read_exactly(stream, size, "member", allow_eof=False)
                _read_exactly(stream, padded - size, "padding", allow_eof=False)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ShardFormatError(f"damaged compressed shard: {e}") from None
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name: the name of the next member
            long_name = _pax_path(body) if kind == b"x" else body.rstrip(b"\0").decode("utf-8", "replace")
        else:
            long_name = long_name if kind == b"g" else None
            if name is not None:
                yield Member(name, pos, size, body)
        pos += padded
        head = _read_exactly(stream, 512, "header", allow_eof=True)
        pos += 512
    if head is not None:
        # A damaged header after the end marker looks like the end; a real end is zeros to the end
        # (a tar writer pads with at most 10 KB of them).
        try:
            rest = stream.read(1 << 16)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ShardFormatError(f"damaged compressed shard: {e}") from None
        if rest.strip(b"\0"):
            raise ShardFormatError(f"data after the end-of-archive marker at byte {pos}")


def group_samples(
    members: Iterator[Member], url: str, ignored: Callable[[str, str], None] | None = None
) -> Iterator[dict]:
    """Samples {'__key__', '__url__', suffix: bytes} of a member stream, by the rules in the module
    docstring (a member whose data was skipped stands as its Member: offset and size);
    `ignored(name, why)` hears of every member passed over."""
    current: dict | None = None
    try:
        for member in members:
            name = member.name
            key, suffix = split_member_name(name)
            if key is None:
                if ignored:
                    ignored(name, "no KEY.suffix name")
                continue
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or _TAR_META.match(name):
                if ignored:
                    ignored(name, "a metadata member")
                continue
            suffix = suffix.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                raise ShardFormatError(f"{name}: duplicate file name in tar file")
            current[suffix] = member if member.data is None else member.data
    except ShardFormatError:
        if current is not None:
            yield current  # read whole before the damage; a member it lacks is the decoder's fault to count
        raise
    if current is not None:
        yield current


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Raw samples of one tar stream (see group_samples). Raises ShardFormatError for a truncated or
    corrupt stream, after yielding every sample read whole before the damage."""
    return group_samples(tar_members(stream), url)


def _read_exactly(stream, n: int, what: str, allow_eof: bool) -> bytes | None:
    data = stream.read(n) if n else b""
    if len(data) == n:
        return data
    if allow_eof and not data:
        return None
    raise ShardFormatError(f"unexpected end of data in a tar {what}")


def _discard(stream, n: int) -> None:
    while n:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise ShardFormatError("unexpected end of data in a tar member")
        n -= len(chunk)


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
    try:
        while pos < len(body):
            length = int(body[pos : body.index(b" ", pos)])
            if length <= 0:
                raise ValueError(length)
            record = body[pos : pos + length]
            key, _, value = record[record.index(b" ") + 1 : -1].partition(b"=")
            if key == b"path":
                return value.decode("utf-8", "replace")
            pos += length
    except ValueError:
        raise ShardFormatError("corrupt PAX header") from None
    return None
