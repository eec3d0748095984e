"""storage/readahead.py: a stream read by a thread of its own, bounded, stopping cleanly: against real
files and a real HTTP server on 127.0.0.1 (httpio's reader, as a shard is read)."""

import io
import threading
import time

import httpkit
import pytest

from pipeline.storage import httpio
from pipeline.storage.readahead import ReadAhead


def readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("clipstream-readahead")]


@pytest.fixture
def blob(tmp_path):
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit, every byte position distinct mod 256
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


def test_the_reader_gets_the_streams_bytes_in_order_whatever_it_asks_for(blob):
    path, data = blob
    got, sizes = [], [1, 7, 512, 65536, 100_000, 3, 1 << 20]
    with ReadAhead(lambda: io.BufferedReader(Reader(path)), buffer_bytes=40_000).wait_open() as stream:
        for i in range(10_000):
            part = stream.read(sizes[i % len(sizes)])
            if not part:
                break
            got.append(part)
        assert stream.read(10) == b"" and stream.read() == b""
    assert b"".join(got) == data
    with ReadAhead(lambda: Reader(path)).wait_open() as stream:
        assert isinstance(stream, ReadAhead) and stream.read() == data


def test_a_local_file_is_handed_out_as_it_is(blob):
    """A cache's verified copy is a local file: opened (and checked) ahead, read without the thread."""
    path, data = blob
    ahead = ReadAhead(lambda: open(path, "rb"))
    stream = ahead.wait_open()
    assert not isinstance(stream, ReadAhead) and stream.tell() == 0 and stream.read() == data
    stream.close()
    ahead.close()
    unread = ReadAhead(lambda: open(path, "rb"))
    unread.thread.join(5)
    file = unread.file
    unread.close()  # never handed out: closed with it
    assert file.closed and not readahead_threads()


class Reader(io.RawIOBase):
    """A local file seen only through read/readinto, as a remote stream is (not handed out as a file)."""

    def __init__(self, path):
        self.f = open(path, "rb", buffering=0)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.f.readinto(buffer)

    def close(self):
        self.f.close()
        super().close()


def test_the_thread_reads_no_more_than_its_buffer_ahead(blob):
    path, data = blob
    opened = []

    def opener():
        opened.append(Reader(path))
        return opened[0]

    stream = ReadAhead(opener, buffer_bytes=64 << 10).wait_open()
    time.sleep(0.3)  # long enough for the thread to have read the whole MiB, were it unbounded
    assert 0 < opened[0].f.tell() <= 128 << 10
    assert stream.read(200_000) == data[:200_000]
    time.sleep(0.3)
    assert opened[0].f.tell() <= 200_000 + (128 << 10)
    stream.close()
    assert opened[0].closed and not readahead_threads()


def test_an_open_error_is_raised_by_wait_open_and_leaves_no_thread(tmp_path):
    stream = ReadAhead(lambda: open(tmp_path / "missing.tar", "rb"))
    with pytest.raises(FileNotFoundError):
        stream.wait_open()
    assert not stream.thread.is_alive() and not readahead_threads()


def test_a_broken_stream_delivers_its_bytes_then_its_error(tmp_path):
    """A server that always cuts the body after 5000 bytes: httpio's reader gives up after its
    retries; read ahead, the reader gets the same 5000 bytes first (all of them: the thread's
    buffered read of 1 MiB would drop them), then the same error from the read that meets the break."""
    data = bytes(range(256)) * 100
    (tmp_path / "s.tar").write_bytes(data)

    class Cut(httpkit.Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:5000])
            self.wfile.flush()
            self.close_connection = True

    with httpkit.serve(handler=Cut) as base:
        url = f"{base}/s.tar"
        direct = httpio.ResumingBody(url, len(data))
        got = direct.read(5000)
        with pytest.raises(ConnectionError) as plain:
            direct.read(10)
        ahead = ReadAhead(lambda: httpio.ResumingBody(url, len(data))).wait_open()
        assert ahead.read(4000) == got[:4000] and ahead.read(1000) == got[4000:]
        with pytest.raises(ConnectionError) as early:  # the read that meets the break raises, as above
            ahead.read(10)
        assert type(early.value) is type(plain.value)
        ahead.close()
        ahead = ReadAhead(lambda: httpio.ResumingBody(url, len(data))).wait_open()
        assert ahead.read(4990) == got[:4990]
        with pytest.raises(ConnectionError):  # bytes 4990-5009: across the break
            ahead.read(20)
        ahead.close()
    assert not readahead_threads()


def test_close_stops_a_thread_waiting_on_a_full_buffer_and_closes_the_stream(blob):
    path, _ = blob
    files = []
    streams = [ReadAhead(lambda: files.append(Reader(path)) or files[-1], buffer_bytes=4096) for _ in range(3)]
    for s in streams:
        s.wait_open().read(10)
    time.sleep(0.1)
    assert len(readahead_threads()) == 3  # each waiting for its reader
    for s in streams:
        s.close()
    assert not readahead_threads() and all(f.closed for f in files)
