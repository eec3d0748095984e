"""Videos to shards: discover, plan, decode in parallel, write each shard atomically, assemble.

The unit of work and of recovery is the shard. The plan (pipeline.pack.plan) depends only on the
inputs and the output options, so a re-run, another worker count or another machine packing
`--part i/N` writes the same bytes. Clips are decoded by the decoder pool (pipeline.pack.pool,
running pipeline.pack.clip.pack_clip); each shard whose clips are back is written by
pipeline.pack.shard.write_shard, the pack-one-shard step. A shard appears under its final name only
when complete (pipeline.pack.outdir: a local `.NAME.partial` renamed, or one upload to an object
store); its manifest rows go to `.clipstream/state/` in the same folder or bucket. The index and
manifest are written last, once every shard of the plan is there.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import sys
import time
from pathlib import Path

from pipeline.config import PackConfig
from pipeline.durable import FolderLock, failpoint, holder_text
from pipeline.errors import TooManyFailures, UserError
from pipeline.pack.layouts import Catalog, discover
from pipeline.pack.outdir import STATE_DIR, LocalDir, StoreDir, json_bytes, open_out_dir, write_file
from pipeline.pack.plan import ShardPlan, fingerprint, plan_shards
from pipeline.pack.shard import file_stamp, state_name
from pipeline.shardformat import INDEX_NAME, MANIFEST_NAME, build_index, manifest_schema

TAG_NAMES = {0: None, 1: "train", 2: "test"}


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class PackReport:
    out_dir: Path | str
    packed: int = 0
    padded: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unused: int = 0
    ignored: int = 0
    listed_missing: int = 0
    videos: int = 0
    bytes: int = 0
    seconds: float = 0.0
    clips_done_now: int = 0
    shards_written: int = 0
    shards_total: int = 0
    complete: bool = False
    already_complete: bool = False
    split_source: str = "official"
    layout: str = "hmdb51"

    def summary(self) -> str:
        rate = self.clips_done_now / self.seconds if self.seconds > 0 else 0.0
        lines = []
        if self.already_complete:
            lines.append(f"nothing to do: {self.out_dir} is already complete")
        lines.append(
            f"{self.layout} layout, {self.split_source} split: packed {self.packed} clips ({self.padded} padded), failed {len(self.failed)}, "
            f"unused {self.unused}, ignored files {self.ignored}; "
            + (f"missing {self.listed_missing} (listed, no file); " if self.listed_missing else "")
            + f"{self.shards_written}/{self.shards_total} shards written this run, {self.bytes / 1e6:.1f} MB in all"
            # no rate of a run that decoded nothing: "0 clips in 0.1 s (0.0 clips/s)" read as a failure
            + (
                f"; {self.clips_done_now} clips in {self.seconds:.1f} s ({rate:.1f} clips/s)"
                if self.clips_done_now
                else ""
            )
        )
        for source, reason in self.failed[:10]:
            lines.append(f"failed: {source}: {reason}")
        if len(self.failed) > 10:
            lines.append(f"... and {len(self.failed) - 10} more failures (see {MANIFEST_NAME})")
        if not self.complete:
            lines.append(
                "this part is done; the index and manifest are written when every part has finished (re-run any part then)"
            )
        return "\n".join(lines)


_OUR_SHARD = re.compile(r"(test-)?[0-9]{3,}\.tar")
"""The names plan_shards gives shards: the only ones, with the index and manifest, a pack deletes."""


def _ours(name: object) -> bool:
    return isinstance(name, str) and (bool(_OUR_SHARD.fullmatch(name)) or name in (INDEX_NAME, MANIFEST_NAME))


def _read_plan(out: LocalDir | StoreDir, plan_file: str) -> tuple[dict | None, str | None]:
    """The old pack's plan.json (None when there is none), or why it cannot be read (empty, torn)."""
    raw = out.read(plan_file)
    if raw is None:
        return None, None
    if not raw.strip():
        return None, "empty"
    try:
        old = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return None, f"not JSON: {str(e)[:80]}"
    if not isinstance(old, dict) or not isinstance(old.get("options"), dict):
        return None, "not a plan clipstream wrote"
    return old, None


