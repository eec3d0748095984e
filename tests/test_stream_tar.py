"""The stream's lean tar reader groups samples exactly as webdataset does, and fails loudly on
truncated or corrupt shards."""

import gzip
import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.errors import ShardFormatError
from pipeline.stream import tar


def webdataset_samples(data: bytes) -> list[dict]:
    files = tar_file_expander([{"url": "u", "stream": io.BytesIO(data)}], handler=wds.reraise_exception)
    return list(group_by_keys(files, handler=wds.reraise_exception))


def lean_samples(data: bytes) -> list[dict]:
    return list(tar.tar_samples(io.BytesIO(data), "u"))


def test_same_samples_as_webdataset_on_packed_shards(packed):
    for path in sorted(packed.glob("*.tar")):
        data = path.read_bytes()
        assert lean_samples(data) == webdataset_samples(data), path


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset_on_odd_members(fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        add("__meta__", b"m")
        long = "a/" + "x" * 60 + "/" + "k" * 70  # beyond 100 characters: PAX, GNU or ustar prefix
        add(long + ".JPGS", b"1" * 700)
        add(long + ".cls", b"3")
        add("key_\u00fc.cls" if fmt != tarfile.USTAR_FORMAT else "key_u.cls", b"4")
        add("nodot", b"5")
        add("k2.a.b", b"6")
    data = buf.getvalue()
    got = lean_samples(data)
    assert got == webdataset_samples(data)
    assert [s["__key__"] for s in got] == ["a/" + "x" * 60 + "/" + "k" * 70, got[1]["__key__"], "k2"]
    assert got[0]["jpgs"] == b"1" * 700 and got[2]["a.b"] == b"6"


def test_compressed_tar_goes_through_webdataset(packed):
    data = (packed / "000.tar").read_bytes()
    assert lean_samples(gzip.compress(data)) == webdataset_samples(data)


@pytest.mark.parametrize("cut", [0, 100, 600, 5000])
def test_truncated_or_garbage_stream_raises(packed, cut):
    data = (packed / "000.tar").read_bytes()[:cut] if cut else b""
    with pytest.raises(ShardFormatError):
        lean_samples(data)
    with pytest.raises(ShardFormatError, match="corrupt tar header"):
        lean_samples(b"garbage!" * 100)


def test_a_member_claiming_gigabytes_is_refused_before_it_is_read(tmp_path):
    """A valid header whose size field claims 2 GiB: the samples before it are delivered, then one
    error names the limit; nothing near that size is allocated."""
    import tracemalloc

    raw = b""
    for name, data in (("a.cls", b"1"), ("a.jpgs", b"x" * 100)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        raw += info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)
    huge = tarfile.TarInfo("b.jpgs")
    huge.size = 2 << 30
    shard = tmp_path / "huge.tar"
    shard.write_bytes(raw + huge.tobuf(format=tarfile.USTAR_FORMAT) + b"y" * 4096)
    tracemalloc.start()
    got = []
    with (
        open(shard, "rb") as f,
        pytest.raises(ShardFormatError, match=r"tar member of 2147483648 bytes exceeds the 1073741824 byte limit"),
    ):
        for sample in tar.tar_samples(f, str(shard)):
            got.append(sample["__key__"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == ["a"] and peak < 10 * 2**20
