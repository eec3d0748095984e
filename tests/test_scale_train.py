"""Training past one machine, with real processes: two torchrun agents against one node of two
processes, resumes on another number of ranks or loader workers, `torchrun --max-restarts` with a
rank killed, SIGTERM and timed checkpoints. Tiny model, 48 clips in 8 shards, 1-2 epochs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_command, cli_env
from shardmaker import shard_keys

from pipeline.tools.plots import current_records, read_metrics

ARGS = ["--model", "tiny", "--crop", "24", "--batch-size", "4", "--shuffle-buffer", "8", "--no-progress"]
ARGS += ["--lr", "0.003", "--eval-every", "0", "--audit-keys", "--log-every", "1", "--threads", "1"]


def shards(packed: Path) -> list[str]:
    return ["--shards", f"{packed}/<000..007>.tar"]


def all_keys(packed: Path) -> list[str]:
    return sorted(k for i in range(8) for k in shard_keys(packed / f"{i:03d}.tar"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 300, cwd=None, **env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_stream(packed: Path, log: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    return run(cli_command("train_app") + shards(packed) + ARGS + ["--log-dir", str(log), *extra], **env)


def torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "pipeline.train"]


def audit_lines(log: Path, epoch: int) -> dict[int, list[str]]:
    """Every rank's audit lines of `epoch`, by rank."""
    found = sorted((log / "audit").glob(f"epoch-{epoch:03d}-rank-*.txt"))
    return {int(p.stem.rsplit("-", 1)[1]): p.read_text().splitlines() for p in found}


def assert_every_clip_once(log: Path, packed: Path, epochs=(0, 1)) -> None:
    """Each epoch's first uses (repeats are marked) are every training clip exactly once."""
    for epoch in epochs:
        lines = [line for ranks in audit_lines(log, epoch).values() for line in ranks]
        firsts = [line for line in lines if "\t" not in line]
        assert sorted(firsts) == all_keys(packed), epoch
        assert all(line.endswith("\trepeat") and line.split("\t")[0] in firsts for line in lines if "\t" in line)


