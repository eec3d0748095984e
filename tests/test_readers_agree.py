"""One reader per contract: the training stream, read_shard, inspect-shards' scan and verify-shards'
check read every shard alike: the same samples, and the same verdict on where a shard is damaged."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import numpy as np
import pytest
from shardmaker import encode_clip

from pipeline import read_shard
from pipeline.errors import ShardFormatError, UserError
from pipeline.stream.sources import Shard
from pipeline.stream.stages import Faults, read_samples
from pipeline.tools.inspect import scan_shard
from pipeline.tools.verify import check_shard

FRAMES = 2
PACK = encode_clip([np.full((16, 16, 3), 40 * t, np.uint8) for t in range(FRAMES)])
LONG = "k" * 120  # needs a GNU long name or a PAX path


def _members(key: str, label: int = 0) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.jpgs", PACK),
        (f"{key}.cls", str(label).encode()),
        (f"{key}.json", json.dumps({"label": label}).encode()),
    ]


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT, extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            extra(tar)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _three() -> list[tuple[str, bytes]]:
    return _members("a") + _members("b", 1) + _members("c", 2)


def _odd_entries(tar: tarfile.TarFile) -> None:
    folder = tarfile.TarInfo("dir")
    folder.type = tarfile.DIRTYPE
    tar.addfile(folder)
    for name in ("__meta__", "README"):
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))


def _corrupt_second_header(data: bytes) -> bytes:
    raw = bytearray(data)
    offset = raw.find(b"b.jpgs")
    raw[offset + 20] ^= 0xFF  # inside the name field: the checksum no longer matches
    return bytes(raw)


def _cut_inside(member: str) -> bytes:
    """The shard cut off in the middle of `member`'s data."""
    data = _tar(_three())
    return data[: data.find(member.encode()) + 520]


ODD_SHARDS = {
    # name: (bytes, keys every reader must yield, damaged?)
    "pax": (_tar(_three()), ["a", "b", "c"], False),
    "gnu-long-names": (_tar(_members(LONG) + _members("b"), fmt=tarfile.GNU_FORMAT), [LONG, "b"], False),
    "pax-long-names": (_tar(_members(LONG) + _members("b"), fmt=tarfile.PAX_FORMAT), [LONG, "b"], False),
    "ustar-prefix": (
        _tar(_members("some/folder/" + "p" * 90), fmt=tarfile.USTAR_FORMAT),
        ["some/folder/" + "p" * 90],
        False,
    ),
    "gzip": (gzip.compress(_tar(_three()), mtime=0), ["a", "b", "c"], False),
    "bzip2": (bz2.compress(_tar(_three())), ["a", "b", "c"], False),
    "xz": (lzma.compress(_tar(_three())), ["a", "b", "c"], False),
    "dirs-meta-and-dotless": (_tar(_three(), extra=_odd_entries), ["a", "b", "c"], False),
    "key-twice-apart": (_tar(_members("a") + _members("b") + _members("a")), ["a", "b", "a"], False),
    "member-repeated-in-a-sample": (
        _tar(_members("a") + [("b.cls", b"1"), ("b.cls", b"1")] + _members("c")),
        ["a", "b"],
        True,
    ),
    "truncated": (_cut_inside("b.jpgs"), ["a"], True),
    "corrupt-header": (_corrupt_second_header(_tar(_three())), ["a"], True),
    "garbage-after-the-end": (_tar(_three()) + b"\x01" * 600, ["a", "b", "c"], True),
    "gzip-truncated": (gzip.compress(_tar(_three()), mtime=0)[:-12], ["a", "b", "c"], True),
}


def _stream(path: Path) -> tuple[list[str], bool]:
    faults = Faults()
    keys = [s["__key__"] for s in read_samples([Shard(str(path), -1)], False, faults)]
    return keys, bool(faults.pending)


def _read_shard(path: Path) -> tuple[list[str], bool]:
    keys = []
    try:
        for sample in read_shard(path):
            keys.append(sample["key"])
    except ShardFormatError:
        return keys, True
    return keys, False


def _verify(path: Path) -> tuple[list[str], bool]:
    data = path.read_bytes()
    entry = {"name": path.name, "samples": -1, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    report = check_shard(path, entry, FRAMES, 3)
    return report.keys, any("readers lose the rest of the shard" in p for p in report.problems)


@pytest.mark.parametrize("name", sorted(ODD_SHARDS))
def test_every_reader_reads_an_odd_shard_alike(tmp_path, name):
    data, keys, damaged = ODD_SHARDS[name]
    path = tmp_path / "000.tar"
    path.write_bytes(data)
    assert _stream(path) == (keys, damaged), "training stream"
    if name != "member-repeated-in-a-sample":  # read_shard also refuses a sample without .jpgs first
        assert _read_shard(path) == (keys, damaged), "read_shard"
    assert _verify(path) == (keys, damaged), "verify-shards"
    if damaged:
        with pytest.raises(UserError, match="cannot read|is damaged"):
            scan_shard(path)
    else:
        assert [e.key for e in scan_shard(path)] == keys, "inspect-shards"
