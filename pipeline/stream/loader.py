"""`ClipLoader`: the fast loader, one rank's batches from persistent worker processes.

The workers (pipeline/stream/workers.py) live for the whole run: no re-forking and no refilled
shuffle buffers at epoch boundaries; they run into the next epoch as soon as their slots free up,
and decode every clip straight into a shared-memory batch slot. Which worker's clips make each step
is the plan's `step_schedule`, so `state_dict()` is two numbers and a resume is exact.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch

from pipeline.config import StreamConfig
from pipeline.device import cores_per_rank, known_rank_and_world, rank_and_world
from pipeline.errors import UserError, WorkerGaveUp
from pipeline.stream.clips import TrainClips, check_crop
from pipeline.stream.mix import checked_epoch_shards, epoch_shards
from pipeline.stream.passes import (
    eval_clips,
    part_samples,
    shard_cache,
    stream_config,
    test_samples,
    worker_samples,
)
from pipeline.stream.plan import (
    WorkerPlan,
    auto_workers,
    eval_plan,
    step_schedule,
    train_plan,
    worker_parts,
)
from pipeline.stream.reshard import TOPOLOGY_KEYS, Part, Segment, segment_parts
from pipeline.stream.sources import ShardSet, changed_content, content_of, resolve, shard_name
from pipeline.stream.stages import Faults, skip_consumed
from pipeline.stream.workers import Closing


@dataclasses.dataclass(frozen=True)
class TrainProducer:
    """What loader worker `w` of one rank runs: epoch after epoch, its parts of every step of the
    schedule, each decoded into a free slot of its ring. Picklable (plain fields)."""

    source: ShardSet
    cfg: StreamConfig
    rank: int
    world_size: int
    n_workers: int
    start_epoch: int = 0
    start_step: int = 0
    epochs: int | None = None
    """Stop after this epoch number; None: for ever."""
    segment: int = 0
    """The start epoch's segment (see stream/reshard.py): 0, or later when it was resumed on another topology."""
    parts: tuple[Part, ...] = ()
    """This rank's Parts of the start epoch's segment when `segment` > 0."""
    stop_at_max_bad: bool = False
    """Stop as soon as this worker alone meets more unreadable clips than cfg.max_bad allows its
    rank in the epoch (train-stream; see stages.Faults)."""
    cache: object = None
    """The node's cache of remote shards (storage.cache.ShardCache), or None."""

    def faults(self, epoch: int, steps: int) -> Faults:
        if not self.stop_at_max_bad:
            return Faults()
        budget = f"in epoch {epoch + 1}, more than --max-bad {self.cfg.max_bad:g} allows"
        return Faults(self.cfg.bad_limit(steps * self.cfg.batch_size), budget)

    def schedule(self, epoch: int) -> tuple[list[WorkerPlan | Part], list[list[tuple[int, int]]]]:
        if self.segment and epoch == self.start_epoch:
            plans = list(self.parts)
        else:
            shards = epoch_shards(self.source, self.cfg, epoch)
            plans = train_plan(shards, self.cfg, epoch, self.rank, self.world_size, self.n_workers)
        return plans, step_schedule([p.quota for p in plans], self.cfg.batch_size)

    def samples(self, plans: list, epoch: int, worker: int, faults: Faults) -> Iterator[dict]:
        if self.segment and epoch == self.start_epoch:
            return part_samples(
                self.source, self.cfg, plans[worker], epoch, self.rank, worker, self.segment, faults, self.cache
            )
        return worker_samples(self.source, self.cfg, plans[worker], epoch, self.rank, worker, faults, self.cache)

    def first_step(self, epoch: int) -> int:
        return self.start_step if epoch == self.start_epoch else 0

    def __call__(self, worker: int, ring) -> Iterator[dict]:
        epochs = itertools.count(self.start_epoch) if self.epochs is None else range(self.start_epoch, self.epochs)
        faults = Faults()
        try:
            for epoch in epochs:
                plans, schedule = self.schedule(epoch)
                skip, sizes = worker_parts(schedule, worker, self.first_step(epoch))
                if not sizes:
                    continue
                faults = self.faults(epoch, len(schedule))
                # On resume: drop what was already trained on, before decoding it.
                src = skip_consumed(self.samples(plans, epoch, worker, faults), skip)
                clips = TrainClips(
                    src, self.cfg.crop, self.source.label_maps, self.cfg.seed, epoch, faults, self.cfg.temporal
                )
                for n in sizes:
                    slot, rows = ring.take()
                    keys, labels, repeats, packs = clips.fill(rows[:n])
                    yield {
                        "slot": slot,
                        "n": n,
                        "epoch": epoch,
                        "key": keys,
                        "label": labels,
                        "repeat": repeats,
                        "pack": packs,
                        "faults": faults.take(),
                    }
        except UserError as e:
            yield {"fatal": str(e), "faults": faults.take()}  # the bad clips behind it, for the faults log


