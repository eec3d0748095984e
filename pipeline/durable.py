"""Writes that survive a crash, and the failpoints that prove it.

Both the packer (shards, index, manifest) and the trainer (checkpoints) publish a file by writing
it beside its final name, fsyncing it, renaming it over the final name and fsyncing the folder: a
reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import signal
import time
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
