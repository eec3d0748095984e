"""Writes that survive a crash, and the failpoints that prove it.

Both the packer (shards, index, manifest) and the trainer (checkpoints) publish a file by writing
it beside its final name, fsyncing it, renaming it over the final name and fsyncing the folder: a
reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import UserError

STALE_TEMP_SECONDS = 3600.0
"""A temporary file of another machine's writer is taken as abandoned after this long: a writer
holds one only while it writes bytes it already has in memory (seconds)."""

_TEMP = re.compile(r"^\.(?P<name>.+?)(?:\.[0-9a-f]{8}-(?P<pid>[0-9]+)@(?P<host>[^/]*))?\.partial$")


def failpoint(name: str, before_kill=None) -> None:
    """Crash tests: CLIPSTREAM_FAILPOINT=name kills this process with SIGKILL right here (after
    `before_kill()`, e.g. to leave a half-written file); CLIPSTREAM_FAILPOINT=pause:name holds it
    here until a test kills it from outside; CLIPSTREAM_FAILPOINT=term:name sends it SIGTERM (a
    preemption notice at a known step). With CLIPSTREAM_FAILPOINT_ONCE=PATH each fires once only, in
    the process that creates PATH: one rank of a job, once over restarts; a task retried after it
    goes through."""
    point = os.environ.get("CLIPSTREAM_FAILPOINT")
    if point not in (name, f"pause:{name}", f"term:{name}"):
        return
    if not _first_time(os.environ.get("CLIPSTREAM_FAILPOINT_ONCE")):
        return
    if point == name:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
    if point == f"term:{name}":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    while True:
        time.sleep(1)


def _first_time(marker: str | None) -> bool:
    if marker is None:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def temp_path(path: Path) -> Path:
    """Where a writer of `path` puts its bytes until they are whole: `.NAME.<random>-<pid>@<host>.partial`
    beside it, a name of its own, so that writers of one folder (parts of a pack started together, a
    task retried while its first try still runs) never write into or rename each other's file."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}-{os.getpid()}@{socket.gethostname()}.partial")


def temps_of(path: Path) -> list[Path]:
    """The temporary files (temp_path) of `path`'s writers there now, live or not."""
    return list(path.parent.glob(f".{glob.escape(path.name)}.*.partial"))


def _writer_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    try:  # a killed writer whose parent died too may stay a zombie for a while: gone all the same
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def remove_stale_temps(folder: Path, now: float | None = None) -> list[Path]:
    """Delete the temporary files (temp_path) in `folder` that no live writer owns: a writer of this
    machine whose process is gone, any writer's after STALE_TEMP_SECONDS, and the owner-less names
    of earlier versions. A live writer's file is left alone, whoever runs this. Returns what went."""
    now = time.time() if now is None else now
    host, gone = socket.gethostname(), []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return gone
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
        except FileNotFoundError:
            continue  # its writer just renamed it
        ours = m["pid"] is not None and m["host"] == host
        if m["pid"] is None or old or (ours and _writer_gone(int(m["pid"]))):
            Path(entry.path).unlink(missing_ok=True)
            gone.append(Path(entry.path))
    return gone


def publish(tmp: Path, path: Path) -> None:
    """Rename the complete, fsynced `tmp` over `path`, then fsync the folder so the rename lasts."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, midway: Callable[[], None] | None = None, sync: bool = True) -> None:
    """Write `data` to the local file `path` through a hidden temporary file of its own beside it (temp_path), so that
    `path` is old or whole, never a part; `midway()` runs with half of it written (crash tests).
    `sync=False` skips the fsyncs, for a file whose loss costs only redone work: a killed process
    still leaves it whole or absent, but a power cut may leave it absent or empty. An OSError (a
    full disk) leaves no partial file behind and propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open_new(tmp) as f:
            f.write(data[: len(data) // 2])
            f.flush()
            if midway is not None:
                midway()
            f.write(data[len(data) // 2 :])
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if sync:
            publish(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def open_new(path: Path):
    """`path` as a new, empty file open for binary writing, never through a symbolic link: whatever
    has the name (a stale temporary file of ours, or a link planted in its place) is removed first,
    and the file is created with O_EXCL | O_NOFOLLOW, so a link made in between fails the write
    rather than truncating the file it points to. Removing a link never touches what it points to."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def open_append(path: Path):
    """`path` open for appending text (created if missing), refusing a symbolic link in its place
    (ELOOP): a log of ours is never written through a link planted under its name."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags, 0o644), "a")


def check_real_folder(path: Path) -> None:
    """`path`, where we keep files of our own, must not be a symbolic link: writing there would
    write wherever it points (a link planted by anyone who could write the parent folder)."""
    if path.is_symlink():
        raise UserError(
            f"{path} is a symbolic link; clipstream keeps its own files there and never writes through a link: remove it"
        )


_HELD_LOCKS: set[int] = set()
"""The descriptors of the locks this process holds: a forked child lets go of its copies."""


def _drop_inherited_locks() -> None:
    # An flock belongs to the open file, which a fork shares: a decoder or loader worker that kept
    # its copy would hold the parent's lock after the parent died (until it noticed), and a re-run
    # started at once would be told the folder is in use by a dead process. The descriptor is
    # pointed at /dev/null rather than closed, so that its number is not reused under the parent's
    # file object.
    if not _HELD_LOCKS:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive lock on a folder we write, held by this process until `release()` (or its end:
    the kernel drops an flock with the last descriptor, so a process killed -9 leaves no stale lock;
    forked children do not keep it).

    The lock file records who holds it (host, pid, start time, command) for the second writer's
    message. One helper for every folder we own: the run folder (train-stream) and OUT_DIR
    (pack-shards without --part)."""

    def __init__(self, lock_path: Path, busy: Callable[[dict], str], remove: bool = False):
        """Take the lock at `lock_path` or raise UserError(busy(holder)) at once; `holder` is what the
        holder wrote ({} when unreadable). `remove`: the lock file goes with the release (a folder
        whose contents are compared elsewhere, OUT_DIR), else it stays for the next holder."""
        import fcntl

        self.path, self.remove = lock_path, remove

        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(lock_path, flags, 0o644)
        except OSError as e:
            raise UserError(f"cannot lock {lock_path}: {e.strerror or e}") from None
        self._file = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return  # a file system without flock (some network mounts): unlocked, as before
            try:
                holder = json.loads(self._file.read(4096) or b"{}")
            except ValueError:
                holder = {}
            self._file.close()
            raise UserError(busy(holder if isinstance(holder, dict) else {})) from None
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        self._file.truncate(0)
        self._file.write(json.dumps(me).encode())
        self._file.flush()
        _HELD_LOCKS.add(self._file.fileno())

    def release(self) -> None:
        if self._file.closed:
            return
        _HELD_LOCKS.discard(self._file.fileno())
        if self.remove:
            # before the close, while still held: a process that starts now creates a fresh file
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._file.close()


def holder_text(holder: dict) -> str:
    """`pid N on host H since T` from a FolderLock holder record (fields may be missing)."""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


@contextlib.contextmanager
def folder_lock(lock_path: Path, busy: Callable[[dict], str]) -> Iterator[FolderLock]:
    """`with folder_lock(path, busy):` holds a FolderLock for the block."""
    lock = FolderLock(lock_path, busy)
    try:
        yield lock
    finally:
        lock.release()
