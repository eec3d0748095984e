"""Typer wiring only: every console script is one small Typer app calling into the package."""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from pipeline.errors import UserError, as_options, printable


def one_line_errors(fn: Callable) -> Callable:
    """Expected failures become `error: ...` on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            # printable: the message may quote a key or member name from a shard (one line, no escapes)
            typer.echo(f"error: {printable(as_options(str(e)))}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class _OneLineUsageErrors(typer.core.TyperCommand):
    """click's own usage errors (unknown option, bad value, missing argument) as one `error: ...` line
    and exit code 2, like every other bad argument, instead of a usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # click.UsageError, BadParameter, ...
            message = " ".join(e.format_message().split())
            typer.echo(f"error: {message} (see --help)", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class _Script(typer.Typer):
    """A console script: calling it runs the command, and then the process ends."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # Keep what exists now out of the interpreter's last garbage collection, which otherwise
            # walks every object numpy, PyAV, OpenCV and pyarrow made: measured on pack-shards here,
            # 59 ms from the command's end to the process's, 19 ms with the freeze.
            gc.freeze()


def _app(fn: Callable) -> typer.Typer:
    app = _Script(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=fn.__doc__, cls=_OneLineUsageErrors)(one_line_errors(fn))
    return app


def _parse_stored(text: str | None) -> int | str | None:
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--stored-frames must be a number or 'all', got {text!r}") from None


def _parse_views(text: str) -> tuple[int, int]:
    try:
        k, c = (int(x) for x in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise UserError(f"--test-views must be KxC, e.g. 1x1 or 3x3, got {text!r}") from None
    return k, c


def _parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part must look like i/N (e.g. 1/4), got {text!r}") from None
    return i, n


def pack_shards(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder with one sub-folder of videos per class (HMDB51: the folder holding hmdb51_org/ or the class folders; UCF101: UCF-101/ or the class folders; Kinetics: the folder holding train/ and val/).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        str,
        typer.Argument(
            help="Output folder for the shards, index.json and manifest.parquet: a local folder or an object-store prefix such as s3://bucket/hmdb51/ (needs the s3 extra)."
        ),
    ] = "shards",
    split: Annotated[
        int,
        typer.Option(
            help="Official split to pack: 1, 2 or 3 (HMDB51, UCF101 and the grouped fallback; Kinetics has only 1)."
        ),
    ] = 1,
    frames: Annotated[
        int, typer.Option("--frames", "-t", help="Frames per clip (T), equally spaced over the decodable length.")
    ] = 16,
    stored_frames: Annotated[
        str | None,
        typer.Option(
            help="Frames stored per clip, S: a number with S - 1 a multiple of T - 1 (e.g. 61 for T = 16), or 'all' (every frame up to --max-stored-frames), so that training can draw other frames each epoch (train-stream --temporal segment) [default: T].",
            show_default=False,
        ),
    ] = None,
    max_stored_frames: Annotated[
        int,
        typer.Option(
            help="Cap of --stored-frames all (cap - 1 a multiple of T - 1); longer clips store this many, equally spaced."
        ),
    ] = 301,
    short_side: Annotated[
        int, typer.Option(help="Resize frames so the shorter side has this many pixels (aspect kept).")
    ] = 128,
    keep_size: Annotated[
        bool, typer.Option("--keep-size", help="Store frames at their original size (ignores --short-side).")
    ] = False,
    quality: Annotated[int, typer.Option(help="JPEG quality of stored frames, 1-100.")] = 90,
    shards: Annotated[int, typer.Option(help="Number of training shards (000.tar ...).")] = 32,
    test_shards: Annotated[
        int | None,
        typer.Option(
            help="Number of test shards (test-000.tar ...) [default: as many as --shards, at most one per test clip].",
            show_default=False,
        ),
    ] = None,
    splits_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the official split files: HMDB51's <class>_test_split1.txt ..., UCF101's classInd.txt and trainlist01.txt ... (ucfTrainTestlist/), or Kinetics' train.csv, validate.csv, test.csv [default: searched for inside DATA_DIR; UCF101's ucfTrainTestlist/ also beside it].",
            show_default=False,
        ),
    ] = None,
    layout: Annotated[
        str,
        typer.Option(
            help="Dataset layout: hmdb51 (split files <class>_test_split{1,2,3}.txt), ucf101 (ucfTrainTestlist/: classInd.txt decides the labels), kinetics (train/ and val/ folders of class folders: val/ fills the test shards; annotation CSVs name missing clips), folders (class folders, grouped 70/30 split), or auto: detected from DATA_DIR."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the shard plan and of the fallback 70/30 split.")] = 0,
    decoder: Annotated[
        str, typer.Option(help="Video decoder: pyav (fastest here) or decord; both frame-exact.")
    ] = "pyav",
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes [default: all cores].", show_default=False)
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds one video may take before it is recorded as failed.")] = 120.0,
    max_failures: Annotated[
        float,
        typer.Option(
            help="Failed videos allowed: a fraction of all videos if < 1, else a count; above it exit code 1."
        ),
    ] = 0.01,
    part: Annotated[
        str,
        typer.Option(
            help="Pack only part i of N of the shard plan (i/N), for several machines sharing OUT_DIR (a shared folder or a bucket)."
        ),
    ] = "1/1",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an OUT_DIR packed with different inputs or options.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Pack class folders of videos into frame-exact WebDataset tar shards."""
    # Nothing in a pack multiplies matrices, and OpenBLAS starts a spinning thread per core when
    # numpy is imported: 0.04 s of start-up and 0.15 s of CPU here. Set before numpy is first imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from pipeline.config import PackConfig, default_workers
    from pipeline.pack.job import check_failures, run_pack

    cfg = PackConfig(
        data_dir=data_dir,
        out_dir=out_dir,
        split=split,
        frames=frames,
        stored_frames=_parse_stored(stored_frames),
        max_stored_frames=max_stored_frames,
        short_side=None if keep_size else short_side,
        quality=quality,
        shards=shards,
        test_shards=test_shards,
        splits_dir=splits_dir,
        layout=layout,
        seed=seed,
        decoder=decoder,
        workers=workers if workers is not None else default_workers(),
        timeout=timeout,
        max_failures=max_failures,
        part=_parse_part(part),
        overwrite=overwrite,
    )
    report = run_pack(cfg, quiet=quiet)
    typer.echo(report.summary())
    check_failures(cfg, report)


def make_sample_data_command(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder to write the sample set into (hmdb51: hmdb51_org/ and testTrainMulti_7030_splits/; ucf101: class folders and ucfTrainTestlist/; kinetics: train/, val/ and annotations/)."
        ),
    ] = Path("data"),
    classes: Annotated[
        int,
        typer.Option(
            help="Number of classes (hmdb51: the first N HMDB51 names, sorted, 1-51; ucf101: 1-16; kinetics: 1-12)."
        ),
    ] = 8,
    clips_per_class: Annotated[int, typer.Option(help="Clips per class.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed for clip lengths, sizes and split tags.")] = 0,
    layout: Annotated[
        str,
        typer.Option(
            help="hmdb51 (official HMDB51 archive layout), ucf101 (v_<Class>_gNN_cNN.avi files, classInd.txt in an unsorted order, the six split lists) or kinetics (.mp4 files in train/ and val/ class folders, annotation CSVs with a few rows whose file is missing)."
        ),
    ] = "hmdb51",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Write a sample set in the HMDB51, UCF101 or Kinetics layout: real MPEG-4 clips whose frames show their own index and class."""
    from pipeline.progress import progress
    from pipeline.tools.sampledata import MAX_SAMPLE_CLASSES
    from pipeline.tools.sampledata import make_sample_data as make

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path is a file, not a folder: {out_dir}")
    if layout not in MAX_SAMPLE_CLASSES:
        raise UserError(f"unknown layout {layout!r}; choose {', '.join(MAX_SAMPLE_CLASSES)}")
    if not 1 <= classes <= MAX_SAMPLE_CLASSES[layout]:
        raise UserError(f"--classes must be in 1..{MAX_SAMPLE_CLASSES[layout]} for the {layout} layout, got {classes}")
    if clips_per_class < 1:
        raise UserError(f"--clips-per-class must be >= 1, got {clips_per_class}")
    with progress(classes * clips_per_class, "sample data", quiet=quiet) as bar:
        plan = make(
            out_dir,
            classes=classes,
            clips_per_class=clips_per_class,
            seed=seed,
            progress=lambda c: bar.update(1),
            layout=layout,
        )
    written = [c for c in plan if c.kind != "missing"]
    typer.echo(
        f"wrote {len(written)} clips in {classes} classes to {out_dir} ({layout} layout"
        + (f", {len(plan) - len(written)} CSV rows without a file)" if len(written) < len(plan) else ")")
    )


def train_stream(
    shards: Annotated[
        list[str],
        typer.Option(
            "--shards",
            help="Training shards: 'shards/<000..031>.tar', '{000..031}' ranges, '::'-separated lists, local paths, http(s):// or s3:// URLs, or a packed folder (shards/, s3://bucket/hmdb51/); repeatable.",
            show_default=False,
        ),
    ],
    eval_shards: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-shards",
            help="Test shards, same syntax [default: the test shards listed in the index beside the training shards].",
            show_default=False,
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(help="Path or URL of index.json [default: beside the training shards].", show_default=False),
    ] = None,
    model: Annotated[str, typer.Option(help="r3d18, r2plus1d18, cnn-lstm, tiny, or torchvision:<name>.")] = "r3d18",
    epochs: Annotated[int, typer.Option(help="Passes over the training shards.")] = 10,
    batch_size: Annotated[
        int, typer.Option(help="Clips per batch on each rank (global batch: x ranks x --grad-accum).")
    ] = 8,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Loader worker processes per rank; each reads its own shards and builds whole batches [default: one per core left to the rank, at most 8 and at most shards / ranks].",
            show_default=False,
        ),
    ] = None,
    shuffle_buffer: Annotated[
        int, typer.Option(help="Samples in each worker's shuffle buffer (about 150 KB each).")
    ] = 256,
    crop: Annotated[
        int, typer.Option(help="Side of the square crop (random in training, centred in evaluation).")
    ] = 112,
    seed: Annotated[int, typer.Option(help="Seed of shard order, shuffle, crops, flips and model initialisation.")] = 0,
    resample: Annotated[
        bool,
        typer.Option("--resample", help="Draw shards with replacement (allows fewer shards than ranks x workers)."),
    ] = False,
    epoch_fill: Annotated[
        str,
        typer.Option(
            help="pad: every training clip once per epoch, the last batches topped up with marked repeats so every rank runs the same steps; drop: each rank's surplus left unread."
        ),
    ] = "pad",
    temporal: Annotated[
        str,
        typer.Option(
            help="Training frames: segment (one stored frame drawn per segment each epoch) or fixed (the evaluation frames); the same for packs of T stored frames."
        ),
    ] = "segment",
    test_views: Annotated[
        str,
        typer.Option(
            help="Evaluation views KxC: K temporal offsets x C spatial crops (1: centre, 3: centre and both ends); scores averaged per clip."
        ),
    ] = "1x1",
    allow_pipe: Annotated[
        bool, typer.Option("--allow-pipe", help="Allow pipe: shard URLs, which run shell commands.")
    ] = False,
    prefetch: Annotated[
        int,
        typer.Option(
            help="Batches each worker prepares ahead; each worker holds this many + 1 batch buffers in shared memory."
        ),
    ] = 2,
    max_bad: Annotated[
        float,
        typer.Option(
            "--max-bad",
            "--max-bad-fraction",
            help="Unreadable training clips allowed per rank and epoch: a fraction of its clips if < 1, else a count; above it the run stops.",
        ),
    ] = 0.01,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (momentum 0.9, Nesterov).")] = "adamw",
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate [default: 1e-3 for adamw, 0.05 for sgd].", show_default=False),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay.")] = 1e-4,
    schedule: Annotated[
        str, typer.Option(help="cosine (to zero at the last step) or step (x --lr-gamma every --lr-step-epochs).")
    ] = "cosine",
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up over this many optimiser steps.")] = 0,
    lr_step_epochs: Annotated[int, typer.Option(help="Epochs between decays of the step schedule.")] = 10,
    lr_gamma: Annotated[float, typer.Option(help="Decay factor of the step schedule.")] = 0.1,
    grad_accum: Annotated[int, typer.Option(help="Batches whose gradients are summed before each optimiser step.")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="Wrap the model in torch.compile.")] = False,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (ignored on CPU).")] = True,
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last/--no-channels-last", help="channels_last_3d memory format on CUDA (ignored on CPU)."
        ),
    ] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            help="Intra-op CPU threads per training process [default: its share of the cores minus --workers, at least 1].",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(help="Evaluate every N epochs (and after the last); 0: only after the last.")
    ] = 1,
    log_dir: Annotated[
        str | None,
        typer.Option(
            help="Run folder for metrics.jsonl, checkpoint.pt and audit logs [default: runs/<timestamp>, or the resumed run's folder].",
            show_default=False,
        ),
    ] = None,
    log_every: Annotated[int, typer.Option(help="Steps between step records in metrics.jsonl.")] = 10,
    checkpoint_every: Annotated[
        int, typer.Option(help="Also checkpoint every N steps (0: only at the end of each epoch).")
    ] = 0,
    resume: Annotated[
        str | None,
        typer.Option(help="Checkpoint file or run folder to continue from, mid-epoch included.", show_default=False),
    ] = None,
    max_steps: Annotated[
        int, typer.Option(help="Stop with a checkpoint after this many steps in total (0: no limit).")
    ] = 0,
    audit_keys: Annotated[
        bool,
        typer.Option("--audit-keys", help="Write the sample keys each rank consumed, per epoch, to LOG_DIR/audit/."),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar (rank 0 only).")] = True,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="At the end, draw LOG_DIR/curves.png: loss, test accuracy, clips/s and data-wait share over steps (as plot-run does).",
        ),
    ] = False,
    nproc_per_node: Annotated[
        int, typer.Option(help="Start N local processes (gloo on CPU, NCCL on GPU); under torchrun leave at 1.")
    ] = 1,
):
    """Stream WebDataset shards into (distributed) training of a video classifier, then evaluate on the test shards."""
    from pipeline.config import StreamConfig, TrainConfig
    from pipeline.device import DistEnv
    from pipeline.train.launch import launch

    stream_cfg = StreamConfig(
        shards=tuple(shards),
        eval_shards=tuple(eval_shards or ()),
        index=index,
        batch_size=batch_size,
        workers=workers,
        shuffle_buffer=shuffle_buffer,
        crop=crop,
        seed=seed,
        resample=resample,
        epoch_fill=epoch_fill,
        temporal=temporal,
        test_views=_parse_views(test_views),
        allow_pipe=allow_pipe,
        prefetch=prefetch,
        max_bad=max_bad,
    )
    cfg = TrainConfig(
        stream=stream_cfg,
        model=model,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_steps=warmup_steps,
        lr_step_epochs=lr_step_epochs,
        lr_gamma=lr_gamma,
        grad_accum=grad_accum,
        compile=compile,
        amp=amp,
        channels_last=channels_last,
        device=device,
        threads=threads,
        eval_every=eval_every,
        log_dir=log_dir,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
        max_steps=max_steps,
        audit_keys=audit_keys,
        progress=progress,
        plot=plot,
        nproc_per_node=nproc_per_node,
    )
    summary = launch(cfg)
    if plot and summary is not None and DistEnv.from_env().rank == 0:
        from pipeline.tools.plots import plot_run as draw

        typer.echo(printable(f"curves: {draw(Path(summary['log_dir']))}"))


def inspect_shards(
    pattern: Annotated[
        str,
        typer.Argument(
            help="Shards to look at: 'shards/<000..031>.tar', 'shards/{000..031}.tar', one .tar file, or a packed folder (all shards in its index.json); local or in an object store (s3://bucket/hmdb51/).",
            show_default=False,
        ),
    ],
    sheet: Annotated[
        Path | None,
        typer.Option(
            help="Also write a contact sheet PNG here: one labelled row of T frames per randomly drawn clip.",
            show_default=False,
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", "-n", help="Clips drawn for the contact sheet (all, if the shards hold fewer).")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the contact sheet's draw.")] = 0,
    frame_height: Annotated[
        int, typer.Option(help="Height of each frame on the contact sheet in pixels (frames are scaled, aspect kept).")
    ] = 128,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Summarise packed shards (clips per class and split, frame sizes, bytes per clip, padded and failed clips) and optionally draw a contact sheet."""
    from pipeline.tools.inspect import choose_samples, contact_sheet, scan_shards, shard_paths, summarize, write_png

    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if not 8 <= frame_height <= 1024:
        raise UserError(f"--frame-height must be in 8..1024, got {frame_height}")
    paths = shard_paths(pattern)
    found = scan_shards(paths, quiet=quiet)
    typer.echo(summarize(paths, found).render())
    if sheet is not None:
        if not found:
            raise UserError(f"no samples in the shards of {pattern!r}: nothing to draw")
        drawn = contact_sheet(choose_samples(found, samples, seed), frame_height)
        write_png(drawn.image, sheet)
        h, w = drawn.image.shape[:2]
        note = f" (the shards hold only {len(found)})" if len(found) < samples else ""
        typer.echo(f"contact sheet: {sheet} ({len(drawn.rows)} clips{note}, {w}x{h} px)")


