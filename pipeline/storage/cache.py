"""A node-local cache of remote shards: one verified copy per node, shared by every rank and worker.

A remote shard (object store or HTTP(S)) that the index gives a sha256 and a size for is teed into
a temporary file of the cache folder while the reader consumes it (the first epoch waits for
nothing more than the network), and kept only when the read was whole and its sha256 is the
index's: an fsync, an atomic rename (durable.publish). A later open reads the copy, after checking
its size and sha256 again, so a corrupted copy is dropped and fetched again, never read.

Concurrency is file locks (flock) in `<cache>/.locks/`: one lock a shard, so a process opening a
shard another one is downloading waits for that download and reads the copy (two processes never
download the same shard at once; a download that makes no progress for WAIT_STALL_S is given up
on and the shard streamed past the cache); one lock for the whole cache while room is made,
evicting the least recently used copies (their mtime, touched on every hit) past `max_bytes`.

Nothing here fails a run: an unwritable folder, a full disk or any other OSError turns the cache
off for the process that met it, with one warning per cache session (the loader's), and the
shard is read from its URL as without a cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import secrets
import time
from pathlib import Path

from pipeline.durable import check_real_folder, open_new, publish, remove_stale_temps, temp_path, temps_of
from pipeline.redact import redact

_log = logging.getLogger("clipstream")

LOCKS = ".locks"
"""The cache's lock files (one a shard ever cached, a few bytes each, and the cache-wide one)."""
WAIT_STALL_S = 30.0
"""How long a process waits for another's download of the same shard to make progress before it
streams the shard past the cache instead."""
POLL_S = 0.05
TAIL_BYTES = 1 << 20
"""A reader that stops with at most this much of a shard unread (a tar's end padding, the last
samples a quota cut) has the rest read for it on close, so the copy can still be kept."""
FREE_SHARE = 0.9
"""Without a size: the cache may take this share of the space free on its disk at the start."""
WARNED_STALE_S = 86_400.0
_SAID: set[str] = set()
"""The warnings open_cache gave in this process: a run opens its cache once a loader (training,
evaluation), and says what is wrong with it once."""


def entry_name(url: str, sha256: str) -> str:
    """The copy's file name: the shard's sha256 (its identity: a re-packed shard never hits a stale
    copy) after a hash of its URL without a query string (a pre-signed URL's signature changes)."""
    where = hashlib.sha256(url.split("?", 1)[0].encode()).hexdigest()[:16]
    return f"{where}-{sha256}.tar"


def is_entry(name: str) -> bool:
    head, _, rest = name.partition("-")
    return len(head) == 16 and rest.endswith(".tar") and len(rest) == 68


