"""Reading over HTTP(S): retries, resumed connections and deadlines, for shards and indexes.

Imported by `sources` only for http(s) URLs, so that local and object-store work does not import
http.client and ssl.
"""

from __future__ import annotations

import http.client
import io
import time
import urllib.error
import urllib.request

from pipeline.errors import (
    ShardDeadline,
    UserError,
)

HTTP_TIMEOUT_S = 60
HTTP_ATTEMPTS = 3
HTTP_SHARD_DEADLINE_S = 120.0
"""Every HTTP(S) shard must arrive whole within this many seconds plus its size at
HTTP_MIN_BYTES_PER_S (all its connections together): HTTP_TIMEOUT_S bounds one read only, and a
server sending a byte every few seconds would hold a loader worker, and the run, for ever."""
HTTP_MIN_BYTES_PER_S = 64 << 10
HTTP_UNKNOWN_SIZE_DEADLINE_S = 3600.0
"""The deadline of a shard served without Content-Length."""


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


def get(url: str, limit: int) -> bytes:
    """The body of `url`, at most `limit` bytes (UserError above), with retries; failures as OSError."""

    def fetch() -> bytes:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            data = response.read(limit + 1)
        if len(data) > limit:
            raise UserError(f"{url} is larger than {limit} bytes")
        return data

    try:
        return with_retries(fetch)
    except http.client.HTTPException as e:  # a broken answer is no OSError: one error type for callers
        raise ConnectionError(f"{type(e).__name__}: {e}") from None


def urlopen(request: urllib.request.Request):
    """urlopen with retries (see with_retries)."""
    return with_retries(lambda: urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S))


class ResumingBody(io.RawIOBase):
    """The body of one HTTP(S) shard, surviving dropped connections: a read that fails, or ends
    before Content-Length, re-requests the rest (HTTP_ATTEMPTS connections in all) with a Range
    header, or, from a server that ignores Range, re-reads and drops the bytes already delivered.
    After that the error reaches read_samples, which counts the shard's missing samples."""

    def __init__(self, url: str):
        self.url, self.pos, self.attempts = url, 0, 1
        started = time.monotonic()
        self.response = urlopen(urllib.request.Request(url))
        length = self.response.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        budget = (
            HTTP_SHARD_DEADLINE_S + self.length / HTTP_MIN_BYTES_PER_S
            if self.length is not None
            else HTTP_UNKNOWN_SIZE_DEADLINE_S
        )
        self.budget, self.deadline = budget, started + budget

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        self.response.close()
        self.response = urlopen(urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-"}))
        if self.response.status != 206:
            left = self.pos
            while left:
                chunk = self.response.read(min(left, 1 << 20))
                if not chunk:
                    raise ConnectionError(f"{self.url} ended after {self.pos - left} bytes on a retry")
                left -= len(chunk)

    def _late(self) -> ShardDeadline:
        return ShardDeadline(
            f"{self.url}: not read whole within {self.budget:.0f} s ({self.pos} of {self.length or '?'} bytes arrived)"
        )

    def _read_some(self, buffer) -> int:
        """One socket read's worth (read1, not readinto, which waits until the buffer is full), so
        the deadline is checked between reads; the read itself is bounded by what is left of it."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._late()
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
                    raise self._late() from None
                if self.attempts >= HTTP_ATTEMPTS:
                    raise ConnectionError(f"{e} ({self.attempts} connections tried)") from None
                self.attempts += 1
                self._reopen()

    def close(self) -> None:
        self.response.close()
        super().close()
