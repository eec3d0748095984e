"""Test helpers for the framework examples (tests/test_examples.py runs them).

`check_lightning_resume`: examples/train_lightning.py on 1 device or under DDP (2 processes, gloo),
killed mid-epoch (SIGKILL right after a checkpoint) and resumed from Lightning's checkpoint in a new
process, for either route (a ClipLoader, a StatefulDataLoader over a ClipDataset): the steps' keys
equal an uninterrupted pass over the same loaders, every training clip comes once per epoch, epochs
differ in order, validation sees every test clip once, and the resumed process exits by itself soon
after `fit` returns (no loader is closed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, cli_env
from shardmaker import shard_keys
from torch.utils.data import DataLoader

from pipeline import ClipDataset, ClipLoader

EXAMPLE = REPO / "examples" / "train_lightning.py"
ARGS = dict(batch_size=4, crop=24, seed=0)
EPOCHS = 2


def _reference(packed: Path, route: str, rank: int, world: int, workers: int) -> list[list[str]]:
    """Each step's keys over EPOCHS uninterrupted epochs of `rank`, outside Lightning."""
    if route == "cliploader":
        with ClipLoader(packed, workers=workers, rank=rank, world_size=world, **ARGS) as loader:
            return [b["key"] for e in range(EPOCHS) for b in loader.epoch(e)]
    dataset = ClipDataset(packed, num_workers=workers, rank=rank, world_size=world, **ARGS)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [b["key"] for _ in range(EPOCHS) for b in loader]  # each pass is the next epoch


def _run(packed: Path, tmp: Path, route: str, devices: int, workers: int, *extra) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXAMPLE), str(packed), "--route", route, "--devices", str(devices)]
    command += ["--crop", "24", "--batch-size", "4", "--workers", str(workers), "--epochs", str(EPOCHS)]
    command += ["--checkpoint", str(tmp / "mid.ckpt"), *map(str, extra)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=240, cwd=tmp, env=cli_env(OMP_NUM_THREADS="1")
    )


def _records(folder: Path, kind: str, rank: int) -> list[dict]:
    path = folder / f"{kind}-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_lightning_resume(packed: Path, tmp_path: Path, route: str, devices: int) -> None:
    workers = 2 if devices == 1 else 1
    reference = [_reference(packed, route, r, devices, workers) for r in range(devices)]
    per_epoch = len(reference[0]) // EPOCHS
    stop = per_epoch + per_epoch // 2  # inside epoch 1: a resume there must not replay epoch 0's order

    # under DDP the loaders are made before the process group exists (--early): each rank must
    # still read only its share
    early = ["--early"] if devices > 1 else []
    killed = _run(
        packed, tmp_path, route, devices, workers, *early, "--stop-at-step", stop, "--record", tmp_path / "head"
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _run(
        packed,
        tmp_path,
        route,
        devices,
        workers,
        *early,
        "--resume",
        tmp_path / "mid.ckpt",
        "--record",
        tmp_path / "tail",
    )
    exited = time.time()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    line = re.search(r"train_lightning: .*", resumed.stdout).group(0)
    out = dict(re.findall(r"(\w+)=(\S+)", line))
    assert int(out["steps"]) == EPOCHS * per_epoch
    assert exited - float(out["fit_returned"]) < 60, "the process did not exit by itself after fit returned"

    train_keys = {k for name in (f"{i:03d}.tar" for i in range(8)) for k in shard_keys(packed / name)}
    test_keys = sorted(k for name in ("test-000.tar", "test-001.tar") for k in shard_keys(packed / name))
    for rank in range(devices):
        head = [r["keys"] for r in _records(tmp_path / "head", "train", rank)]
        tail = _records(tmp_path / "tail", "train", rank)
        assert len(head) == stop and [r["step"] for r in tail] == list(range(stop, EPOCHS * per_epoch))
        assert head + [r["keys"] for r in tail] == reference[rank]
    for epoch in range(EPOCHS):
        steps = [reference[r][epoch * per_epoch : (epoch + 1) * per_epoch] for r in range(devices)]
        used = [k for rank_steps in steps for keys in rank_steps for k in keys]
        assert sorted(used) == sorted(train_keys), f"epoch {epoch}: not every training clip exactly once"
    orders = [[k for keys in reference[0][e * per_epoch : (e + 1) * per_epoch] for k in keys] for e in range(EPOCHS)]
    assert orders[0] != orders[1]
    # validation after each epoch of the resumed run (only epoch 1 ends in it): every test clip once
    validated = [k for rank in range(devices) for r in _records(tmp_path / "tail", "val", rank) for k in r["keys"]]
    assert sorted(validated) == test_keys
