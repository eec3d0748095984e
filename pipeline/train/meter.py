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
from pipeline.errors import UserError
from pipeline.train.collectives import gather


class Meter:
    """Loss, clips, data wait and wall time since the last step record, summed over every rank when
    the record is made; plus the run's totals for the summary."""

    def __init__(self, device: torch.device, env: DistEnv):
        self.device, self.env = device, env
        self.clips = self.wait = self.step_time = 0.0
        self.reset()

    def reset(self) -> None:
        self.interval = {
            "loss": torch.zeros((), device=self.device),
            "steps": 0,
            "clips": 0,
            "wait": 0.0,
            "start": time.perf_counter(),
        }

    def add(self, loss: torch.Tensor, clips: int, wait: float, step_time: float) -> None:
        i = self.interval
        i["loss"] += loss.detach()
        i["steps"] += 1
        i["clips"] += clips
        i["wait"] += wait
        self.clips += clips
        self.wait += wait
        self.step_time += step_time

    def record(self) -> dict:
        """The interval's figures over all ranks (a collective: every rank calls it), then a new interval."""
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
        with open(self.log, "a") as f:
            for fault in faults:
                f.write(json.dumps({"epoch": epoch, "step": step, **extra, **fault}) + "\n")

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
