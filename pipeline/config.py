"""Frozen configuration of every job; typer options map one to one onto these fields."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from pipeline.errors import UserError


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


MAX_TIMEOUT_S = 86_400
"""A day per video: longer is a typo (and above ~1e9 s the time-out cannot even be waited for)."""
MAX_COUNT = 1_000_000_000
"""The largest count `max_failures` / `max_bad` take (infinity is not a count: use a large one)."""
PACK_LAYOUTS = ("auto", "hmdb51", "ucf101", "kinetics", "folders")


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """How `pack-shards` turns a folder of videos into shards."""

    data_dir: Path
    """Folder with one sub-folder per class (or the `hmdb51_org/` or `UCF-101/` level above them; Kinetics: the folder holding train/ and val/)."""
    out_dir: Path | str
    """Where shards, index.json and manifest.parquet go: a local folder, or an object-store URL (`s3://bucket/prefix/`) kept as a string."""
    split: int = 1
    """Official split to pack (1, 2 or 3): its training clips go to the train shards, test clips to the test shards."""
    frames: int = 16
    """T, frames sampled per clip, equally spaced over the clip's decodable length."""
    stored_frames: int | str | None = None
    """S, frames stored per clip: None keeps T (today's format, byte for byte); a number S > T with S - 1 a multiple of T - 1, stored at round(j*(n-1)/(S-1)); or "all": every decodable frame, up to `max_stored_frames` (longer clips at the formula with S = that cap). Either way the T evaluation frames round(i*(n-1)/(T-1)) are among them."""
    max_stored_frames: int = 301
    """The cap of stored_frames="all" (with T = 16, 301 = 20 x 15 + 1 frames: 10 s at 30 fps); cap - 1 must be a multiple of T - 1."""
    short_side: int | None = 128
    """Resize so the shorter side is this many pixels (aspect kept); None keeps the original size."""
    quality: int = 90
    """JPEG quality of the stored frames (1-100)."""
    shards: int = 32
    """Number of training shards (000.tar ...)."""
    test_shards: int | None = None
    """Number of test shards (test-000.tar ...); default: as many as training shards, at most one per test clip."""
    splits_dir: Path | None = None
    """Folder with the official split files (HMDB51 split files, UCF101 ucfTrainTestlist/, Kinetics CSVs); default: searched for inside data_dir."""
    layout: str = "auto"
    """Dataset layout: hmdb51, ucf101, kinetics or folders (see pipeline.pack.layouts); auto: detected from data_dir."""
    seed: int = 0
    """Seed of the shard plan (which clip goes to which shard, in which order) and of the fallback split."""
    decoder: str = "pyav"
    """Video decoder: pyav (default: about twice as fast as decord here, see the README) or decord; both are frame-exact."""
    workers: int = dataclasses.field(default_factory=default_workers)
    """Decoding processes."""
    timeout: float = 120.0
    """Seconds one video may take to decode before it is recorded as failed (a hung decoder costs one clip)."""
    max_failures: float = 0.01
    """Failed videos allowed: a fraction of all videos if < 1, else a count. Above it the run exits non-zero."""
    part: tuple[int, int] = (1, 1)
    """(i, N): pack only part i of N of the shard plan, for several machines sharing OUT_DIR."""
    engine: str = "local"
    """What packs the shards: local (decoder processes here) or ray (one Ray task per shard); same bytes."""
    ray_address: str | None = None
    """The Ray cluster of engine ray (host:port, or ray://...); None: RAY_ADDRESS, else a local one."""
    overwrite: bool = False
    """Replace an OUT_DIR packed with different options."""

    def __post_init__(self):
        if isinstance(self.out_dir, str) and "://" not in self.out_dir:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.split not in (1, 2, 3):
            raise UserError(f"unknown split {self.split}: HMDB51 and UCF101 have splits 1, 2 and 3")
        if self.layout not in PACK_LAYOUTS:
            raise UserError(f"unknown layout {self.layout!r}; choose {', '.join(PACK_LAYOUTS)}")
        from pipeline.shardformat import MAX_FRAMES_PER_CLIP, MAX_JPEG_SIDE

        if self.frames < 1:
            raise UserError(f"`frames` must be >= 1, got {self.frames}")
        if self.frames > MAX_FRAMES_PER_CLIP:
            raise UserError(f"`frames` must be <= {MAX_FRAMES_PER_CLIP} (what shard readers accept), got {self.frames}")
        if self.short_side is not None and self.short_side < 1:
            raise UserError(f"`short_side` must be >= 1, got {self.short_side}")
        if self.short_side is not None and self.short_side > MAX_JPEG_SIDE:
            raise UserError(
                f"`short_side` must be <= {MAX_JPEG_SIDE} (what shard readers accept), got {self.short_side}"
            )
        if self.stored_frames is not None:
            self._check_stored()
        if not 1 <= self.quality <= 100:
            raise UserError(f"`quality` must be in 1..100, got {self.quality}")
        if self.shards < 1:
            raise UserError(f"`shards` must be >= 1, got {self.shards}")
        if self.test_shards is not None and self.test_shards < 1:
            raise UserError(f"`test_shards` must be >= 1, got {self.test_shards}")
        if self.decoder not in ("pyav", "decord"):
            raise UserError(f"unknown decoder {self.decoder!r}; choose pyav or decord")
        if self.workers < 1:
            raise UserError(f"`workers` must be >= 1, got {self.workers}")
        # `not x <= high` also refuses nan, which every comparison calls false (a nan time-out never
        # fired: a hung decoder held the pack for ever)
        if not 0 < self.timeout <= MAX_TIMEOUT_S:
            raise UserError(f"`timeout` must be > 0 seconds and at most {MAX_TIMEOUT_S:,} (a day), got {self.timeout}")
        if not 0 <= self.max_failures <= MAX_COUNT:
            raise UserError(
                f"`max_failures` must be >= 0 (a fraction if < 1, else a count) and at most {MAX_COUNT:,}, got {self.max_failures}"
            )
        if self.engine not in ("local", "ray"):
            raise UserError(f"unknown engine {self.engine!r}; choose local or ray")
        if self.ray_address is not None and self.engine != "ray":
            raise UserError("`ray_address` is for `engine` ray")
        i, n = self.part
        if not (n >= 1 and 1 <= i <= n):
            raise UserError(f"`part` must be i/N with 1 <= i <= N, got {i}/{n}")

    def _check_stored(self) -> None:
        from pipeline.shardformat import MAX_FRAMES_PER_CLIP

        s, t = self.stored_frames, self.frames
        if t < 2:
            raise UserError(
                "`stored_frames` needs `frames` of 2 or more (the stored frames must hold the T evaluation frames)"
            )
        if s == "all":
            cap = self.max_stored_frames
            if not (t <= cap <= MAX_FRAMES_PER_CLIP and (cap - 1) % (t - 1) == 0):
                raise UserError(
                    f"`max_stored_frames` must be in {t}..{MAX_FRAMES_PER_CLIP} with cap - 1 a multiple of T - 1 = {t - 1}, got {cap}"
                )
            return
        if not isinstance(s, int) or not (t <= s <= MAX_FRAMES_PER_CLIP and (s - 1) % (t - 1) == 0):
            raise UserError(
                f"`stored_frames` must be 'all' or a number S in {t}..{MAX_FRAMES_PER_CLIP} with S - 1 a multiple of T - 1 = {t - 1} "
                f"(e.g. {t}, {2 * t - 1}, {4 * t - 3}), got {s!r}"
            )

    def stored_count(self, n: int) -> int:
        """S for a clip of n decodable frames."""
        if self.stored_frames is None:
            return self.frames
        if self.stored_frames == "all":
            return n if n <= self.max_stored_frames else self.max_stored_frames
        return int(self.stored_frames)

    def output_options(self) -> dict:
        """The options that decide the bytes written: a changed one means a different pack."""
        stored = (
            {}
            if self.stored_frames is None
            else {"stored_frames": self.stored_frames, "max_stored_frames": self.max_stored_frames}
        )
        return {
            **stored,
            "split": self.split,
            "frames": self.frames,
            "short_side": self.short_side,
            "quality": self.quality,
            "shards": self.shards,
            "test_shards": self.test_shards,
            "seed": self.seed,
            "decoder": self.decoder,
        }


