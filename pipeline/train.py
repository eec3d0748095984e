"""The training loop: one flat function, `train`, in the order a reader expects.

process group -> data -> run folder -> model -> optimiser -> resume -> epochs of steps (with logging
and checkpoints) -> evaluation -> summary -> teardown.

Rank and world size come in as a `DistEnv`, read once from the torchrun environment at the edge
(`DistEnv.from_env`); `launch` starts N local processes itself for `--nproc-per-node N`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import stream
from pipeline.config import TrainConfig
from pipeline.durable import failpoint, publish
from pipeline.errors import UserError

# Kinetics-400 statistics, the usual normalisation of the r3d / r(2+1)d recipes.
MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    local_world_size: int = 1
    """Processes on this machine (share its CPU cores)."""

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @classmethod
    def from_env(cls) -> "DistEnv":
        """The torchrun variables, or a single process when they are absent."""
        env = os.environ
        if "WORLD_SIZE" not in env:
            return cls()
        local_world = int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), local_world)


def cores_per_rank(local_world_size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)


def with_workers(cfg: TrainConfig, n_shards: int, world_size: int, local_world_size: int) -> TrainConfig:
    """`cfg` with the number of loader workers decided (see stream.auto_workers)."""
    if cfg.stream.workers is not None:
        return cfg
    workers = stream.auto_workers(n_shards, world_size, cores_per_rank(local_world_size), cfg.stream.resample)
    return dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=workers))


def prepare(cfg: TrainConfig, world_size: int, local_world_size: int) -> stream.Dataset:
    """Check everything a user can get wrong before any process starts: shards, index, model name."""
    dataset = stream.resolve_dataset(cfg.stream)
    cfg = with_workers(cfg, len(dataset.train), world_size, local_world_size)
    stream.check_enough_shards(dataset, cfg.stream, world_size)
    from pipeline.models import MODEL_NAMES, build_model

    if cfg.model not in MODEL_NAMES:
        build_model(cfg.model, len(dataset.classes))  # UserError for unknown names
    if cfg.resume and not Path(resolve_checkpoint(cfg.resume)).is_file():
        raise UserError(f"no checkpoint at {cfg.resume!r}")
    check_log_dir(cfg.log_dir)
    return dataset


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
    muted = [logging.getLogger(n) for n in ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")]
    levels = [m.level for m in muted]
    with tempfile.TemporaryDirectory(prefix="clipstream-errors-") as errors:
        try:
            for m in muted:
                m.setLevel(logging.CRITICAL)
            results = elastic_launch(config, _launched)(cfg, errors)
        except ChildFailedError as e:
            messages = sorted(Path(errors).glob("rank-*.txt"))
            if messages:
                raise UserError(messages[0].read_text()) from None
            ranks = ", ".join(f"{r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
            raise UserError(f"training failed on rank {ranks} (see the messages above)") from None
        finally:
            for m, level in zip(muted, levels):
                m.setLevel(level)
    return results.get(0)


def _launched(cfg: TrainConfig, errors: str) -> dict:
    """Entry point of each process started by `launch`."""
    env = DistEnv.from_env()
    try:
        return train(cfg, env)
    except UserError as e:
        (Path(errors) / f"rank-{env.rank}.txt").write_text(str(e))
        raise SystemExit(2) from None


def default_log_dir(cfg: TrainConfig) -> str:
    if cfg.log_dir:
        return cfg.log_dir
    if cfg.resume:
        path = Path(cfg.resume)
        return str(path if path.is_dir() else path.parent)
    return str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))


def resolve_checkpoint(resume: str) -> str:
    path = Path(resume)
    return str(path / CHECKPOINT_NAME) if path.is_dir() else str(path)


def cpu_threads(cfg: TrainConfig, env: DistEnv) -> int:
    """Intra-op threads of one training process.

    Loader workers run single-threaded beside it; more threads than free cores make OpenMP wait on
    descheduled threads, which costs far more than it gains (10x slower steps measured on 2 cores).
    """
    if cfg.threads is not None:
        return cfg.threads
    return max(1, cores_per_rank(env.local_world_size) - (cfg.stream.workers or 0))


def learning_rate(cfg: TrainConfig, opt_step: int, total_opt_steps: int, epoch: int) -> float:
    """The schedule, a pure function of the optimiser step (and the epoch, for `step`)."""
    peak = cfg.peak_lr
    if opt_step < cfg.warmup_steps:
        return peak * (opt_step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return peak * cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)
    span = max(1, total_opt_steps - cfg.warmup_steps)
    progress = min(1.0, (opt_step - cfg.warmup_steps) / span)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def model_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """channels_last_3d for 3D conv nets, channels_last for 2D ones (cnn-lstm: its frames, cut from a
    channels_last_3d clip batch by transpose + reshape, arrive channels_last without a copy)."""
    if any(isinstance(m, torch.nn.Conv3d) for m in model.modules()):
        return torch.channels_last_3d
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return torch.channels_last
    return torch.contiguous_format


def to_model_input(video: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 on the host -> normalised (B, 3, T, H, W) float on `device` (a fresh
    buffer each call; the training loop uses a ModelInput, which reuses one)."""
    return ModelInput(device, channels_last)(video)


