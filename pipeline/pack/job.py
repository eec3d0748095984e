"""Videos to shards: discover, plan, decode in parallel, write each shard atomically, assemble.

The unit of work and of recovery is the shard. The plan (which clip goes to which shard, in which
order) depends only on the inputs and the output options, so a re-run, another worker count or
another machine packing `--part i/N` writes the same bytes. A shard appears under its final name
only when complete (pipeline.pack.outdir: a local `.NAME.partial` renamed, or one upload to an object
store); its manifest rows go to `.clipstream/state/` in the same folder or bucket. The index and
manifest are written last, once every shard of the plan is there.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import os
import sys
import tarfile
import time
from pathlib import Path

from pipeline.config import PackConfig
from pipeline.durable import failpoint
from pipeline.errors import UserError
from pipeline.frames import clip_indices
from pipeline.pack.layouts import Catalog, Video, discover
from pipeline.pack.outdir import LocalDir, StoreDir, open_out_dir
from pipeline.shardformat import FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, MAX_JPEG_SIDE, pack_jpegs

STATE_DIR = ".clipstream"
TAG_NAMES = {0: None, 1: "train", 2: "test"}


class TooManyFailures(UserError):
    exit_code = 1


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    videos: tuple[Video, ...]


# ---------------------------------------------------------------- planning


def _stable_order(videos: list[Video], seed: int) -> list[Video]:
    """A shuffle that depends only on the keys and the seed (no RNG version can change it)."""
    return sorted(videos, key=lambda v: hashlib.sha1(f"{seed}:{v.key}".encode()).hexdigest())


def plan_shards(catalog: Catalog, cfg: PackConfig) -> list[ShardPlan]:
    s = cfg.split - 1
    train = [v for v in catalog.videos if v.tags[s] == 1]
    test = [v for v in catalog.videos if v.tags[s] == 2]
    if not train:
        raise UserError(f"split {cfg.split} has no training clips")
    if len(train) < cfg.shards:
        raise UserError(
            f"only {len(train)} training clips for --shards {cfg.shards}: use --shards {len(train)} or fewer"
        )
    if cfg.test_shards is not None and cfg.test_shards > len(test):
        raise UserError(f"only {len(test)} test clips for --test-shards {cfg.test_shards}")
    n_test = cfg.test_shards or min(cfg.shards, len(test))
    plans = []
    for split, clips, n, prefix in (("train", train, cfg.shards, ""), ("test", test, n_test, "test-")):
        order = _stable_order(clips, cfg.seed)
        width = max(3, len(str(n - 1)))
        # Round-robin over a shuffled order: sizes differ by at most one, every shard mixes classes.
        for j in range(n):
            plans.append(ShardPlan(f"{prefix}{j:0{width}d}.tar", split, tuple(order[j::n])))
    return plans


def fingerprint(cfg: PackConfig, plans: list[ShardPlan]) -> dict:
    h = hashlib.sha256()
    for p in plans:
        h.update(p.name.encode())
        for v in p.videos:
            h.update(f"\0{v.source}\0{v.label}\0{v.tags}".encode("utf-8", "surrogateescape"))
    return {"format_version": FORMAT_VERSION, "options": cfg.output_options(), "plan_sha256": h.hexdigest()}


# ---------------------------------------------------------------- the worker


def _worker_init():
    import signal

    import cv2

    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def _die_with(parent: int) -> None:
    """Have the kernel kill this worker when the packer dies (Linux). Without it a worker whose
    packer was killed -9 while it sent a result larger than the pipe buffer would block for ever:
    it holds a copy of the packer's end of its own pipe (fork), so the pipe never breaks."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the poll loop below still notices between tasks
    if os.getppid() != parent:  # the packer died before prctl took effect
        os._exit(0)


def _worker_main(conn, parent: int, fn) -> None:
    _die_with(parent)
    _worker_init()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # the packer was killed (-9): nobody will read our results
                return
            continue
        try:
            args = conn.recv()
        except EOFError:
            return
        if args is None:
            return
        try:
            result = fn(*args)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"}
        conn.send(result)


class _Slot:
    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.tasks: collections.deque = collections.deque()
        """(task, args) sent to this worker, oldest (the one running) first."""
        self.deadline = 0.0


