"""`ClipDataset`: the stream as a webdataset `DataPipeline` (a torch `IterableDataset`), for a plain
`DataLoader`, Lightning, the HF Trainer or any loop of one's own.

It follows ClipLoader's plan rules: per epoch the shards are shuffled with (seed, epoch), dealt to
ranks, then to the DataLoader's workers; every rank gets the same number of clips (or batches) from
the index, and a clip gets the same crop and flip in an epoch as ClipLoader gives it. A DataLoader
cannot merge its workers' last partial batches, so with `batch_size` each worker delivers whole
batches only, which can leave up to one batch per worker more unread than ClipLoader does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds

from pipeline.device import rank_and_world
from pipeline.errors import ShardFormatError, UserError
from pipeline.frames import training_positions
from pipeline.stream.clips import TrainClips, decode_sample
from pipeline.stream.passes import eval_clips, stream_config, test_samples, worker_samples
from pipeline.stream.plan import WorkerPlan, check_enough_shards, eval_plan, train_plan
from pipeline.stream.sources import resolve
from pipeline.stream.stages import Faults

log = logging.getLogger("clipstream")


@dataclasses.dataclass
class _Pass:
    """What one pass (epoch) of one worker reads; set by the first stage, read by the others."""

    epoch: int = 0
    rank: int = 0
    worker: int = 0
    plan: WorkerPlan | None = None
    by_key: bool = False
    """Testing with fewer test shards than ranks: keep only this rank's keys."""
    faults: Faults = dataclasses.field(default_factory=Faults)


class _PassState:
    """Shared by a ClipDataset and the copies its fluid methods make: the epoch set by `set_epoch`
    (in shared memory, so persistent DataLoader workers see it) and the current pass."""

    def __init__(self):
        self.epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        self.passes = 0
        self.current = _Pass()


