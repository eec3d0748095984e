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

from pipeline.device import known_rank_and_world, rank_and_world
from pipeline.errors import ShardFormatError, UserError
from pipeline.frames import training_positions
from pipeline.stream.clips import TrainClips, check_crop, decode_sample
from pipeline.stream.mix import check_mix, checked_epoch_shards, epoch_shards
from pipeline.stream.passes import eval_clips, shard_cache, stream_config, test_samples, worker_samples
from pipeline.stream.plan import WorkerPlan, eval_plan, train_plan
from pipeline.stream.sources import resolve, shard_name
from pipeline.stream.stages import Faults, skip_consumed
from pipeline.stream.workers import default_signals

log = logging.getLogger("clipstream")

MAX_WORKERS = 256
"""DataLoader workers a ClipDataset can follow the epochs of (one shared int64 each)."""


class ClipBatch(dict):
    """A batch built by ClipDataset (`batch_size` set): a plain dict, except that a DataLoader which
    batches it again (its default batch_size=1) stops with a clear error instead of yielding
    (1, B, T, H, W, 3) frames."""


def _collated_again(batch, *, collate_fn_map=None):
    raise UserError(
        f"a ClipDataset with `batch_size`={len(batch[0]['key'])} yields whole batches, and the DataLoader "
        f"batched {len(batch)} of them again: give the DataLoader batch_size=None"
    )


torch.utils.data._utils.collate.default_collate_fn_map[ClipBatch] = _collated_again


@dataclasses.dataclass
class _Pass:
    """What one pass (epoch) of one worker reads; set by the first stage, read by the others."""

    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    workers: int = 0
    """The DataLoader's num_workers (0: this process)."""
    plan: WorkerPlan | None = None
    by_key: bool = False
    """Testing with fewer test shards than ranks: keep only this rank's keys."""
    faults: Faults = dataclasses.field(default_factory=Faults)
    step: int = 0
    """Items (clips or batches) delivered in this pass, resumed ones included."""
    items: int = -1
    """Items the pass delivers in all (training), -1 unknown."""
    running: bool = False


class _PassState:
    """Shared by a ClipDataset and the copies its fluid methods make. `next[w]`: the epoch the next
    pass of DataLoader worker w plans, in shared memory, so that it lives on from one set of
    DataLoader workers to the next (non-persistent workers are forked or spawned again each epoch
    from the main process's copy) and `set_epoch` in the main process reaches persistent ones."""

    def __init__(self):
        self.next = torch.zeros(MAX_WORKERS, dtype=torch.int64).share_memory_()
        self.current = _Pass()
        self.resume: tuple[int, int] | None = None
        """(epoch, step) from load_state_dict, for this process's next pass."""
        self.signals_reset = False