@dataclasses.dataclass
class ShardCache:
    """The cache at `folder`, keeping at most `max_bytes` of shards. Made by `open_cache` in the
    loader's process and copied into its workers (picklable); `off` is each process's own."""

    folder: Path
    max_bytes: int
    session: str
    """Names the warning marker, so that the loader's workers warn once between them."""
    off: bool = False

    def bypass(self, why: str) -> None:
        """Turn the cache off in this process, with one warning per session."""
        if self.off:
            return
        self.off = True
        marker = self.folder / LOCKS / f"warned-{self.session}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
        except FileExistsError:
            return  # another worker of this loader said it
        except OSError:
            pass  # a folder that cannot take even that: say it here
        _log.warning("warning: shard cache %s: %s; reading shards without it", self.folder, why)

    def holds(self, url: str, sha256: str | None, size: int | None) -> bool:
        """Whether a copy of the shard of that size is in the cache (not yet checked: `open` checks
        its sha256). A stat, no more: what lets a reader open a copy at its turn rather than in a
        read-ahead thread (0.23 ms a shard of thread against 0.1 ms of opening and checking a
        100 KB copy, measured on 3-clip shards)."""
        if self.off or sha256 is None or size is None:
            return False
        try:
            return (self.folder / entry_name(url, sha256)).stat().st_size == size
        except OSError:
            return False

    def open(self, url: str, sha256: str | None, size: int | None, fetch, fresh: bool = False):
        """A binary stream of the shard at `url`: the verified copy, or `fetch()` (the remote
        stream) teed into the cache, or `fetch()` alone (no sha256 or size to verify against, the
        cache off, another process's download stalled). `fresh`: never the copy, always the remote
        stream (teed in, replacing the copy when it is whole and verified): what verify-shards
        reads, since it checks the store, not the cache."""
        if self.off or sha256 is None or size is None:
            return fetch()
        path = self.folder / entry_name(url, sha256)
        try:
            copy = None if fresh else self._hit(path, url, sha256, size)
            if copy is not None:
                return copy
            lock = self._claim(path)
            if lock is None:
                return fetch()
            copy = None if fresh else self._hit(path, url, sha256, size)  # downloaded by the process we waited for
        except OSError as e:
            self.bypass(_reason(e))
            return fetch()
        if copy is not None:
            lock.close()
            return copy
        try:
            remote = fetch()
        except BaseException:
            lock.close()
            raise
        return Tee(remote, self, path, url, sha256, size, lock)

    def _hit(self, path: Path, url: str, sha256: str, size: int):
        """The copy at `path`, open at its start, if it is whole and its sha256 is `sha256`; a
        corrupted copy is removed (and None returned, so it is fetched again)."""
        try:
            f = open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)), "rb")
        except FileNotFoundError:
            return None
        with contextlib.ExitStack() as guard:
            guard.callback(f.close)
            good = os.fstat(f.fileno()).st_size == size and hashlib.file_digest(f, "sha256").hexdigest() == sha256
            if not good:
                _log.warning(
                    "warning: shard cache: the copy of %s is corrupt (size or sha256); fetching it again", redact(url)
                )
                path.unlink(missing_ok=True)
                return None
            os.utime(path)  # least recently used: mtime is the last use
            f.seek(0)
            guard.pop_all()
        return f

    def _claim(self, path: Path):
        """The shard's lock (an open file holding an flock), waiting while another process's
        download of it makes progress; None when that download stalls for WAIT_STALL_S."""
        import fcntl

        lock = _lock_file(self.folder / LOCKS / (path.name + ".lock"))
        seen, since = -1, time.monotonic()
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return lock
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    lock.close()
                    raise
            progress = _temp_bytes(path)
            if progress != seen:
                seen, since = progress, time.monotonic()
            elif time.monotonic() - since > WAIT_STALL_S:
                lock.close()
                return None
            time.sleep(POLL_S)

    def keep(self, tmp: Path, path: Path, size: int) -> None:
        """Publish the verified temporary copy `tmp` as `path`, after evicting least recently used
        copies until it fits (under the cache-wide lock)."""
        import fcntl

        if size > self.max_bytes:
            tmp.unlink(missing_ok=True)
            return
        with _lock_file(self.folder / LOCKS / "cache.lock") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            self.evict(self.max_bytes - size)
            publish(tmp, path)

    def evict(self, room: int) -> list[Path]:
        """Remove the least recently used copies until the others take at most `room` bytes."""
        copies = []
        for entry in os.scandir(self.folder):
            if is_entry(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat(follow_symlinks=False)
                    copies.append((st.st_mtime, entry.name, st.st_size))
        copies.sort()
        total, gone = sum(c[2] for c in copies), []
        for _, name, nbytes in copies:
            if total <= room:
                break
            (self.folder / name).unlink(missing_ok=True)
            total -= nbytes
            gone.append(self.folder / name)
        return gone

    def used(self) -> int:
        """Bytes of the copies the cache holds."""
        return sum(e.stat().st_size for e in os.scandir(self.folder) if is_entry(e.name))


def _reason(e: OSError) -> str:
    return e.strerror or str(e) if not e.filename else f"{e.strerror or e} ({e.filename})"


def _lock_file(path: Path):
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o644), "r+b")


def _temp_bytes(path: Path) -> int:
    """Bytes the temporary copies of `path` hold (a download in progress grows them)."""
    total = 0
    for tmp in temps_of(path):
        with contextlib.suppress(FileNotFoundError):
            total += tmp.stat().st_size
    return total


