"""Typer wiring only: every console script is one small Typer app calling into the package."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.errors import UserError


def one_line_errors(fn: Callable) -> Callable:
    """Expected failures become `error: ...` on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _app(fn: Callable) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(help=fn.__doc__)(one_line_errors(fn))
    return app


def _parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part must look like i/N (e.g. 1/4), got {text!r}") from None
    return i, n


def pack_shards(
    data_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of videos per class (HMDB51: the folder holding hmdb51_org/ or the class folders).", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Output folder for the shards, index.json and manifest.parquet.")] = Path("shards"),
    split: Annotated[int, typer.Option(help="Official split to pack: 1, 2 or 3.")] = 1,
    frames: Annotated[int, typer.Option("--frames", "-t", help="Frames per clip (T), equally spaced over the decodable length.")] = 16,
    short_side: Annotated[int, typer.Option(help="Resize frames so the shorter side has this many pixels (aspect kept).")] = 128,
    keep_size: Annotated[bool, typer.Option("--keep-size", help="Store frames at their original size (ignores --short-side).")] = False,
    quality: Annotated[int, typer.Option(help="JPEG quality of stored frames, 1-100.")] = 90,
    shards: Annotated[int, typer.Option(help="Number of training shards (000.tar ...).")] = 32,
    test_shards: Annotated[Optional[int], typer.Option(help="Number of test shards (test-000.tar ...) [default: as many as --shards, at most one per test clip].", show_default=False)] = None,
    splits_dir: Annotated[Optional[Path], typer.Option(help="Folder with the official split files [default: searched for inside DATA_DIR].", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shard plan and of the fallback 70/30 split.")] = 0,
    decoder: Annotated[str, typer.Option(help="Video decoder: decord or pyav.")] = "decord",
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes [default: all cores].", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds one video may take before it is recorded as failed.")] = 120.0,
    max_failures: Annotated[float, typer.Option(help="Failed videos allowed: a fraction of all videos if < 1, else a count; above it exit code 1.")] = 0.01,
    part: Annotated[str, typer.Option(help="Pack only part i of N of the shard plan (i/N), for several machines sharing OUT_DIR.")] = "1/1",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an OUT_DIR packed with different inputs or options.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Pack class folders of videos into frame-exact WebDataset tar shards."""
    from pipeline.config import PackConfig, default_workers
    from pipeline.pack import check_failures, run_pack

    cfg = PackConfig(
        data_dir=data_dir,
        out_dir=out_dir,
        split=split,
        frames=frames,
        short_side=None if keep_size else short_side,
        quality=quality,
        shards=shards,
        test_shards=test_shards,
        splits_dir=splits_dir,
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


def make_sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write hmdb51_org/ and testTrainMulti_7030_splits/ into.")] = Path("data"),
    classes: Annotated[int, typer.Option(help="Number of classes (the first N HMDB51 class names, sorted), 1-51.")] = 8,
    clips_per_class: Annotated[int, typer.Option(help="Clips per class.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed for clip lengths, sizes and split tags.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Write an HMDB51-shaped sample set: real MPEG-4 AVI clips whose frames show their own index and class."""
    from pipeline.progress import progress
    from pipeline.sampledata import make_sample_data as make

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path is a file, not a folder: {out_dir}")
    if not 1 <= classes <= 51:
        raise UserError(f"--classes must be in 1..51, got {classes}")
    if clips_per_class < 1:
        raise UserError(f"--clips-per-class must be >= 1, got {clips_per_class}")
    with progress(classes * clips_per_class, "sample data", quiet=quiet) as bar:
        plan = make(out_dir, classes=classes, clips_per_class=clips_per_class, seed=seed, progress=lambda c: bar.update(1))
    typer.echo(f"wrote {len(plan)} clips in {classes} classes to {out_dir}/hmdb51_org and split files to {out_dir}/testTrainMulti_7030_splits")


def inspect_shards(
    pattern: Annotated[str, typer.Argument(help="Shards to look at: 'shards/<000..031>.tar', 'shards/{000..031}.tar', one .tar file, or a packed folder (all shards in its index.json).", show_default=False)],
    sheet: Annotated[Optional[Path], typer.Option(help="Also write a contact sheet PNG here: one labelled row of T frames per randomly drawn clip.", show_default=False)] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Clips drawn for the contact sheet (all, if the shards hold fewer).")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the contact sheet's draw.")] = 0,
    frame_height: Annotated[int, typer.Option(help="Height of each frame on the contact sheet in pixels (frames are scaled, aspect kept).")] = 128,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Summarise packed shards (clips per class and split, frame sizes, bytes per clip, padded and failed clips) and optionally draw a contact sheet."""
    from pipeline.inspect import choose_samples, contact_sheet, expand_pattern, scan_shards, summarize, write_png

    if samples < 1:
        raise UserError(f"--samples must be >= 1, got {samples}")
    if not 8 <= frame_height <= 1024:
        raise UserError(f"--frame-height must be in 8..1024, got {frame_height}")
    paths = expand_pattern(pattern)
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
    folder: Annotated[Path, typer.Argument(help="Packed folder holding index.json, manifest.parquet and the shards.", show_default=False)],
    workers: Annotated[Optional[int], typer.Option(help="Processes checking shards in parallel [default: all cores].", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Re-read every shard listed in index.json: bytes, sha256, sample count, members, JPEG decodes, labels. Prints one line per problem; exit code 1 when there is any."""
    from pipeline.config import default_workers
    from pipeline.inspect import verify_pack

    report = verify_pack(folder, workers if workers is not None else default_workers(), quiet=quiet)
    for line in report.problems:
        typer.echo(line)
    typer.echo(report.summary())
    if report.problems:
        raise typer.Exit(1)


def plot_run(
    log_dir: Annotated[Path, typer.Argument(help="Run folder holding metrics.jsonl (train-stream --log-dir).", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="PNG to write [default: LOG_DIR/curves.png].", show_default=False)] = None,
):
    """Draw a training run's curves: loss, test top-1/top-5, clips/s and data-wait share over steps."""
    from pipeline.plots import plot_run as draw

    typer.echo(f"wrote {draw(log_dir, out)}")


pack_app = _app(pack_shards)
sample_data_app = _app(make_sample_data)
inspect_app = _app(inspect_shards)
verify_app = _app(verify_shards)
plot_app = _app(plot_run)