class WorkerPool:
    """Forked worker processes with a time-out per task that kills a hung decoder (a native call
    that never returns can be stopped no other way) and forks a fresh one in its place.

    Hand-written in place of pebble's ProcessPool: measured here, pebble took 0.25 s to import and
    0.1-0.15 s to start and stop, against 0.01-0.03 s for a plain pool, out of a 3 s pack of 153
    clips. A pipe per worker and `multiprocessing.connection.wait` are all it needs. Each worker
    holds `depth` tasks, so it starts the next clip while the packer writes a shard.
    """

    def __init__(self, workers: int, fn, timeout: float, depth: int = 2):
        import multiprocessing

        self._mp = multiprocessing.get_context("fork")
        self._fn, self.timeout, self.depth = fn, timeout, depth
        self._slots = [self._start() for _ in range(workers)]

    def _start(self) -> _Slot:
        ours, theirs = self._mp.Pipe()
        proc = self._mp.Process(target=_worker_main, args=(theirs, os.getpid(), self._fn), daemon=True)
        proc.start()
        theirs.close()
        return _Slot(proc, ours)

    def idle(self) -> bool:
        return any(len(s.tasks) < self.depth for s in self._slots)

    def busy(self) -> bool:
        return any(s.tasks for s in self._slots)

    def submit(self, task: int, args: tuple) -> None:
        slot = min(self._slots, key=lambda s: len(s.tasks))
        slot.conn.send(args)
        if not slot.tasks:
            slot.deadline = time.monotonic() + self.timeout
        slot.tasks.append((task, args))

    def wait(self) -> list[tuple[int, dict]]:
        """Block until a task ends or times out; (task, result) of each that did."""
        from multiprocessing.connection import wait

        busy = [s for s in self._slots if s.tasks]
        ready = wait([s.conn for s in busy], max(0.0, min(s.deadline for s in busy) - time.monotonic()))
        done = []
        for slot in busy:
            if slot.conn in ready:
                try:
                    result = slot.conn.recv()
                except (EOFError, OSError):
                    slot.proc.join()
                    result = {"error": f"decoder process died (exit code {slot.proc.exitcode})"}
                    self._replace(slot)
            elif time.monotonic() >= slot.deadline:
                result = {"error": f"decoding took longer than {self.timeout:g} s (time-out)"}
                self._replace(slot)
            else:
                continue
            done.append((slot.tasks.popleft()[0], result))
            slot.deadline = time.monotonic() + self.timeout  # the next task starts now
        return done

    def _replace(self, slot: _Slot) -> None:
        """A fresh worker in place of a dead or killed one; the tasks queued behind go to it."""
        slot.proc.kill()
        slot.proc.join()
        slot.conn.close()
        fresh = self._start()
        slot.proc, slot.conn = fresh.proc, fresh.conn
        for _, args in list(slot.tasks)[1:]:
            slot.conn.send(args)

    def close(self) -> None:
        for s in self._slots:
            try:
                s.conn.send(None)
            except OSError:
                pass
        for s in self._slots:
            s.proc.join(5)
        self.stop()

    def stop(self) -> None:
        for s in self._slots:
            if s.proc.is_alive():
                s.proc.kill()
            s.proc.join()
            s.conn.close()


def pack_clip(path: str, frames: int, short_side: int | None, quality: int, decoder: str, stored=None) -> dict:
    """Runs in a worker process: one video to its `.jpgs` member and facts for the metadata.
    `stored`: n -> S, the frames to store of an n-frame clip (PackConfig.stored_count); None: T."""
    import cv2
    import simplejpeg

    from pipeline.frames import resized_size
    from pipeline.video import DecodeError, decode_clip, probe_video

    try:
        probe = probe_video(path)
        too_big = _too_big(*probe.size, short_side)  # before decoding: T frames of it may not fit in memory
        if too_big:
            return {"error": too_big}
        keep = lambda n: clip_indices(n, stored(n) if stored else frames)  # noqa: E731
        clip = decode_clip(path, keep, decoder, planes=True, probe=probe)
    except DecodeError as e:
        return {"error": str(e)}
    too_big = _too_big(*clip.size, short_side)
    if too_big:
        return {"error": too_big}
    w, h = resized_size(*clip.size, short_side)
    interp = cv2.INTER_AREA if w <= clip.size[0] else cv2.INTER_LINEAR

    def fit(a, size):
        return a if (a.shape[1], a.shape[0]) == size else cv2.resize(a, size, interpolation=interp)

    jpegs = []
    for f in clip.frames:
        if isinstance(f, tuple):  # 4:2:0 planes straight into the JPEG encoder: no RGB round trip
            chroma = ((w + 1) // 2, (h + 1) // 2)
            y, u, v = _even_padded(fit(f[0], (w, h))), fit(f[1], chroma), fit(f[2], chroma)
            jpegs.append(simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=quality))
        else:
            jpegs.append(
                simplejpeg.encode_jpeg(fit(f, (w, h)), quality=quality, colorspace="RGB", colorsubsampling="420")
            )
    return {
        "jpgs": pack_jpegs(jpegs),
        "indices": clip.indices,
        "decoded_frames": clip.decoded_frames,
        "container_frames": clip.container_frames,
        "fps": round(clip.fps, 6),
        "original_size": list(clip.size),
        "frame_size": [w, h],
        "note": clip.note,
    }


