"""Checkpoints: one file, `checkpoint.pt` in the run folder, written atomically at a step every rank
reached, read back without unpickling anything (weights_only), its fields checked.

A checkpoint holds the model and optimiser state, the position (`Position`), every rank's RNG state and
the run's identity (what a mid-epoch resume must keep the same to continue with exactly the clips not yet
used)."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.durable import failpoint, publish
from pipeline.errors import UserError
from pipeline.storage.urls import shard_name
from pipeline.stream.sources import ShardSet
from pipeline.train.collectives import gather

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1

_CHECKPOINT_FIELDS = {
    "model": dict,
    "optimizer": dict,
    "step": int,
    "opt_step": int,
    "epoch": int,
    "step_in_epoch": int,
    "rng": dict,
    "run": dict,
}


@dataclasses.dataclass
class Position:
    """Where a run stands: the checkpoint's position fields, and where a resume continues."""

    step: int = 0
    """Training steps (batches) taken, over all epochs."""
    opt_step: int = 0
    """Optimiser steps taken (steps / grad_accum, each epoch's last group counted)."""
    epoch: int = 0
    """The epoch under way (0-based); the next one at an epoch's end."""
    step_in_epoch: int = 0
    """Steps of `epoch` already taken."""


def run_identity(cfg: TrainConfig, world_size: int, workers: int, train: ShardSet) -> dict:
    """What a checkpoint's run is: the model and classes any resume must keep, and what else decides
    the epoch's plan (a mid-epoch resume must keep it all)."""
    sc = cfg.stream
    return {
        "seed": sc.seed,
        "world_size": world_size,
        "workers": workers,
        "batch_size": sc.batch_size,
        "grad_accum": cfg.grad_accum,
        "model": cfg.model,
        "classes": list(train.classes),
        "shards": [shard_name(s.url) for s in train.shards],
        "resample": sc.resample,
        "epoch_fill": sc.epoch_fill,
    }


def resolve_checkpoint(resume: str) -> str:
    """--resume's file, or the checkpoint in the run folder it names."""
    path = Path(resume)
    return str(path / CHECKPOINT_NAME) if path.is_dir() else str(path)


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


@dataclasses.dataclass(frozen=True)
class Checkpointer:
    """Writes the run's checkpoint; `save` is a collective (every rank's RNG state is gathered), and
    only rank 0 writes."""

    path: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    run_identity: dict
    """What a mid-epoch resume must find unchanged (see `load_resume`)."""
    schedule: str
    total_opt_steps: int
    env: DistEnv
    device: torch.device

    def save(self, at: Position) -> None:
        rng = {"torch": gather(torch.get_rng_state().to(self.device), self.env).cpu()}
        if self.device.type == "cuda":
            rng["cuda"] = gather(torch.cuda.get_rng_state().to(self.device), self.env).cpu()
        if self.env.rank != 0:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"kind": self.schedule, "opt_step": at.opt_step, "total_opt_steps": self.total_opt_steps},
            "step": at.step,
            "opt_step": at.opt_step,
            "epoch": at.epoch,
            "step_in_epoch": at.step_in_epoch,
            "rng": rng,
            "run": self.run_identity,
        }
        save_checkpoint(self.path, state)


def read_checkpoint(path: str) -> dict:
    """A checkpoint `save_checkpoint` wrote, its fields checked; anything else (another program's
    file, a text file, a pickle of arbitrary objects, which is never unpickled) is one line.
    torch's own messages run to a dozen lines and advise weights_only=False, which we never use."""

    def not_ours(why: str) -> UserError:
        return UserError(f"cannot load checkpoint {path!r}: it is not a clipstream checkpoint ({why})")

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise not_ours("it holds Python objects, which clipstream never unpickles") from None
        raise not_ours("not a file torch.save wrote") from None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot load checkpoint {path!r}: {getattr(e, 'strerror', None) or e}") from None
    except Exception:  # torch raises KeyError, RuntimeError, ValueError ... for foreign files
        raise not_ours("not a file torch.save wrote") from None
    if not isinstance(ckpt, dict):
        raise not_ours(f"it holds a {type(ckpt).__name__}")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise not_ours(f"format version {str(ckpt.get('version'))[:20]}, expected {CHECKPOINT_VERSION}")
    wrong = [k for k, kind in _CHECKPOINT_FIELDS.items() if not isinstance(ckpt.get(k), kind)]
    run = ckpt.get("run") if isinstance(ckpt.get("run"), dict) else {}
    if not isinstance(run.get("model"), str) or not isinstance(run.get("classes"), list):
        wrong.append("run")
    if not isinstance(ckpt.get("rng", {}).get("torch") if isinstance(ckpt.get("rng"), dict) else None, torch.Tensor):
        wrong.append("rng")
    if wrong:
        raise not_ours("missing or malformed " + ", ".join(sorted(set(wrong))))
    return ckpt


def load_resume(path: str, run_identity: dict, model, optimizer, env: DistEnv, use_cuda: bool) -> Position:
    """Load a checkpoint into `model` and `optimizer` (and this rank's RNG state); returns its
    position. Nothing is unpickled (weights_only)."""
    ckpt = read_checkpoint(path)
    saved = ckpt["run"]
    if saved["model"] != run_identity["model"] or saved["classes"] != run_identity["classes"]:
        raise UserError(f"checkpoint {path!r} is of model {saved['model']!r} on {len(saved['classes'])} classes")
    if ckpt["step_in_epoch"] > 0 and saved != run_identity:
        changed = sorted(k for k in {*saved, *run_identity} if saved.get(k) != run_identity.get(k))
        raise UserError(f"checkpoint {path!r} stopped mid-epoch; resuming it needs the same {', '.join(changed)}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path!r} does not fit model {saved['model']!r}: {first[:200]}") from None
    if env.rank < len(ckpt["rng"]["torch"]):
        # A row of the stacked states is a view at an offset; set_rng_state reads from the start of
        # its storage (rank 1 of a two-rank resume crashed with SIGSEGV), so hand it a copy.
        torch.set_rng_state(ckpt["rng"]["torch"][env.rank].clone())
        if use_cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][env.rank].clone())
    return Position(*(ckpt[k] for k in ("step", "opt_step", "epoch", "step_in_epoch")))