def open_cache(folder: str | os.PathLike, max_bytes: int | None) -> ShardCache | None:
    """The cache at `folder` (created if missing), checked writable: None, with one warning, when it
    is not (the run goes on without it). Temporary files of dead writers are removed.
    `max_bytes` None: FREE_SHARE of the space free on its disk, plus what it holds already."""
    path = Path(folder)
    try:
        (path / LOCKS).mkdir(parents=True, exist_ok=True)
        check_real_folder(path)
        probe = temp_path(path / "probe")
        with open_new(probe) as f:
            f.write(b"probe")
        probe.unlink()
        remove_stale_temps(path)
        _remove_old_markers(path / LOCKS)
        cache = ShardCache(path, 0, secrets.token_hex(8))
        if max_bytes is None:
            st = os.statvfs(path)
            max_bytes = max(1, int(st.f_bavail * st.f_frsize * FREE_SHARE) + cache.used())
    except OSError as e:
        _say_once(f"warning: shard cache {folder}: {_reason(e)}; reading shards without it")
        return None
    except Exception as e:  # check_real_folder's UserError: a link in the cache's place
        _say_once(f"warning: shard cache {folder}: {e}; reading shards without it")
        return None
    cache.max_bytes = max_bytes
    return cache


def _say_once(text: str) -> None:
    if text not in _SAID:
        _SAID.add(text)
        _log.warning("%s", text)


def _remove_old_markers(locks: Path) -> None:
    now = time.time()
    for marker in locks.glob("warned-*"):
        with contextlib.suppress(OSError):
            if now - marker.stat().st_mtime > WARNED_STALE_S:
                marker.unlink()


class Tee:
    """The remote stream of one shard, copied into a temporary file of the cache as it is read and
    hashed; at its end (all `size` bytes read, on close at the latest: a short rest is read then,
    see TAIL_BYTES) the copy is kept when its sha256 is the index's. A failing write (a full disk)
    drops the copy and turns the cache off, but never the read. Not seekable: the tar reader reads
    over the members it skips."""

    def __init__(self, remote, cache: ShardCache, path: Path, url: str, sha256: str, size: int, lock):
        self.remote, self.cache, self.path, self.url = remote, cache, path, url
        self.sha256, self.size, self.lock = sha256, size, lock
        self.got, self.hasher = 0, hashlib.sha256()
        self.tmp: Path | None = temp_path(path)
        try:
            self.file = open_new(self.tmp)
        except OSError as e:
            self._drop(_reason(e))

    def read(self, n: int = -1) -> bytes:
        return self._tee(self.remote.read(n), n)

    def read1(self, n: int = -1) -> bytes:
        """One read of the remote stream's (its read1 where it has one: a read-ahead thread takes
        what has come, and so the bytes before an error)."""
        return self._tee(getattr(self.remote, "read1", self.remote.read)(n), n)

    def _tee(self, data: bytes, n: int) -> bytes:
        if self.tmp is not None and data:
            try:
                self.file.write(data)
            except OSError as e:
                self._drop(_reason(e))
            else:
                self.hasher.update(data)
        self.got += len(data)
        if self.tmp is not None and (self.got >= self.size or not data and n != 0):
            self._finish()
        return data

    def _finish(self) -> None:
        if self.got != self.size or self.hasher.hexdigest() != self.sha256:
            _log.warning(
                "warning: shard cache: %s is not the shard the index describes (%d bytes read, sha256 %s): not cached",
                redact(self.url),
                self.got,
                self.hasher.hexdigest()[:12],
            )
            self._drop(None)
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.cache.keep(self.tmp, self.path, self.size)
        except OSError as e:
            self._drop(_reason(e))
            return
        self.tmp = None

    def _drop(self, why: str | None) -> None:
        """Forget the copy (a partial or wrong read, or a write that failed: then `why` turns the cache off)."""
        if self.tmp is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        self.tmp = None
        if why is not None:
            self.cache.bypass(why)

    def close(self) -> None:
        try:
            if self.tmp is not None and 0 <= self.size - self.got <= TAIL_BYTES:
                with contextlib.suppress(Exception):  # the rest was only for the copy
                    while self.tmp is not None and self.read(1 << 16):
                        pass
            self._drop(None)
        finally:
            self.lock.close()
            self.remote.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def __enter__(self) -> Tee:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
