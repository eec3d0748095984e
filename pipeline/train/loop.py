"""The training loop: one flat function, `train`, in the order a reader expects.

process group -> loader -> run folder -> model -> optimiser -> resume -> epochs of steps (with logging
and checkpoints) -> evaluation -> summary -> teardown; each part a call with its inputs spelled out.

Rank and world size come in as a `DistEnv`, read once from the torchrun environment at the edge
(`DistEnv.from_env`, in launch.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.device import DistEnv, ModelInput, cores_per_rank, model_memory_format, pick_device
from pipeline.durable import failpoint
from pipeline.errors import Stopped, UserError, WorkerGaveUp, printable
from pipeline.redact import redact
from pipeline.stream.loader import ClipLoader
from pipeline.stream.reshard import audit_lines_kept
from pipeline.train.checkpoint import (
    CHECKPOINT_NAME,
    Checkpointer,
    Position,
    load_resume,
    resolve_checkpoint,
    run_identity,
)
from pipeline.train.collectives import agree_min, broadcast_text, gather
from pipeline.train.data import mapping_note, resolve_data, with_workers
from pipeline.train.elastic import CheckpointTriggers, init_process_group
from pipeline.train.evaluate import check_eval_faults, evaluate, evaluation_message
from pipeline.train.meter import BadClipBudget, Meter, PackDraws, pack_draws
from pipeline.train.resuming import resolve_auto
from pipeline.train.runfolder import Audit, Metrics, open_run_folder, trim_audits
from pipeline.train.schedule import learning_rate


def train(cfg: TrainConfig, env: DistEnv) -> dict:
    """Train and evaluate; returns the summary record (on every rank)."""
    # what the run holds until it ends, however it ends (the run folder's lock)
    with contextlib.ExitStack() as held:
        return _train(cfg, env, held)


def _train(cfg: TrainConfig, env: DistEnv, held: contextlib.ExitStack) -> dict:
    started = time.perf_counter()
    say = rank0_say(env)

    # --- process group ----------------------------------------------------------------------
    device = start_process_group(cfg, env)
    use_cuda = device.type == "cuda"
    channels_last = use_cuda and cfg.channels_last
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and cfg.amp else nullcontext()

    # --- loader -----------------------------------------------------------------------------
    data = resolve_data(cfg.stream)
    cfg = agree_on_workers(cfg, len(data.train.shards), env, device)
    torch.set_num_threads(cpu_threads(cfg, env))
    sc = cfg.stream
    # One set of loader workers for the whole run (started with the first epoch asked for).
    loader = ClipLoader.from_config(
        data.train,
        sc,
        env.rank,
        env.world_size,
        epochs=cfg.epochs,
        pin_memory=use_cuda,
        copy=False,
        stop_at_max_bad=True,
    )
    classes = data.train.classes

    # --- run folder -------------------------------------------------------------------------
    log_dir = open_run_folder(cfg, env, device, held)
    restarted = (log_dir / "metrics.jsonl").exists()  # an earlier attempt of this run wrote here
    metrics = Metrics(log_dir, env)
    bad_clips = BadClipBudget(cfg, log_dir / f"faults-rank{env.rank}.jsonl", env.rank, say)

    # --- model ------------------------------------------------------------------------------
    model, net = build_net(cfg, len(classes), env, device, channels_last)
    forward = torch.compile(net) if cfg.compile else net

    # --- optimiser --------------------------------------------------------------------------
    optimizer = make_optimizer(cfg, model, use_cuda)

    # --- resume -----------------------------------------------------------------------------
    identity = run_identity(cfg, env.world_size, loader.n_workers, data.train)
    meter = Meter(device, env)
    resume = broadcast_text(resolve_auto(cfg.resume, str(log_dir)) or "", env, device)  # rank 0's view, alike
    at = Position()
    if resume:
        path = resolve_checkpoint(resume)
        at = load_resume(path, identity, model, optimizer, loader, env, use_cuda)
        if at.epoch > cfg.epochs:  # every rank alike
            raise UserError(f"`epochs` {cfg.epochs} is fewer than the {at.epoch} the run in {log_dir} has trained")
        if env.rank == 0 and loader.history:
            trim_audits(log_dir, at.epoch, loader.history, env.world_size)
        say(resumed_message(path, at, loader))
    if resume or restarted:
        # the steps after `at.step` that an earlier attempt logged are redone: its records of them are superseded
        metrics.record("resume", step=at.step, epoch=at.epoch, world_size=env.world_size, workers=loader.n_workers)
    steps_per = [loader.steps(e) for e in range(cfg.epochs)]
    earlier_opt_steps = sum(math.ceil(seg.steps / cfg.grad_accum) for seg in loader.history)
    total_opt_steps = earlier_opt_steps + sum(math.ceil(s / cfg.grad_accum) for s in steps_per)
    checkpointer = Checkpointer(
        log_dir / CHECKPOINT_NAME,
        model,
        optimizer,
        identity,
        cfg.schedule,
        total_opt_steps,
        env,
        device,
        loader,
        check=lambda: meter.check_finite(log_dir / CHECKPOINT_NAME),
    )
    say(
        f"training {cfg.model} on {data.train.samples} clips ({len(data.train.shards)} shards), {len(classes)} classes; "
        f"{env.world_size} rank(s) x {loader.n_workers} worker(s) on {device.type}; {steps_per[0]} steps/epoch of {sc.batch_size} clips per rank"
    )

    if mapping_note(data):
        say(mapping_note(data))

    # --- loop -------------------------------------------------------------------------------
    stepper = Stepper(net, forward, optimizer, ModelInput(device, channels_last), autocast, cfg, total_opt_steps)
    triggers = CheckpointTriggers(cfg.checkpoint_every, cfg.checkpoint_every_min, env.world_size, use_cuda)
    triggers.install(at.step)
    last_eval, stopped_early = None, False
    net.train()
    try:
        for epoch in range(at.epoch, cfg.epochs):
            finished = run_epoch(
                loader.epoch(epoch),
                steps_per[epoch],
                at,
                stepper=stepper,
                meter=meter,
                bad_clips=bad_clips,
                metrics=metrics,
                checkpointer=checkpointer,
                triggers=triggers,
                audit_dir=log_dir if cfg.audit_keys else None,
                audit_earlier=audit_lines_kept(loader.history, env.rank) if epoch == loader.history_epoch else 0,
                cfg=cfg,
                env=env,
                draws=pack_draws(data.train, sc, device, env),
            )
            if not finished and triggers.stop:
                raise stopped_by_sigterm(at, log_dir)
            if not finished:
                say(f"stopped after step {at.step} (--max-steps); continue with --resume {log_dir}")
                stopped_early = True
                break

            # --- evaluation ---------------------------------------------------------------------
            if data.test.shards and (at.epoch == cfg.epochs or (cfg.eval_every and at.epoch % cfg.eval_every == 0)):
                last_eval = evaluate(
                    model, data.test, cfg, env, device, channels_last, autocast, classes, data.test_labels
                )
                eval_faults = last_eval.pop("faults")
                metrics.record("eval", step=at.step, epoch=at.epoch, **last_eval)
                try:
                    check_eval_faults(
                        last_eval, eval_faults, data.test, cfg, bad_clips, log_dir, at.epoch, at.step, say
                    )
                except UserError:
                    checkpointer.save(at)  # the epoch is trained: keep it (every rank raises alike)
                    raise
                if last_eval["clips"]:
                    say(evaluation_message(at.epoch, last_eval))
            checkpointer.save(at)
            triggers.taken(at.step, epoch_end=True)
            if triggers.due(at.step) and triggers.stop:  # SIGTERM during the epoch's last steps or evaluation
                raise stopped_by_sigterm(at, log_dir)
            if cfg.max_steps and at.step >= cfg.max_steps and at.epoch < cfg.epochs:
                say(f"stopped after step {at.step} (--max-steps); continue with --resume {log_dir}")
                stopped_early = True
                break
    finally:
        triggers.close()
        loader.close()

    # --- summary ----------------------------------------------------------------------------
    summary = summarise(meter, bad_clips, last_eval, at, stopped_early, time.perf_counter() - started, env, log_dir)
    metrics.record("summary", **summary)
    report(summary, log_dir, say)

    # --- teardown ---------------------------------------------------------------------------
    metrics.close()
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def rank0_say(env: DistEnv) -> Callable[[str], None]:
    """print for rank 0, below its progress bar; nothing on the other ranks."""
    from tqdm import tqdm

    if env.rank != 0:
        return lambda msg: None
    # printable: keys, member names and class names in messages come from shards and the index;
    # redact: a pre-signed shard URL's signature is a secret
    return lambda msg: tqdm.write(printable(redact(msg)), file=sys.stdout)


def start_process_group(cfg: TrainConfig, env: DistEnv) -> torch.device:
    """This rank's device, and the process group of every rank (NCCL on GPUs, gloo on CPUs)."""
    device = pick_device(cfg.device, env.local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if env.world_size > 1 and not dist.is_initialized():
        init_process_group("nccl" if use_cuda else "gloo", env.rank, env.world_size, device if use_cuda else None)
    return device


def resumed_message(path: str, at: Position, loader: ClipLoader) -> str:
    steps = loader.steps(at.epoch) if loader.epochs is None or at.epoch < loader.epochs else 0
    if not loader.history or at.epoch != loader.history_epoch:
        return f"resumed from {path}: epoch {at.epoch + 1}, step {at.step_in_epoch} of {steps}"
    before = ", ".join(f"{s.world_size}x{s.workers}x{s.batch_size}: {s.steps} steps" for s in loader.history)
    return (
        f"resumed from {path}: epoch {at.epoch + 1} goes on with the clips it has left, {steps} steps on "
        f"{loader.world_size} rank(s) x {loader.n_workers} worker(s) (ranks x workers x batch before: {before})"
    )


def stopped_by_sigterm(at: Position, log_dir: Path) -> Stopped:
    return Stopped(
        f"stopped by SIGTERM after step {at.step}, checkpoint written; continue with --resume {log_dir} (or --resume auto)",
        143,
    )


def agree_on_workers(cfg: TrainConfig, n_shards: int, env: DistEnv, device: torch.device) -> TrainConfig:
    """`cfg` with the loader workers decided, alike on every rank: each rank must split its shards the
    same way (a mid-epoch resume needs the same plan)."""
    if cfg.stream.workers is not None:
        return cfg
    mine = with_workers(cfg, n_shards, env.world_size, env.local_world_size).stream.workers
    workers = agree_min(mine, env, device)
    return dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=workers))


