"""pipeline/durable.py: temporary files of their own per writer, a clean-up that removes only those
no live writer owns (parts of a pack share one folder and may start together), and the folder lock."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import cli_env

from pipeline.durable import (
    STALE_TEMP_SECONDS,
    FolderLock,
    failpoint,
    remove_stale_temps,
    temp_path,
    temps_of,
    write_atomic,
)
from pipeline.errors import UserError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_every_writer_has_a_temporary_name_of_its_own(tmp_path):
    a, b = temp_path(tmp_path / "000.tar"), temp_path(tmp_path / "000.tar")
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(".000.tar.") and a.name.endswith(f"-{os.getpid()}@{socket.gethostname()}.partial")


def test_temps_of_finds_every_writer_of_one_name_and_no_other(tmp_path):
    shard = tmp_path / "a[1].tar"  # glob characters in the name are not patterns
    mine = [temp_path(shard) for _ in range(2)]
    for p in [*mine, temp_path(tmp_path / "a1.tar"), temp_path(tmp_path / "b.tar"), shard]:
        p.write_bytes(b"x")
    assert sorted(temps_of(shard)) == sorted(mine)


def test_clean_up_spares_live_writers_and_removes_the_rest(tmp_path):
    host, now = socket.gethostname(), time.time()
    names = {
        "live": f".000.tar.0123abcd-{os.getpid()}@{host}.partial",  # this process: alive
        "dead": f".001.tar.0123abcd-{_dead_pid()}@{host}.partial",  # this machine, its writer gone
        "remote": ".002.tar.0123abcd-1@another-node.example.org.partial",  # can't tell: kept while young
        "remote-old": ".003.tar.0123abcd-1@another-node.partial",
        "legacy": ".004.tar.partial",  # an earlier version's name: no owner to wait for
        "shard": "005.tar",
        "hidden": ".notes.txt",
    }
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"x")
    old = now - STALE_TEMP_SECONDS - 60
    os.utime(tmp_path / names["remote-old"], (old, old))
    gone = {p.name for p in remove_stale_temps(tmp_path, now=now)}
    assert gone == {names["dead"], names["remote-old"], names["legacy"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("live", "remote", "shard", "hidden"))


def test_clean_up_spares_a_live_writer_of_another_process(tmp_path):
    """A second process writing now (a part started with us) keeps its temporary file."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        name = f".000.tar.0123abcd-{writer.pid}@{socket.gethostname()}.partial"
        (tmp_path / name).write_bytes(b"x")
        assert remove_stale_temps(tmp_path) == []
        writer.kill()
        writer.wait()
        assert [p.name for p in remove_stale_temps(tmp_path)] == [name]
    finally:
        writer.kill()
        writer.wait()


def test_write_atomic_leaves_only_the_final_name(tmp_path):
    write_atomic(tmp_path / "index.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_a_failpoint_with_a_marker_fires_once(tmp_path, monkeypatch):
    """CLIPSTREAM_FAILPOINT_ONCE: the first process to reach the point is killed, a retry goes on."""
    marker = tmp_path / "fired"
    code = "from pipeline.durable import failpoint; failpoint('here'); print('passed')"
    env = {**os.environ, "CLIPSTREAM_FAILPOINT": "here", "CLIPSTREAM_FAILPOINT_ONCE": str(marker)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == -9 and marker.exists()
    assert second.returncode == 0 and second.stdout.strip() == "passed"
    monkeypatch.delenv("CLIPSTREAM_FAILPOINT", raising=False)
    failpoint("here")  # unset: nothing happens


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
