"""Test helpers around the stream: one rank's loader or evaluation pass from a resolved run."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import StreamConfig
from pipeline.stream.loader import ClipLoader
from pipeline.train.data import RunData, resolve_data


def resolve(cfg: StreamConfig) -> RunData:
    return resolve_data(cfg)


def train_loader(
    data: RunData,
    cfg: StreamConfig,
    rank: int = 0,
    world: int = 1,
    start_epoch: int = 0,
    start_step: int = 0,
    *,
    epochs=None,
    copy=False,
    start_method=None,
    pin_memory=False,
) -> ClipLoader:
    """A ClipLoader over the run's training shards, positioned at (start_epoch, start_step)."""
    loader = ClipLoader.from_config(
        data.train, cfg, rank, world, epochs=epochs, copy=copy, start_method=start_method, pin_memory=pin_memory
    )
    if start_epoch or start_step:
        loader.load_state_dict({**loader.state_dict(), "epoch": start_epoch, "step": start_step})
    return loader


def eval_batches(data: RunData, cfg: StreamConfig, rank: int = 0, world: int = 1, copy: bool = False):
    """One evaluation pass of `rank` over the run's test shards."""
    return ClipLoader.from_config(data.test, cfg, rank, world, split="test", copy=copy).epoch(0)


def cfg_for(folder: Path, **kw) -> StreamConfig:
    kw = {"batch_size": 4, "workers": 2, "crop": 24, "shuffle_buffer": 8, **kw}
    return StreamConfig(shards=(f"{folder}/<000..007>.tar",), **kw)


def epoch_batches(ds, cfg, epoch, rank, world, start_step=0, start_method=None):
    """One epoch of one rank from a fresh TrainLoader (batches copied out of the workers' slots)."""
    with train_loader(
        ds, cfg, rank, world, epoch, start_step, epochs=epoch + 1, copy=True, start_method=start_method
    ) as loader:
        return list(loader.epoch(epoch))
