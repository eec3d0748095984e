"""The run folder (--log-dir): where it is, that it is writable and not another run's, and the record
of the options each start of the run used. Only global rank 0 writes in it, but every rank its own
faults log."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.errors import UserError
from pipeline.train.checkpoint import CHECKPOINT_NAME, resolve_checkpoint
from pipeline.train.collectives import broadcast_text

RUN_FILES = ("metrics.jsonl", CHECKPOINT_NAME, "options.json")
"""Files whose presence means a folder holds a run's output."""


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def default_log_dir(cfg: TrainConfig) -> str:
    """--log-dir, or the resumed run's folder, or a new runs/<timestamp>."""
    if cfg.log_dir:
        return cfg.log_dir
    if cfg.resume:
        path = Path(cfg.resume)
        return str(path if path.is_dir() else path.parent)
    stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    folder, n = stamp, 2
    while holds_run(folder):  # two runs started within one second
        folder, n = stamp.with_name(f"{stamp.name}-{n}"), n + 1
    return str(folder)


def check_run_folder(log_dir: str, resume: str | None) -> None:
    """A run folder is never mixed with another run's output (metrics appended to, a checkpoint
    overwritten) unless that run is the one being resumed."""
    folder = Path(log_dir)
    if not folder.is_dir() or not holds_run(folder):
        return
    if resume and Path(resolve_checkpoint(resume)).resolve().parent == folder.resolve():
        return
    what = "another run" if resume else "a run"
    raise UserError(
        f"the run folder {log_dir} already holds {what}; continue it with --resume {log_dir}, or pass a new `log_dir`"
    )


def check_log_dir(log_dir: str | None) -> None:
    """The run folder (or the nearest folder above it that exists) must be a writable folder."""
    if not log_dir:
        return
    probe = Path(log_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create the run folder {log_dir}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {log_dir}: {probe} is not writable")


def open_run_folder(cfg: TrainConfig, env: DistEnv, device: torch.device) -> Path:
    """Rank 0's choice of run folder, on every rank, made and its options recorded before any rank
    writes in it."""
    log_dir = Path(broadcast_text(default_log_dir(cfg), env, device))
    if env.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_options(log_dir, cfg, env)
    if env.world_size > 1:
        dist.barrier()
    return log_dir


def write_options(log_dir: Path, cfg: TrainConfig, env: DistEnv) -> Path:
    """Record what this run (or this resume of it) ran with: options.json, then options-resume-N.json."""
    path, n = log_dir / "options.json", 1
    while path.exists():
        path, n = log_dir / f"options-resume-{n}.json", n + 1
    from pipeline import __version__

    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clipstream": __version__,
        "command": sys.argv,
        "world_size": env.world_size,
        "options": dataclasses.asdict(cfg),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


class Metrics:
    """metrics.jsonl, appended to by rank 0 (the other ranks' records go nowhere): one JSON line a
    record, flushed, so a crash loses at most the line being written."""

    def __init__(self, log_dir: Path, env: DistEnv):
        self.path = log_dir / "metrics.jsonl"
        self._file = open(self.path, "a") if env.rank == 0 else None

    def record(self, kind: str, **fields) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"kind": kind, **fields}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Audit:
    """--audit-keys: audit/epoch-NNN-rank-R.txt, the sample keys this rank consumed in an epoch, one a
    line. A resume keeps the lines of the steps taken before its checkpoint and writes on from there."""

    def __init__(self, log_dir: Path, epoch: int, rank: int, kept_lines: int):
        path = log_dir / "audit" / f"epoch-{epoch:03d}-rank-{rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = path.read_text().splitlines()[:kept_lines] if kept_lines and path.exists() else []
        self._file = open(path, "w")
        self._file.write("".join(k + "\n" for k in kept))

    def write(self, keys: list[str], repeats: list[bool]) -> None:
        # a repeat (--epoch-fill pad topping the epoch up) is marked, so each clip's first use stands alone
        self._file.write("".join(k + ("\trepeat\n" if r else "\n") for k, r in zip(keys, repeats)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
