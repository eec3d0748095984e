"""The run folder (--log-dir): where it is, that it is writable and not another run's, and the record
of the options each start of the run used. Only global rank 0 writes in it, but every rank its own
faults log."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.durable import FolderLock, holder_text, open_append, open_new
from pipeline.errors import UserError
from pipeline.redact import redact_all
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


LOCK_NAME = ".lock"
"""Held (flock) by the rank 0 that writes the run folder, for as long as it runs."""


def open_run_folder(cfg: TrainConfig, env: DistEnv, device: torch.device, held: contextlib.ExitStack) -> Path:
    """Rank 0's choice of run folder, on every rank, made, locked by rank 0 until `held` closes (see
    `lock_run_folder`) and its options recorded before any rank writes in it."""
    log_dir = Path(broadcast_text(default_log_dir(cfg), env, device))
    if env.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        held.callback(lock_run_folder(log_dir).release)
        write_options(log_dir, cfg, env)
    if env.world_size > 1:
        dist.barrier()
    return log_dir


def lock_run_folder(log_dir: Path) -> FolderLock:
    """One writer a run folder: a second `--resume` of a run still going (or a new run given its
    folder) would mix its metrics and audit logs with the first's and delete its checkpoint temp."""
    return FolderLock(
        log_dir / LOCK_NAME,
        lambda holder: (
            f"the run folder {log_dir} is in use by {holder_text(holder)} ({holder.get('command', '?')}); "
            "wait for that run to end, or pass another `log_dir`"
        ),
    )


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
    # redacted: a pre-signed shard URL's signature and a user:password@ never reach the file
    text = json.dumps(redact_all(json.loads(json.dumps(record, default=str))), indent=1) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    with open_new(tmp) as f:
        f.write(text.encode("utf-8", "surrogateescape"))
    os.replace(tmp, path)
    return path


class Metrics:
    """metrics.jsonl, appended to by rank 0 (the other ranks' records go nowhere): one JSON line a
    record, flushed, so a crash loses at most the line being written."""

    def __init__(self, log_dir: Path, env: DistEnv):
        self.path = log_dir / "metrics.jsonl"
        self._file = None
        if env.rank == 0:
            drop_torn_line(self.path)
            self._file = open_append(self.path)

    def record(self, kind: str, **fields) -> None:
        if self._file is not None:
            self._file.write(json_line({"kind": kind, **fields}))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def json_line(record: dict) -> str:
    """One line of strict JSON: a NaN or infinity (not JSON; plot-run and pandas would refuse the
    file) is written as null."""

    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(record), allow_nan=False) + "\n"


def drop_torn_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last whole line: a process killed mid-line leaves a torn
    one, which a resume would otherwise append to, making the file unreadable from then on."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if not size:
                return
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            start = max(0, size - (1 << 20))
            f.seek(start)
            tail = f.read()
            cut = tail.rfind(b"\n")
            f.truncate(start + cut + 1 if cut >= 0 else (0 if start == 0 else size))
    except FileNotFoundError:
        pass


def trim_audits(log_dir: Path, epoch: int, history: tuple, world_size: int) -> None:
    """An epoch resumed on fewer ranks: the audit files of the ranks that are gone keep the lines of
    the steps before the checkpoint, no more (each rank that goes on trims its own, see Audit)."""
    from pipeline.stream.reshard import audit_lines_kept

    for path in sorted((log_dir / "audit").glob(f"epoch-{epoch:03d}-rank-*.txt")):
        rank = int(path.stem.rsplit("-", 1)[1])
        if rank >= world_size:
            kept = path.read_text().splitlines()[: audit_lines_kept(history, rank)]
            path.write_text("".join(k + "\n" for k in kept))


class Audit:
    """--audit-keys: audit/epoch-NNN-rank-R.txt, the sample keys this rank consumed in an epoch, one a
    line. A resume keeps the lines of the steps taken before its checkpoint and writes on from there."""

    def __init__(self, log_dir: Path, epoch: int, rank: int, kept_lines: int):
        path = log_dir / "audit" / f"epoch-{epoch:03d}-rank-{rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = path.read_text().splitlines()[:kept_lines] if kept_lines and path.exists() else []
        self._file = open(path, "w")
        self._file.write("".join(k + "\n" for k in kept))

    def write(self, keys: list[str], repeats: list[bool], packs: list[int] | None = None) -> None:
        # a repeat (--epoch-fill pad topping the epoch up) is marked, so each clip's first use stands alone;
        # in a mix of packs each key is prefixed with its pack's number (`1:<key>`; keys hold no colon)
        named = keys if packs is None else [f"{p}:{k}" for p, k in zip(packs, keys)]
        self._file.write("".join(k + ("\trepeat\n" if r else "\n") for k, r in zip(named, repeats)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
