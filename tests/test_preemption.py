"""Pre-emption with real processes: kill -9 mid-epoch (one process, and a process group of two ranks),
kill -9 inside a checkpoint write, then --resume; the audit logs prove each epoch used every clip once."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_command, cli_env
from shardmaker import shard_keys

from pipeline.config import StreamConfig, TrainConfig
from pipeline.train.launch import launch

ARGS = [
    "--model",
    "tiny",
    "--crop",
    "24",
    "--batch-size",
    "4",
    "--workers",
    "2",
    "--shuffle-buffer",
    "8",
    "--no-progress",
]
ARGS += [
    "--epochs",
    "2",
    "--lr",
    "0.003",
    "--eval-every",
    "0",
    "--audit-keys",
    "--checkpoint-every",
    "3",
    "--log-every",
    "1",
    "--threads",
    "1",
]


def start(packed: Path, log: Path, *extra, failpoint: str | None = None) -> subprocess.Popen:
    cmd = cli_command("train_app") + ["--shards", f"{packed}/<000..007>.tar", *ARGS, "--log-dir", str(log), *extra]
    env = cli_env(**({"CLIPSTREAM_FAILPOINT": failpoint} if failpoint else {}))
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, err


def wait_for_checkpoint(log: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if torch.load(log / "checkpoint.pt", weights_only=True)["step"] == step:
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint at step {step} after {timeout} s")


def audit(log: Path, epoch: int, rank: int) -> list[str]:
    return (log / "audit" / f"epoch-{epoch:03d}-rank-{rank}.txt").read_text().split()


def step_records(log: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (log / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def all_train_keys(packed: Path) -> list[str]:
    return sorted(k for i in range(8) for k in shard_keys(packed / f"{i:03d}.tar"))


def assert_each_epoch_exactly_once(log: Path, packed: Path, world: int) -> None:
    for epoch in (0, 1):
        keys = [k for r in range(world) for k in audit(log, epoch, r)]
        assert len(keys) == len(set(keys)) == 48 and sorted(keys) == all_train_keys(packed)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_run(packed, tmp_path):
    """Killed in step 18 (epoch 2, two steps past the checkpoint at step 16): resuming redoes steps
    17-18 and ends with bit-identical weights and optimiser state to a run never interrupted."""
    log = tmp_path / "run"
    proc = start(packed, log, failpoint="pause:step:18")
    wait_for_checkpoint(log, 16, proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL
    before = audit(log, 1, 0)
    assert len(before) >= 16  # what the killed run had consumed (at least up to the checkpoint)
    rc, err = finish(start(packed, log, "--resume", str(log)))
    assert rc == 0, err[-3000:]
    assert_each_epoch_exactly_once(log, packed, 1)
    assert audit(log, 1, 0)[:16] == before[:16]  # kept up to the checkpoint, continued from there
    assert step_records(log) == [*range(1, 18), *range(17, 25)]  # killed after 17; the counter went on from 16
    resumed = torch.load(log / "checkpoint.pt", weights_only=True)
    cfg = TrainConfig(
        stream=StreamConfig(shards=(f"{packed}/<000..007>.tar",), batch_size=4, workers=2, crop=24, shuffle_buffer=8),
        model="tiny",
        epochs=2,
        lr=0.003,
        eval_every=0,
        log_dir=str(tmp_path / "straight"),
        progress=False,
        threads=1,
    )
    launch(cfg)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 24 and resumed["opt_step"] == 24
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for i, state in straight["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(resumed["optimizer"]["state"][i][k], v), (i, k)


@pytest.mark.slow
def test_kill_9_of_two_ranks_mid_epoch_then_resume(packed, tmp_path):
    log = tmp_path / "run"
    proc = start(packed, log, "--nproc-per-node", "2", failpoint="pause:step:5")
    wait_for_checkpoint(log, 3, proc)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, both ranks and their loader workers
    finish(proc)
    rc, err = finish(start(packed, log, "--nproc-per-node", "2", "--resume", str(log)))
    assert rc == 0, err[-3000:]
    assert_each_epoch_exactly_once(log, packed, 2)
    for rank in (0, 1):
        assert len(audit(log, 0, rank)) == len(audit(log, 1, rank)) == 24
    assert step_records(log) == [*range(1, 5), *range(4, 13)]  # killed in step 5; went on from the checkpoint's step 3
    final = torch.load(log / "checkpoint.pt", weights_only=True)
    assert final["step"] == final["opt_step"] == 12 and final["epoch"] == 2
    assert all(
        int(s["step"]) == 12 for s in final["optimizer"]["state"].values()
    )  # Adam's own count: restored, not restarted


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint-mid-write:6", "checkpoint-before-rename:6"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(packed, tmp_path, point):
    log = tmp_path / "run"
    rc, _ = finish(start(packed, log, failpoint=point))
    assert rc == -signal.SIGKILL
    (stale,) = log.glob(".checkpoint.pt.*.tmp")  # the half-done write
    ckpt = torch.load(log / "checkpoint.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (3, 0, 3)
    rc, err = finish(start(packed, log, "--resume", str(log)))
    assert rc == 0, err[-3000:]
    assert_each_epoch_exactly_once(log, packed, 1)
    assert not stale.exists() and torch.load(log / "checkpoint.pt", weights_only=True)["step"] == 24
