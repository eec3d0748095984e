"""Writes that survive a crash, and the failpoints that prove it.

Both the packer (shards, index, manifest) and the trainer (checkpoints) publish a file by writing
it beside its final name, fsyncing it, renaming it over the final name and fsyncing the folder: a
reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

STALE_TEMP_SECONDS = 3600.0
"""A temporary file of another machine's writer is taken as abandoned after this long: a writer
holds one only while it writes bytes it already has in memory (seconds)."""

_TEMP = re.compile(r"^\.(?P<name>.+?)(?:\.[0-9a-f]{8}-(?P<pid>[0-9]+)@(?P<host>[^/]*))?\.partial$")


def failpoint(name: str, before_kill=None) -> None:
    """Crash tests: CLIPSTREAM_FAILPOINT=name kills this process with SIGKILL right here (after
    `before_kill()`, e.g. to leave a half-written file); CLIPSTREAM_FAILPOINT=pause:name holds it
    here until a test kills it from outside. With CLIPSTREAM_FAILPOINT_ONCE=PATH either fires
    once only, in the process that creates PATH (a task retried after it then goes through)."""
    point = os.environ.get("CLIPSTREAM_FAILPOINT")
    if point not in (name, f"pause:{name}") or not _first_time(os.environ.get("CLIPSTREAM_FAILPOINT_ONCE")):
        return
    if point == name:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
    else:
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
        with open(tmp, "wb") as f:
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