def _prepare_out_dir(cfg: PackConfig, out: LocalDir | StoreDir, fp: dict, plans: list[ShardPlan]) -> None:
    plan_file = f"{STATE_DIR}/plan.json"
    old, torn = _read_plan(out, plan_file)
    ours = {p.name for p in plans} | {INDEX_NAME, MANIFEST_NAME}
    if torn is not None:
        if not cfg.overwrite:
            raise UserError(
                f"{out}/{plan_file} is unreadable ({torn}), so what {out} holds is not known; pass --overwrite to pack it again"
            )
        _clear(out, ours)
    elif old is not None and {k: v for k, v in old.items() if k != "files"} != fp:
        if not cfg.overwrite:
            changed = [
                f"{k} {old['options'].get(k)!r} -> {v!r}"
                for k, v in fp["options"].items()
                if old["options"].get(k) != v
            ]
            what = ", ".join(changed) if changed else "the input videos or split files changed"
            raise UserError(
                f"{out} was packed with different inputs or options ({what}); pass --overwrite to replace it"
            )
        # The old plan names what it wrote, but a state file is no authority on what to delete: only
        # names of our own pattern, inside the folder, are (an absolute or ../ name is never touched).
        listed = old.get("files") if isinstance(old.get("files"), list) else []
        _clear(out, {n for n in listed if _ours(n)} | ours)
    elif old is None:
        clash = sorted(n for n in ours if out.exists(n))
        if clash and _same_plan(out.read(plan_file), fp):
            clash = []  # a part of this pack, started with us, wrote its plan (then a shard) since we looked
        if clash and not cfg.overwrite:
            raise UserError(f"{out} already holds {clash[0]} not written by this pack; pass --overwrite to replace it")
        if clash:
            _clear(out, ours)
    out.remove_partials()
    write_file(out, plan_file, json_bytes({**fp, "files": sorted(ours)}))


def _same_plan(raw: bytes | None, fp: dict) -> bool:
    try:
        old = json.loads(raw) if raw is not None else None
    except ValueError:
        return False
    return isinstance(old, dict) and {k: v for k, v in old.items() if k != "files"} == fp


def _clear(out: LocalDir | StoreDir, names: set[str]) -> None:
    for n in names:
        out.delete(n)
    out.delete_tree(f"{STATE_DIR}/state")


def _shard_done(out: LocalDir | StoreDir, plan: ShardPlan, data_dir: Path) -> dict | None:
    """The saved state of a complete shard, or None when it must be (re)written: missing, of another
    size than recorded, or holding a clip that failed from a file that has changed since (fixed)."""
    try:
        saved = json.loads(out.read(state_name(plan)) or b"null")
        failed = saved.get("failed_inputs", {}) if saved is not None else {}
        if any(file_stamp(data_dir / source) != stamp for source, stamp in failed.items()):
            return None
        if saved is not None and out.size(plan.name) == saved["bytes"]:
            return saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _engine(name: str):
    """The engine's pack function (pipeline.pack.engines), imported only when it is chosen."""
    if name == "ray":
        from pipeline.pack.engines.ray import pack_on_ray

        return pack_on_ray
    from pipeline.pack.engines.local import pack_here

    return pack_here


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pack(cfg: PackConfig, quiet: bool = False, log=_stderr) -> PackReport:
    t0 = time.monotonic()
    out = open_out_dir(cfg.out_dir)  # a URL we cannot write to fails here, before the videos are listed
    catalog = discover(cfg)
    for note in catalog.warnings:
        log(f"warning: {note}")
    out.check_writable(f"{STATE_DIR}/.write-test.{secrets.token_hex(8)}")  # a name of its own: parts run at once
    lock = _lock_out_dir(out, cfg)
    try:
        return _pack(cfg, out, catalog, quiet, t0)
    finally:
        if lock is not None:
            lock.release()


def _lock_out_dir(out: LocalDir | StoreDir, cfg: PackConfig) -> FolderLock | None:
    """A local OUT_DIR is packed by one run at a time (a second one's start-up clean-up would delete
    the first's files); --part runs share it by design, and a bucket has no locks."""
    if not isinstance(out, LocalDir) or cfg.part[1] > 1:
        return None
    return FolderLock(
        out.path / STATE_DIR / "lock",
        lambda holder: (
            f"{out} is being packed by {holder_text(holder)}; wait for that run, or pack into another folder"
        ),
        remove=True,  # OUT_DIR's files are the pack: no lock file left among them
    )


