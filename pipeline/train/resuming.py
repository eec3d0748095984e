"""Which run a start continues, and with which options: `--resume auto` and the run's options.json.

A resumed run trains on with the options it was started with, read from the newest options file of
its run folder (options.json, then options-resume-N.json); an option given again must agree, except
those that only say how to run it (`RUNNING`): more `epochs` extend a run, `workers`, ranks and the
batch size may change (the interrupted epoch is re-divided, see pipeline/stream/reshard.py), the
shards may be given from another place (the checkpoint checks they are the same shards).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from pipeline.config import StreamConfig, TrainConfig
from pipeline.errors import UserError

AUTO = "auto"
CHECKPOINT_FILE = "checkpoint.pt"
OPTIONS_NAME = "options.json"
_RESUMED_OPTIONS = re.compile(r"options-resume-(\d+)\.json")

RUNNING = frozenset(
    {
        # where the data is (its identity is the checkpoint's to check)
        "shards",
        "eval_shards",
        "index",
        "cache_dir",
        "cache_bytes",
        # how long, and on what
        "epochs",
        "max_steps",
        "nproc_per_node",
        "workers",
        "batch_size",
        "prefetch",
        "threads",
        "device",
        "compile",
        "amp",
        "channels_last",
        # what is written and shown
        "log_dir",
        "resume",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "checkpoint_every_min",
        "audit_keys",
        "progress",
        "plot",
        "max_bad",
        # the peak learning rate, given again on purpose: a resume may lower it (or raise it), as one
        # does to fine-tune a run; the schedule goes on from the same step with the new peak
        "lr",
    }
)
"""Options a resume may change; every other one (model, seed, optimiser, schedule, crop, ...) decides
what the run computes and must stay."""

NOT_INHERITED = frozenset({"resume", "log_dir", "nproc_per_node", "max_steps"})
"""Options that belong to one start of a run, never carried to the next: how it is launched and
where it stops are the new command line's."""

STREAM_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamConfig))
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig)) - {"stream"}


def resolve_auto(resume: str | None, log_dir: str | None) -> str | None:
    """`resume`, with `auto` made the run folder when it holds a checkpoint and None (a fresh start)
    when it does not: one command line for the first start and every restart."""
    if resume != AUTO:
        return resume
    if not log_dir:
        raise UserError("`resume` auto needs `log_dir`: the run folder to continue, or to start when it holds none")
    return log_dir if (Path(log_dir) / CHECKPOINT_FILE).is_file() else None


def options_file(folder: Path) -> Path | None:
    """The newest options file of a run folder (what its last start ran with), or None."""
    numbered = []
    try:
        for p in folder.iterdir():
            m = _RESUMED_OPTIONS.fullmatch(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
    except OSError:
        return None
    if numbered:
        return max(numbered)[1]
    first = folder / OPTIONS_NAME
    return first if first.is_file() else None


def saved_options(folder: Path) -> tuple[dict, Path] | None:
    """(flat options, the file) the run in `folder` last ran with; None when it has no options file."""
    path = options_file(folder)
    if path is None:
        return None
    try:
        record = json.loads(path.read_text())
        options = dict(record["options"])
        stream = dict(options.pop("stream"))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"unreadable run options {path}: {e}") from None
    known = (STREAM_FIELDS | TRAIN_FIELDS) - NOT_INHERITED
    flat = {k: v for k, v in {**options, **stream}.items() if k in known}
    for name in ("shards", "eval_shards", "test_views"):
        if isinstance(flat.get(name), list):
            flat[name] = tuple(flat[name])
    return flat, path


def _shown(value) -> str:
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return " ".join(repr(v) for v in value) or "(none)"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}x{value[1]}"
    return repr(value) if isinstance(value, str) else str(value)


def merged_options(saved: dict, path: Path, given: dict) -> dict:
    """The options of a resumed start: `saved` (flat, from `saved_options`) with what the user gave
    again; a given option outside RUNNING must agree with the saved one."""
    for name, value in given.items():
        if name in RUNNING or name not in saved:
            continue
        if _same(saved[name], value):
            continue
        raise UserError(
            f"`{name}` {_shown(value)} disagrees with {_shown(saved[name])}, what the run in {path.parent} was started "
            f"with ({path.name}); leave `{name}` out to continue the run, or start a new run with another `log_dir`"
        )
    return {**saved, **given}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def build_config(options: dict) -> TrainConfig:
    """A TrainConfig from flat options (unknown names are not accepted)."""
    unknown = set(options) - STREAM_FIELDS - TRAIN_FIELDS
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    stream = StreamConfig(**{k: v for k, v in options.items() if k in STREAM_FIELDS})
    return TrainConfig(stream=stream, **{k: v for k, v in options.items() if k in TRAIN_FIELDS})


def resumed_options(resume: str | None, log_dir: str | None, given: dict, defaults: dict) -> dict:
    """The flat options a start runs with. `given`: the options on the command line; `defaults`:
    the others' defaults. A start that continues a run (`resume` a folder or checkpoint, or `auto`
    finding one) takes the run's saved options, overridden by `given` as `merged_options` allows;
    `auto` starting afresh in a folder an earlier attempt left without a checkpoint must agree
    with that attempt's options too."""
    target = resolve_auto(resume, log_dir)
    folder = None
    if target is not None:
        p = Path(target)
        folder = p if p.is_dir() else p.parent
    elif resume == AUTO and log_dir and Path(log_dir).is_dir():
        folder = Path(log_dir)
    found = saved_options(folder) if folder is not None else None
    if found is None:
        if "shards" not in given:
            if target is None:
                raise UserError("`shards` must name the training shards")
            where = folder / OPTIONS_NAME if folder is not None else target
            raise UserError(f"no run options at {where} to continue from: give `shards` and the run's other options")
        return {**defaults, **given}
    saved, path = found
    merged = merged_options(saved, path, given)
    return {**defaults, **merged, "resume": resume, "log_dir": given.get("log_dir") or str(folder)}
