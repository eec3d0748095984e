"""The edge of a training run: `launch` checks everything a user can get wrong before any process
starts (`prepare`), then runs `train` here (one process, or one rank of a torchrun job) or in
`--nproc-per-node` local processes it starts itself (torch elastic, c10d rendezvous), and turns their
failures and signals into one line."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import tempfile
import uuid
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.errors import (
    Stopped,
    UserError,
)
from pipeline.stream.mix import checked_epoch_shards
from pipeline.train.checkpoint import resolve_checkpoint
from pipeline.train.data import RunData, resolve_data, with_workers
from pipeline.train.loop import train
from pipeline.train.resuming import AUTO, resolve_auto
from pipeline.train.runfolder import check_log_dir, check_run_folder, default_log_dir


def prepare(cfg: TrainConfig, world_size: int, local_world_size: int) -> RunData:
    """Check everything a user can get wrong before any process starts: shards, index, model name."""
    data = resolve_data(cfg.stream)
    cfg = with_workers(cfg, len(data.train.shards), world_size, local_world_size)
    cfg.stream.check_memory(data.train.frames, cfg.stream.workers)  # T is known from here
    checked_epoch_shards(data.train, cfg.stream, world_size, cfg.stream.workers)
    from pipeline.train.models import MODEL_NAMES, build_model

    if cfg.model not in MODEL_NAMES:
        build_model(cfg.model, len(data.train.classes))  # UserError for unknown names
    resume = resolve_auto(cfg.resume, cfg.log_dir)
    if resume and not Path(resolve_checkpoint(resume)).is_file():
        raise UserError(f"no checkpoint at {resume!r}")
    check_log_dir(cfg.log_dir)
    if cfg.resume != AUTO:  # `auto` runs in its own folder, whatever an earlier attempt left there
        check_run_folder(default_log_dir(cfg), resume)
    return data


def launch(cfg: TrainConfig) -> dict | None:
    """Run `train` here, or in `cfg.nproc_per_node` local processes (torch elastic, c10d rendezvous).

    Returns rank 0's summary.
    """
    env = DistEnv.from_env()
    if cfg.nproc_per_node == 1:
        prepare(cfg, env.world_size, env.local_world_size)
        return train(cfg, env)
    if env.world_size > 1:
        raise UserError("--nproc-per-node starts its own processes; under torchrun leave it at 1")
    nproc = cfg.nproc_per_node
    prepare(cfg, nproc, nproc)
    # Decided once here, so that every process writes to the same run folder.
    cfg = dataclasses.replace(cfg, log_dir=default_log_dir(cfg), nproc_per_node=1)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    # A rank that stops on a UserError leaves its message in `errors` for this process to print as the
    # run's one line; torch elastic's own failure reports (a traceback of the launcher) are muted.
    muted = [
        logging.getLogger(n)
        for n in (
            "torch.distributed.elastic.multiprocessing.api",
            "torch.multiprocessing.spawn",
            "torch.distributed.elastic.agent.server.api",
        )
    ]
    levels = [m.level for m in muted]
    with tempfile.TemporaryDirectory(prefix="clipstream-errors-") as errors:
        try:
            for m in muted:
                m.setLevel(logging.CRITICAL)
            results = elastic_launch(config, _launched)(cfg, errors)
        except SignalException as e:
            # torch elastic turns Ctrl-C (SIGINT) and SIGTERM into this, with a launcher traceback;
            # it has stopped the ranks by then. Ctrl-C is `interrupted` and exit code 130, as in
            # one process.
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise Stopped(f"stopped by {signal.Signals(e.sigval).name}", 128 + int(e.sigval)) from None
        except ChildFailedError as e:
            messages = sorted(Path(errors).glob("rank-*.txt"))
            codes = {f.exitcode for f in e.failures.values()}
            if messages and codes == {143}:  # every rank checkpointed on SIGTERM, then stopped
                raise Stopped(messages[0].read_text(), 143) from None
            if messages:
                raise UserError(messages[0].read_text()) from None
            ranks = ", ".join(f"{r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
            raise UserError(f"training failed on rank {ranks} (see the messages above)") from None
        finally:
            for m, level in zip(muted, levels):
                m.setLevel(level)
    return results.get(0)


def _stop_quietly(signum, frame) -> None:
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # the second signal (terminal, then launcher) must not cut the unwinding short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    raise SystemExit(128 + signum)


def _launched(cfg: TrainConfig, errors: str) -> dict:
    """Entry point of each process started by `launch`."""
    # Ctrl-C reaches every process of the terminal's group, and the launcher passes the signal on to
    # the ranks too: a rank unwinds once (its loader workers and their semaphores closed), quietly,
    # since an interrupted collective or loader would print a traceback the launcher's one line is
    # there to replace.
    signal.signal(signal.SIGINT, _stop_quietly)
    signal.signal(signal.SIGTERM, _stop_quietly)
    env = DistEnv.from_env()
    try:
        return train(cfg, env)
    except UserError as e:
        (Path(errors) / f"rank-{env.rank}.txt").write_text(str(e))
        raise SystemExit(getattr(e, "exit_code", 2)) from None