class ClipDataset(wds.DataPipeline, wds.FluidInterface):
    """Clips of packed shards as a webdataset pipeline: our shard plan and tar reader as its first
    stages, then shuffling, decoding and cropping; webdataset's fluid methods (`.map`, `.select`,
    `.batched`, `.with_epoch`, ...) append stages of one's own.

    Yields {'key': str, 'frames': (T, crop, crop, 3) uint8 tensor, 'label': int, 'repeat': bool} per
    clip, or, with `batch_size=B`, whole batches {'key': list of B, 'frames': (B, T, crop, crop, 3)
    uint8, 'label': (B,) int64, 'repeat': (B,) bool, 'faults': list}. 'repeat' marks a clip given
    again to top the epoch up (`epoch_fill="pad"`: every clip once, then repeats, so that every rank
    gets the same number; `"drop"`: each rank's surplus left unread instead). Use it as `DataLoader(ds, batch_size=None, num_workers=W,
    persistent_workers=True)` and call `ds.set_epoch(e)` before each epoch (without it, each pass
    counts as the next epoch in every worker).

    `split="test"`: every test clip exactly once across all ranks and workers, centre-cropped, the
    last batch of each worker possibly short. Unreadable clips are counted as faults: in training
    replaced by the worker's previous good clip (counts stay as planned), in testing skipped.

    `shards` takes what train-stream's --shards takes: `<000..031>` or `{000..031}` ranges, lists,
    http(s) and s3:// URLs, a packed folder (local or s3://bucket/prefix/). Rank and world size
    default to torch.distributed's when it is initialised (create the dataset after
    `init_process_group`).
    """

    def __init__(
        self,
        shards,
        *,
        split: str = "train",
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **options,
    ):
        super().__init__()
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserError(f"`batch_size` must be None (single clips) or >= 1, got {batch_size!r}")
        if split not in ("train", "test"):
            raise UserError(f"`split` must be 'train' or 'test', got {split!r}")
        if options.get("crop", 112) is None and batch_size is not None:
            raise UserError(
                "`crop` None gives whole frames, whose sizes differ from clip to clip: leave `batch_size` None"
            )
        self.rank, self.world_size = rank_and_world(rank, world_size)
        # Single clips are planned as batches of one: every rank still gets the same number. The
        # DataLoader's workers are the workers here, and evaluation views are ClipLoader's.
        ignored = frozenset({"workers", "prefetch", "test_views"})
        self.cfg = stream_config(shards, "ClipDataset", ignored, batch_size=batch_size or 1, **options)
        self.split, self.batch_size = split, batch_size
        self.source = resolve(self.cfg.shards, split, self.cfg.index, self.cfg.allow_pipe)
        self.cfg.check_memory(self.source.frames, 1)  # each DataLoader worker builds its batches in memory of its own
        if split == "train":
            check_enough_shards(self.source.shards, self.cfg, self.world_size, 1)
        self.state = _PassState()
        self.pipeline = [
            # this pass's plan: which shards this rank and worker read, how many clips it delivers
            self._plan,
            # raw samples, read by our tar reader; a broken shard is a counted fault
            self._raw,
            # decoded, cropped and flipped (clip-consistent), one clip or one batch at a time
            self._decode,
        ]

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; a label is an index into them."""
        return self.source.classes

    @property
    def frames(self) -> int:
        """Frames per clip (T)."""
        return self.source.frames

    def set_epoch(self, epoch: int) -> None:
        """Plan the next pass as epoch `epoch` (shard order, shuffle, crops), in every worker."""
        if epoch < 0:
            raise UserError(f"`epoch` must be >= 0, got {epoch}")
        self.state.epoch[0] = epoch

    def _plan(self) -> Iterator[WorkerPlan]:
        """First stage. Runs when a pass begins, before the later stages read `state.current`."""
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        chosen = int(self.state.epoch[0])
        epoch = chosen if chosen >= 0 else self.state.passes
        self.state.passes += 1
        by_key = False
        if self.split == "train":
            check_enough_shards(self.source.shards, self.cfg, self.world_size, n_workers)
            plan = train_plan(
                self.source.shards, self.cfg, epoch, self.rank, self.world_size, n_workers, separate=True
            )[worker]
        else:
            per_worker, by_key = eval_plan(self.source.shards, n_workers, self.rank, self.world_size)
            plan = WorkerPlan(per_worker[worker] if worker < len(per_worker) else (), -1)
        self.state.current = _Pass(epoch, self.rank, worker, plan, by_key)
        return iter([plan])

    def _raw(self, plans: Iterator[WorkerPlan]) -> Iterator[dict]:
        now = self.state.current
        for plan in plans:
            if self.split == "train":
                yield from worker_samples(self.source, self.cfg, plan, now.epoch, now.rank, now.worker, now.faults)
                continue
            yield from test_samples(
                plan.shards, self.cfg.allow_pipe, now.faults, now.by_key, self.rank, self.world_size
            )

    def _decode(self, raw: Iterator[dict]) -> Iterator[dict]:
        now = self.state.current
        cfg, frames, classes = self.cfg, self.source.frames, len(self.source.classes)
        if cfg.crop is None:
            yield from self._whole_frames(raw, now)
            return
        shape = (self.batch_size or 1, frames, cfg.crop, cfg.crop, 3)
        if self.split == "train":
            clips = TrainClips(raw, cfg.crop, classes, cfg.seed, now.epoch, now.faults, cfg.temporal)
            for _ in range(now.plan.quota // shape[0]):
                rows = np.empty(shape, np.uint8)
                keys, labels, repeats = clips.fill(rows)
                yield self._output(rows, keys, labels, now.faults, repeats)
            return
        for rows, keys, labels, _ in eval_clips(
            raw, cfg.crop, classes, now.faults, lambda: (np.empty(shape, np.uint8),) * 2
        ):
            yield self._output(rows[: len(keys)], keys, labels, now.faults, [False] * len(keys))
        self._log(now.faults.take())

    def _output(
        self, rows: np.ndarray, keys: list[str], labels: list[int], faults: Faults, repeats: list[bool]
    ) -> dict:
        if self.batch_size is None:
            self._log(faults.take())
            return {"key": keys[0], "frames": torch.from_numpy(rows[0]), "label": labels[0], "repeat": repeats[0]}
        return {
            "key": keys,
            "frames": torch.from_numpy(rows),
            "label": torch.tensor(labels, dtype=torch.int64),
            "repeat": torch.tensor(repeats, dtype=torch.bool),
            "faults": faults.take(),
        }

    def _whole_frames(self, raw: Iterator[dict], now: _Pass) -> Iterator[dict]:
        """`crop=None`: each clip's T frames whole, (T, H, W, 3), chosen as in training (or view 0 in
        testing), no flip; an unreadable clip is logged and skipped."""
        cfg, frames, classes, scratch = self.cfg, self.source.frames, len(self.source.classes), {}
        for sample in raw:
            key = sample.get("__key__", "?")
            temporal = cfg.temporal if self.split == "train" else "fixed"
            choose = training_positions(temporal, frames, cfg.seed, now.epoch, key)
            try:
                label, clip = decode_sample(sample, None, classes, None, None, scratch, choose)
            except ShardFormatError as e:
                now.faults.add(f"{sample.get('__url__', '?')}:{key}", str(e))
                self._log(now.faults.take())
                continue
            yield {"key": key, "frames": torch.from_numpy(clip), "label": label, "repeat": "__repeat__" in sample}

    @staticmethod
    def _log(faults: list[dict]) -> None:
        for fault in faults:
            log.warning("clipstream: skipped %s: %s", fault["what"], fault["reason"])