@dataclasses.dataclass(frozen=True)
class EvalProducer:
    """What evaluation worker `w` runs: its test shards once, centre-cropped clips in batch slots."""

    source: ShardSet
    cfg: StreamConfig
    rank: int
    world_size: int
    per_worker: tuple[tuple, ...]
    by_key: bool
    cache: object = None
    """The node's cache of remote shards (storage.cache.ShardCache), or None."""

    def __call__(self, worker: int, ring) -> Iterator[dict]:
        faults = Faults()
        raw = test_samples(
            self.per_worker[worker], self.cfg.allow_pipe, faults, self.by_key, self.rank, self.world_size, self.cache
        )
        for slot, keys, labels, views, packs in eval_clips(
            raw, self.cfg.crop, self.source.label_maps, faults, ring.take, self.cfg.test_views
        ):
            yield {
                "slot": slot, "n": len(keys), "key": keys, "label": labels, "view": views, "pack": packs,
                "faults": faults.take(),
            }  # fmt: skip
        if faults.pending:
            yield {"n": 0, "key": [], "label": [], "pack": [], "faults": faults.take()}


# ---------------------------------------------------------------------------------------------
# The loader


class ClipLoader(Closing):
    """One rank's batches of clips from persistent loader workers, epoch after epoch.

    `for batch in loader.epoch(e)` yields the batches of epoch e: 'frames' (B, T, crop, crop, 3)
    uint8, 'label' (B,) int64, 'key' list of B str, 'worker' (B,) int64 (which worker read each clip),
    'repeat' (B,) bool (a clip delivered again to fill the epoch's last batches, `epoch_fill="pad"`)
    and 'faults' (unreadable clips replaced since the last batch: {'what', 'reason', 'samples'}).
    Every rank gets the same number of batches (`len(loader)`, from the index). Epochs must be asked
    for in order; `state_dict()` / `load_state_dict()` resume mid-epoch exactly.

    `split="test"`: each `epoch()` is one pass over this rank's share of the test clips (every clip
    exactly once across ranks), centre-cropped; the last batch of each worker may be short, and a
    batch that only reports faults has 'frames' None.

    `copy=True` (default): every batch is a tensor of its own, valid for ever (Lightning-style loops
    that fetch one batch ahead need this). `copy=False`: a batch is a view of a worker's shared
    slot, valid until the next batch is asked for (saves one copy a batch). `pin_memory`: a
    background thread copies each batch into pinned memory for non-blocking copies to this rank's GPU.
    Workers start with the first epoch asked for and stop on `close()` (or the `with` block's end).

    Rank and world size default to torch.distributed's, read when they are first needed (the first
    epoch, `len()`, `state_dict()`), so a loader made before `init_process_group` (in a Lightning
    DataModule's __init__) still gets its rank. `workers=None`: a core each (one core left to the
    trainer), at most 8, and in training at most shards / ranks.
    """

    stop_at_max_bad = False
    """See from_config: library users get the faults in their batches and decide themselves."""

    def __init__(
        self,
        shards,
        *,
        split: str = "train",
        rank: int | None = None,
        world_size: int | None = None,
        pin_memory: bool = False,
        copy: bool = True,
        epochs: int | None = None,
        **options,
    ):
        if "crop" in options and options["crop"] is None:
            raise UserError(
                "`crop` None (whole frames) is for ClipDataset with single clips: ClipLoader batches need one size"
            )
        cfg = stream_config(shards, "ClipLoader", **options)
        source = resolve(cfg.shards, split, cfg.index, cfg.allow_pipe)
        self._setup(source, cfg, split, rank, world_size, pin_memory, copy, epochs, None)

    @classmethod
    def from_config(
        cls,
        source: ShardSet,
        cfg: StreamConfig,
        rank: int,
        world_size: int,
        *,
        split: str = "train",
        pin_memory: bool = False,
        copy: bool = True,
        epochs: int | None = None,
        start_method: str | None = None,
        stop_at_max_bad: bool = False,
    ) -> ClipLoader:
        """A loader over already resolved shards (what train-stream and bench-stream use).
        `stop_at_max_bad`: a worker stops (WorkerGaveUp) as soon as its own unreadable clips pass
        `cfg.max_bad`, rather than at its next batch (train-stream's fail-fast)."""
        loader = cls.__new__(cls)
        loader.stop_at_max_bad = stop_at_max_bad
        loader._setup(source, cfg, split, rank, world_size, pin_memory, copy, epochs, start_method)
        return loader

    def _setup(self, source, cfg, split, rank, world_size, pin_memory, copy, epochs, start_method) -> None:
        if split not in ("train", "test"):
            raise UserError(f"`split` must be 'train' or 'test', got {split!r}")
        self.source, self.split = source, split
        self.pin_memory, self.copy, self.epochs, self.start_method = pin_memory, copy, epochs, start_method
        self._asked = (cfg, rank, world_size)
        if known_rank_and_world(rank, world_size) is not None:
            self._place()
        else:  # at least one worker's buffers, before the rank (and so `workers=None`) is known
            cfg.check_memory(source.frames, max(1, cfg.workers or 0))
        check_crop(cfg.crop, source)
        self.cache = shard_cache(cfg, source)
        self.pool = None
        self.merged: torch.Tensor | None = None
        self.position = (0, 0)
        self._ticket = 0
        """(epoch, step) of the next batch to deliver; the step counts within the epoch's segment."""
        self.history: tuple[Segment, ...] = ()
        """The segments of epoch `history_epoch` run before on other topologies (see stream/reshard.py)."""
        self.history_epoch = -1
        self._parts: tuple[Part, ...] | None = None

    def _place(self, freeze: bool = True) -> dict:
        """Rank, world size and the workers that follow from them (`workers=None`), checked; kept
        once they are known for sure (given, or torch.distributed initialised, or the workers
        started), else worked out again at each use."""
        cfg, rank, world_size = self._asked
        rank, world_size = rank_and_world(rank, world_size)
        if cfg.workers is None:
            test = cfg.resample or self.split == "test"
            cfg = dataclasses.replace(
                cfg, workers=auto_workers(len(self.source.shards), world_size, cores_per_rank(), test)
            )
        n_workers = max(1, cfg.workers or 0)
        cfg.check_memory(self.source.frames, n_workers)  # before any buffer is allocated
        if self.split == "train":
            checked_epoch_shards(self.source, cfg, world_size, n_workers)
        placed = {"cfg": cfg, "rank": rank, "world_size": world_size, "n_workers": n_workers}
        if freeze:
            self.__dict__.update(placed)
        return placed

    def __getattr__(self, name: str):
        # cfg, rank, world_size and n_workers before they are known for sure (see _place)
        if name in ("cfg", "rank", "world_size", "n_workers") and "_asked" in self.__dict__:
            return self._place(freeze=known_rank_and_world(*self._asked[1:]) is not None)[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names; a label is an index into them."""
        return self.source.classes

    @property
    def frames(self) -> int:
        """Frames per clip (T)."""
        return self.source.frames

    @property
    def views(self) -> int:
        """Rows a test clip takes: K x C evaluation views (1 in training)."""
        return 1 if self.split == "train" else self.cfg.test_views[0] * self.cfg.test_views[1]

    @property
    def slot_shape(self) -> tuple[int, ...]:
        return (self.cfg.batch_size, self.source.frames, self.cfg.crop, self.cfg.crop, 3)

    def steps(self, epoch: int) -> int:
        """Batches this rank (and every rank) gets in `epoch` (training)."""
        if self.split != "train":
            raise TypeError(
                "a test-split ClipLoader has no planned number of batches (each worker's last batch may be short)"
            )
        parts = self._segment_parts(epoch)
        if parts is None:
            shards = epoch_shards(self.source, self.cfg, epoch)
            parts = train_plan(shards, self.cfg, epoch, self.rank, self.world_size, self.n_workers)
        return sum(p.quota for p in parts) // self.cfg.batch_size

    def _segment_parts(self, epoch: int) -> tuple[Part, ...] | None:
        """This rank's Parts of `epoch` when it continues on this topology after others; else None."""
        if not self.history or epoch != self.history_epoch:
            return None
        if self._parts is None:
            counts = [s.samples for s in epoch_shards(self.source, self.cfg, epoch)]
            me = Segment(self.world_size, self.n_workers, self.cfg.batch_size, 0)
            self._parts = tuple(segment_parts(counts, self.cfg, epoch, self.history, me)[self.rank])
        return self._parts

    def __len__(self) -> int:
        return self.steps(self._next()[0])

    def __iter__(self) -> Iterator[dict]:
        return self.epoch(self._next()[0])

    # --- state ---------------------------------------------------------------------------------

    def _plan_identity(self) -> dict:
        cfg = self.cfg
        return {
            "seed": cfg.seed,
            "world_size": self.world_size,
            "workers": self.n_workers,
            "batch_size": cfg.batch_size,
            "shuffle_buffer": cfg.shuffle_buffer,
            "resample": cfg.resample,
            "epoch_fill": cfg.epoch_fill,
            "temporal": cfg.temporal,
            "shards": [shard_name(s.url) for s in self.source.shards],
            **({} if cfg.weights is None else {"weights": list(cfg.weights), "packs": len(self.source.pack_indexes)}),
        }

    def _next(self) -> tuple[int, int]:
        """(epoch, step) of the next batch to deliver, an epoch taken to its last batch counted as done."""
        epoch, step = self.position
        if step and step >= self.steps(epoch):
            return epoch + 1, 0
        return epoch, step

    def state_dict(self) -> dict:
        """Where this loader is: the next batch to deliver is batch `step` of epoch `epoch` (the same
        on every rank), with the plan it was computed from."""
        epoch, step = self._next()
        segments = [s.as_dict() for s in self.history] if epoch == self.history_epoch else []
        return {
            "epoch": epoch,
            "step": step,
            "plan": self._plan_identity(),
            "segments": segments,
            "content": content_of(self.source.shards),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict()`). On the same plan the next batches are exactly
        those an uninterrupted run would have delivered, clips, order, crops and flips alike. A
        mid-epoch state from another world size, worker count or batch size continues the epoch with
        exactly the clips it has not used, dealt over this loader's ranks and workers (see
        stream/reshard.py); the rest of the plan (seed, shuffle buffer, shards, ...) must be the same."""
        try:
            epoch, step, plan = int(state["epoch"]), int(state["step"]), state["plan"]
            segments = tuple(Segment.from_dict(d) for d in state.get("segments") or ())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"not a ClipLoader state: {state!r:.200}") from None
        if epoch < 0 or step < 0:
            raise ValueError(f"ClipLoader state at epoch {epoch}, step {step}")
        content = state.get("content")
        differ = changed_content(content, content_of(self.source.shards)) if isinstance(content, dict) else []
        if differ:
            raise ValueError(
                f"the state was taken on another pack: {len(differ)} shards of the same name differ in content "
                f"(sha256 in the index), e.g. {differ[0]}; load it into a loader on the shards it was taken on"
            )
        history = segments
        if step or segments:
            mine = self._plan_identity()
            changed = sorted(k for k in mine if plan.get(k) != mine[k])
            moved = [k for k in changed if k in TOPOLOGY_KEYS]
            kept = [k for k in changed if k not in TOPOLOGY_KEYS or self.cfg.resample]
            if kept:
                raise ValueError(f"the state stopped mid-epoch; resuming it needs the same {', '.join(kept)}")
            if moved and step:
                old = Segment(int(plan["world_size"]), int(plan["workers"]), int(plan["batch_size"]), step)
                history, step = segments + (old,), 0
        self.close()
        self.history, self.history_epoch, self._parts = history, epoch if history else -1, None
        self.position = (epoch, step)

    # --- batches -------------------------------------------------------------------------------

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of `epoch` (training: epochs in order from the first or the resumed one)."""
        if self.split == "test":
            return self._test_pass()
        self.position = self._next()
        if epoch != self.position[0]:
            raise ValueError(
                f"epoch {epoch} asked for; the loader is at epoch {self.position[0]}, step {self.position[1]}"
            )
        if self.epochs is not None and epoch >= self.epochs:
            raise ValueError(
                f"epoch {epoch} asked for; the loader was made for `epochs`={self.epochs} (epochs 0..{self.epochs - 1})"
            )
        if self.pool is None:
            from pipeline.stream.workers import WorkerPool

            self._place()  # the workers follow this rank and world size from now on
            start_epoch, start_step = self.position
            parts = self._segment_parts(start_epoch)
            producer = TrainProducer(
                self.source, self.cfg, self.rank, self.world_size, self.n_workers, start_epoch, start_step, self.epochs,
                len(self.history) if parts is not None else 0, parts or (), self.stop_at_max_bad, self.cache,
            )  # fmt: skip
            _preload_decoders()
            self.producer = producer
            self.pool = WorkerPool(
                producer, self.cfg.workers or 0, self.slot_shape, self.cfg.prefetch + 1, self.start_method
            )
        batches = self._batches(epoch)
        batches = _pinning(batches) if self.pin_memory else batches
        self._ticket += 1
        return self._counted(batches, epoch, self._ticket)

    def _counted(self, batches: Iterator[dict], epoch: int, ticket: int) -> Iterator[dict]:
        step = self.position[1]
        while True:
            # One iterator at a time reads the workers: an older one read on after epoch() was asked
            # for again would take the newer one's batches, and fail later with a misleading message.
            if ticket != self._ticket:
                raise ValueError(
                    f"this iterator of epoch {epoch} was superseded: epoch() was asked for again while it was open "
                    "(iterate one epoch's batches at a time)"
                )
            batch = next(batches, None)
            if batch is None:
                break
            step += 1
            self.position = (epoch, step)
            yield batch
        self.position = (epoch + 1, 0)

    def _batches(self, epoch: int) -> Iterator[dict]:
        _, schedule = self.producer.schedule(epoch)
        held: list[tuple[int, dict]] = []
        pool = self.pool
        try:
            for parts in schedule[self.position[1] :]:
                got = [(w, self._get(w, epoch, n)) for w, n in parts]
                if len(got) == 1:
                    frames = got[0][1]["frames"]
                    held = got
                else:  # the workers' remainders, at the end of the epoch: one copy, into a reused buffer
                    if self.merged is None:
                        self.merged = torch.empty(pool.slot_shape, dtype=torch.uint8)
                    frames = torch.cat([m["frames"] for _, m in got], out=self.merged)
                    for w, m in got:
                        pool.release(w, m)
                if self.copy:
                    frames = frames.clone()
                yield {
                    "frames": frames,
                    "label": torch.tensor([label for _, m in got for label in m["label"]], dtype=torch.int64),
                    "key": [k for _, m in got for k in m["key"]],
                    "worker": torch.tensor([w for w, m in got for _ in range(m["n"])], dtype=torch.int64),
                    "repeat": torch.tensor([r for _, m in got for r in m["repeat"]], dtype=torch.bool),
                    "pack": torch.tensor([p for _, m in got for p in m["pack"]], dtype=torch.int64),
                    "faults": [f for _, m in got for f in m["faults"]],
                }
                for w, m in held:
                    pool.release(w, m)
                held = []
        finally:
            for w, m in held:
                pool.release(w, m)

    def _get(self, worker: int, epoch: int, n: int) -> dict:
        message = self.pool.get(worker)
        if "fatal" in message:
            raise WorkerGaveUp(message["fatal"], message.get("faults", []))
        if message.get("epoch") != epoch or message.get("n") != n:
            raise RuntimeError(
                f"loader worker {worker} sent {message.get('n')} clips of epoch {message.get('epoch')}; expected {n} of epoch {epoch}"
            )
        return message

    def _test_pass(self) -> Iterator[dict]:
        from pipeline.stream.workers import WorkerPool

        self._place()
        per_worker, by_key = eval_plan(self.source.shards, self.cfg.workers or 0, self.rank, self.world_size)
        workers = len(per_worker) if self.cfg.workers else 0
        producer = EvalProducer(
            self.source, self.cfg, self.rank, self.world_size, tuple(per_worker), by_key, self.cache
        )

        def batches() -> Iterator[dict]:
            _preload_decoders()
            with WorkerPool(producer, workers, self.slot_shape, self.cfg.prefetch + 1, self.start_method) as pool:
                active = list(range(max(1, workers)))
                while active:
                    for w in list(active):
                        message = pool.get(w)
                        if "done" in message:
                            active.remove(w)
                            continue
                        frames = message.get("frames")
                        yield {
                            "frames": frames.clone() if self.copy and frames is not None else frames,
                            "label": torch.tensor(message["label"], dtype=torch.int64) if message["n"] else None,
                            "key": message["key"],
                            "view": torch.tensor(message.get("view", []), dtype=torch.int64),
                            "pack": torch.tensor(message.get("pack", []), dtype=torch.int64),
                            "faults": message["faults"],
                        }
                        pool.release(w, message)

        return _pinning(batches()) if self.pin_memory else batches()

    # --- lifetime ------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The worker processes' ids (none before the first epoch, or with workers=0)."""
        return [] if self.pool is None else self.pool.pids()

    def close(self) -> None:
        """Stop the workers (the loader can start them again from its position)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def _pinning(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches` with each batch's frames copied into pinned memory by a background thread (for
    non-blocking copies to this rank's GPU), which releases the worker's slot as soon as the copy is
    made."""
    from pipeline.stream.workers import threaded

    device = torch.cuda.current_device()
    return threaded(batches, _pinned, init=lambda: torch.cuda.set_device(device))


def _pinned(batch: dict) -> dict:
    return batch if batch["frames"] is None else {**batch, "frames": batch["frames"].pin_memory()}


def _preload_decoders() -> None:
    """Import simplejpeg once in the parent, so that forked workers inherit it (cv2 is imported with
    the clips module)."""
    import simplejpeg  # noqa: F401