def _pack(cfg: PackConfig, out: LocalDir | StoreDir, catalog: Catalog, quiet: bool, t0: float) -> PackReport:
    from pipeline.progress import progress

    plans = plan_shards(catalog, cfg)
    fp = fingerprint(cfg, plans)
    _prepare_out_dir(cfg, out, fp, plans)
    part_i, part_n = cfg.part
    mine = [p for g, p in enumerate(plans) if g % part_n == part_i - 1]
    todo = [p for p in mine if _shard_done(out, p, cfg.data_dir) is None]
    report = PackReport(out_dir=cfg.out_dir, shards_total=len(plans), split_source=catalog.split_source)
    index_done = _index_readable(out) and out.exists(MANIFEST_NAME)

    if todo:
        bar = progress(sum(len(p.videos) for p in todo), "pack", quiet=quiet)

        def on_clips(n: int) -> None:
            bar.update(n)
            report.clips_done_now += n

        def on_shard(plan: ShardPlan) -> None:
            report.shards_written += 1
            failpoint(f"after-shards:{report.shards_written}")

        try:
            _engine(cfg.engine)(cfg, out, todo, on_clips, on_shard)
        finally:
            bar.close()
        out.remove_partials()  # what a try killed mid-write left (a Ray task is retried elsewhere)

    saved = {p.name: _shard_done(out, p, cfg.data_dir) for p in plans}
    report.complete = all(saved.values())
    report.already_complete = not todo and index_done
    report.seconds = time.monotonic() - t0
    if report.complete:
        rows = _assemble(cfg, out, catalog, plans, saved)
        for r in rows:
            report.packed += r["status"] == "packed"
            report.padded += bool(r["padded"])
            report.unused += r["status"] == "unused"
            if r["status"] == "failed":
                report.failed.append((r["source"], r["reason"]))
        report.bytes = sum(s["bytes"] for s in saved.values())
    report.ignored = len(catalog.ignored)
    report.listed_missing = len(catalog.listed_missing)
    report.layout = catalog.layout
    report.videos = len(catalog.videos)
    return report


def _index_readable(out: LocalDir | StoreDir) -> bool:
    """An index.json that is there and parses: an emptied or torn one is rewritten, not 'nothing to do'."""
    raw = out.read(INDEX_NAME)
    try:
        return raw is not None and isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


def _utf8(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _assemble(
    cfg: PackConfig, out: LocalDir | StoreDir, catalog: Catalog, plans: list[ShardPlan], saved: dict[str, dict]
) -> list[dict]:
    """Write manifest.parquet and index.json (in that order: the index marks a finished pack)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for p in plans for r in saved[p.name]["rows"]]
    in_plan = {r["source"] for r in rows}
    s = cfg.split - 1
    for v in catalog.videos:
        if v.source not in in_plan:
            rows.append(
                {
                    "source": v.source, "class_name": v.class_name, "label": v.label, "key": v.key,
                    "split_tags": list(v.tags), "split": TAG_NAMES[v.tags[s]], "shard": None,
                    "status": "unused", "reason": v.unused_reason or f"tag 0 in split {cfg.split}", "decoded_frames": None,
                    "container_frames": None, "padded": None,
                }
            )  # fmt: skip
    for m in catalog.listed_missing:
        rows.append(
            {
                "source": m.source, "class_name": m.class_name, "label": m.label, "key": None,
                "split_tags": list(m.tags), "split": TAG_NAMES[m.tags[s]], "shard": None,
                "status": "missing", "reason": f"listed in {m.listed_in}, no such file", "decoded_frames": None,
                "container_frames": None, "padded": None,
            }
        )  # fmt: skip
    rows = [{**r, "layout": catalog.layout, "split_source": catalog.split_source} for r in rows]
    rows.sort(key=lambda r: (r["source"], r["status"]))
    # A file name the OS allows need not be UTF-8 (Python keeps its stray bytes as surrogates, which
    # Parquet strings cannot hold): such bytes are written as \xNN, so the manifest is always written.
    rows = [{k: _utf8(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    table = pa.Table.from_pylist(rows, schema=manifest_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_file(out, MANIFEST_NAME, sink.getvalue().to_pybytes())
    failpoint("before-index")

    splits = {}
    for split in ("train", "test"):
        shards = [
            {k: saved[p.name][k] for k in ("name", "samples", "bytes", "sha256")} for p in plans if p.split == split
        ]
        splits[split] = {"samples": sum(x["samples"] for x in shards), "shards": shards}
    index = build_index(
        classes=catalog.classes,
        frames_per_clip=cfg.frames,
        stored_frames=cfg.stored_frames,
        max_stored_frames=cfg.max_stored_frames,
        short_side=cfg.short_side,
        options=cfg.output_options(),
        layout=catalog.layout,
        split_source=catalog.split_source,
        splits=splits,
        counts={
            "videos": len(catalog.videos),
            "packed": sum(r["status"] == "packed" for r in rows),
            "padded": sum(bool(r["padded"]) for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "unused": sum(r["status"] == "unused" for r in rows),
            "missing": sum(r["status"] == "missing" for r in rows),
        },
    )
    write_file(out, INDEX_NAME, json_bytes(index))
    return rows


def check_failures(cfg: PackConfig, report: PackReport) -> None:
    total_videos = report.videos
    limit = cfg.max_failures * total_videos if cfg.max_failures < 1 else cfg.max_failures
    if len(report.failed) > limit:
        raise TooManyFailures(
            f"{len(report.failed)} of {total_videos} videos failed, above --max-failures {cfg.max_failures:g}; "
            f"first: {report.failed[0][0]}: {report.failed[0][1]}"
        )
