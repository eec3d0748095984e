"""The curves of a training run, drawn from its `metrics.jsonl` (what `plot-run` and
`train-stream --plot` show).

The trainer appends one JSON object a line with "kind" "step" (step, epoch, loss, lr, clips_per_s,
clips_per_s_rank, data_wait, step_time), "eval" (step, epoch, top1, top5, per_class, clips) or
"summary" (top1, top5, clips_per_s, data_wait, wall_s, steps, epochs). Other kinds are skipped.
Drawing uses matplotlib's Agg canvas on a private Figure, never pyplot's global state, so a
training process can call `plot_run` without side effects.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pipeline.errors import UserError

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file. A last line without its newline is a record still being
    written by a live run and is left out; any other unreadable line is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no {path.name} in {path.parent}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable metrics file {path}: {e}") from None
    lines = text.split("\n")
    lines.pop()  # "" after the final newline, or the unterminated line of a run mid-write
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        except RecursionError:  # [[[[...]]]] deeper than the parser's stack
            raise UserError(f"{path}:{n}: not a JSON line (nested too deeply)") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        records.append(record)
    return records


def current_records(records: list[dict]) -> list[dict]:
    """The records a resumed run's metrics stand by. A resume appends {"kind": "resume", "step": S}:
    the steps after S that an earlier attempt logged were redone, so its records of them (steps,
    evaluations) are superseded, as TensorBoard's purge_step does; every step then counts once."""
    kept: list[dict] = []
    for record in records:
        if record.get("kind") == "resume" and isinstance(record.get("step"), int):
            kept = [r for r in kept if not (isinstance(r.get("step"), (int, float)) and r["step"] > record["step"])]
        kept.append(record)
    return kept


def _xy(records: list[dict], field: str, scale: float = 1.0) -> tuple[list, list]:
    pts = [(r["step"], r[field] * scale) for r in records if _number(r.get("step")) and _number(r.get(field))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _title(log_dir: Path, steps: list[dict], summary: dict | None) -> str:
    if summary is None:
        return f"{log_dir.name}: {len(steps)} step records, no summary yet (run going on, or stopped)"
    parts = []
    if _number(summary.get("top1")):
        parts.append(f"test top-1 {summary['top1']:.1%}")
    if _number(summary.get("top5")):
        parts.append(f"top-5 {summary['top5']:.1%}")
    if _number(summary.get("clips_per_s")):
        parts.append(f"{summary['clips_per_s']:.1f} clips/s")
    if _number(summary.get("data_wait")):
        parts.append(f"data wait {summary['data_wait']:.0%}")
    if _number(summary.get("wall_s")):
        parts.append(f"{summary['wall_s']:.0f} s")
    if summary.get("steps") is not None:
        parts.append(f"{summary['steps']} steps, {summary.get('epochs')} epochs")
    return f"{log_dir.name}: " + ", ".join(parts)


def plot_run(log_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw LOG_DIR/metrics.jsonl into a PNG (default LOG_DIR/curves.png); returns its path.

    Four panels over training steps: loss (and learning rate), test top-1/top-5, clips/s (total,
    and per rank when there are several), data-wait share of step time. Dotted lines mark epochs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise UserError(f"run folder not found: {log_dir}")
    records = current_records(read_metrics(log_dir / METRICS_NAME))
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind") == "eval"]
    summaries = [r for r in records if r.get("kind") == "summary"]
    if not steps and not evals:
        raise UserError(f"{log_dir / METRICS_NAME} holds no step or eval records yet")
    out = Path(out) if out is not None else log_dir / CURVES_NAME
    if out.is_dir():
        raise UserError(f"--out must name a file, got the folder {out}")

    fig = Figure(figsize=(12, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, acc_ax), (speed_ax, wait_ax) = fig.subplots(2, 2, sharex=True)
    fig.suptitle(_title(log_dir, steps, summaries[-1] if summaries else None))

    x, y = _xy(steps, "loss")
    loss_ax.plot(x, y, color="C0", label="training loss")
    loss_ax.set_ylabel("loss")
    lx, ly = _xy(steps, "lr")
    if ly:
        lr_ax = loss_ax.twinx()
        lr_ax.plot(lx, ly, color="0.6", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="0.5")
    if not y:
        _note(loss_ax, "no step records")

    for field, label, colour in (("top1", "top-1", "C2"), ("top5", "top-5", "C1")):
        x, y = _xy(evals, field, 100.0)
        if y:
            acc_ax.plot(x, y, marker="o", color=colour, label=f"test {label} (last {y[-1]:.1f} %)")
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_ylim(0, 104)  # room above 100 so a perfect top-5 is not hidden by the frame
    acc_ax.set_yticks(range(0, 101, 20))
    if acc_ax.lines:
        acc_ax.legend(loc="lower right")
    else:
        _note(acc_ax, "no evaluation records")

    x, y = _xy(steps, "clips_per_s")
    speed_ax.plot(x, y, color="C3", label="all ranks")
    per_rank = [r for r in steps if isinstance(r.get("clips_per_s_rank"), list) and len(r["clips_per_s_rank"]) > 1]
    if per_rank:
        for k in range(len(per_rank[0]["clips_per_s_rank"])):
            pts = [(r["step"], r["clips_per_s_rank"][k]) for r in per_rank if len(r["clips_per_s_rank"]) > k]
            speed_ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.8, alpha=0.6, label=f"rank {k}")
        speed_ax.legend(loc="lower right", fontsize="small")
    speed_ax.set_ylabel("clips/s")
    speed_ax.set_ylim(bottom=0)
    if not y:
        _note(speed_ax, "no step records")

    x, y = _xy(steps, "data_wait", 100.0)
    wait_ax.plot(x, y, color="C4")
    wait_ax.set_ylabel("data wait (% of step time)")
    wait_ax.set_ylim(0, 100)
    if not y:
        _note(wait_ax, "no step records")

    # An epoch ends at its last step record; mark the boundary on every panel.
    ends = [a["step"] for a, b in zip(steps, steps[1:]) if a.get("epoch") != b.get("epoch") and _number(a.get("step"))]
    for ax in (loss_ax, acc_ax, speed_ax, wait_ax):
        for s in ends:
            ax.axvline(s, color="0.8", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    for ax in (speed_ax, wait_ax):
        ax.set_xlabel("step")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    return out