class ModelInput:
    """(B, T, H, W, 3) uint8 batches on the host -> normalised (B, 3, T, H, W) float on `device`.

    The copy travels as uint8 (4x less than float); the per-pixel work happens on the device.
    (B, T, H, W, 3) is exactly channels_last_3d memory for (B, 3, T, H, W), so no transpose is paid
    there. The result is written into one float buffer reused from batch to batch (on a CPU a fresh
    19 MB buffer per batch is mostly page faults: normalising took 2.8x as long), so each result is
    valid until the next call, which is all a training step needs (backward frees its graph). The
    mean and std live on the device from the start: building them per batch from a Python list was
    a blocking host-to-device copy every step.
    """

    def __init__(self, device: torch.device, channels_last: bool):
        self.device, self.channels_last = device, channels_last
        self.scale = torch.tensor([1 / (255 * s) for s in STD], device=device)
        self.shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.buffer: torch.Tensor | None = None

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        x = video.to(self.device, non_blocking=True)
        batch, frames, height, width, channels = x.shape
        if self.buffer is None or self.buffer.numel() != x.numel():
            self.buffer = torch.empty(x.numel(), dtype=torch.float32, device=self.device)
        if self.channels_last:
            # Normalise the memory as rows of width x 3 values against a per-row pattern of scales:
            # long inner loops (a 3-long channel loop is 1.8x slower on a CPU), and the result is
            # already channels_last_3d memory for (B, 3, T, H, W).
            if width not in self.rows:
                self.rows[width] = (self.scale.repeat(width), self.shift.repeat(width))
            scale, shift = self.rows[width]
            rows = self.buffer.view(-1, width * channels)
            rows.copy_(x.reshape(-1, width * channels))
            torch.addcmul(shift, rows, scale, out=rows)
            return rows.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        # One pass, uint8 in, float out, written straight in contiguous layout: x * scale - shift.
        dense = self.buffer.view(batch, channels, frames, height, width)
        return torch.addcmul(self.shift.view(1, 3, 1, 1, 1), x.permute(0, 4, 1, 2, 3), self.scale.view(1, 3, 1, 1, 1), out=dense)