def checkpoint(log: Path) -> dict:
    return torch.load(log / "checkpoint.pt", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return set(a["model"]) == set(b["model"]) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def one_node_of_two(packed, tmp_path_factory) -> Path:
    """The reference: 2 epochs on one node of 2 processes (`--nproc-per-node 2`), 2 workers each."""
    log = tmp_path_factory.mktemp("one-node") / "run"
    done = train_stream(packed, log, "--epochs", "2", "--workers", "2", "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return log


@pytest.mark.slow
def test_two_torchrun_agents_train_as_one_node_of_two_processes(packed, tmp_path, one_node_of_two):
    """Static rendezvous on 127.0.0.1, one process per agent: the same keys on every rank in every
    epoch, the same final weights; one run folder written by global rank 0 alone."""
    log, port = tmp_path / "run", free_port()
    args = shards(packed) + ARGS + ["--epochs", "2", "--workers", "2", "--log-dir", str(log)]
    agents = [
        subprocess.Popen(
            torchrun(
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
            )
            + args,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    try:
        results = [(a.wait(timeout=300), a.stdout.read(), a.stderr.read()) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    for epoch in (0, 1):
        assert audit_lines(log, epoch) == audit_lines(one_node_of_two, epoch)
    assert same_weights(checkpoint(log), checkpoint(one_node_of_two))
    summaries = [r for r in read_metrics(log / "metrics.jsonl") if r["kind"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2 and summaries[0]["steps"] == 12
    assert sorted(p.name for p in log.glob("options*.json")) == ["options.json"]
    assert "training tiny" in results[0][1] and "training tiny" not in results[1][1]  # only rank 0 prints


@pytest.mark.slow
def test_an_epoch_resumed_on_one_rank_then_on_two_with_fewer_workers_uses_every_clip_once(packed, tmp_path):
    """2 ranks x 2 workers stop at step 3 of epoch 1's 6; 1 rank x 2 workers goes on for 2 steps; 2
    ranks x 1 worker finish the epoch and run epoch 2 on their own plan. Each epoch uses every clip
    exactly once (marked repeats apart), each segment with equal steps on every rank."""
    log = tmp_path / "run"
    first = train_stream(packed, log, "--epochs", "2", "--workers", "2", "--nproc-per-node", "2", "--max-steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_stream(packed, log, "--resume", str(log), "--workers", "2", "--max-steps", "5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert checkpoint(log)["step_in_epoch"] == 2 and checkpoint(log)["epoch"] == 0
    third = train_stream(packed, log, "--resume", str(log), "--workers", "1", "--nproc-per-node", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert_every_clip_once(log, packed)
    ranks = audit_lines(log, 0)
    # rank 0: 3 steps, 2 steps alone, then the last segment; rank 1: 3 steps, then the last segment
    assert len(ranks[0]) - 4 * (3 + 2) == len(ranks[1]) - 4 * 3 > 0
    assert [len(lines) for lines in audit_lines(log, 1).values()] == [24, 24]  # epoch 2: the normal plan
    final = checkpoint(log)
    assert final["epoch"] == 2 and final["step_in_epoch"] == 0
    steps = [r["step"] for r in current_records(read_metrics(log / "metrics.jsonl")) if r["kind"] == "step"]
    assert steps == list(range(1, final["step"] + 1))


def test_a_mid_epoch_resume_with_fewer_workers_uses_every_clip_once(packed, tmp_path):
    """One process: 2 workers stop at step 5 of 12; 1 worker finishes both epochs."""
    log = tmp_path / "run"
    first = train_stream(packed, log, "--epochs", "2", "--workers", "2", "--max-steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_stream(packed, log, "--resume", str(log), "--workers", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_every_clip_once(log, packed)
    assert [len(lines) for lines in audit_lines(log, 0).values()] == [48]
    assert checkpoint(log)["step"] == 24


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_a_run_whose_rank_was_killed(packed, tmp_path):
    """The first rank to reach step 5 is killed (SIGKILL); torchrun restarts both ranks with the same
    command line (`--resume auto`), which continues from the checkpoint of step 3. Exit 0, every
    clip once per epoch, no step counted twice in the metrics."""
    log = tmp_path / "run"
    cmd = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2")
    cmd += shards(packed) + ARGS + ["--epochs", "2", "--workers", "2", "--checkpoint-every", "3"]
    cmd += ["--log-dir", str(log), "--resume", "auto"]
    once = tmp_path / "killed-once"
    done = run(cmd, cwd=tmp_path, CLIPSTREAM_FAILPOINT="step:5", CLIPSTREAM_FAILPOINT_ONCE=str(once))
    assert done.returncode == 0, done.stderr[-3000:]
    assert once.exists()  # the failpoint fired
    assert_every_clip_once(log, packed)
    records = read_metrics(log / "metrics.jsonl")
    assert any(r["kind"] == "resume" and r["step"] == 3 for r in records)
    steps = [r["step"] for r in current_records(records) if r["kind"] == "step"]
    assert steps == list(range(1, 13))
    assert checkpoint(log)["step"] == 12


@pytest.mark.slow
def test_sigterm_to_every_rank_checkpoints_then_the_run_resumes_exactly(packed, tmp_path, one_node_of_two):
    """Each rank gets SIGTERM in step 5 (not a checkpoint step): both checkpoint at step 5 and exit
    143 with one line; the resumed run ends with the uninterrupted run's audit and weights."""
    log = tmp_path / "run"
    common = ["--epochs", "2", "--workers", "2", "--nproc-per-node", "2"]
    stopped = train_stream(packed, log, *common, CLIPSTREAM_FAILPOINT="term:step:5")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert checkpoint(log)["step"] == 5
    resumed = train_stream(packed, log, "--resume", str(log), "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for epoch in (0, 1):
        assert audit_lines(log, epoch) == audit_lines(one_node_of_two, epoch)
    assert same_weights(checkpoint(log), checkpoint(one_node_of_two))


def test_checkpoints_every_n_minutes(packed, tmp_path):
    """`--checkpoint-every-min` tiny: a checkpoint after every step, so a kill in step 7 leaves step 6's."""
    log = tmp_path / "run"
    done = train_stream(
        packed, log, "--epochs", "1", "--workers", "1", "--checkpoint-every-min", "1e-6", CLIPSTREAM_FAILPOINT="step:7"
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert checkpoint(log)["step"] == 6


def test_resume_reads_the_run_options(packed, tmp_path):
    """`--resume RUN_DIR` alone continues a 2-epoch tiny run as it was started (no --shards, no
    --model); a disagreeing option is one line naming it; more --epochs extend it."""
    log = tmp_path / "run"
    first = train_stream(packed, log, "--epochs", "2", "--workers", "1", "--max-steps", "14")
    assert first.returncode == 0, first.stderr[-3000:]
    wrong = run(cli_command("train_app") + ["--resume", str(log), "--model", "r3d18"])
    assert wrong.returncode == 2
    (line,) = wrong.stderr.strip().splitlines()
    assert "--model 'r3d18' disagrees with 'tiny'" in line and "leave --model out" in line
    again = run(cli_command("train_app") + ["--resume", str(log), "--no-progress"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint(log)["step"] == 24 and checkpoint(log)["epoch"] == 2  # 2 epochs, not the default 10
    more = run(cli_command("train_app") + ["--resume", str(log), "--epochs", "3", "--no-progress"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert checkpoint(log)["epoch"] == 3
    options = json.loads((log / "options-resume-2.json").read_text())["options"]
    assert options["epochs"] == 3 and options["model"] == "tiny"