def verify_shards(
    folder: Annotated[
        str,
        typer.Argument(
            help="Packed folder holding index.json, manifest.parquet and the shards: a local folder or an object-store prefix (s3://bucket/hmdb51/).",
            show_default=False,
        ),
    ],
    workers: Annotated[
        int | None,
        typer.Option(help="Processes checking shards in parallel [default: all cores].", show_default=False),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Re-read every shard listed in index.json: bytes, sha256, sample count, members, JPEG decodes, labels. Prints one line per problem; exit code 1 when there is any."""
    from pipeline.config import default_workers
    from pipeline.tools.inspect import as_path
    from pipeline.tools.verify import verify_pack

    report = verify_pack(as_path(folder), workers if workers is not None else default_workers(), quiet=quiet)
    for line in report.problems:
        typer.echo(printable(line))  # names and keys come from the shards and the index
    typer.echo(report.summary())
    if report.problems:
        raise typer.Exit(1)


def plot_run_command(
    log_dir: Annotated[
        Path, typer.Argument(help="Run folder holding metrics.jsonl (train-stream --log-dir).", show_default=False)
    ],
    out: Annotated[
        Path | None, typer.Option(help="PNG to write [default: LOG_DIR/curves.png].", show_default=False)
    ] = None,
):
    """Draw a training run's curves: loss, test top-1/top-5, clips/s and data-wait share over steps."""
    from pipeline.tools.plots import plot_run as draw

    typer.echo(f"wrote {draw(log_dir, out)}")


def bench_stream(
    shards: Annotated[
        list[str],
        typer.Option(
            "--shards",
            help="Training shards to read: 'shards/<000..031>.tar', '{000..031}' ranges, '::'-separated lists, local paths, http(s):// or s3:// URLs, or a packed folder; repeatable.",
            show_default=False,
        ),
    ],
    workers: Annotated[
        str, typer.Option(help="Loader worker counts to measure, comma-separated; one configuration each.")
    ] = "0,1,2",
    batches: Annotated[int, typer.Option(help="Measured batches per configuration.")] = 20,
    warmup: Annotated[int, typer.Option(help="Batches taken before the clock starts.")] = 3,
    model: Annotated[
        str | None,
        typer.Option(
            help="End to end: forward + backward of this model (r3d18, r2plus1d18, cnn-lstm, tiny, ...) on --device for every batch, so the data-wait share means something [default: loader only].",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Also run the model on the same batches held in memory (no decoding) and print real / synthetic; needs --model.",
        ),
    ] = False,
    stages: Annotated[
        bool,
        typer.Option(
            "--stages/--no-stages",
            help="Time each stage of the stream in this process (tar read and grouping, JPEG decode, crop, collate, host to device).",
        ),
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 8,
    shuffle_buffer: Annotated[int, typer.Option(help="Samples in each worker's shuffle buffer.")] = 256,
    crop: Annotated[int, typer.Option(help="Side of the random square crop.")] = 112,
    prefetch: Annotated[
        int,
        typer.Option(
            help="Batches each worker prepares ahead; each worker holds this many + 1 batch buffers in shared memory."
        ),
    ] = 2,
    index: Annotated[
        str | None, typer.Option(help="Path or URL of index.json [default: beside the shards].", show_default=False)
    ] = None,
    resample: Annotated[
        bool, typer.Option("--resample", help="Draw shards with replacement (allows fewer shards than workers).")
    ] = False,
    epoch_fill: Annotated[
        str,
        typer.Option(
            help="pad: every training clip once per epoch, the last batches topped up with marked repeats so every rank runs the same steps; drop: each rank's surplus left unread."
        ),
    ] = "pad",
    temporal: Annotated[
        str,
        typer.Option(
            help="Training frames: segment (one stored frame drawn per segment each epoch) or fixed (the evaluation frames); the same for packs of T stored frames."
        ),
    ] = "segment",
    allow_pipe: Annotated[
        bool, typer.Option("--allow-pipe", help="Allow pipe: shard URLs, which run shell commands.")
    ] = False,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.")] = True,
    channels_last: Annotated[
        bool, typer.Option("--channels-last/--no-channels-last", help="channels_last_3d on CUDA.")
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Intra-op threads of the main process [default: cores minus workers, at least 1].", show_default=False
        ),
    ] = None,
    step_ms: Annotated[
        float | None,
        typer.Option(
            help="Simulate an accelerator instead of --model: each batch is consumed by waiting this many ms without using the CPU, as a GPU step would; with --synthetic, real / synthetic shows whether the loader keeps up, epoch boundaries included.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of shard order, shuffle and crops.")] = 0,
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON line per configuration (and one for the stage breakdown) instead of the table.",
        ),
    ] = False,
):
    """Measure the loading pipeline: clips/s, frames/s, MB/s, data-wait share and peak memory for 0, 1, 2, ... workers, and the time of each stage."""
    import json

    from pipeline.config import StreamConfig
    from pipeline.tools.bench import BenchConfig, parse_workers, run_bench, table

    stream_cfg = StreamConfig(
        shards=tuple(shards),
        index=index,
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        crop=crop,
        seed=seed,
        resample=resample,
        epoch_fill=epoch_fill,
        temporal=temporal,
        allow_pipe=allow_pipe,
        prefetch=prefetch,
    )
    cfg = BenchConfig(
        stream=stream_cfg,
        workers=parse_workers(workers),
        batches=batches,
        warmup=warmup,
        model=model,
        device=device,
        synthetic=synthetic,
        stages=stages,
        amp=amp,
        channels_last=channels_last,
        threads=threads,
        step_ms=step_ms,
    )
    if model:
        from pipeline.train.models import MODEL_NAMES, build_model

        if model not in MODEL_NAMES:
            build_model(model, 2)  # UserError for unknown names, before any shard is read
    emit = (lambda r: typer.echo(json.dumps(r))) if json_lines else (lambda r: None)
    results = run_bench(cfg, emit=emit)
    if not json_lines:
        typer.echo(table(results))


pack_app = _app(pack_shards)
sample_data_app = _app(make_sample_data_command)
train_app = _app(train_stream)
inspect_app = _app(inspect_shards)
verify_app = _app(verify_shards)
plot_app = _app(plot_run_command)
bench_app = _app(bench_stream)
