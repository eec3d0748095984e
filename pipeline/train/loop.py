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
import pickle
import signal
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import StreamConfig, TrainConfig
from pipeline.device import DistEnv, ModelInput, cores_per_rank, model_memory_format, pick_device
from pipeline.durable import failpoint, publish
from pipeline.errors import UserError, printable
from pipeline.stream.loader import ClipLoader, WorkerGaveUp
from pipeline.stream.plan import auto_workers, check_enough_shards
from pipeline.stream.sources import ShardSet, local_path, resolve, shard_name, test_beside

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RunData:
    """The shards a run trains and evaluates on."""

    train: ShardSet
    test: ShardSet
    """Empty when the index lists no test shards and none are given."""


def resolve_data(sc: StreamConfig) -> RunData:
    """--shards, and --eval-shards or the test shards the training index lists beside them."""
    train = resolve(sc.shards, "train", sc.index, sc.allow_pipe)
    test = (
        resolve(sc.eval_shards, "test", sc.index or train.index, sc.allow_pipe)
        if sc.eval_shards
        else test_beside(train)
    )
    # A shard an index lists (a packed folder given, or the test shards beside) that is gone, or is a
    # folder, would cost its clips in every epoch or evaluation, after hours of training: say so now,
    # as for a shard pattern naming a missing file.
    for kind, shards in (("training", train.shards), ("test", test.shards)):
        missing = [s.url for s in shards if local_path(s.url) is not None and not _is_file(local_path(s.url))]
        if missing:
            raise UserError(
                f"{len(missing)} of the {len(shards)} {kind} shards listed in {train.index if kind == 'training' else test.index} are missing or not files, e.g. {missing[0]!r}"
            )
    return RunData(train, test)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def with_workers(cfg: TrainConfig, n_shards: int, world_size: int, local_world_size: int) -> TrainConfig:
    """`cfg` with the number of loader workers decided (see plan.auto_workers)."""
    if cfg.stream.workers is not None:
        return cfg
    workers = auto_workers(n_shards, world_size, cores_per_rank(local_world_size), cfg.stream.resample)
    return dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=workers))


def prepare(cfg: TrainConfig, world_size: int, local_world_size: int) -> RunData:
    """Check everything a user can get wrong before any process starts: shards, index, model name."""
    data = resolve_data(cfg.stream)
    cfg = with_workers(cfg, len(data.train.shards), world_size, local_world_size)
    cfg.stream.check_memory(data.train.frames, cfg.stream.workers)  # T is known from here
    check_enough_shards(data.train.shards, cfg.stream, world_size, cfg.stream.workers)
    from pipeline.train.models import MODEL_NAMES, build_model

    if cfg.model not in MODEL_NAMES:
        build_model(cfg.model, len(data.train.classes))  # UserError for unknown names
    if cfg.resume and not Path(resolve_checkpoint(cfg.resume)).is_file():
        raise UserError(f"no checkpoint at {cfg.resume!r}")
    check_log_dir(cfg.log_dir)
    check_run_folder(default_log_dir(cfg), cfg.resume)
    return data


RUN_FILES = ("metrics.jsonl", CHECKPOINT_NAME, "options.json")
"""Files whose presence means a folder holds a run's output."""


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_run_folder(log_dir: str, resume: str | None) -> None:
    """A run folder is never mixed with another run's output (metrics appended to, a checkpoint
    overwritten) unless that run is the one being resumed."""
    folder = Path(log_dir)
    if not folder.is_dir() or not holds_run(folder):
        return
    if resume and Path(resolve_checkpoint(resume)).resolve().parent == folder.resolve():
        return
    what = "another run" if resume else "a run"
    raise UserError(
        f"the run folder {log_dir} already holds {what}; continue it with --resume {log_dir}, or pass a new `log_dir`"
    )


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
    from torch.distributed.elastic.multiprocessing.api import SignalException
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
    muted = [
        logging.getLogger(n)
        for n in (
            "torch.distributed.elastic.multiprocessing.api",
            "torch.multiprocessing.spawn",
            "torch.distributed.elastic.agent.server.api",
        )
    ]
    levels = [m.level for m in muted]
    with tempfile.TemporaryDirectory(prefix="clipstream-errors-") as errors:
        try:
            for m in muted:
                m.setLevel(logging.CRITICAL)
            results = elastic_launch(config, _launched)(cfg, errors)
        except SignalException as e:
            # torch elastic turns Ctrl-C (SIGINT) and SIGTERM into this, with a launcher traceback;
            # it has stopped the ranks by then. Ctrl-C is `interrupted` and exit code 130, as in
            # one process.
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            raise Stopped(f"stopped by {signal.Signals(e.sigval).name}", 128 + int(e.sigval)) from None
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


