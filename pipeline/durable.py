"""Writes that survive a crash, and the failpoints that prove it.

Both the packer (shards, index, manifest) and the trainer (checkpoints) publish a file by writing
it beside its final name, fsyncing it, renaming it over the final name and fsyncing the folder: a
reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def failpoint(name: str, before_kill=None) -> None:
    """Crash tests: CLIPSTREAM_FAILPOINT=name kills this process with SIGKILL right here (after
    `before_kill()`, e.g. to leave a half-written file); CLIPSTREAM_FAILPOINT=pause:name holds it
    here until a test kills it from outside."""
    point = os.environ.get("CLIPSTREAM_FAILPOINT")
    if point == name:
        if before_kill is not None:
            before_kill()
        os.kill(os.getpid(), signal.SIGKILL)
    if point == f"pause:{name}":
        while True:
            time.sleep(1)


def publish(tmp: Path, path: Path) -> None:
    """Rename the complete, fsynced `tmp` over `path`, then fsync the folder so the rename lasts."""
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, midway: Callable[[], None] | None = None, sync: bool = True) -> None:
    """Write `data` to the local file `path` through a hidden `.NAME.partial` beside it, so that
    `path` is old or whole, never a part; `midway()` runs with half of it written (crash tests).
    `sync=False` skips the fsyncs, for a file whose loss costs only redone work: a killed process
    still leaves it whole or absent, but a power cut may leave it absent or empty. An OSError (a
    full disk) leaves no partial file behind and propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
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
