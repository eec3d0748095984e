"""Crash safety, resume, worker-count and --part independence: real processes, real kill -9."""

import subprocess
import time

import pytest

from pipeline.cli import pack_app
from tests.conftest import cli_command, cli_env, run_cli

ARGS = ["--quiet", "--shards", "5", "--test-shards", "3"]


@pytest.fixture(scope="module")
def clean(small_tree, tmp_path_factory):
    """A reference pack made in one go with 2 workers."""
    root, _ = small_tree
    out = tmp_path_factory.mktemp("clean")
    result = run_cli(pack_app, root, out, *ARGS, "--workers", "2")
    assert result.exit_code == 0, result.output
    return out


def _snapshot(out):
    names = sorted(p.name for p in out.glob("*.tar")) + ["index.json", "manifest.parquet"]
    return {n: (out / n).read_bytes() for n in names if (out / n).exists()}


def _assert_no_partial_under_final_names(out, clean):
    ref = _snapshot(clean)
    for name, data in _snapshot(out).items():
        assert data == ref[name], f"{name} exists but is not the complete file"


@pytest.mark.parametrize(
    "point", ["after-shards:1", "mid-write:002.tar", "after-shards:6", "before-index", "mid-write:index.json"]
)
def test_kill_9_then_resume_gives_the_same_bytes(point, small_tree, clean, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [str(root), str(out), *ARGS, "--workers", "2"]
    crashed = subprocess.run(cmd, env=cli_env(CLIPSTREAM_FAILPOINT=point), capture_output=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr.decode()
    assert not (out / "index.json").exists()
    _assert_no_partial_under_final_names(out, clean)
    resumed = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _snapshot(out) == _snapshot(clean)
    assert not list(out.glob(".*.partial"))


def test_kill_9_at_a_random_moment(small_tree, clean, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    cmd = cli_command("pack_app") + [str(root), str(out), *ARGS, "--workers", "2"]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("00[0-9].tar")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)  # the packer and its decoding workers
    proc.wait()
    _assert_no_partial_under_final_names(out, clean)
    resumed = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _snapshot(out) == _snapshot(clean)


def test_shard_records_lost_in_a_power_cut_only_repack_their_shards(small_tree, clean, tmp_path):
    """A shard's record (.clipstream/state/NAME.json) is not fsynced: after a power cut it may be
    missing, empty or cut short. Each such shard is packed again, and nothing else is."""
    import shutil

    root, _ = small_tree
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    state = out / ".clipstream" / "state"
    (state / "001.tar.json").unlink()
    (state / "003.tar.json").write_bytes(b"")
    record = (state / "test-001.tar.json").read_bytes()
    (state / "test-001.tar.json").write_bytes(record[: len(record) // 2])
    result = run_cli(pack_app, root, out, *ARGS)
    assert result.exit_code == 0, result.output
    assert "3/8 shards written this run" in result.stdout
    assert _snapshot(out) == _snapshot(clean)
    assert (state / "test-001.tar.json").read_bytes() == record


def test_one_worker_gives_the_same_bytes(small_tree, clean, tmp_path):
    root, _ = small_tree
    result = run_cli(pack_app, root, tmp_path / "one", *ARGS, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert _snapshot(tmp_path / "one") == _snapshot(clean)


def test_parts_assemble_to_the_single_machine_bytes(small_tree, clean, tmp_path):
    root, _ = small_tree
    out = tmp_path / "out"
    first = run_cli(pack_app, root, out, *ARGS, "--part", "1/2")
    assert first.exit_code == 0, first.output
    assert not (out / "index.json").exists()
    assert "every part has finished" in first.stdout
    written = {p.name for p in out.glob("*.tar")}
    assert written and written < set(_snapshot(clean))
    second = run_cli(pack_app, root, out, *ARGS, "--part", "2/2")
    assert second.exit_code == 0, second.output
    total = len([n for n in _snapshot(clean) if n.endswith(".tar")])
    assert f"{total - len(written)}/{total} shards written this run" in second.stdout  # disjoint parts
    assert _snapshot(out) == _snapshot(clean)


def test_workers_do_not_outlive_a_killed_packer(small_tree, tmp_path):
    """kill -9 of the packer alone (not its process group): its decoding workers go with it, also
    one in the middle of sending a result nobody will read."""
    import os

    root, _ = small_tree
    cmd = cli_command("pack_app") + [str(root), str(tmp_path / "out"), *ARGS, "--workers", "2"]
    packer = subprocess.Popen(
        cmd,
        env=cli_env(CLIPSTREAM_FAILPOINT="after-shards:1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert packer.wait(timeout=300) == -9

    def in_packers_group():  # start_new_session: the group id is the packer's pid, workers inherit it
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == packer.pid and fields[0] != "Z":
                found.append(int(pid))
        return found

    # The kernel kills them with the packer (PR_SET_PDEATHSIG); polling for the packer between
    # tasks would take up to a second, and for ever for a worker blocked sending a result.
    deadline = time.monotonic() + 0.5
    while in_packers_group() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_packers_group() == []