class Stopped(UserError):
    """The run was stopped by a signal: one line, exit code 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _stop_quietly(signum, frame) -> None:
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # the second signal (terminal, then launcher) must not cut the unwinding short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    raise SystemExit(128 + signum)


def _launched(cfg: TrainConfig, errors: str) -> dict:
    """Entry point of each process started by `launch`."""
    # Ctrl-C reaches every process of the terminal's group, and the launcher passes the signal on to
    # the ranks too: a rank unwinds once (its loader workers and their semaphores closed), quietly,
    # since an interrupted collective or loader would print a traceback the launcher's one line is
    # there to replace.
    signal.signal(signal.SIGINT, _stop_quietly)
    signal.signal(signal.SIGTERM, _stop_quietly)
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
    stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    folder, n = stamp, 2
    while holds_run(folder):  # two runs started within one second
        folder, n = stamp.with_name(f"{stamp.name}-{n}"), n + 1
    return str(folder)


def write_options(log_dir: Path, cfg: TrainConfig, env: DistEnv) -> Path:
    """Record what this run (or this resume of it) ran with: options.json, then options-resume-N.json."""
    path, n = log_dir / "options.json", 1
    while path.exists():
        path, n = log_dir / f"options-resume-{n}.json", n + 1
    from pipeline import __version__

    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clipstream": __version__,
        "command": sys.argv,
        "world_size": env.world_size,
        "options": dataclasses.asdict(cfg),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


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


def evaluate(model, test: ShardSet, cfg: TrainConfig, env: DistEnv, device, channels_last: bool, autocast) -> dict:
    """Top-1, top-5 and per-class accuracy on the test shards; each test clip counted once across ranks.

    With K x C test views (--test-views) a clip's softmax scores are averaged over its views
    ('top1', 'top5', 'per_class'); 'single_top1' / 'single_top5' score view 0 alone (the fixed
    frames and the centre crop: the 1x1 figures). A clip's views all come from one worker of one
    rank, so each rank scores whole clips."""
    num_classes = len(test.classes)
    k = min(5, num_classes)
    clips: dict[str, list] = {}  # key -> [label, summed softmax, view-0 logits]
    skipped, faults = 0, []
    was_training = model.training
    model_input = ModelInput(device, channels_last)
    model.eval()
    with torch.no_grad():
        loader = ClipLoader.from_config(
            test, cfg.stream, env.rank, env.world_size, split="test", pin_memory=device.type == "cuda", copy=False
        )
        for batch in loader.epoch(0):
            skipped += sum(f["samples"] for f in batch["faults"])
            faults += batch["faults"]
            if batch["frames"] is None:
                continue
            with autocast:
                logits = model(model_input(batch["frames"])).float()
            probs, logits = logits.softmax(dim=1).cpu(), logits.cpu()
            for j, (key, label, view) in enumerate(zip(batch["key"], batch["label"].tolist(), batch["view"].tolist())):
                entry = clips.setdefault(key, [label, torch.zeros(num_classes, dtype=torch.float64), None])
                entry[1] += probs[j]
                if view == 0:
                    entry[2] = logits[j]
    model.train(was_training)
    # rows: clips, top-1 hits, top-5 hits (views averaged), the same for view 0 alone; columns: true class
    counts = torch.zeros(5, num_classes, dtype=torch.float64)
    for label, summed, single in clips.values():
        counts[0, label] += 1
        for row, scores in ((1, summed), (3, summed if single is None else single)):
            top = scores.topk(k).indices
            counts[row, label] += float(top[0] == label)
            counts[row + 1, label] += float(bool((top == label).any()))
    counts = counts.to(device)
    extra = torch.tensor([skipped], dtype=torch.float64, device=device)
    if env.world_size > 1:
        dist.all_reduce(counts)
        dist.all_reduce(extra)
    total = counts.sum(dim=1).tolist()
    n = int(total[0])
    per_class = {
        name: (counts[1, c].item() / counts[0, c].item() if counts[0, c] > 0 else None)
        for c, name in enumerate(test.classes)
    }
    views = cfg.stream.test_views
    return {
        "top1": total[1] / n if n else None,
        "top5": total[2] / n if n else None,
        "single_top1": total[3] / n if n else None,
        "single_top5": total[4] / n if n else None,
        "views": f"{views[0]}x{views[1]}",
        "per_class": per_class,
        "clips": n,
        "skipped": int(extra.item()),
        "faults": faults,
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


def load_resume(path: str, run_identity: dict, model, optimizer, env: DistEnv, use_cuda: bool) -> dict:
    """Load a checkpoint into `model` and `optimizer` (and this rank's RNG state); returns its
    position {'step', 'opt_step', 'epoch', 'step_in_epoch'}. Nothing is unpickled (weights_only)."""
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
    return {k: ckpt[k] for k in ("step", "opt_step", "epoch", "step_in_epoch")}


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


def check_eval_faults(
    result: dict,
    faults: list[dict],
    test: ShardSet,
    cfg: TrainConfig,
    bad_clips: BadClipBudget,
    log_dir: Path,
    epoch: int,
    step: int,
    say,
) -> None:
    """Test clips an evaluation could not read: written to the rank's faults log, warned about in one
    line (an accuracy over a subset is not the accuracy), and held against --max-bad as in training.
    `result["skipped"]` is summed over ranks, so every rank decides alike (no rank left waiting)."""
    bad_clips.write(faults, epoch - 1, step, split="test")
    skipped = result["skipped"]
    if not skipped:
        return
    planned = test.samples if all(s.samples >= 0 for s in test.shards) else result["clips"] + skipped
    what = sorted({f["what"] for f in faults if f["samples"]})  # shards, or shard:key for single clips
    named = ", ".join(what[:3]) + (f" and {len(what) - 3} more" if len(what) > 3 else "") if what else "on other ranks"
    where = f"{log_dir}/faults-rank*.jsonl"
    limit = cfg.bad_limit(planned)
    if skipped > limit:
        raise UserError(
            f"evaluation after epoch {epoch}: {skipped} of {planned} test clips unreadable ({named}), more than --max-bad "
            f"{cfg.stream.max_bad:g} allows ({limit}); accuracy on the rest would mislead (all in {where})"
        )
    say(
        f"warning: evaluation after epoch {epoch} skipped {skipped} of {planned} test clips ({named}): accuracy is on the other {result['clips']}; named in {where}"
    )


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
        every = _gather(mine, self.env).cpu()
        per_rank = (every[:, 2] / every[:, 4]).tolist()
        self.reset()
        return {
            "loss": float(every[:, 0].sum() / every[:, 1].sum()),
            "clips_per_s": sum(per_rank),
            "clips_per_s_rank": per_rank,
            "data_wait": float((every[:, 3] / every[:, 4]).mean()),
            "step_time": float((every[:, 4] / every[:, 1]).mean()),
        }


def train(cfg: TrainConfig, env: DistEnv) -> dict:
    """Train and evaluate; returns the summary record (on every rank)."""
    from tqdm import tqdm

    from pipeline.progress import progress
    from pipeline.train.models import build_model

    started = time.perf_counter()
    # printable: keys, member names and class names in messages come from shards and the index
    say = (lambda msg: tqdm.write(printable(msg), file=sys.stdout)) if env.rank == 0 else (lambda msg: None)

    # --- process group ----------------------------------------------------------------------
    device = pick_device(cfg.device, env.local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=env.rank,
            world_size=env.world_size,
            device_id=device if use_cuda else None,
        )
    channels_last = use_cuda and cfg.channels_last
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda and cfg.amp else nullcontext()

    # --- data -------------------------------------------------------------------------------
    data = resolve_data(cfg.stream)
    if cfg.stream.workers is None:
        # Every rank must split its shards the same way (a mid-epoch resume needs the same plan).
        mine = with_workers(cfg, len(data.train.shards), env.world_size, env.local_world_size).stream.workers
        agreed = torch.tensor([mine], device=device)
        if env.world_size > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        cfg = dataclasses.replace(cfg, stream=dataclasses.replace(cfg.stream, workers=int(agreed.item())))
    torch.set_num_threads(cpu_threads(cfg, env))
    sc = cfg.stream
    # One set of loader workers for the whole run (started with the first epoch asked for).
    train_loader = ClipLoader.from_config(
        data.train, sc, env.rank, env.world_size, epochs=cfg.epochs, pin_memory=use_cuda, copy=False
    )
    steps_per = [train_loader.steps(e) for e in range(cfg.epochs)]
    opt_steps_per = [math.ceil(s / cfg.grad_accum) for s in steps_per]
    classes = data.train.classes

    # --- run folder -------------------------------------------------------------------------
    log_dir = Path(_broadcast_text(default_log_dir(cfg), env, device))
    if env.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        write_options(log_dir, cfg, env)
    if env.world_size > 1:
        dist.barrier()
    metrics = open(log_dir / "metrics.jsonl", "a") if env.rank == 0 else None
    bad_clips = BadClipBudget(cfg, log_dir / f"faults-rank{env.rank}.jsonl", env.rank, say)

    def record(kind: str, **fields) -> None:
        if metrics is not None:
            metrics.write(json.dumps({"kind": kind, **fields}) + "\n")
            metrics.flush()

    # --- model ------------------------------------------------------------------------------
    torch.manual_seed(sc.seed)
    model = build_model(cfg.model, len(classes)).to(device)
    if channels_last:
        model = model.to(memory_format=model_memory_format(model))
    net = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
        if env.world_size > 1
        else model
    )
    forward = torch.compile(net) if cfg.compile else net

    # --- optimiser --------------------------------------------------------------------------
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.peak_lr, weight_decay=cfg.weight_decay, fused=use_cuda or None
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.peak_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )

    # --- resume -----------------------------------------------------------------------------
    run_identity = {
        "seed": sc.seed,
        "world_size": env.world_size,
        "workers": train_loader.n_workers,
        "batch_size": sc.batch_size,
        "grad_accum": cfg.grad_accum,
        "model": cfg.model,
        "classes": list(classes),
        "shards": [shard_name(s.url) for s in data.train.shards],
        "resample": sc.resample,
        "epoch_fill": sc.epoch_fill,
    }
    step = opt_step = start_epoch = start_in_epoch = 0
    if cfg.resume:
        path = resolve_checkpoint(cfg.resume)
        at = load_resume(path, run_identity, model, optimizer, env, use_cuda)
        step, opt_step, start_epoch, start_in_epoch = at["step"], at["opt_step"], at["epoch"], at["step_in_epoch"]
        state = train_loader.state_dict()
        train_loader.load_state_dict({**state, "epoch": start_epoch, "step": start_in_epoch})
        say(
            f"resumed from {path}: epoch {start_epoch + 1}, step {start_in_epoch} of {steps_per[min(start_epoch, cfg.epochs - 1)]}"
        )

    def checkpoint(epoch: int, in_epoch: int) -> None:
        if audit is not None and not audit.closed:
            audit.flush()  # a resume keeps the audit lines up to this checkpoint: they must be on disk
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
                "rng": rng,
                "run": run_identity,
            }
            save_checkpoint(log_dir / CHECKPOINT_NAME, state)

    say(
        f"training {cfg.model} on {data.train.samples} clips ({len(data.train.shards)} shards), {len(classes)} classes; "
        f"{env.world_size} rank(s) x {train_loader.n_workers} worker(s) on {device.type}; {steps_per[0]} steps/epoch of {sc.batch_size} clips per rank"
    )

    # --- loop -------------------------------------------------------------------------------
    audit = None
    model_input = ModelInput(device, channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()
    meter = Meter(device, env)
    last_eval: dict | None = None
    epochs_done = start_epoch
    stopped_early = False
    last_checkpoint = step
    net.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            batches = train_loader.epoch(epoch)
            audit = None
            bad_clips.new_epoch(steps_per[epoch] * sc.batch_size)
            if cfg.audit_keys:
                audit_path = log_dir / "audit" / f"epoch-{epoch:03d}-rank-{env.rank}.txt"
                audit_path.parent.mkdir(parents=True, exist_ok=True)
                kept = (
                    audit_path.read_text().splitlines()[: first * sc.batch_size]
                    if first and audit_path.exists()
                    else []
                )
                audit = open(audit_path, "w")
                audit.write("".join(k + "\n" for k in kept))
            bar = progress(
                steps_per[epoch],
                f"epoch {epoch + 1}/{cfg.epochs}",
                quiet=env.rank != 0 or not cfg.progress,
                unit="step",
            )
            bar.update(first)
            meter.reset()
            for in_epoch in range(first, steps_per[epoch]):
                t0 = time.perf_counter()
                try:
                    batch = next(batches, None)
                except WorkerGaveUp as e:
                    bad_clips.write(e.faults, epoch, step)  # the message points at the log: it must hold them
                    raise UserError(f"rank {env.rank}: {e}; named in {bad_clips.log}") from None
                t1 = time.perf_counter()
                if batch is None or batch["frames"] is None or len(batch["key"]) != sc.batch_size:
                    raise UserError(
                        f"rank {env.rank}: training stream of epoch {epoch + 1} ended after {in_epoch} of {steps_per[epoch]} batches"
                    )
                bad_clips.add(batch["faults"], epoch, step)
                x = model_input(batch["frames"])
                y = batch["label"].to(device, non_blocking=True)
                boundary = (in_epoch + 1) % cfg.grad_accum == 0 or in_epoch + 1 == steps_per[epoch]
                group = (
                    cfg.grad_accum
                    if (in_epoch // cfg.grad_accum + 1) * cfg.grad_accum <= steps_per[epoch]
                    else steps_per[epoch] % cfg.grad_accum
                )
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
                if audit is not None:
                    # a repeat (--epoch-fill pad topping the epoch up) is marked, so each clip's first use stands alone
                    audit.write(
                        "".join(
                            k + ("\trepeat\n" if r else "\n") for k, r in zip(batch["key"], batch["repeat"].tolist())
                        )
                    )
                failpoint(f"step:{step}")
                meter.add(loss, sc.batch_size, t1 - t0, time.perf_counter() - t0)
                bar.update(1)

                if step % cfg.log_every == 0 or in_epoch + 1 == steps_per[epoch]:
                    rec = {"step": step, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **meter.record()}
                    record("step", **rec)
                    bar.set_postfix(
                        loss=f"{rec['loss']:.3f}", clips_s=f"{rec['clips_per_s']:.1f}", wait=f"{rec['data_wait']:.0%}"
                    )

                last_of_epoch = in_epoch + 1 == steps_per[epoch]
                if boundary and not last_of_epoch:
                    if cfg.max_steps and step >= cfg.max_steps:
                        checkpoint(epoch, in_epoch + 1)
                        stopped_early = True
                        break
                    if cfg.checkpoint_every and step - last_checkpoint >= cfg.checkpoint_every:
                        checkpoint(epoch, in_epoch + 1)
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
            if data.test.shards and (
                epochs_done == cfg.epochs or (cfg.eval_every and epochs_done % cfg.eval_every == 0)
            ):
                last_eval = evaluate(model, data.test, cfg, env, device, channels_last, autocast)
                eval_faults = last_eval.pop("faults")
                record("eval", step=step, epoch=epochs_done, **last_eval)
                try:
                    check_eval_faults(
                        last_eval, eval_faults, data.test, cfg, bad_clips, log_dir, epochs_done, step, say
                    )
                except UserError:
                    checkpoint(epochs_done, 0)  # the epoch is trained: keep it (every rank raises alike)
                    raise
                if last_eval["clips"]:
                    # every class, so that one without any test clip left shows, not drops out
                    per_class = ", ".join(
                        f"{n} {'n/a' if a is None else f'{a:.0%}'}" for n, a in last_eval["per_class"].items()
                    )
                    views = (
                        ""
                        if last_eval["views"] == "1x1"
                        else (
                            f" over {last_eval['views']} views (one view: top-1 {last_eval['single_top1']:.1%}, top-5 {last_eval['single_top5']:.1%})"
                        )
                    )
                    say(
                        f"epoch {epochs_done}: test top-1 {last_eval['top1']:.1%}, top-5 {last_eval['top5']:.1%}{views} "
                        f"on {last_eval['clips']} clips; per class: {per_class}"
                    )
            checkpoint(epochs_done, 0)
            if cfg.max_steps and step >= cfg.max_steps and epochs_done < cfg.epochs:
                say(f"stopped after step {step} (--max-steps); continue with --resume {log_dir}")
                stopped_early = True
                break
    finally:
        train_loader.close()

    # --- summary ----------------------------------------------------------------------------
    totals = torch.tensor(
        [meter.clips, meter.wait, meter.step_time, bad_clips.total], dtype=torch.float64, device=device
    )
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

    # --- teardown ---------------------------------------------------------------------------
    if metrics is not None:
        metrics.close()
        if cfg.plot:
            from pipeline.tools.plots import plot_run

            say(f"curves: {plot_run(log_dir)}")
    if env.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    # `torchrun ... -m pipeline.train.loop --shards ...`: the train-stream options, without installing the package.
    from pipeline.cli import train_app

    train_app()
