"""pipeline/durable.py: the folder lock."""

import subprocess
import sys
import textwrap

import pytest
from conftest import cli_env

from pipeline.durable import FolderLock
from pipeline.errors import UserError


def test_a_lock_is_exclusive_and_names_its_holder(tmp_path):
    lock = FolderLock(tmp_path / "lock", lambda holder: f"held by {holder['pid']}")
    try:
        with pytest.raises(UserError, match=r"held by \d+"):
            FolderLock(tmp_path / "lock", lambda holder: f"held by {holder['pid']}")
    finally:
        lock.release()
    FolderLock(tmp_path / "lock", lambda holder: "busy").release()


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """A packer or trainer killed while its decoder or loader workers live on: the lock goes with it,
    not with the workers (an flock is the open file's, which a fork shares)."""
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from pipeline.durable import FolderLock
        held = FolderLock(Path({str(tmp_path / "lock")!r}), lambda holder: "busy")
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)  # the test reads the parent's output to its end
            time.sleep(20)  # a worker that has not noticed its parent is gone
            os._exit(0)
        print("parent done", flush=True)
        os._exit(0)  # the parent dies holding the lock, as under kill -9
        """
    )
    done = subprocess.run([sys.executable, "-c", script], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "parent done", done.stderr
    FolderLock(tmp_path / "lock", lambda holder: f"still held by {holder}").release()