MAX_BATCH_SIZE = 1 << 16
MAX_CROP = 8192
"""As large as the largest frame a reader accepts (shardformat.MAX_JPEG_SIDE)."""
MAX_PREFETCH = 64
MAX_LOADER_WORKERS = 256
MAX_SHUFFLE_BUFFER = 1_000_000
MAX_BATCH_BYTES = 4 << 30
"""Largest batch buffer (B x T x crop x crop x 3 bytes): r3d18's recipe batch is 4.8 MB, a batch of 64
clips of 64 frames at 224 px is 0.6 GiB. Each worker holds prefetch + 1 of them."""
MAX_EPOCHS = 100_000
MAX_PACKS = 1024
"""Most packs one run mixes (`weights`)."""


MAX_CACHE_BYTES = 10**18
"""An exabyte: a larger cache size is a typo."""
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgtp]?i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """`--weights 0.7,0.3` -> (0.7, 0.3); checked further by StreamConfig."""
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"`weights` must be numbers separated by commas (0.7,0.3), got {text!r}") from None


def parse_size(text: str, what: str = "`cache_bytes`") -> int:
    """Bytes from a human size: `50GB`, `500MB`, `1.5TiB`, `2g` or plain bytes (`1000000`). K, M, G,
    T, P are powers of 1000 (as disks are sold), Ki, Mi, Gi, Ti, Pi powers of 1024; case and a final
    B do not matter. UserError naming `what` for anything else (negative, zero, nan, no number)."""
    m = _SIZE.match(str(text))
    if m is None:
        raise UserError(f"{what} must be a size like 50GB, 500MB, 1.5TiB or a number of bytes, got {text!r}")
    unit = m["unit"].lower().rstrip("b")
    if unit.endswith("i") and unit != "i":
        scale = 1024 ** (" kmgtp".index(unit[0]))
    elif unit in _UNITS:
        scale = _UNITS[unit]
    else:
        raise UserError(f"{what}: unknown unit in {text!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(m["number"]) * scale) if "." in m["number"] else int(m["number"]) * scale
    if not 1 <= size <= MAX_CACHE_BYTES:
        raise UserError(f"{what} must be between 1 byte and 1 EB, got {text!r}")
    return size


def physical_memory() -> int | None:
    """Bytes of RAM of this machine; None where it cannot be told."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


OPTIMIZERS = ("adamw", "sgd")
EPOCH_FILLS = ("pad", "drop")
TEMPORAL = ("segment", "fixed")
SCHEDULES = ("cosine", "step")
DEVICES = ("auto", "cpu", "cuda")


def checked_cache(cache_dir, cache_bytes) -> tuple[str | None, int | None]:
    """StreamConfig's `cache_dir` and `cache_bytes` checked (a local folder; a size like 50GB or
    bytes, only with a folder): what every command with --cache-dir takes."""
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        if not cache_dir.strip() or "://" in cache_dir:
            raise UserError(f"`cache_dir` must be a local folder, got {cache_dir!r}")
    if isinstance(cache_bytes, str):
        cache_bytes = parse_size(cache_bytes, "`cache_bytes`")
    if cache_bytes is None:
        return cache_dir, None
    if cache_dir is None:
        raise UserError("a cache size (cache_bytes, --cache-size) needs `cache_dir`")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int):
        raise UserError(f"`cache_bytes` must be a number of bytes or a size like 50GB, got {cache_bytes!r}")
    if not 1 <= cache_bytes <= MAX_CACHE_BYTES:
        raise UserError(f"`cache_bytes` must be in 1..{MAX_CACHE_BYTES:,} bytes, got {cache_bytes:,}")
    return cache_dir, cache_bytes


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """Where the shards are and how they are read, shuffled, augmented and batched."""

    shards: tuple[str, ...]
    """Training shards: 'shards/<000..031>.tar', '{000..031}' ranges, '::'-separated lists, local paths, http(s):// or s3:// URLs, or a packed folder (shards/, s3://bucket/hmdb51/); several patterns (repeat the option on the command line) are read as one set; a resumed run's own when not given again."""
    eval_shards: tuple[str, ...] = ()
    """Test shards, same syntax; None: the test shards listed in the index beside the training shards."""
    index: str | None = None
    """Path or URL of index.json; None: `index.json` in the folder (or base URL) of the training shards."""
    batch_size: int = 8
    """Clips per batch on each rank (the global batch is `batch_size` x world size x `grad_accum`)."""
    workers: int | None = None
    """Loader worker processes per rank (started once for the run), each reading its own shards and building whole batches; None: one per core left to the rank, at most 8 and at most shards / ranks."""
    shuffle_buffer: int = 256
    """Samples held in each worker's shuffle buffer (raw JPEG bytes, about 150 KB a clip)."""
    crop: int | None = 112
    """Side of the square crop fed to the model (random in training, centred in evaluation)."""
    seed: int = 0
    """Seed of everything random: shard order, shuffle buffer, crops and flips, model initialisation."""
    resample: bool = False
    """Draw shards with replacement per worker (allows fewer shards than ranks x workers)."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs, which run shell commands."""
    prefetch: int = 2
    """Batches each worker prepares ahead (each worker holds prefetch + 1 batch buffers)."""
    temporal: str = "segment"
    """Training frames: `segment` draws one stored frame per segment each epoch (deterministic in seed, epoch and key); `fixed` takes the T evaluation frames. The same when a pack stores T frames per clip."""
    test_views: tuple[int, int] = (1, 1)
    """Evaluation views KxC per test clip (the library takes (K, C)): K temporal offsets x C spatial crops (1: centre; 3: centre and both ends of the longer side), scores softmax-averaged per clip."""
    epoch_fill: str = "pad"
    """How every rank gets the same number of steps: `pad` uses every training clip once per epoch and tops the last batches up with repeats of that epoch's clips (marked); `drop` leaves each rank's surplus unread (see docs/TRAINING.md)."""
    max_bad: float = 0.01
    """Unreadable training clips allowed per rank and epoch: a fraction of the rank's clips if < 1, else a count. Above it the run stops with an error."""
    weights: tuple[float, ...] | None = None
    """Mix the packs named by `shards` (each packed folder or index one pack, in the order named) with these weights, e.g. 0.7,0.3: an epoch is the packs' training clips in number, drawn in these shares, each pack's clips without replacement within its own passes (see docs/TRAINING.md); normalised; None: every training clip once an epoch."""
    cache_dir: str | None = None
    """Local folder caching remote shards (s3://, gs://, az://, http(s)://): a shard is written there while it streams, kept once its sha256 matches the index, and read from there afterwards; one copy per node, shared by every rank and worker (put it on local disk). A cache that is full, unwritable or corrupt is bypassed with one warning. None: no cache."""
    cache_bytes: int | None = None
    """Most bytes the cache keeps: a size like 50GB, 500MB, 1.5TiB (K, M, G, T: powers of 1000; Ki, Mi, Gi, Ti: of 1024) or plain bytes; the least recently used shards are evicted past it. None: 90% of the space free on the cache's disk when the run starts."""

    def __post_init__(self):
        if isinstance(self.shards, str) or isinstance(self.eval_shards, str):
            raise TypeError("shards and eval_shards are tuples of patterns, not strings")
        self._check_cache()
        if not self.shards or not all(s.strip() for s in self.shards):
            raise UserError(f"`shards` must name at least one pattern, got {self.shards!r}")
        # Bounded here, before anything is sized from them (a typo of a few zeros is gigabytes).
        for name, low, high in (
            ("batch_size", 1, MAX_BATCH_SIZE),
            ("workers", 0, MAX_LOADER_WORKERS),
            ("shuffle_buffer", 1, MAX_SHUFFLE_BUFFER),
            ("crop", 1, MAX_CROP),
            ("prefetch", 1, MAX_PREFETCH),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"`{name}` must be >= {low}, got {value}")
            if value is not None and value > high:
                raise UserError(f"`{name}` must be at most {high:,}, got {value:,}")
        if self.temporal not in TEMPORAL:
            raise UserError(f"`temporal` must be one of {', '.join(TEMPORAL)}, got {self.temporal!r}")
        k, c = self.test_views
        if not (isinstance(k, int) and 1 <= k <= 32 and c in (1, 3)):
            raise UserError(f"`test_views` must be KxC with K in 1..32 and C 1 or 3, got {k}x{c}")
        self._check_weights()
        if self.epoch_fill not in EPOCH_FILLS:
            raise UserError(f"`epoch_fill` must be one of {', '.join(EPOCH_FILLS)}, got {self.epoch_fill!r}")
        if not 0 <= self.max_bad <= MAX_COUNT:
            raise UserError(
                f"`max_bad` must be >= 0 (a fraction if < 1, else a count) and at most {MAX_COUNT:,}, got {self.max_bad}"
            )

    def _check_weights(self) -> None:
        if self.weights is None:
            return
        weights = parse_weights(self.weights) if isinstance(self.weights, str) else self.weights
        if not hasattr(weights, "__iter__"):
            raise UserError(f"`weights` must be numbers, one per pack, got {weights!r}")
        weights = tuple(weights)
        if not weights or len(weights) > MAX_PACKS:
            raise UserError(f"`weights` must be 1..{MAX_PACKS} numbers, one per pack, got {len(weights)}")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
                raise UserError(f"`weights` must be positive finite numbers, got {w!r} in {list(weights)}")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        if self.resample:
            raise UserError("`weights` and `resample` do not go together: a weighted epoch draws whole shards itself")

    def _check_cache(self) -> None:
        cache_dir, cache_bytes = checked_cache(self.cache_dir, self.cache_bytes)
        object.__setattr__(self, "cache_dir", cache_dir)
        object.__setattr__(self, "cache_bytes", cache_bytes)

    def bad_limit(self, planned: int) -> int:
        """Unreadable clips a rank may meet in an epoch of `planned` clips (`max_bad`: a fraction if < 1, else a count)."""
        return int(self.max_bad * planned) if self.max_bad < 1 else int(self.max_bad)

    def check_memory(self, frames: int, workers: int) -> None:
        """The batch buffers a loader with `workers` workers allocates for clips of `frames` frames
        (known from the index) must fit: one slot at most MAX_BATCH_BYTES, all of them in RAM."""
        if self.crop is None:  # whole frames, one clip at a time (ClipDataset): no batch buffer
            return
        slot = self.batch_size * frames * self.crop * self.crop * 3
        shape = f"`batch_size` {self.batch_size} x {frames} frames x `crop` {self.crop}x{self.crop} x 3"
        if slot > MAX_BATCH_BYTES:
            raise UserError(
                f"a batch of {shape} bytes is {slot / 2**30:.1f} GiB, more than the {MAX_BATCH_BYTES >> 30} GiB a batch may take"
            )
        total, ram = slot * max(1, workers) * (self.prefetch + 1), physical_memory()
        if ram and total > ram:
            raise UserError(
                f"the loader's batch buffers ({max(1, workers)} `workers` x (`prefetch` {self.prefetch} + 1) x {shape} bytes) "
                f"take {total / 2**30:.1f} GiB, more than this machine's {ram / 2**30:.1f} GiB of memory"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: model, optimisation, evaluation, checkpoints, logging, launch."""

    stream: StreamConfig
    """The data side."""
    model: str = "r3d18"
    """Model name (see pipeline.train.models.MODEL_NAMES) or `torchvision:<name>`."""
    epochs: int = 10
    """Passes over the training shards."""
    optimizer: str = "adamw"
    """`adamw` or `sgd` (momentum 0.9, Nesterov)."""
    lr: float | None = None
    """Peak learning rate; None: 1e-3 for AdamW, 0.05 for SGD."""
    weight_decay: float = 1e-4
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    schedule: str = "cosine"
    """`cosine` (to zero at the last step) or `step` (x `lr_gamma` every `lr_step_epochs`)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimiser steps."""
    lr_step_epochs: int = 10
    """Epochs between decays of the `step` schedule."""
    lr_gamma: float = 0.1
    """Decay factor of the `step` schedule."""
    grad_accum: int = 1
    """Batches whose gradients are summed before each optimiser step."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    channels_last: bool = True
    """channels_last_3d memory format on CUDA (ignored on CPU)."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    threads: int | None = None
    """Intra-op CPU threads per training process; None: this process's share of the cores minus its loader workers, at least 1."""
    eval_every: int = 1
    """Evaluate every this many epochs (and always after the last); 0: only after the last."""
    log_dir: str | None = None
    """Run folder for metrics.jsonl, checkpoints and audit logs; None: runs/<timestamp> (or the resumed run's folder)."""
    log_every: int = 10
    """Steps between step records in metrics.jsonl."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps (0: only at the end of each epoch)."""
    checkpoint_every_min: float = 0.0
    """Also checkpoint every this many minutes, at the first step every rank reaches after it (0: never by time). A checkpoint is also written on SIGTERM, before exiting with 143."""
    resume: str | None = None
    """Checkpoint file or run folder to continue from, with the options it was started with (options given again must agree; more `epochs`, another number of ranks, loader workers or batch size are allowed); `auto`: the checkpoint in `log_dir` when there is one, else a fresh start."""
    max_steps: int = 0
    """Stop (with a checkpoint) after this many steps in total; 0: no limit."""
    audit_keys: bool = False
    """Write the sample keys each rank consumed, per epoch, to <log_dir>/audit/."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""
    plot: bool = False
    """At the end, draw <log_dir>/curves.png (loss, accuracy, clips/s, data wait) like plot-run (rank 0)."""
    nproc_per_node: int = 1
    """Start this many local processes (gloo on CPU, NCCL on GPU); 1: run in this process (or as launched by torchrun)."""

    def __post_init__(self):
        if not self.model:
            raise UserError("`model` must name a model")
        if self.epochs < 1:
            raise UserError(f"`epochs` must be >= 1, got {self.epochs}")
        if self.epochs > MAX_EPOCHS:  # the plan of every epoch is computed at the start
            raise UserError(f"`epochs` must be at most {MAX_EPOCHS:,}, got {self.epochs:,}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"`lr` must be > 0 and finite, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UserError(f"`weight_decay` must be >= 0 and finite, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise UserError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.lr_step_epochs < 1:
            raise UserError(f"`lr_step_epochs` must be >= 1, got {self.lr_step_epochs}")
        if not 0 < self.lr_gamma <= 1:
            raise UserError(f"`lr_gamma` must be in (0, 1], got {self.lr_gamma}")
        if self.grad_accum < 1:
            raise UserError(f"`grad_accum` must be >= 1, got {self.grad_accum}")
        if self.device not in DEVICES:
            raise UserError(f"`device` must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"`threads` must be >= 1, got {self.threads}")
        if self.eval_every < 0:
            raise UserError(f"`eval_every` must be >= 0, got {self.eval_every}")
        if self.log_every < 1:
            raise UserError(f"`log_every` must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise UserError(f"`checkpoint_every` must be >= 0, got {self.checkpoint_every}")
        if not 0 <= self.checkpoint_every_min < float("inf"):
            raise UserError(f"`checkpoint_every_min` must be a number of minutes >= 0, got {self.checkpoint_every_min}")
        if self.max_steps < 0:
            raise UserError(f"`max_steps` must be >= 0, got {self.max_steps}")
        if self.nproc_per_node < 1:
            raise UserError(f"`nproc_per_node` must be >= 1, got {self.nproc_per_node}")

    def bad_limit(self, planned: int) -> int:
        """Unreadable clips a rank may meet in an epoch of `planned` clips before the run stops."""
        return self.stream.bad_limit(planned)

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.optimizer == "adamw" else 0.05