class ClipDataset(wds.DataPipeline, wds.FluidInterface):
    """Clips of packed shards as a webdataset pipeline: our shard plan and tar reader as its first
    stages, then shuffling, decoding and cropping; webdataset's fluid methods (`.map`, `.select`,
    `.batched`, `.with_epoch`, ...) append stages of one's own.

    Yields {'key': str, 'frames': (T, crop, crop, 3) uint8 tensor, 'label': int, 'repeat': bool} per
    clip, or, with `batch_size=B`, whole batches {'key': list of B, 'frames': (B, T, crop, crop, 3)
    uint8, 'label': (B,) int64, 'repeat': (B,) bool, 'faults': list}. 'repeat' marks a clip given
    again to top the epoch up (`epoch_fill="pad"`: every clip once, then repeats, so that every rank
    gets the same number; `"drop"`: each rank's surplus left unread instead). Use it as
    `DataLoader(ds, batch_size=None, num_workers=W)`, or as torchdata's `StatefulDataLoader` for an
    exact mid-epoch resume: `state_dict()` / `load_state_dict()` follow its `Stateful` protocol in
    each worker. Each pass is the next epoch (persistent workers or not); `ds.set_epoch(e)` makes
    the next one epoch e. `len(ds)` is the items a rank gets per epoch; it needs `num_workers`, the
    DataLoader's (each of its workers delivers whole batches of its own).

    `split="test"`: every test clip exactly once across all ranks and workers, centre-cropped, the
    last batch of each worker possibly short. Unreadable clips are counted as faults: in training
    replaced by the worker's previous good clip (counts stay as planned), in testing skipped.

    `shards` takes what train-stream's --shards takes: `<000..031>` or `{000..031}` ranges, lists,
    http(s) and s3:// URLs, a packed folder (local or s3://bucket/prefix/). Rank and world size
    default to torch.distributed's, read when iteration starts (a dataset made before
    `init_process_group`, in a DataModule's __init__, is fine).
    """

    def __init__(
        self,
        shards,
        *,
        split: str = "train",
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int | None = None,
        **options,
    ):
        super().__init__()
        if num_workers is not None and (not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_WORKERS):
            raise UserError(
                f"`num_workers` must be None or the DataLoader's num_workers, 0..{MAX_WORKERS}, got {num_workers!r}"
            )
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserError(f"`batch_size` must be None (single clips) or >= 1, got {batch_size!r}")
        if split not in ("train", "test"):
            raise UserError(f"`split` must be 'train' or 'test', got {split!r}")
        if "crop" in options and options["crop"] is None and batch_size is not None:
            raise UserError(
                "`crop` None gives whole frames, whose sizes differ from clip to clip: leave `batch_size` None"
            )
        self._rank, self._world_size = rank, world_size
        self._frozen: tuple[int, int] | None = None
        known = known_rank_and_world(rank, world_size)
        # Single clips are planned as batches of one: every rank still gets the same number. The
        # DataLoader's workers are the workers here, and evaluation views are ClipLoader's.
        ignored = frozenset({"workers", "prefetch", "test_views"})
        self.cfg = stream_config(shards, "ClipDataset", ignored, batch_size=batch_size or 1, **options)
        self.split, self.batch_size, self.num_workers = split, batch_size, num_workers
        self.source = resolve(self.cfg.shards, split, self.cfg.index, self.cfg.allow_pipe)
        self.cfg.check_memory(self.source.frames, 1)  # each DataLoader worker builds its batches in memory of its own
        check_crop(self.cfg.crop, self.source)
        self.cache = shard_cache(self.cfg, self.source)
        if split == "train" and known is None:
            check_mix(self.source, self.cfg)  # the readers are known when the first pass plans
        elif split == "train":
            checked_epoch_shards(self.source, self.cfg, known[1], self.num_workers or 0)
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

    @property
    def rank(self) -> int:
        """This process's rank, as iteration would read it now."""
        return self._dist()[0]

    @property
    def world_size(self) -> int:
        return self._dist()[1]

    def _dist(self) -> tuple[int, int]:
        """Rank and world size, read when they are needed: the arguments, else torch.distributed's
        (a forked DataLoader worker inherits the parent's process group; a spawned one gets the
        values the parent had when it pickled the dataset)."""
        if self._frozen is not None and (self._rank is None or self._world_size is None):
            return self._frozen
        return rank_and_world(self._rank, self._world_size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # Pickled for a spawned DataLoader worker, where torch.distributed is not initialised: take
        # the parent's rank along (only when it is known for sure: copies made by the fluid methods
        # before init_process_group must still read it later).
        state["_frozen"] = self._frozen or known_rank_and_world(self._rank, self._world_size)
        return state

    def set_epoch(self, epoch: int) -> None:
        """Plan the next pass as epoch `epoch` (shard order, shuffle, crops), in every worker; the
        passes after it are the epochs after it."""
        if not isinstance(epoch, int) or epoch < 0:
            raise UserError(f"`epoch` must be a whole number >= 0, got {epoch!r}")
        self.state.next.fill_(epoch)
        self.state.resume = None

    def __len__(self) -> int:
        """Items (batches with `batch_size`, else clips) each rank gets in the next epoch, from the
        index: what `len(DataLoader(ds, batch_size=None))` and Lightning's totals read."""
        if self.split != "train":
            raise TypeError("a test-split ClipDataset has no planned length (each worker's last batch may be short)")
        if self.num_workers is None:
            raise TypeError(
                "len() of a ClipDataset needs `num_workers`, the DataLoader's: each worker delivers "
                "whole batches of its own, so the number of batches depends on it"
            )
        epoch = self.state.resume[0] if self.state.resume else int(self.state.next[0])
        return self._items(epoch, *self._dist(), max(1, self.num_workers))

    def _items(self, epoch: int, rank: int, world: int, n_workers: int, worker: int | None = None) -> int:
        shards = epoch_shards(self.source, self.cfg, epoch)
        plans = train_plan(shards, self.cfg, epoch, rank, world, n_workers, separate=True)
        if worker is not None:
            plans = plans[worker : worker + 1]
        return sum(p.quota for p in plans) // (self.batch_size or 1)

    # --- torchdata's Stateful protocol, called in each DataLoader worker ---------------------------

    def _plan_identity(self, workers: int) -> dict:
        cfg = self.cfg
        return {
            "seed": cfg.seed,
            "world_size": self._dist()[1],
            "workers": workers,
            "batch_size": self.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer,
            "resample": cfg.resample,
            "epoch_fill": cfg.epoch_fill,
            "temporal": cfg.temporal,
            "shards": [shard_name(s.url) for s in self.source.shards],
            **({} if cfg.weights is None else {"weights": list(cfg.weights), "packs": len(self.source.pack_indexes)}),
        }

    def state_dict(self) -> dict:
        """Where this worker (or, without DataLoader workers, this process) is: its next item is
        item `step` of its pass of epoch `epoch`. Numbers and strings only."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 0)
        now = self.state.current
        mine = now.running and now.worker == worker
        if mine and 0 <= now.items <= now.step:
            # Delivered all it plans (Lightning, knowing the length, never asks past the last
            # batch): a checkpoint taken now must resume at the next epoch, not at an empty rest.
            epoch, step = now.epoch + 1, 0
        elif mine:
            epoch, step = now.epoch, now.step
        elif self.state.resume is not None:
            epoch, step = self.state.resume
        else:
            epoch, step = int(self.state.next[worker]), 0
        return {"epoch": epoch, "step": step, "split": self.split, "plan": self._plan_identity(workers)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()` of the same worker): the next pass carries on
        with exactly the items an uninterrupted run would have delivered, without decoding the ones
        already delivered. A mid-epoch state needs the same plan (`ValueError` naming what changed)."""
        try:
            epoch, step, plan = int(state["epoch"]), int(state["step"]), state["plan"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a ClipDataset state: {state!r:.200}") from None
        if epoch < 0 or step < 0:
            raise ValueError(f"ClipDataset state at epoch {epoch}, step {step}")
        if step:
            info = torch.utils.data.get_worker_info()
            mine = self._plan_identity(info.num_workers if info is not None else 0)
            changed = sorted(k for k in mine if plan.get(k) != mine[k])
            if changed:
                raise ValueError(f"the state stopped mid-epoch; resuming it needs the same {', '.join(changed)}")
        self.state.resume = (epoch, step if self.split == "train" else 0)

    # --- the stages ------------------------------------------------------------------------------

    def _plan(self) -> Iterator[WorkerPlan]:
        """First stage. Runs when a pass begins, before the later stages read `state.current`."""
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and not self.state.signals_reset:
            default_signals()  # the trainer's SIGTERM handler must not keep this worker from exiting
            self.state.signals_reset = True
        if self.num_workers is not None and (info.num_workers if info is not None else 0) != self.num_workers:
            raise UserError(
                f"the ClipDataset was made for `num_workers`={self.num_workers}, the DataLoader has "
                f"num_workers={info.num_workers if info is not None else 0}: give both the same number"
            )
        if n_workers > MAX_WORKERS:
            raise UserError(f"a ClipDataset follows at most {MAX_WORKERS} DataLoader workers, got {n_workers}")
        rank, world = self._dist()
        state = self.state
        epoch, step = state.resume if state.resume is not None else (int(state.next[worker]), 0)
        state.resume = None
        state.next[worker] = epoch + 1
        by_key, items = False, -1
        if self.split == "train":
            shards = checked_epoch_shards(self.source, self.cfg, world, n_workers, epoch)
            plan = train_plan(shards, self.cfg, epoch, rank, world, n_workers, separate=True)[worker]
            items = plan.quota // (self.batch_size or 1)
        else:
            per_worker, by_key = eval_plan(self.source.shards, n_workers, rank, world)
            plan = WorkerPlan(per_worker[worker] if worker < len(per_worker) else (), -1)
        workers = info.num_workers if info is not None else 0
        state.current = _Pass(epoch, rank, world, worker, workers, plan, by_key, Faults(), step, items, True)
        return iter([plan])

    def _raw(self, plans: Iterator[WorkerPlan]) -> Iterator[dict]:
        now = self.state.current
        for plan in plans:
            if self.split == "train":
                samples = worker_samples(
                    self.source, self.cfg, plan, now.epoch, now.rank, now.worker, now.faults, self.cache
                )
                # On resume: drop what was already delivered, before decoding it.
                yield from skip_consumed(samples, now.step * (self.batch_size or 1))
                continue
            yield from test_samples(
                plan.shards, self.cfg.allow_pipe, now.faults, now.by_key, now.rank, now.world_size, self.cache
            )

    def _decode(self, raw: Iterator[dict]) -> Iterator[dict]:
        now = self.state.current
        cfg, frames, classes = self.cfg, self.source.frames, self.source.label_maps
        if cfg.crop is None:
            yield from self._whole_frames(raw, now)
            return
        shape = (self.batch_size or 1, frames, cfg.crop, cfg.crop, 3)
        if self.split == "train":
            clips = TrainClips(raw, cfg.crop, classes, cfg.seed, now.epoch, now.faults, cfg.temporal)
            while now.step < now.items:
                rows = np.empty(shape, np.uint8)
                keys, labels, repeats, packs = clips.fill(rows)
                now.step += 1
                yield self._output(rows, keys, labels, now.faults, repeats, packs)
            now.running = False
            return
        for rows, keys, labels, _, packs in eval_clips(
            raw, cfg.crop, classes, now.faults, lambda: (np.empty(shape, np.uint8),) * 2
        ):
            now.step += 1
            yield self._output(rows[: len(keys)], keys, labels, now.faults, [False] * len(keys), packs)
        now.running = False
        self._log(now.faults.take())

    def _output(
        self, rows: np.ndarray, keys: list[str], labels: list[int], faults: Faults, repeats: list[bool], packs
    ) -> dict:
        # frames first: accelerate (and others) read the batch size from a batch's first entry
        mixed = bool(self.source.packs)  # which pack a clip is from, when there are several
        if self.batch_size is None:
            self._log(faults.take())
            clip = {"frames": torch.from_numpy(rows[0]), "label": labels[0], "key": keys[0], "repeat": repeats[0]}
            return {**clip, "pack": packs[0]} if mixed else clip
        batch = ClipBatch(
            frames=torch.from_numpy(rows),
            label=torch.tensor(labels, dtype=torch.int64),
            key=keys,
            repeat=torch.tensor(repeats, dtype=torch.bool),
            faults=faults.take(),
        )
        if mixed:
            batch["pack"] = torch.tensor(packs, dtype=torch.int64)
        return batch

    def _whole_frames(self, raw: Iterator[dict], now: _Pass) -> Iterator[dict]:
        """`crop=None`: each clip's T frames whole, (T, H, W, 3), chosen as in training (or view 0 in
        testing), no flip; an unreadable clip is logged and skipped."""
        cfg, frames, classes, scratch = self.cfg, self.source.frames, self.source.label_maps, {}
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
            now.step += 1
            yield {"frames": torch.from_numpy(clip), "label": label, "key": key, "repeat": "__repeat__" in sample}
        now.running = False

    @staticmethod
    def _log(faults: list[dict]) -> None:
        for fault in faults:
            log.warning("clipstream: skipped %s: %s", fault["what"], fault["reason"])
