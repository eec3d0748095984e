"""What a run measures and counts as it goes: `Meter` (loss, clips/s, data-wait share, step time,
summed over every rank at each record) and `BadClipBudget` (the unreadable clips of one rank, held
against --max-bad)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.durable import open_append
from pipeline.errors import UserError
from pipeline.redact import redact_all
from pipeline.train.collectives import gather


class Meter:
    """Loss, clips, data wait and wall time since the last step record, summed over every rank when
    the record is made; plus the run's totals for the summary."""

    def __init__(self, device: torch.device, env: DistEnv):
        self.device, self.env = device, env
        self.clips = self.wait = self.step_time = 0.0
        # The first step whose loss was not finite (-1: none yet) and that loss, kept on the device:
        # checking each step's loss on the host would wait for the GPU every step.
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.interval = {
            "loss": torch.zeros((), device=self.device),
            "steps": 0,
            "clips": 0,
            "wait": 0.0,
            "start": time.perf_counter(),
        }

    def add(self, loss: torch.Tensor, clips: int, wait: float, step_time: float, step: int = 0) -> None:
        i = self.interval
        first = (self.bad_step < 0) & ~torch.isfinite(loss.detach())
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)
        i["loss"] += loss.detach()
        i["steps"] += 1
        i["clips"] += clips
        i["wait"] += wait
        self.clips += clips
        self.wait += wait
        self.step_time += step_time

    def check_finite(self, checkpoint: Path) -> None:
        """Stop the run, on every rank alike (a collective), once a step's loss was not finite: the
        weights are then NaN or on their way, and must never replace the last good `checkpoint`."""
        mine = torch.stack([self.bad_step.double(), self.bad_loss.double()])
        every = gather(mine, self.env).cpu()
        bad = [(int(s), float(v), r) for r, (s, v) in enumerate(every.tolist()) if s >= 0]
        if bad:
            step, value, rank = min(bad)
            kept = (
                f"the last good checkpoint ({checkpoint}) is kept"
                if checkpoint.exists()
                else "no checkpoint is written"
            )
            raise UserError(
                f"the loss is not finite ({value}) at step {step} on rank {rank}; the run stops here and {kept}. "
                "A lower `lr` (or `warmup_steps`) usually helps"
            )

    def record(self, checkpoint: Path) -> dict:
        """The interval's figures over all ranks (a collective: every rank calls it), then a new
        interval; first `check_finite(checkpoint)`, so a record never holds a NaN loss."""
        self.check_finite(checkpoint)
        i = self.interval
        wall = time.perf_counter() - i["start"]
        mine = torch.tensor(
            [i["loss"].item(), i["steps"], i["clips"], i["wait"], wall], dtype=torch.float64, device=self.device
        )
        every = gather(mine, self.env).cpu()
        per_rank = (every[:, 2] / every[:, 4]).tolist()
        self.reset()
        return {
            "loss": float(every[:, 0].sum() / every[:, 1].sum()),
            "clips_per_s": sum(per_rank),
            "clips_per_s_rank": per_rank,
            "data_wait": float((every[:, 3] / every[:, 4]).mean()),
            "step_time": float((every[:, 4] / every[:, 1]).mean()),
        }


class BadClipBudget:
    """Unreadable clips of one rank: each written to the rank's faults log and warned about, the
    epoch's count held against --max-bad (above it the run stops with one line)."""

    def __init__(self, cfg: TrainConfig, log: Path, rank: int, say):
        self.cfg, self.log, self.rank, self.say = cfg, log, rank, say
        self.total = self.epoch_bad = self.limit = 0

    def new_epoch(self, planned_clips: int) -> None:
        self.epoch_bad, self.limit = 0, self.cfg.bad_limit(planned_clips)

    def write(self, faults: list[dict], epoch: int, step: int, **extra) -> None:
        if not faults:
            return  # no empty log: its presence says this rank met faults
        with open_append(self.log) as f:
            for fault in faults:
                f.write(json.dumps(redact_all({"epoch": epoch, "step": step, **extra, **fault})) + "\n")

    def add(self, faults: list[dict], epoch: int, step: int) -> None:
        if not faults:
            return
        bad = sum(f["samples"] for f in faults)
        self.total += bad
        self.epoch_bad += bad
        self.write(faults, epoch, step)
        for fault in faults:
            self.say(f"warning: skipped {fault['what']}: {fault['reason']}")
        if self.epoch_bad > self.limit:
            last = faults[-1]
            raise UserError(
                f"rank {self.rank}: {self.epoch_bad} unreadable clips in epoch {epoch + 1}, more than --max-bad {self.cfg.stream.max_bad:g} allows "
                f"({self.limit}); last: {last['what']}: {last['reason']} (all in {self.log})"
            )


class PackDraws:
    """A mix of packs: the clips each pack gave this epoch (repeats not counted), summed over every
    rank at the epoch's end into the realised shares that metrics.jsonl records beside the weights.
    After a mid-epoch resume they count the epoch from the resumed step (`from_step`)."""

    def __init__(self, packs: list[str], weights: tuple[float, ...], device: torch.device, env: DistEnv):
        self.packs, self.weights, self.device, self.env = packs, [w / sum(weights) for w in weights], device, env
        self.new_epoch(0)

    def new_epoch(self, from_step: int) -> None:
        self.counts, self.from_step = [0] * len(self.packs), from_step

    def add(self, packs: list[int], repeats: list[bool]) -> None:
        for p, repeat in zip(packs, repeats):
            if not repeat:
                self.counts[p] += 1

    def record(self) -> dict:
        """Every rank calls it at the same epoch end (a collective)."""
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.device)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(counts)
        total = counts.sum().item()
        clips = [int(c) for c in counts.tolist()]
        shares = [c / total if total else None for c in clips]
        return {
            "packs": self.packs,
            "weights": self.weights,
            "clips": clips,
            "share": shares,
            "from_step": self.from_step,
        }


def pack_draws(train, sc, device: torch.device, env: DistEnv) -> PackDraws | None:
    """A weighted mix's PackDraws for the training ShardSet `train` (None without `weights`)."""
    if sc.weights is None:
        return None
    return PackDraws(list(train.pack_indexes), sc.weights, device, env)
