"""`bench-stream`: how fast the loading pipeline delivers clips, and where the time goes.

For each worker count: the real training stream (`ClipLoader`, one set of workers running
epoch after epoch as in train.py), a warm-up, then a measured phase.
Loader-only mode takes batches as fast as they come; with a model, every batch is copied to the
device, normalised there and run forward and backward (one optimiser step), so the share of wall
time spent waiting for the next batch is the data-wait share train-stream reports.

The per-stage breakdown runs the stream's own stage functions one after another in this process
(0 workers), each over the same samples: tar read and grouping (`read_samples`), JPEG decode
(`decode_frame`, frame by frame into a reused one-frame buffer), crop and flip (`crop_box` +
`crop_frame`, straight into a row of a reused batch slot, as the workers do), collate (the batch's label and worker
tensors: the pixels are already in place) and host to device with normalisation (`ModelInput`, as the trainer does).

Peak memory: after every batch, VmRSS (from /proc/<pid>/status) of this process plus that of every
live child (the loader workers, the next epoch's included); the largest such sum is `peak_rss_mb`.
Forked workers share the parent's pages and each counts them, so the sum is an upper bound on what
the loader really holds. `peak_rss_main_mb` and `peak_rss_worker_mb` are the VmHWM (kernel-kept
peak) of this process and of the largest worker.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch

from pipeline.config import StreamConfig
from pipeline.device import ModelInput, cores_per_rank, model_memory_format, pick_device
from pipeline.errors import UserError
from pipeline.frames import clip_draw, crop_box
from pipeline.shardformat import jpeg_size, unpack_jpegs
from pipeline.storage.urls import local_path
from pipeline.stream.clips import crop_frame, decode_frame, frame_buffer
from pipeline.stream.loader import ClipLoader
from pipeline.stream.mix import checked_epoch_shards, epoch_shards
from pipeline.stream.plan import steps_per_epoch
from pipeline.stream.sources import ShardSet, resolve
from pipeline.stream.stages import Faults, read_samples


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What bench-stream measures."""

    stream: StreamConfig
    """The data side (workers there is ignored: see `workers`)."""
    workers: tuple[int, ...] = (0, 1, 2)
    """Loader worker counts to measure (comma-separated on the command line), one configuration each."""
    batches: int = 20
    """Measured batches per configuration."""
    warmup: int = 3
    """Batches taken before the clock starts (workers started, buffers filled, caches warm)."""
    model: str | None = None
    """End to end: forward + backward of this model (r3d18, r2plus1d18, cnn-lstm, tiny, ...) on `device` for every batch, so the data-wait share means something; None: loader only."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    synthetic: bool = False
    """Also run the model on the same batches held in memory (no decoding) and print real / synthetic; needs `model` (or `step_ms`)."""
    stages: bool = True
    """Time each stage of the stream in this process (tar read and grouping, JPEG decode, crop, collate, host to device)."""
    amp: bool = True
    """bf16 autocast on CUDA."""
    channels_last: bool = True
    """channels_last_3d on CUDA."""
    threads: int | None = None
    """Intra-op threads of this process; None: as train-stream picks them (cores minus workers, at least 1)."""
    step_ms: float | None = None
    """Simulate an accelerator instead of `model`: each batch is consumed by waiting this many ms without using the CPU, as a GPU step would; with `synthetic`, real / synthetic shows whether the loader keeps up, epoch boundaries included."""

    def __post_init__(self):
        if not self.workers:
            raise UserError("--workers must list at least one worker count, e.g. 0,1,2")
        if any(w < 0 for w in self.workers):
            raise UserError(f"--workers counts must be >= 0, got {','.join(map(str, self.workers))}")
        from pipeline.config import MAX_LOADER_WORKERS

        if any(w > MAX_LOADER_WORKERS for w in self.workers):  # before the first configuration runs
            raise UserError(
                f"--workers counts must be at most {MAX_LOADER_WORKERS}, got {','.join(map(str, self.workers))}"
            )
        if self.batches < 1:
            raise UserError(f"--batches must be >= 1, got {self.batches}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.step_ms is not None and (not 0 < self.step_ms <= 60_000 or self.model):
            raise UserError(
                f"--step-ms must be in (0, 60000] ms and cannot be combined with --model, got {self.step_ms}"
            )
        if self.synthetic and not (self.model or self.step_ms):
            raise UserError("--synthetic compares against a model's step time: give --model (or --step-ms) too")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")


def parse_workers(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--workers must be a comma-separated list of counts like 0,1,2, got {text!r}") from None
    if not counts:
        raise UserError(f"--workers must list at least one worker count, got {text!r}")
    return counts


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """The live children of `pid`, sorted. Each is listed under the thread that forked it, and any
    thread (torch's, the transfer thread) may exit between listing and reading: skip it, not the rest."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return sorted(out)


class PeakMemory:
    """Resident memory of this process and its live children (the loader workers), sampled at most
    every `interval` seconds (reading /proc after every batch cost up to 10 % of the throughput it
    measures): the peak of their sum, and the largest peak (VmHWM, kept by the kernel, so no peak
    is missed) of any one worker, in MB."""

    def __init__(self, interval: float = 0.25):
        self.total_kb = 0
        self.worker_kb = 0
        self.workers_seen: set[int] = set()
        self.interval, self.last = interval, -float("inf")

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        children = child_pids(os.getpid())
        self.workers_seen.update(children)
        total = _status_kb(os.getpid(), "VmRSS") + sum(_status_kb(pid, "VmRSS") for pid in children)
        self.total_kb = max(self.total_kb, total)
        self.worker_kb = max([self.worker_kb, *(_status_kb(pid, "VmHWM") for pid in children)])

    @property
    def main_mb(self) -> float:
        return _status_kb(os.getpid(), "VmHWM") / 1024

    @property
    def total_mb(self) -> float:
        return self.total_kb / 1024

    @property
    def worker_mb(self) -> float:
        return self.worker_kb / 1024


# ---------------------------------------------------------------------------------------------
# Sources of batches


def endless_batches(source: ShardSet, cfg: StreamConfig, pin_memory: bool, copy: bool = False) -> Iterator[dict]:
    """The real training stream of rank 0 of 1, epoch after epoch, from one set of loader workers
    (ClipLoader, as train.py uses it). Each batch is valid until the next is asked for, unless `copy`."""
    counts = [s.samples for s in epoch_shards(source, cfg, 0)]
    if steps_per_epoch(counts, cfg.batch_size, 1, cfg.seed, 0, cfg.resample) == 0:
        raise UserError(f"{sum(counts)} clips do not fill one batch of {cfg.batch_size}")
    with ClipLoader.from_config(source, cfg, 0, 1, pin_memory=pin_memory, copy=copy) as loader:
        for epoch in itertools.count():
            yield from loader.epoch(epoch)


def memory_batches(batches: list[dict], pin_memory: bool) -> Iterator[dict]:
    """The same few batches again and again, from memory: a source that costs nothing."""
    held = [{**b, "frames": b["frames"].pin_memory() if pin_memory else b["frames"]} for b in batches]
    return itertools.cycle(held)


# ---------------------------------------------------------------------------------------------
# One configuration


@dataclasses.dataclass
class Step:
    """An end-to-end consumer: copy to the device, normalise, forward, backward, optimiser step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    model_input: ModelInput
    """Host to device and normalisation, as the trainer does it."""
    autocast: object

    def __call__(self, batch: dict) -> None:
        x = self.model_input(batch["frames"])
        y = batch["label"].to(self.device, non_blocking=True)
        with self.autocast:
            loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            loss.item()  # the step is done when its loss is known: no run-ahead hides data wait


@dataclasses.dataclass
class SleepStep:
    """A simulated accelerator: each batch takes `ms` of waiting that leaves the CPU to the loader,
    as a GPU step does. Shows whether the loader keeps up at a given step time, epoch boundaries
    included, on a machine without a GPU."""

    ms: float
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def __call__(self, batch: dict) -> None:
        time.sleep(self.ms / 1000)


def build_step(name: str, num_classes: int, device: torch.device, amp: bool, channels_last: bool) -> Step:
    from pipeline.train.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes).to(device)
    cl = channels_last and device.type == "cuda"
    if cl:
        model = model.to(memory_format=model_memory_format(model))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda" or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and amp else nullcontext()
    return Step(model, optimizer, device, ModelInput(device, cl), autocast)


def measure(source: Iterator[dict], warmup: int, batches: int, step: Step | None, memory: PeakMemory | None) -> dict:
    """Time `batches` batches of `source` after `warmup` ones; returns clips, seconds, wait seconds
    and the seconds to the first batch (a fresh `source` starts its workers and opens its first
    shards then: what a training job waits before its first step)."""
    created = time.perf_counter()
    first_batch: float | None = None

    def take() -> dict:
        nonlocal first_batch
        batch = next(source)
        if first_batch is None:
            first_batch = time.perf_counter() - created
        return batch

    for _ in range(warmup):
        batch = take()
        if step is not None:
            step(batch)
    if memory is not None:
        memory.sample(force=True)
    clips = 0
    wait = 0.0
    start = time.perf_counter()
    for i in range(batches):
        t0 = time.perf_counter()
        batch = take()
        wait += time.perf_counter() - t0
        if step is not None:
            step(batch)
        clips += len(batch["key"])
        if memory is not None:
            memory.sample()
    if step is not None and step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - start
    if memory is not None:
        memory.sample(force=True)
    return {"clips": clips, "seconds": seconds, "wait": wait, "first_batch": first_batch}


# ---------------------------------------------------------------------------------------------
# Per-stage breakdown (0 workers, this process, the stream's own stage functions)


def stage_breakdown(
    source: ShardSet, cfg: StreamConfig, device: torch.device, channels_last: bool, max_clips: int, repeats: int = 3
) -> dict:
    """Milliseconds per clip of each stage on up to `max_clips` clips of the first shards: every stage
    runs `repeats` times over the same inputs after a warm-up run (imports, caches), median kept."""
    faults = Faults()
    cuda = device.type == "cuda"

    def timed(fn):
        times, result = [], None
        for _ in range(repeats + 1):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            result = fn()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), result

    def read():
        return list(itertools.islice(read_samples(source.shards, cfg.allow_pipe, faults), max_clips))

    def clip_stages() -> tuple[float, float, float, list[torch.Tensor]]:
        # Clip by clip and frame by frame, as a loader worker runs them: decode each frame into a
        # reused one-frame buffer, crop and flip it straight into a row of a reused batch slot, then
        # the batch's small fields (collate).
        decode = crop = collate = 0.0
        slot = np.empty((cfg.batch_size, source.frames, cfg.crop, cfg.crop, 3), np.uint8)
        scratch: dict = {}
        labels: list[int] = []
        kept: list[torch.Tensor] = []
        clock = time.perf_counter
        for position, (key, p, (h, w)) in enumerate(zip(keys, packs, sizes)):
            frame = frame_buffer(h, w, scratch)
            row = slot[len(labels)]
            t0 = clock()
            top, left, flip = crop_box(h, w, cfg.crop, clip_draw(cfg.seed, 0, key))
            window = frame[top : top + cfg.crop, left : left + cfg.crop]
            crop += clock() - t0
            for t, jpeg in enumerate(p):
                t0 = clock()
                decode_frame(jpeg, t, frame)
                t1 = clock()
                crop_frame(window, flip, row[t])
                t2 = clock()
                decode, crop = decode + t1 - t0, crop + t2 - t1
            labels.append(0)
            if len(labels) == cfg.batch_size or position == n - 1:
                t0 = clock()
                batch = {
                    "frames": torch.from_numpy(slot[: len(labels)]),
                    "label": torch.tensor(labels, dtype=torch.int64),
                    "worker": torch.zeros(len(labels), dtype=torch.int64),
                }
                collate += clock() - t0
                kept = [*kept[-3:], batch["frames"].clone()]  # a few kept for host_to_device
                labels = []
        return decode, crop, collate, kept

    def to_device():
        model_input = ModelInput(device, channels_last)
        for v in videos:
            model_input(v)

    timings: dict[str, float] = {}
    timings["tar_read_group"], raw = timed(read)
    n = len(raw)
    if n == 0:
        raise UserError("the shards hold no readable sample")
    keys = [s["__key__"] for s in raw]
    packs = [unpack_jpegs(s["jpgs"]) for s in raw]
    sizes = [jpeg_size(p[0]) for p in packs]
    runs = [clip_stages() for _ in range(repeats + 1)][1:]
    for i, name in enumerate(("jpeg_decode", "crop_augment", "collate")):
        timings[name] = statistics.median(r[i] for r in runs)
    videos = [v.pin_memory() if cuda else v for v in runs[-1][3]]
    timings["host_to_device"], _ = timed(to_device)

    ms = {k: round(1000 * v / n, 4) for k, v in timings.items()}
    ms["host_to_device"] = round(1000 * timings["host_to_device"] / sum(len(v) for v in videos), 4)
    loader_ms = sum(v for k, v in ms.items() if k != "host_to_device")
    return {
        "clips": n,
        "repeats": repeats,
        "ms_per_clip": ms,
        "share": {k: round(v / loader_ms, 4) for k, v in ms.items() if k != "host_to_device"},
        # what the target bounds: everything but decoding, against decoding
        "overhead_vs_decode": round((loader_ms - ms["jpeg_decode"]) / ms["jpeg_decode"], 4),
    }


# ---------------------------------------------------------------------------------------------
# The command


def run_bench(cfg: BenchConfig, emit=print) -> list[dict]:
    """Measure every worker count; `emit` gets one result dict per configuration (and the breakdown)."""
    shards = resolve(cfg.stream.shards, "train", cfg.stream.index, cfg.stream.allow_pipe)
    device = pick_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    frames = shards.frames
    local = [local_path(s.url) for s in shards.shards]
    bytes_per_clip = (
        sum(p.stat().st_size for p in local) / max(1, shards.samples) if all(p is not None for p in local) else None
    )
    cores = cores_per_rank()
    results: list[dict] = []
    if cfg.model:
        step, mode = build_step(cfg.model, len(shards.classes), device, cfg.amp, cfg.channels_last), "end_to_end"
    elif cfg.step_ms:
        step, mode = SleepStep(cfg.step_ms), "simulated_accelerator"
    else:
        step, mode = None, "loader"
    held: list[dict] | None = None
    for workers in cfg.workers:
        sc = dataclasses.replace(cfg.stream, workers=workers)
        checked_epoch_shards(shards, sc, 1, workers)
        torch.set_num_threads(cfg.threads or max(1, cores - workers))
        memory = PeakMemory()
        source = endless_batches(shards, sc, pin_memory=cuda)
        m = measure(source, cfg.warmup, cfg.batches, step, memory)
        source.close()
        rate = m["clips"] / m["seconds"]
        result = {
            "bench": "stream",
            "mode": mode,
            "source": "shards",
            "workers": workers,
            "batch_size": sc.batch_size,
            "model": cfg.model,
            "device": device.type,
            "clips": m["clips"],
            "seconds": round(m["seconds"], 4),
            "clips_per_s": round(rate, 2),
            "frames_per_s": round(rate * frames, 1),
            "mb_per_s": round(rate * bytes_per_clip / 1e6, 2) if bytes_per_clip else None,
            "data_wait": round(m["wait"] / m["seconds"], 4),
            "first_batch_s": round(m["first_batch"], 4),
            "peak_rss_mb": round(memory.total_mb, 1),
            "peak_rss_main_mb": round(memory.main_mb, 1),
            "peak_rss_worker_mb": round(memory.worker_mb, 1),
            "worker_processes": len(memory.workers_seen),
        }
        results.append(result)
        if cfg.synthetic:
            # Same model, same threads as this configuration's trainer, batches from memory.
            if held is None:
                held = list(
                    itertools.islice(
                        endless_batches(shards, dataclasses.replace(cfg.stream, workers=0), False, copy=True), 4
                    )
                )
            m = measure(memory_batches(held, cuda), cfg.warmup, cfg.batches, step, None)
            synthetic_rate = m["clips"] / m["seconds"]
            result["real_vs_synthetic"] = round(rate / synthetic_rate, 4)
            synthetic = {
                **{k: result[k] for k in ("bench", "mode", "batch_size", "model", "device")},
                "source": "synthetic",
                "workers": workers,
                "clips": m["clips"],
                "seconds": round(m["seconds"], 4),
                "clips_per_s": round(synthetic_rate, 2),
                "frames_per_s": round(synthetic_rate * frames, 1),
                "data_wait": round(m["wait"] / m["seconds"], 4),
                "first_batch_s": round(m["first_batch"], 4),
            }
            results.append(synthetic)
        emit(result)
        if cfg.synthetic:
            emit(synthetic)
    if cfg.stages:
        sc = dataclasses.replace(cfg.stream, workers=0)
        torch.set_num_threads(cfg.threads or cores)
        breakdown = {
            "bench": "stream-stages",
            "workers": 0,
            "device": device.type,
            **stage_breakdown(
                shards, sc, device, cfg.channels_last and cuda, max_clips=max(cfg.batches, 1) * sc.batch_size
            ),
        }
        results.append(breakdown)
        emit(breakdown)
    return results


def table(results: list[dict]) -> str:
    """The human-readable summary of `run_bench`'s results."""
    lines = [
        f"{'source':9} {'workers':>7} {'clips/s':>9} {'frames/s':>9} {'MB/s':>7} {'wait':>6} {'1st batch':>9} {'peak RSS MB':>11}"
    ]
    for r in results:
        if r["bench"] != "stream":
            continue
        mb = "-" if r.get("mb_per_s") is None else f"{r['mb_per_s']:.1f}"
        rss = "-" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        first = "-" if r.get("first_batch_s") is None else f"{r['first_batch_s']:.2f} s"
        # loader only, nothing consumes the batches: all of the time is waiting, so "100%" says nothing
        wait = "-" if r.get("mode") == "loader" else f"{r['data_wait']:.0%}"
        lines.append(
            f"{r['source']:9} {r['workers']:>7} {r['clips_per_s']:9.1f} {r['frames_per_s']:9.0f} {mb:>7} {wait:>6} {first:>9} {rss:>11}"
        )
    ratios = [f"{r['workers']} workers {r['real_vs_synthetic']:.2f}" for r in results if "real_vs_synthetic" in r]
    if ratios:
        lines.append("real / synthetic: " + ", ".join(ratios))
    for r in results:
        if r["bench"] == "stream-stages":
            lines.append(f"stages (ms per clip, 0 workers, {r['clips']} clips):")
            for k, v in r["ms_per_clip"].items():
                share = r["share"].get(k)
                lines.append(f"  {k:15} {v:8.3f}" + (f"  {share:5.1%} of loading" if share is not None else ""))
            lines.append(f"  everything but decoding costs {r['overhead_vs_decode']:.0%} of decoding")
    return "\n".join(lines)