def _even_padded(y):
    """The luma plane as a view into a copy one pixel wider/taller where its size is odd (edge
    repeated). libjpeg-turbo reads 4:2:0 luma in whole 2x2 blocks: given an odd-sized plane it reads
    a byte past each row, and past the buffer's end on the last one, so two packs of the same clip
    differed (a 320x240 clip at --short-side 128 is 171 px wide)."""
    import cv2

    h, w = y.shape
    if not (h % 2 or w % 2):
        return y
    return cv2.copyMakeBorder(y, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)[:h, :w]


def _too_big(width: int, height: int, short_side: int | None) -> str | None:
    """Why frames of this source would be refused by our own readers (shardformat.MAX_JPEG_SIDE)."""
    from pipeline.frames import resized_size

    if not (width and height):
        return None  # the header does not say; checked again on the decoded size
    w, h = resized_size(width, height, short_side)
    if max(w, h) <= MAX_JPEG_SIDE:
        return None
    return f"frames would be {w}x{h} px ({width}x{height} source), above the {MAX_JPEG_SIDE} px a side shard readers accept"


# ---------------------------------------------------------------- writing


def _atomic_write(out: LocalDir | StoreDir, name: str, data: bytes, sync: bool = True) -> None:
    out.write(name, data, midway=lambda: failpoint(f"mid-write:{name.rsplit('/', 1)[-1]}"), sync=sync)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """What webdataset's TarWriter(user="", group="", mode=0o644, mtime=0, encoder=False) writes,
    byte for byte (members in sorted order, PAX headers of Python's tarfile), without importing
    webdataset: it imports torch, 1.5 s of every pack's start-up on this machine."""
    for ext in sorted(members):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(members[ext]), 0, 0o644, "", ""
        tar.addfile(info, io.BytesIO(members[ext]))


def build_shard(plan: ShardPlan, results: list[dict], catalog: Catalog, cfg: PackConfig) -> tuple[bytes, list[dict]]:
    """Tar bytes of one shard and the manifest rows of its clips. Deterministic: no clocks, no owners."""
    buf = io.BytesIO()
    writer = tarfile.open(fileobj=buf, mode="w|")
    rows = []
    for v, r in zip(plan.videos, results):
        row = {
            "source": v.source,
            "class_name": v.class_name,
            "label": v.label,
            "key": v.key,
            "split_tags": list(v.tags),
            "split": plan.split,
            "shard": None,
            "status": "failed",
            "reason": r.get("error"),
            "decoded_frames": r.get("decoded_frames"),
            "container_frames": r.get("container_frames"),
            "padded": None,
        }
        if "error" not in r:
            meta = {
                "key": v.key,
                "source": v.source,
                "class_name": v.class_name,
                "label": v.label,
                "split_tags": list(v.tags),
                "split": plan.split,
                "decoded_frames": r["decoded_frames"],
                "container_frames": r["container_frames"],
                "fps": r["fps"],
                "original_size": r["original_size"],
                "frame_size": r["frame_size"],
                "indices": r["indices"] if cfg.stored_frames is None else clip_indices(r["decoded_frames"], cfg.frames),
                **({} if cfg.stored_frames is None else {"stored_indices": r["indices"]}),
                "padded": r["decoded_frames"] < cfg.frames,
            }
            _add_sample(
                writer,
                v.key,
                {
                    "cls": str(v.label).encode(),
                    "jpgs": r["jpgs"],
                    "json": json.dumps(meta, sort_keys=True, ensure_ascii=True).encode(),
                },
            )
            row.update(shard=plan.name, status="packed", reason=r["note"], padded=meta["padded"])
        rows.append(row)
    writer.close()
    return buf.getvalue(), rows


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
            + f"{self.shards_written}/{self.shards_total} shards written this run, "
            f"{self.bytes / 1e6:.1f} MB in all; {self.clips_done_now} clips in {self.seconds:.1f} s ({rate:.1f} clips/s)"
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


