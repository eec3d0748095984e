"""Checkpoints: one file, `checkpoint.pt` in the run folder, written atomically at a step every rank
reached, read back without unpickling anything (weights_only), its fields checked.

A checkpoint holds the model and optimiser state, the position (`Position`), every rank's RNG state and
the run's identity (what a mid-epoch resume must keep the same to continue with exactly the clips not yet
used)."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.device import DistEnv
from pipeline.durable import failpoint, open_new, publish
from pipeline.errors import UserError
from pipeline.storage.urls import shard_name
from pipeline.stream.reshard import Segment, clips_used
from pipeline.stream.sources import ShardSet, changed_content, content_of
from pipeline.train.collectives import gather

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1
RESHARDABLE = frozenset({"world_size", "workers", "batch_size", "grad_accum"})
"""Identity fields a mid-epoch resume may change: the epoch's unused clips are dealt over the new
topology (stream/reshard.py); gradient accumulation starts a new group at the checkpoint's boundary."""

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
        "content": content_of(train.shards),
        "resample": sc.resample,
        "epoch_fill": sc.epoch_fill,
        **({} if sc.weights is None else {"weights": list(sc.weights), "packs": list(train.pack_indexes)}),
    }


def resolve_checkpoint(resume: str) -> str:
    """--resume's file, or the checkpoint in the run folder it names."""
    path = Path(resume)
    return str(path / CHECKPOINT_NAME) if path.is_dir() else str(path)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written beside, flushed, then renamed over the old one. A crash at any point leaves
    the previous checkpoint in place (and at worst a stale temporary file, removed next time); a
    full disk or a file-size limit is one line, the temporary file removed, the previous checkpoint
    kept. The temporary file is never written through a symlink (durable.open_new); the run
    folder's lock (runfolder.lock_run_folder) makes every other `.checkpoint.pt.*.tmp` a stale one."""
    buf = io.BytesIO()
    torch.save(state, buf)  # in memory first: a failing write is then an OSError, not torch's chained errors
    data = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_new(tmp) as f:
            f.write(data)
            f.flush()
            failpoint(f"checkpoint-mid-write:{state['step']}", lambda: f.truncate(f.tell() // 2))
            os.fsync(f.fileno())
        failpoint(f"checkpoint-before-rename:{state['step']}")
        publish(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
        raise UserError(
            f"cannot write checkpoint {path}: {e.strerror or e}; {len(data)} bytes were to be written, {kept}"
        ) from None
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
    loader: object
    """The run's ClipLoader: its state_dict (epoch, step, plan, the epoch's earlier segments) is saved."""
    check: Callable[[], None] = lambda: None
    """Run first on every rank (a collective): raises when the state must not be saved (a NaN loss)."""

    def save(self, at: Position) -> None:
        self.check()
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
            **loader_fields(self.loader.state_dict()),
        }
        save_checkpoint(self.path, state)


def loader_fields(loader_state: dict) -> dict:
    """What a resume on another topology needs: the loader's state (the epoch's segments and the
    plan it ran) and, for people reading the checkpoint, the clips the epoch has used so far."""
    plan = loader_state["plan"]
    here = Segment(plan["world_size"], plan["workers"], plan["batch_size"], loader_state["step"])
    done = tuple(Segment.from_dict(d) for d in loader_state["segments"]) + (here,)
    return {"loader": loader_state, "clips_used": clips_used(done)}


def read_checkpoint(path: str) -> dict:
    """A checkpoint `save_checkpoint` wrote, its fields checked; anything else (another program's
    file, a text file, a pickle of arbitrary objects, which is never unpickled) is one line.
    torch's own messages run to a dozen lines and advise weights_only=False, which we never use."""

    def not_ours(why: str) -> UserError:
        return UserError(f"cannot load checkpoint {path!r}: it is not a clipstream checkpoint ({why})")

    try:
        if os.path.getsize(path) == 0:  # torch's EOFError says nothing ("cannot load ...: ")
            raise UserError(f"cannot load checkpoint {path!r}: it is empty (0 bytes)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():
            raise not_ours("it holds Python objects, which clipstream never unpickles") from None
        raise not_ours("not a file torch.save wrote") from None
    except EOFError:
        raise UserError(f"cannot load checkpoint {path!r}: it is cut short (a torn write?)") from None
    except OSError as e:
        raise UserError(f"cannot load checkpoint {path!r}: {e.strerror or e}") from None
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


def check_same_pack(path: str, saved: dict, run_identity: dict) -> None:
    """A resume is on the pack the run started on: a shard of the same name with other contents (the
    folder packed again) would have clips trained twice and others never, so it is one error. A
    checkpoint written before content identity (no "content") is not checked."""
    before = saved.get("content")
    if not isinstance(before, dict):
        return
    now = run_identity["content"]
    differ = changed_content(before, now)
    if differ:
        common = sum(1 for n in now if n in before)
        raise UserError(
            f"the shards are not the pack checkpoint {path!r} was trained on: {len(differ)} of {common} training shards "
            f"differ in content (sha256 in the index), e.g. {differ[0]}; resume on the shards it started on, or start a new run"
        )


def load_resume(path: str, run_identity: dict, model, optimizer, loader, env: DistEnv, use_cuda: bool) -> Position:
    """Load a checkpoint into `model`, `optimizer` and `loader` (and this rank's RNG state); returns
    its position. Nothing is unpickled (weights_only). Mid-epoch, the topology may differ (RESHARDABLE):
    the loader deals the epoch's unused clips over this one."""
    ckpt = read_checkpoint(path)
    saved = ckpt["run"]
    if saved["model"] != run_identity["model"] or saved["classes"] != run_identity["classes"]:
        raise UserError(f"checkpoint {path!r} is of model {saved['model']!r} on {len(saved['classes'])} classes")
    check_same_pack(path, saved, run_identity)
    mid_epoch = ckpt["step_in_epoch"] > 0 or bool((ckpt.get("loader") or {}).get("segments"))
    changed = sorted(k for k in {*saved, *run_identity} - {"content"} if saved.get(k) != run_identity.get(k))
    fixed = [k for k in changed if k not in RESHARDABLE or run_identity.get("resample")]
    if mid_epoch and fixed:
        raise UserError(f"checkpoint {path!r} stopped mid-epoch; resuming it needs the same {', '.join(fixed)}")
    _load_loader(path, ckpt, loader)
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
    at = Position(*(ckpt[k] for k in ("step", "opt_step", "epoch", "step_in_epoch")))
    at.step_in_epoch = loader.position[1]  # 0 when the epoch goes on on another topology
    return at


def _load_loader(path: str, ckpt: dict, loader) -> None:
    """The loader at the checkpoint's position: its saved state, or (a checkpoint from before the
    state was saved) the epoch and step on this loader's own plan."""
    state = ckpt.get("loader")
    if not isinstance(state, dict):
        state = {**loader.state_dict(), "epoch": ckpt["epoch"], "step": ckpt["step_in_epoch"], "segments": []}
    try:
        loader.load_state_dict(state)
    except ValueError as e:
        raise UserError(f"checkpoint {path!r}: {e}") from None