def cpu_threads(cfg: TrainConfig, env: DistEnv) -> int:
    """Intra-op threads of one training process.

    Loader workers run single-threaded beside it; more threads than free cores make OpenMP wait on
    descheduled threads, which costs far more than it gains (10x slower steps measured on 2 cores).
    """
    if cfg.threads is not None:
        return cfg.threads
    return max(1, cores_per_rank(env.local_world_size) - (cfg.stream.workers or 0))


def build_net(
    cfg: TrainConfig, num_classes: int, env: DistEnv, device: torch.device, channels_last: bool
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model, seeded alike on every rank, on `device`; and what the steps run: DDP over it when
    there are several ranks, the model itself in one."""
    from pipeline.train.models import build_model

    torch.manual_seed(cfg.stream.seed)
    model = build_model(cfg.model, num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=model_memory_format(model))
    if env.world_size == 1:
        return model, model
    ids = [device.index] if device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, use_cuda: bool) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            model.parameters(), lr=cfg.peak_lr, weight_decay=cfg.weight_decay, fused=use_cuda or None
        )
    return torch.optim.SGD(
        model.parameters(), lr=cfg.peak_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )


@dataclasses.dataclass(frozen=True)
class Stepper:
    """One training step: forward and backward, gradients summed over --grad-accum steps (DDP's
    all-reduce only at a group's last), and at a group's end the optimiser step at the schedule's rate."""

    net: torch.nn.Module
    """The model, or DDP over it (for no_sync)."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    """`net`, compiled with --compile."""
    optimizer: torch.optim.Optimizer
    model_input: ModelInput
    autocast: AbstractContextManager
    cfg: TrainConfig
    total_opt_steps: int
    loss_fn: torch.nn.Module = dataclasses.field(default_factory=torch.nn.CrossEntropyLoss)

    def step(self, batch: dict, at: Position, steps: int) -> tuple[torch.Tensor, bool]:
        """Step `at.step_in_epoch` of an epoch of `steps`; `at.opt_step` counts the optimiser step.
        Returns the loss and whether the optimiser stepped."""
        accum, in_epoch = self.cfg.grad_accum, at.step_in_epoch
        x = self.model_input(batch["frames"])
        y = batch["label"].to(self.model_input.device, non_blocking=True)
        boundary = (in_epoch + 1) % accum == 0 or in_epoch + 1 == steps
        group = accum if (in_epoch // accum + 1) * accum <= steps else steps % accum
        ddp = isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
        sync = nullcontext() if boundary or not ddp else self.net.no_sync()
        with sync:
            with self.autocast:
                loss = self.loss_fn(self.forward(x).float(), y)
            (loss / group).backward()
        if boundary:
            lr = learning_rate(self.cfg, at.opt_step, self.total_opt_steps, at.epoch)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            at.opt_step += 1
        return loss, boundary


def run_epoch(
    batches,
    steps: int,
    at: Position,
    *,
    stepper: Stepper,
    meter: Meter,
    bad_clips: BadClipBudget,
    metrics: Metrics,
    checkpointer: Checkpointer,
    triggers: CheckpointTriggers,
    audit_dir: Path | None,
    audit_earlier: int,
    cfg: TrainConfig,
    env: DistEnv,
    draws: PackDraws | None = None,
) -> bool:
    """The steps of epoch `at.epoch` from `at.step_in_epoch` on, `at` kept at the last step taken
    (the next epoch's start at the end). False when --max-steps or SIGTERM stopped it short, with a
    checkpoint. `audit_earlier`: audit lines this rank wrote in the epoch's earlier segments; `draws`:
    a mix's clips per pack, counted."""
    from pipeline.progress import progress

    epoch, first, batch_size = at.epoch, at.step_in_epoch, cfg.stream.batch_size
    bad_clips.new_epoch(steps * batch_size)
    kept = audit_earlier + first * batch_size
    audit = Audit(audit_dir, epoch, env.rank, kept) if audit_dir is not None else None
    bar = progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", quiet=env.rank != 0 or not cfg.progress, unit="step")
    bar.update(first)
    meter.reset()
    if draws is not None:
        draws.new_epoch(first)
    for in_epoch in range(first, steps):
        t0 = time.perf_counter()
        try:
            batch = next(batches, None)
        except WorkerGaveUp as e:
            bad_clips.write(e.faults, epoch, at.step)  # the message points at the log: it must hold them
            raise UserError(f"rank {env.rank}: {e}; named in {bad_clips.log}") from None
        t1 = time.perf_counter()
        if batch is None or batch["frames"] is None or len(batch["key"]) != batch_size:
            raise UserError(
                f"rank {env.rank}: training stream of epoch {epoch + 1} ended after {in_epoch} of {steps} batches"
            )
        bad_clips.add(batch["faults"], epoch, at.step)
        loss, boundary = stepper.step(batch, at, steps)
        at.step, at.step_in_epoch = at.step + 1, in_epoch + 1
        packs = batch["pack"].tolist() if draws is not None else None
        if draws is not None:
            draws.add(packs, batch["repeat"].tolist())
        if audit is not None:
            audit.write(batch["key"], batch["repeat"].tolist(), packs)
        failpoint(f"step:{at.step}")
        meter.add(loss, batch_size, t1 - t0, time.perf_counter() - t0, at.step)
        bar.update(1)

        if at.step % cfg.log_every == 0 or in_epoch + 1 == steps:
            rec = {
                "step": at.step,
                "epoch": epoch + 1,
                "lr": stepper.optimizer.param_groups[0]["lr"],
                **meter.record(checkpointer.path),
            }
            metrics.record("step", **rec)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}", clips_s=f"{rec['clips_per_s']:.1f}", wait=f"{rec['data_wait']:.0%}"
            )

        if boundary and in_epoch + 1 != steps:
            stop = bool(cfg.max_steps and at.step >= cfg.max_steps)
            if triggers.due(at.step) or stop:  # a collective: every rank asks at every boundary
                if audit is not None:
                    audit.flush()  # a resume keeps the audit lines up to this checkpoint: they must be on disk
                checkpointer.save(at)
                triggers.taken(at.step)
            if stop or triggers.stop:
                bar.close()
                if audit is not None:
                    audit.close()
                return False
    bar.close()
    if audit is not None:
        audit.close()
    at.epoch, at.step_in_epoch = epoch + 1, 0
    if draws is not None:
        metrics.record("mix", step=at.step, epoch=at.epoch, **draws.record())
    return True


def summarise(
    meter: Meter,
    bad_clips: BadClipBudget,
    last_eval: dict | None,
    at: Position,
    stopped_early: bool,
    wall_s: float,
    env: DistEnv,
    log_dir: Path,
) -> dict:
    """The run's summary record, over every rank (a collective)."""
    totals = torch.tensor(
        [meter.clips, meter.wait, meter.step_time, bad_clips.total], dtype=torch.float64, device=meter.device
    )
    every = gather(totals, env).cpu()
    return {
        "top1": last_eval["top1"] if last_eval else None,
        "top5": last_eval["top5"] if last_eval else None,
        "clips_per_s": float(sum(every[r, 0] / every[r, 2] for r in range(env.world_size) if every[r, 2] > 0)),
        "data_wait": float((every[:, 1] / every[:, 2].clamp(min=1e-9)).mean()),
        "wall_s": wall_s,
        "steps": at.step,
        "epochs": at.epoch,
        "bad_samples": int(every[:, 3].sum()),
        "fault_logs": sorted(p.name for p in log_dir.glob("faults-rank*.jsonl")),
        "stopped_early": stopped_early,
        "world_size": env.world_size,
        "log_dir": str(log_dir),
    }


def report(summary: dict, log_dir: Path, say: Callable[[str], None]) -> None:
    """The summary's lines for the user."""
    if summary["top1"] is not None:
        say(
            f"done: test top-1 {summary['top1']:.1%}, top-5 {summary['top5']:.1%}; {summary['clips_per_s']:.1f} clips/s, data wait {summary['data_wait']:.0%}, {summary['wall_s']:.0f} s"
        )
    if summary["bad_samples"]:
        # Name the logs this machine can see: ranks on other machines write theirs to their own disks
        # when LOG_DIR is not shared.
        where = (
            f"{log_dir}/faults-rank*.jsonl"
            if summary["fault_logs"]
            else f"faults-rankR.jsonl in {log_dir} of the machines whose ranks met them"
        )
        say(f"warning: {summary['bad_samples']} unreadable clips replaced or skipped, named in {where}")
    say(f"metrics: {log_dir / 'metrics.jsonl'}")