def _prepare_out_dir(cfg: PackConfig, out: LocalDir | StoreDir, fp: dict, plans: list[ShardPlan]) -> None:
    plan_file = f"{STATE_DIR}/plan.json"
    raw = out.read(plan_file)
    old = json.loads(raw) if raw is not None else None
    ours = {p.name for p in plans} | {INDEX_NAME, MANIFEST_NAME}
    if old is not None and {k: v for k, v in old.items() if k != "files"} != fp:
        if not cfg.overwrite:
            changed = [
                f"{k} {old['options'].get(k)!r} -> {v!r}"
                for k, v in fp["options"].items()
                if old.get("options", {}).get(k) != v
            ]
            what = ", ".join(changed) if changed else "the input videos or split files changed"
            raise UserError(
                f"{out} was packed with different inputs or options ({what}); pass --overwrite to replace it"
            )
        _clear(out, set(old.get("files", [])) | ours)
    elif old is None:
        clash = sorted(n for n in ours if out.exists(n))
        if clash and not cfg.overwrite:
            raise UserError(f"{out} already holds {clash[0]} not written by this pack; pass --overwrite to replace it")
        if clash:
            _clear(out, ours)
    out.remove_partials()
    _atomic_write(out, plan_file, _json_bytes({**fp, "files": sorted(ours)}))


def _clear(out: LocalDir | StoreDir, names: set[str]) -> None:
    for n in names:
        out.delete(n)
    out.delete_tree(f"{STATE_DIR}/state")


