"""Typer wiring only: every console script is one small Typer app calling into the package
(the machinery they are built with: pipeline/cli/forms.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.forms import ConfigCommand, Form, fields_of, given_on_command_line, make_app
from pipeline.errors import UserError, printable
from pipeline.redact import redact


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
    if text == "auto":
        from pipeline.pack.parts import slurm_part

        part, said = slurm_part(os.environ)
        typer.echo(f"--part auto: {said}", err=True)
        return part
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part must look like i/N (e.g. 1/4), got {text!r}") from None
    return i, n


def _parse_cache_size(text: str | None) -> int | None:
    from pipeline.config import parse_size

    return None if text is None else parse_size(text, "--cache-size")


def _parse_weights(text: str | None) -> tuple[float, ...] | None:
    from pipeline.config import parse_weights

    return parse_weights(text)  # 0.7,0.3


def _parse_workers(text: str) -> tuple[int, ...]:
    from pipeline.tools.bench import parse_workers

    return parse_workers(text)


CACHE_SIZE = Form(str | None, _parse_cache_size, ("--cache-size",), shown=lambda v: None)
"""StreamConfig.cache_bytes on the command line: a human size (50GB, 500MB) or bytes."""


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
            help="Pack only part i of N of the shard plan (i/N), for several machines sharing OUT_DIR (a shared folder or a bucket); auto: this task's part of a Slurm job array (sbatch --array), from SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_MIN. Parts may start together; the last to finish writes the index and manifest."
        ),
    ] = "1/1",
    engine: Annotated[
        str,
        typer.Option(
            help="What packs the shards: local (--workers decoder processes on this machine) or ray (one Ray task per shard on the cluster RAY_ADDRESS or --ray-address names, else on a local one; needs the ray extra). The bytes are the same."
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster for --engine ray: host:port of its head, or auto [default: RAY_ADDRESS, else a local cluster of --workers CPUs].",
            show_default=False,
        ),
    ] = None,
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
        engine=engine,
        ray_address=ray_address,
        overwrite=overwrite,
    )
    report = run_pack(cfg, quiet=quiet)
    typer.echo(redact(report.summary()))
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


def train_stream(ctx: typer.Context, **options):
    """Stream WebDataset shards into (distributed) training of a video classifier, then evaluate on the test shards."""
    from pipeline.device import DistEnv
    from pipeline.train.launch import launch
    from pipeline.train.resuming import build_config, resumed_options

    if not options["shards"] and not options["resume"]:
        from typer._click.exceptions import MissingParameter

        raise MissingParameter(param_hint="'--shards'", param_type="option")
    # A resume takes the run's own options; those typed again must agree with them.
    given = {k: v for k, v in options.items() if given_on_command_line(ctx, k)}
    cfg = build_config(resumed_options(options["resume"], options["log_dir"], given, options))
    summary = launch(cfg)
    if cfg.plot and summary is not None and DistEnv.from_env().rank == 0:
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
    typer.echo(redact(summarize(paths, found).render()))
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
    cache_dir: Annotated[
        str | None,
        typer.Option(
            help="Local folder of train-stream's shard cache: every shard of an object-store pack found whole is kept there as it is verified (each is still read from the store, never from the cache), so training then reads none of them from the store again. Ignored for a local pack.",
            show_default=False,
        ),
    ] = None,
    cache_size: Annotated[
        str | None,
        typer.Option(
            help="Most bytes the cache keeps (50GB, 500MB, or bytes); the least recently used shards are evicted past it [default: 90% of the free space on its disk].",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Re-read every shard listed in index.json: bytes, sha256, sample count, members, JPEG decodes, labels. Prints one line per problem; exit code 1 when there is any."""
    from pipeline.config import checked_cache, default_workers
    from pipeline.tools.inspect import as_path
    from pipeline.tools.verify import verify_pack

    cache_dir, cache_bytes = checked_cache(cache_dir, _parse_cache_size(cache_size))
    path, cache = as_path(folder), None
    if cache_dir is not None and not isinstance(path, Path):
        from pipeline.storage.cache import open_cache

        cache = open_cache(cache_dir, cache_bytes)
    report = verify_pack(path, workers if workers is not None else default_workers(), quiet=quiet, cache=cache)
    for line in report.problems:
        typer.echo(printable(redact(line)))  # names and keys come from the shards and the index
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
    json_lines: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON line per configuration (and one for the stage breakdown) instead of the table.",
        ),
    ] = False,
    **options,
):
    """Measure the loading pipeline: clips/s, frames/s, MB/s, data-wait share and peak memory for 0, 1, 2, ... workers, and the time of each stage."""
    import json

    from pipeline.config import StreamConfig
    from pipeline.tools.bench import BenchConfig, run_bench, table

    stream = StreamConfig(**fields_of(StreamConfig, options, but=("workers",)))
    cfg = BenchConfig(stream=stream, **fields_of(BenchConfig, options))
    if cfg.model:
        from pipeline.train.models import MODEL_NAMES, build_model

        if cfg.model not in MODEL_NAMES:
            build_model(cfg.model, 2)  # UserError for unknown names, before any shard is read
    emit = (lambda r: typer.echo(json.dumps(r))) if json_lines else (lambda r: None)
    results = run_bench(cfg, emit=emit)
    if not json_lines:
        typer.echo(table(results))


pack_app = make_app(pack_shards)
sample_data_app = make_app(make_sample_data_command)
train_app = make_app(
    ConfigCommand(
        train_stream,
        ("pipeline.config:StreamConfig", "pipeline.config:TrainConfig"),
        forms={
            "shards": Form(list[str] | None, lambda v: tuple(v or ()), ("--shards",), shown=lambda v: None),
            "eval_shards": Form(list[str] | None, lambda v: tuple(v or ()), ("--eval-shards",), shown=lambda v: None),
            "test_views": Form(str, _parse_views, shown=lambda v: f"{v[0]}x{v[1]}"),
            "max_bad": Form(names=("--max-bad", "--max-bad-fraction")),
            "cache_bytes": CACHE_SIZE,
            "weights": Form(str | None, _parse_weights, shown=lambda v: None),
        },
    )
)
inspect_app = make_app(inspect_shards)
verify_app = make_app(verify_shards)
plot_app = make_app(plot_run_command)
bench_app = make_app(
    ConfigCommand(
        bench_stream,
        ("pipeline.config:StreamConfig", "pipeline.tools.bench:BenchConfig"),
        skip=("StreamConfig.workers", "StreamConfig.eval_shards", "StreamConfig.test_views", "StreamConfig.max_bad"),
        forms={
            "shards": Form(list[str], tuple, ("--shards",), required=True),
            "workers": Form(str, _parse_workers, shown=lambda v: ",".join(map(str, v))),
            "cache_bytes": CACHE_SIZE,
            "weights": Form(str | None, _parse_weights, shown=lambda v: None),
        },
    )
)