def evaluate(model, dataset: stream.Dataset, cfg: TrainConfig, env: DistEnv, device, channels_last: bool, autocast) -> dict:
    """Top-1, top-5 and per-class accuracy on the test shards; each test clip counted once across ranks."""
    num_classes = len(dataset.classes)
    k = min(5, num_classes)
    # rows: clips, top-1 hits, top-5 hits; columns: true class
    counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
    skipped = 0
    was_training = model.training
    model_input = ModelInput(device, channels_last)
    model.eval()
    with torch.no_grad():
        for batch in stream.eval_batches(dataset, cfg.stream, env.rank, env.world_size, pin_memory=device.type == "cuda"):
            skipped += sum(f["samples"] for f in batch["faults"])
            if batch["video"] is None:
                continue
            labels = batch["label"].to(device, non_blocking=True)
            with autocast:
                logits = model(model_input(batch["video"]))
            top = logits.float().topk(k, dim=1).indices
            hit1 = (top[:, 0] == labels).double()
            hit5 = (top == labels[:, None]).any(dim=1).double()
            counts[0].index_add_(0, labels, torch.ones_like(hit1))
            counts[1].index_add_(0, labels, hit1)
            counts[2].index_add_(0, labels, hit5)
    model.train(was_training)
    extra = torch.tensor([skipped], dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(counts)
        dist.all_reduce(extra)
    total = counts.sum(dim=1).tolist()
    clips = int(total[0])
    per_class = {
        name: (counts[1, c].item() / counts[0, c].item() if counts[0, c] > 0 else None) for c, name in enumerate(dataset.classes)
    }
    return {
        "top1": total[1] / clips if clips else None,
        "top5": total[2] / clips if clips else None,
        "per_class": per_class,
        "clips": clips,
        "skipped": int(extra.item()),
    }


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written beside, flushed, then renamed over the old one. A crash at any point leaves
    the previous checkpoint in place (and at worst a stale temporary file, removed next time)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        failpoint(f"checkpoint-mid-write:{state['step']}", lambda: f.truncate(f.tell() // 2))
        os.fsync(f.fileno())
    failpoint(f"checkpoint-before-rename:{state['step']}")
    publish(tmp, path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _gather(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """(world_size, *t.shape): every rank's `t`, on every rank."""
    if env.world_size == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def _broadcast_text(text: str, env: DistEnv, device) -> str:
    if env.world_size == 1:
        return text
    buf = torch.zeros(1024, dtype=torch.uint8, device=device)
    if env.rank == 0:
        data = text.encode()[:1024]
        buf[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode()


def train(cfg: TrainConfig, env: DistEnv) -> dict:
    """Train and evaluate; returns the summary record (on every rank)."""
    from tqdm import tqdm

    from pipeline.models import build_model
    from pipeline.progress import progress

    started = time.perf_counter()
    say = (lambda msg: tqdm.write(msg, file=sys.stdout)) if env.rank == 0 else (lambda msg: None)

    # --- process group ----------------------------------------------------------------------
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size, device_id=device if use_cuda else None)
    channels_last = use_cuda and cfg.channels_last
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and cfg.amp else nullcontext()

    # --- data -------------------------------------------------------------------------------
    dataset = stream.resolve_dataset(cfg.stream)
    if cfg.stream.workers is None:
        # Every rank must split its shards the same way (checkpoints hold a count per worker).
        mine = with_workers(cfg, len(dataset.train), env.world_size, env.local_world_size).stream.workers
        agreed = torch.tensor([mine], device=device)
        if env.world_size > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=int(agreed.item())))
    stream.check_enough_shards(dataset, cfg.stream, env.world_size)
    torch.set_num_threads(cpu_threads(cfg, env))
    sc = cfg.stream
    counts = [s.samples for s in dataset.train]
    steps_per = [stream.steps_per_epoch(counts, sc.batch_size, env.world_size, sc.seed, e, sc.resample) for e in range(cfg.epochs)]
    opt_steps_per = [math.ceil(s / cfg.grad_accum) for s in steps_per]
    n_workers = max(1, sc.workers)

    # --- run folder -------------------------------------------------------------------------
    log_dir = Path(_broadcast_text(default_log_dir(cfg), env, device))
    if env.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
    if env.world_size > 1:
        dist.barrier()
    metrics = open(log_dir / "metrics.jsonl", "a") if env.rank == 0 else None
    fault_log = log_dir / f"faults-rank{env.rank}.jsonl"

    def record(kind: str, **fields) -> None:
        if metrics is not None:
            metrics.write(json.dumps({"kind": kind, **fields}) + "\n")
            metrics.flush()

    # --- model ------------------------------------------------------------------------------
    torch.manual_seed(sc.seed)
    model = build_model(cfg.model, len(dataset.classes)).to(device)
    if channels_last:
        model = model.to(memory_format=model_memory_format(model))
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None) if env.world_size > 1 else model
    forward = torch.compile(net) if cfg.compile else net

    # --- optimiser --------------------------------------------------------------------------
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.peak_lr, weight_decay=cfg.weight_decay, fused=use_cuda or None)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.peak_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)

    # --- resume -----------------------------------------------------------------------------
    run_identity = {
        "seed": sc.seed,
        "world_size": env.world_size,
        "workers": n_workers,
        "batch_size": sc.batch_size,
        "grad_accum": cfg.grad_accum,
        "model": cfg.model,
        "classes": list(dataset.classes),
        "shards": [stream.shard_name(s.url) for s in dataset.train],
        "resample": sc.resample,
    }
    step = opt_step = start_epoch = start_in_epoch = 0
    consumed = torch.zeros(n_workers, dtype=torch.int64)  # this rank's samples per worker, this epoch
    if cfg.resume:
        path = resolve_checkpoint(cfg.resume)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot load checkpoint {path!r}: {e}") from None
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise UserError(f"{path!r} is not a clipstream v{CHECKPOINT_VERSION} checkpoint")
        saved = ckpt["run"]
        if saved["model"] != cfg.model or saved["classes"] != run_identity["classes"]:
            raise UserError(f"checkpoint {path!r} is of model {saved['model']!r} on {len(saved['classes'])} classes")
        if ckpt["step_in_epoch"] > 0 and saved != run_identity:
            changed = sorted(k for k in saved if saved[k] != run_identity[k])
            raise UserError(f"checkpoint {path!r} stopped mid-epoch; resuming it needs the same {', '.join(changed)}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, opt_step = ckpt["step"], ckpt["opt_step"]
        start_epoch, start_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        if start_in_epoch > 0:
            consumed = ckpt["consumed"][env.rank].clone()
            # The step schedule says which worker's clips every step took; the counts must agree.
            plans = stream.train_plan(dataset, sc, start_epoch, env.rank, env.world_size)
            schedule = stream.step_schedule([p.quota for p in plans], sc.batch_size)
            expected = [stream.worker_parts(schedule, w, start_in_epoch)[0] for w in range(n_workers)]
            if consumed.tolist() != expected:
                raise UserError(f"checkpoint {path!r} was written by another version of the loader; it can only be resumed from an epoch's end")
        if env.rank < len(ckpt["rng"]["torch"]):
            # A row of the stacked states is a view at an offset; set_rng_state reads from the start of
            # its storage (rank 1 of a two-rank resume crashed with SIGSEGV), so hand it a copy.
            torch.set_rng_state(ckpt["rng"]["torch"][env.rank].clone())
            if use_cuda and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][env.rank].clone())
        say(f"resumed from {path}: epoch {start_epoch + 1}, step {start_in_epoch} of {steps_per[min(start_epoch, cfg.epochs - 1)]}")

    def checkpoint(epoch: int, in_epoch: int, consumed_now: torch.Tensor) -> None:
        if audit is not None and not audit.closed:
            audit.flush()  # a resume keeps the audit lines up to this checkpoint: they must be on disk
        all_consumed = _gather(consumed_now.to(device), env).cpu()
        rng = {"torch": _gather(torch.get_rng_state().to(device), env).cpu()}
        if use_cuda:
            rng["cuda"] = _gather(torch.cuda.get_rng_state().to(device), env).cpu()
        if env.rank == 0:
            state = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": {"kind": cfg.schedule, "opt_step": opt_step, "total_opt_steps": sum(opt_steps_per)},
                "step": step,
                "opt_step": opt_step,
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "consumed": all_consumed,
                "rng": rng,
                "run": run_identity,
            }
            save_checkpoint(log_dir / CHECKPOINT_NAME, state)

    say(
        f"training {cfg.model} on {dataset.train_samples} clips ({len(dataset.train)} shards), {len(dataset.classes)} classes; "
        f"{env.world_size} rank(s) x {n_workers} worker(s) on {device.type}; {steps_per[0]} steps/epoch of {sc.batch_size} clips per rank"
    )

    # --- loop -------------------------------------------------------------------------------
    # One set of loader workers for the whole run: they run from epoch to epoch without a restart.
    train_loader = stream.TrainLoader(
        dataset, sc, env.rank, env.world_size, start_epoch, start_in_epoch, epochs=cfg.epochs, pin_memory=use_cuda
    )
    audit = None
    model_input = ModelInput(device, channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()
    total_clips = total_wait = total_step_time = 0.0
    bad_samples = 0
    last_eval: dict | None = None
    epochs_done = start_epoch
    stopped_early = False
    last_checkpoint = step
    net.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            if first == 0:
                consumed = torch.zeros(n_workers, dtype=torch.int64)
            batches = train_loader.epoch(epoch)
            audit = None
            epoch_bad, bad_limit = 0, cfg.bad_limit(steps_per[epoch] * sc.batch_size)
            if cfg.audit_keys:
                audit_path = log_dir / "audit" / f"epoch-{epoch:03d}-rank-{env.rank}.txt"
                audit_path.parent.mkdir(parents=True, exist_ok=True)
                kept = audit_path.read_text().splitlines()[: first * sc.batch_size] if first and audit_path.exists() else []
                audit = open(audit_path, "w")
                audit.write("".join(k + "\n" for k in kept))
            bar = progress(steps_per[epoch], f"epoch {epoch + 1}/{cfg.epochs}", quiet=env.rank != 0 or not cfg.progress, unit="step")
            bar.update(first)
            interval = {"loss": torch.zeros((), device=device), "steps": 0, "clips": 0, "wait": 0.0, "start": time.perf_counter()}
            for in_epoch in range(first, steps_per[epoch]):
                t0 = time.perf_counter()
                batch = next(batches, None)
                t1 = time.perf_counter()
                if batch is None or batch["video"] is None or len(batch["key"]) != sc.batch_size:
                    raise UserError(f"rank {env.rank}: training stream of epoch {epoch + 1} ended after {in_epoch} of {steps_per[epoch]} batches")
                if batch["faults"]:
                    bad_samples += sum(f["samples"] for f in batch["faults"])
                    epoch_bad += sum(f["samples"] for f in batch["faults"])
                    with open(fault_log, "a") as f:
                        for fault in batch["faults"]:
                            f.write(json.dumps({"epoch": epoch, "step": step, **fault}) + "\n")
                            say(f"warning: skipped {fault['what']}: {fault['reason']}")
                    if epoch_bad > bad_limit:
                        last = batch["faults"][-1]
                        raise UserError(
                            f"rank {env.rank}: {epoch_bad} unreadable clips in epoch {epoch + 1}, more than --max-bad {sc.max_bad:g} allows "
                            f"({bad_limit}); last: {last['what']}: {last['reason']} (all in {fault_log})"
                        )
                x = model_input(batch["video"])
                y = batch["label"].to(device, non_blocking=True)
                boundary = (in_epoch + 1) % cfg.grad_accum == 0 or in_epoch + 1 == steps_per[epoch]
                group = cfg.grad_accum if (in_epoch // cfg.grad_accum + 1) * cfg.grad_accum <= steps_per[epoch] else steps_per[epoch] % cfg.grad_accum
                sync = nullcontext() if boundary or env.world_size == 1 else net.no_sync()
                with sync:
                    with autocast:
                        loss = loss_fn(forward(x).float(), y)
                    (loss / group).backward()
                if boundary:
                    lr = learning_rate(cfg, opt_step, sum(opt_steps_per), epoch)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    opt_step += 1
                step += 1
                consumed += torch.bincount(batch["worker"], minlength=n_workers)
                if audit is not None:
                    audit.write("".join(k + "\n" for k in batch["key"]))
                failpoint(f"step:{step}")
                t2 = time.perf_counter()
                interval["loss"] += loss.detach()
                interval["steps"] += 1
                interval["clips"] += sc.batch_size
                interval["wait"] += t1 - t0
                total_wait += t1 - t0
                total_step_time += t2 - t0
                total_clips += sc.batch_size
                bar.update(1)

                if step % cfg.log_every == 0 or in_epoch + 1 == steps_per[epoch]:
                    wall = time.perf_counter() - interval["start"]
                    mine = torch.tensor([interval["loss"].item(), interval["steps"], interval["clips"], interval["wait"], wall], dtype=torch.float64, device=device)
                    every = _gather(mine, env).cpu()
                    per_rank = (every[:, 2] / every[:, 4]).tolist()
                    lr_now = optimizer.param_groups[0]["lr"]
                    rec = {
                        "step": step,
                        "epoch": epoch + 1,
                        "loss": float(every[:, 0].sum() / every[:, 1].sum()),
                        "lr": lr_now,
                        "clips_per_s": sum(per_rank),
                        "clips_per_s_rank": per_rank,
                        "data_wait": float((every[:, 3] / every[:, 4]).mean()),
                        "step_time": float((every[:, 4] / every[:, 1]).mean()),
                    }
                    record("step", **rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", clips_s=f"{rec['clips_per_s']:.1f}", wait=f"{rec['data_wait']:.0%}")
                    interval = {"loss": torch.zeros((), device=device), "steps": 0, "clips": 0, "wait": 0.0, "start": time.perf_counter()}

                last_of_epoch = in_epoch + 1 == steps_per[epoch]
                if boundary and not last_of_epoch:
                    if cfg.max_steps and step >= cfg.max_steps:
                        checkpoint(epoch, in_epoch + 1, consumed)
                        stopped_early = True
                        break
                    if cfg.checkpoint_every and step - last_checkpoint >= cfg.checkpoint_every:
                        checkpoint(epoch, in_epoch + 1, consumed)
                        last_checkpoint = step
            bar.close()
            del batches
            if audit is not None:
                audit.close()
            if stopped_early:
                say(f"stopped after step {step} (--max-steps); continue with --resume {log_dir}")
                break

            # --- evaluation -------------------------------------------------------------------------
            epochs_done = epoch + 1
            if dataset.test and (epochs_done == cfg.epochs or (cfg.eval_every and epochs_done % cfg.eval_every == 0)):
                last_eval = evaluate(model, dataset, cfg, env, device, channels_last, autocast)
                record("eval", step=step, epoch=epochs_done, **last_eval)
                if last_eval["clips"]:
                    per_class = ", ".join(f"{n} {a:.0%}" for n, a in last_eval["per_class"].items() if a is not None)
                    say(
                        f"epoch {epochs_done}: test top-1 {last_eval['top1']:.1%}, top-5 {last_eval['top5']:.1%} "
                        f"on {last_eval['clips']} clips; per class: {per_class}"
                    )
            checkpoint(epochs_done, 0, torch.zeros(n_workers, dtype=torch.int64))
            if cfg.max_steps and step >= cfg.max_steps and epochs_done < cfg.epochs:
                say(f"stopped after step {step} (--max-steps); continue with --resume {log_dir}")
                stopped_early = True
                break
    finally:
        train_loader.close()

    # --- summary ----------------------------------------------------------------------------
    totals = torch.tensor([total_clips, total_wait, total_step_time, bad_samples], dtype=torch.float64, device=device)
    every = _gather(totals, env).cpu()
    summary = {
        "top1": last_eval["top1"] if last_eval else None,
        "top5": last_eval["top5"] if last_eval else None,
        "clips_per_s": float(sum(every[r, 0] / every[r, 2] for r in range(env.world_size) if every[r, 2] > 0)),
        "data_wait": float((every[:, 1] / every[:, 2].clamp(min=1e-9)).mean()),
        "wall_s": time.perf_counter() - started,
        "steps": step,
        "epochs": epochs_done,
        "bad_samples": int(every[:, 3].sum()),
        "fault_logs": sorted(p.name for p in log_dir.glob("faults-rank*.jsonl")),
        "stopped_early": stopped_early,
        "world_size": env.world_size,
        "log_dir": str(log_dir),
    }
    record("summary", **summary)
    if summary["top1"] is not None:
        say(f"done: test top-1 {summary['top1']:.1%}, top-5 {summary['top5']:.1%}; {summary['clips_per_s']:.1f} clips/s, data wait {summary['data_wait']:.0%}, {summary['wall_s']:.0f} s")
    if summary["bad_samples"]:
        say(f"warning: {summary['bad_samples']} unreadable clips replaced or skipped, named in {log_dir}/faults-rank*.jsonl")
    say(f"metrics: {log_dir / 'metrics.jsonl'}")

    # --- teardown ---------------------------------------------------------------------------
    if metrics is not None:
        metrics.close()
        if cfg.plot:
            from pipeline.plots import plot_run

            say(f"curves: {plot_run(log_dir)}")
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    # `torchrun ... -m pipeline.train --shards ...`: the train-stream options, without installing the package.
    from pipeline.cli import train_app

    train_app()
