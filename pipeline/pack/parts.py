"""Which part of the shard plan this process packs: `--part i/N` by hand, or `--part auto` in a Slurm
job array (`sbatch --array=0-7 ...`: every task runs the same command line).

Pure: the environment comes in as a mapping, read once at the edge (the CLI).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import UserError

SLURM_ARRAY_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
"""What sbatch --array sets in every task, and `--part auto` needs."""


def _whole(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name} must be a whole number, got {text!r}") from None


def slurm_part(environ: Mapping[str, str]) -> tuple[tuple[int, int], str]:
    """(i, N) of this task of a Slurm job array, and where they came from (one line for the log).

    The array's task ids MIN, MIN + STEP, ..., MAX (`--array=MIN-MAX[:STEP]`) are parts 1 ... N in
    that order, N = SLURM_ARRAY_TASK_COUNT. The step is SLURM_ARRAY_TASK_STEP where Slurm sets it,
    else what MIN, MAX and COUNT imply, else 1. Ids that are not evenly spaced (`--array=1,3,7`)
    cannot be numbered from these variables: refused, rather than two tasks packing one part.
    """
    missing = [v for v in SLURM_ARRAY_VARS if v not in environ]
    if missing:
        raise UserError(
            f"`part` auto needs {', '.join(SLURM_ARRAY_VARS)} (set in each task by sbatch --array); "
            f"missing: {', '.join(missing)}; outside a job array give the part as `part` i/N"
        )
    task, count, first = (_whole(environ, v) for v in SLURM_ARRAY_VARS)
    if count < 1:
        raise UserError(f"SLURM_ARRAY_TASK_COUNT must be >= 1, got {count}")
    last = _whole(environ, "SLURM_ARRAY_TASK_MAX") if "SLURM_ARRAY_TASK_MAX" in environ else None
    if "SLURM_ARRAY_TASK_STEP" in environ:
        step = _whole(environ, "SLURM_ARRAY_TASK_STEP")
    elif last is not None and count > 1:
        step = (last - first) // (count - 1)
    else:
        step = 1
    spread = f"SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_COUNT={count}" + (
        "" if last is None else f", SLURM_ARRAY_TASK_MAX={last}"
    )
    if step < 1 or (last is not None and first + (count - 1) * step != last) or (task - first) % step:
        raise UserError(
            f"the job array's task ids are not evenly spaced (SLURM_ARRAY_TASK_ID={task}, {spread}): "
            "submit it as --array=MIN-MAX[:STEP], or give each task `part` i/N"
        )
    i = (task - first) // step + 1
    if not 1 <= i <= count:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task} is outside the job array ({spread})")
    return (i, count), f"part {i}/{count} from SLURM_ARRAY_TASK_ID={task} ({spread})"