def _file_stamp(path: Path) -> list[int] | None:
    """(size, mtime in ns) of an input file, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _shard_done(out: LocalDir | StoreDir, plan: ShardPlan, data_dir: Path) -> dict | None:
    """The saved state of a complete shard, or None when it must be (re)written: missing, of another
    size than recorded, or holding a clip that failed from a file that has changed since (fixed)."""
    try:
        saved = json.loads(out.read(f"{STATE_DIR}/state/{plan.name}.json") or b"null")
        failed = saved.get("failed_inputs", {}) if saved is not None else {}
        if any(_file_stamp(data_dir / source) != stamp for source, stamp in failed.items()):
            return None
        if saved is not None and out.size(plan.name) == saved["bytes"]:
            return saved
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _preload(decoder: str) -> None:
    """Import what every worker needs once, before they fork: each would otherwise spend its own
    0.1-0.4 s of CPU (`python -X importtime` here) importing PyAV, OpenCV and simplejpeg."""
    import av  # noqa: F401
    import cv2  # noqa: F401
    import simplejpeg  # noqa: F401

    import pipeline.video  # noqa: F401

    if decoder == "decord":
        import decord  # noqa: F401


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pack(cfg: PackConfig, quiet: bool = False, log=_stderr) -> PackReport:
    from pipeline.progress import progress

    t0 = time.monotonic()
    out = open_out_dir(cfg.out_dir)  # a URL we cannot write to fails here, before the videos are listed
    catalog = discover(cfg)
    for note in catalog.warnings:
        log(f"warning: {note}")
    out.check_writable(f"{STATE_DIR}/.write-test")
    plans = plan_shards(catalog, cfg)
    fp = fingerprint(cfg, plans)
    _prepare_out_dir(cfg, out, fp, plans)
    part_i, part_n = cfg.part
    mine = [p for g, p in enumerate(plans) if g % part_n == part_i - 1]
    todo = [p for p in mine if _shard_done(out, p, cfg.data_dir) is None]
    report = PackReport(out_dir=cfg.out_dir, shards_total=len(plans), split_source=catalog.split_source)
    index_done = out.exists(INDEX_NAME) and out.exists(MANIFEST_NAME)

    if todo:
        jobs = [(p, v) for p in todo for v in p.videos]  # grouped by shard, in plan order
        shard_ends = list(itertools.accumulate(len(p.videos) for p in todo))
        # Clips scheduled but not yet written: bounds memory; a shard's worth beyond the workers'
        # share lets one slow clip at the head of a shard hold up writing, not decoding.
        window = cfg.workers * 8 + max(len(p.videos) for p in todo)
        bar = progress(len(jobs), "pack", quiet=quiet)
        _preload(cfg.decoder)
        pool = WorkerPool(cfg.workers, pack_clip, cfg.timeout)
        results: dict[int, dict] = {}
        scheduled = written = shard = 0
        try:
            while written < len(jobs):
                while pool.idle() and scheduled < len(jobs) and scheduled - written < window:
                    v = jobs[scheduled][1]
                    stored = None if cfg.stored_frames is None else cfg.stored_count
                    pool.submit(
                        scheduled,
                        (str(cfg.data_dir / v.source), cfg.frames, cfg.short_side, cfg.quality, cfg.decoder, stored),
                    )
                    scheduled += 1
                if pool.busy():
                    for i, result in pool.wait():
                        results[i] = result
                        bar.update(1)
                        report.clips_done_now += 1
                # Write every shard at the head whose clips are all back, in plan order.
                while shard < len(todo) and all(i in results for i in range(written, shard_ends[shard])):
                    p = todo[shard]
                    data, rows = build_shard(
                        p, [results.pop(i) for i in range(written, shard_ends[shard])], catalog, cfg
                    )
                    _atomic_write(out, p.name, data)
                    saved = {
                        "name": p.name,
                        "split": p.split,
                        "samples": sum(r["status"] == "packed" for r in rows),
                        "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest(),
                        "rows": rows,
                        # a failed clip's file as it was: a fixed file makes the shard be packed again
                        "failed_inputs": {
                            r["source"]: _file_stamp(cfg.data_dir / r["source"])
                            for r in rows
                            if r["status"] == "failed"
                        },
                    }
                    # The shard is on disk for good (fsynced, its folder too) before its record
                    # is written; a record lost or emptied by a power cut only has the shard packed
                    # again (_shard_done), so it is not fsynced: half the fsyncs of a pack.
                    _atomic_write(out, f"{STATE_DIR}/state/{p.name}.json", _json_bytes(saved), sync=False)
                    written, shard = shard_ends[shard], shard + 1
                    report.shards_written += 1
                    failpoint(f"after-shards:{report.shards_written}")
        except BaseException:
            pool.stop()
            raise
        finally:
            bar.close()
        pool.close()

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
    schema = pa.schema(
        [
            ("source", pa.string()), ("class_name", pa.string()), ("label", pa.int32()), ("key", pa.string()),
            ("split_tags", pa.list_(pa.int8())), ("split", pa.string()), ("shard", pa.string()),
            ("status", pa.string()), ("reason", pa.string()), ("decoded_frames", pa.int32()),
            ("container_frames", pa.int32()), ("padded", pa.bool_()), ("layout", pa.string()),
            ("split_source", pa.string()),
        ]
    )  # fmt: skip
    # A file name the OS allows need not be UTF-8 (Python keeps its stray bytes as surrogates, which
    # Parquet strings cannot hold): such bytes are written as \xNN, so the manifest is always written.
    rows = [{k: _utf8(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    _atomic_write(out, MANIFEST_NAME, sink.getvalue().to_pybytes())
    failpoint("before-index")

    splits = {}
    for split in ("train", "test"):
        shards = [
            {k: saved[p.name][k] for k in ("name", "samples", "bytes", "sha256")} for p in plans if p.split == split
        ]
        splits[split] = {"samples": sum(x["samples"] for x in shards), "shards": shards}
    index = {
        "format": "clipstream",
        # a pack of T stored frames keeps version 1, byte for byte; more stored frames are version 2
        "version": FORMAT_VERSION if cfg.stored_frames is None else 2,
        "classes": catalog.classes,
        "frames_per_clip": cfg.frames,
        **(
            {}
            if cfg.stored_frames is None
            else {"stored_frames": cfg.stored_frames, "max_stored_frames": cfg.max_stored_frames}
        ),
        "frame_size": {"short_side": cfg.short_side} if cfg.short_side else {"original": True},
        "options": cfg.output_options(),
        "layout": catalog.layout,
        "split_source": catalog.split_source,
        "splits": splits,
        "counts": {
            "videos": len(catalog.videos),
            "packed": sum(r["status"] == "packed" for r in rows),
            "padded": sum(bool(r["padded"]) for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows),
            "unused": sum(r["status"] == "unused" for r in rows),
            "missing": sum(r["status"] == "missing" for r in rows),
        },
    }
    _atomic_write(out, INDEX_NAME, _json_bytes(index))
    return rows


def check_failures(cfg: PackConfig, report: PackReport) -> None:
    total_videos = report.videos
    limit = cfg.max_failures * total_videos if cfg.max_failures < 1 else cfg.max_failures
    if len(report.failed) > limit:
        raise TooManyFailures(
            f"{len(report.failed)} of {total_videos} videos failed, above --max-failures {cfg.max_failures:g}; "
            f"first: {report.failed[0][0]}: {report.failed[0][1]}"
        )
