"""A remote shard read by a thread of its own, a bounded number of bytes ahead of its reader.

`ReadAhead(opener)` calls `opener()` (the request: an HTTP GET, an object store's first ranged GET
on the first read, a cache lookup and its sha256 check) and reads the stream it returns in CHUNK
pieces in a daemon thread, holding at most BUFFER_BYTES its reader has not taken yet; the reader
gets exactly the stream's bytes, in order, and the stream's error, if any, from the read that
reaches the byte where it came (as reading the stream itself would). So a worker can open its next shards while it decodes the current one (stream/stages.py
keeps a few open ahead) and meet each shard's latency in the background, with nothing read twice,
nothing reordered and every fault where it was.

A local file (a cache's verified copy) is not read by the thread: wait_open hands it out as it is
(the thread's work, the lookup and the sha256 check, is then done ahead, the reading needs no
hiding). A copy the cache already holds when its shard is queued gets no thread at all
(stages.opened_ahead opens it at its turn).

Stopping: `close()` tells the thread, which closes the stream itself (a cache's Tee then drops its
temporary copy, or keeps it if the rest was short) as soon as its current read returns; close waits
for that up to CLOSE_WAIT_S. The thread never outlives a read's own time-out (objectstore's
READ_TIMEOUT_S, httpio's HTTP_TIMEOUT_S), and never waits on a full buffer after close.
"""

from __future__ import annotations

import collections
import io
import threading

CHUNK = 1 << 20
"""Bytes the thread asks the stream for at a time (at most the buffer's size)."""
BUFFER_BYTES = 4 << 20
"""Most bytes a ReadAhead holds that its reader has not taken (besides the stream's own buffer:
an object store's 16 MB block, HTTP's 1 MB)."""
CLOSE_WAIT_S = 5.0
"""How long close() waits for the thread's current read to return (a stalled store: its time-out)."""


class ReadAhead:
    """The binary stream `opener()` returns, read ahead by a thread (see the module docstring)."""

    def __init__(self, opener, name: str = "", buffer_bytes: int = BUFFER_BYTES):
        self.opener, self.limit = opener, buffer_bytes
        self.chunks: collections.deque[bytes] = collections.deque()
        self.held = 0
        self.offset = 0
        """Bytes of chunks[0] already taken by the reader."""
        self.error: BaseException | None = None
        self.open_error: BaseException | None = None
        self.opened = self.ended = self.stopped = False
        self.file = None
        """The opener's stream when it is a local file, until wait_open hands it out."""
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"clipstream-readahead {name}"[:60])
        self.thread.start()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            stream = self.opener()
        except BaseException as e:  # noqa: BLE001 - handed to the reader by wait_open
            with self.cond:
                self.open_error, self.opened = e, True
                self.cond.notify_all()
            return
        if isinstance(getattr(stream, "raw", None), io.FileIO):  # a local file (a cache's verified copy)
            with self.cond:
                if self.stopped:
                    stream.close()
                else:
                    self.file = stream
                self.opened = True
                self.cond.notify_all()
            return
        with self.cond:
            self.opened = True
            self.cond.notify_all()
        # read1 where there is one (a buffered HTTP body, a file): the bytes that came before an
        # error reach the reader (a buffered read of CHUNK drops them when it fails)
        read = getattr(stream, "read1", stream.read)
        try:
            while True:
                with self.cond:
                    while self.held >= self.limit and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                data = read(min(CHUNK, self.limit))
                with self.cond:
                    if data:
                        self.chunks.append(data)
                        self.held += len(data)
                    else:
                        self.ended = True
                    self.cond.notify_all()
                if not data:
                    return
        except BaseException as e:  # noqa: BLE001 - the reader meets it after the bytes before it
            with self.cond:
                self.error, self.ended = e, True
                self.cond.notify_all()
        finally:
            try:
                stream.close()
            except Exception as e:  # noqa: BLE001
                with self.cond:
                    if self.error is None and not self.stopped:
                        self.error, self.ended = e, True
                    self.cond.notify_all()

    # ------------------------------------------------------------------ the reader

    def wait_open(self):
        """The stream to read, once the opener has returned: this ReadAhead, or the local file the
        opener gave (a cache's copy: read as it is, no thread); raises what the opener raised (the
        shard could not be opened)."""
        with self.cond:
            while not self.opened:
                self.cond.wait()
            file, self.file = self.file, None
        if self.open_error is not None:
            self.close()
            raise self.open_error
        return self if file is None else file

    def read(self, n: int = -1) -> bytes:
        parts = []
        with self.cond:
            while n != 0:
                while not self.chunks and not self.ended and self.open_error is None:
                    self.cond.wait()
                if self.open_error is not None:
                    raise self.open_error
                if not self.chunks:
                    if self.error is not None:
                        raise self.error  # as a read of the stream itself would: the bytes it met dropped
                    break  # the end
                head = self.chunks[0]
                take = len(head) - self.offset if n < 0 else min(n, len(head) - self.offset)
                parts.append(head[self.offset : self.offset + take])
                self.offset += take
                if self.offset == len(head):
                    self.chunks.popleft()
                    self.held -= len(head)
                    self.offset = 0
                    self.cond.notify_all()
                n = n - take if n > 0 else n
        return b"".join(parts)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def stop(self) -> None:
        """Tell the thread to close the stream, without waiting (close several, then wait for each)."""
        with self.cond:
            self.stopped = True
            self.chunks.clear()
            self.held = 0
            self.cond.notify_all()

    def close(self) -> None:
        self.stop()
        if self.thread is not threading.current_thread():
            self.thread.join(CLOSE_WAIT_S)
        with self.cond:
            file, self.file = self.file, None
        if file is not None:  # opened, never handed out
            file.close()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
