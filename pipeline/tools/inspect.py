"""Look at packed shards: a summary table and a contact sheet of random clips.

The summary and the sheet read only tar headers, the small `.cls`/`.json` members and the `.jpgs`
members of the clips drawn, so they stay quick on a full HMDB51 pack: tarfile in random-access mode
seeks over member data. The full verify (every byte hashed, every frame decoded) is
pipeline.tools.verify.

A packed folder in an object store (`s3://bucket/hmdb51/`) is read in place, through
`objectstore.ObjectPath` (a pathlib.Path look-alike) and the same tar reader over the store's
seekable, read-ahead file: nothing is downloaded to disk.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.durable import write_atomic
from pipeline.errors import UserError, printable
from pipeline.progress import progress
from pipeline.shardformat import (
    CLS,
    INDEX_NAME,
    JPGS,
    JSON,
    MANIFEST_NAME,
    MEMBERS,
    ShardFormatError,
    decode_jpegs,
    parse_label,
)
from pipeline.storage.objectstore import ObjectPath
from pipeline.storage.urls import is_object_store, local_path
from pipeline.stream.sources import expand_shards, read_index
from pipeline.stream.tar import Member, group_samples, tar_members

LABEL_STRIP = 18
"""Pixels above each row of the contact sheet for its label."""
GAP = 2
"""Pixels between two frames of a row; the sheet has no outer margin."""
BACKGROUND = (24, 24, 24)


# ---------------------------------------------------------------- which shards


def as_path(location: str | Path) -> Path | ObjectPath:
    """A local path, or an ObjectPath for an object-store URL."""
    return ObjectPath(str(location)) if is_object_store(str(location)) else local_path(str(location))


def _index_or_none(folder: Path | ObjectPath) -> dict | None:
    path = folder / INDEX_NAME
    return read_index(str(path)) if path.exists() else None


def _index_shard_names(index: dict) -> list[str]:
    return [e["name"] for split in ("train", "test") for e in index["splits"].get(split, {}).get("shards", [])]


def shard_paths(pattern: str) -> list[Path | ObjectPath]:
    """Shard paths of a pattern or a packed folder (local, or ObjectPaths in a store), in order.

    Accepts `<000..031>` and `{000..031}` ranges, `{a,b}` alternatives and `::`-separated lists (the
    forms webdataset expands), one file, or a packed folder: every shard its index.json lists,
    training shards first.
    """
    folder = as_path(pattern) if is_object_store(pattern) else Path(pattern)
    if folder.is_dir():
        index = _index_or_none(folder)
        if index is None:
            raise UserError(
                f"no {INDEX_NAME} in {folder}: give a packed folder or a shard pattern such as '{folder}/<000..031>.tar'"
            )
        return [folder / n for n in _index_shard_names(index)]
    urls = expand_shards([pattern], allow_pipe=False)
    paths = [as_path(u) for u in urls]
    if any(p is None for p in paths):
        raise UserError(
            f"inspect-shards reads local shards and object stores, not http(s); {pattern!r} names remote ones"
        )
    if len({p.parent for p in paths}) > 1:
        raise UserError(f"the shards of {pattern!r} lie in several folders: inspect one pack at a time")
    return paths


# ---------------------------------------------------------------- scanning headers


@dataclasses.dataclass(frozen=True)
class SampleEntry:
    """One sample found in a shard, its frames not read yet."""

    shard: Path | ObjectPath
    key: str
    label: int
    meta: dict
    jpgs_offset: int
    """Byte offset of the `.jpgs` member's data in the shard file."""
    jpgs_size: int


def scan_shard(path: Path | ObjectPath) -> list[SampleEntry]:
    """Every sample of a shard from its tar headers and small members (the one tar reader, seeking
    over the frames); frames are not read."""
    out = []
    try:
        with path.open("rb") as f:
            for parts in group_samples(tar_members(f, skip=lambda name: name.lower().endswith(f".{JPGS}")), str(path)):
                key = parts["__key__"]
                try:
                    missing = sorted(set(MEMBERS) - set(parts))
                    if missing:
                        raise ValueError(f"has no {', '.join('.' + m for m in missing)}")
                    meta = json.loads(parts[JSON])
                    if not isinstance(meta, dict):
                        raise ValueError("its .json is not an object")
                    label = parse_label(parts[CLS])
                except (ValueError, RecursionError) as e:
                    raise UserError(
                        f"{path}: sample {_printable(key)} is damaged ({_printable(str(e))}); verify-shards {path.parent} lists what is wrong"
                    ) from None
                jpgs: Member = parts[JPGS]
                out.append(SampleEntry(path, key, label, meta, jpgs.offset, jpgs.size))
    except (ShardFormatError, OSError) as e:
        raise UserError(
            f"cannot read {path}: {_printable(str(e))} (verify-shards {path.parent} lists what is wrong)"
        ) from None
    return out


_printable = printable


def scan_shards(paths: list[Path | ObjectPath], quiet: bool = False) -> list[SampleEntry]:
    samples: list[SampleEntry] = []
    with progress(len(paths), "scan", quiet, unit="shard") as bar:
        for p in paths:
            samples += scan_shard(p)
            bar.update(1)
    return samples


def read_frames(entry: SampleEntry) -> np.ndarray:
    """Decode one scanned sample's frames: (T, H, W, 3) uint8 RGB (of a pack storing S > T frames,
    the T evaluation frames)."""
    from pipeline.frames import clip_indices

    with entry.shard.open("rb") as f:
        f.seek(entry.jpgs_offset)
        data = f.read(entry.jpgs_size)
    try:
        frames = decode_jpegs(data)
    except ShardFormatError as e:
        raise UserError(f"{entry.shard}: sample {entry.key}: {e}") from None
    t = len(entry.meta.get("indices") or [])
    return frames[clip_indices(len(frames), t)] if "stored_indices" in entry.meta and 0 < t < len(frames) else frames


# ---------------------------------------------------------------- summary


def _read_manifest(folder: Path | ObjectPath) -> list[dict] | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        source = path if isinstance(path, Path) else pa.BufferReader(path.read_bytes())
        return pq.read_table(source, columns=["source", "shard", "status", "reason"]).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"unreadable manifest {path}: {e}") from None


def _kb(n: float) -> str:
    return f"{n / 1e3:.1f} KB" if n < 1e6 else f"{n / 1e6:.1f} MB"


@dataclasses.dataclass
class Summary:
    """What `inspect-shards` prints, computed from the shards themselves, with the index and
    manifest beside them as a cross-check and the source of the failed clips."""

    folder: Path | ObjectPath
    shards: list[str]
    classes: list[str]
    frames_per_clip: set[int]
    per_class: dict[str, collections.Counter]
    """class name -> Counter of split -> clips."""
    frame_sizes: collections.Counter
    """(width, height) -> clips."""
    padded: collections.Counter
    """split -> padded clips."""
    shard_bytes: int
    jpgs_bytes: list[int]
    index_shards: int | None
    manifest_status: collections.Counter | None
    failed: list[tuple[str, str]]
    warnings: list[str]
    layout: str | None = None
    """'<layout>, <split source> split' from the index (packs before layouts were recorded: None)."""

    @property
    def clips(self) -> int:
        return sum(sum(c.values()) for c in self.per_class.values())

    def split_total(self, split: str) -> int:
        return sum(c[split] for c in self.per_class.values())

    def render(self) -> str:
        """The summary, every line safe for a terminal (names and metadata come from the shards)."""
        return "\n".join(_printable(line) for line in self._lines())

    def _lines(self) -> list[str]:
        n, t = self.clips, "/".join(map(str, sorted(self.frames_per_clip))) or "?"
        of = (
            f" of {self.index_shards}"
            if self.index_shards is not None and self.index_shards != len(self.shards)
            else ""
        )
        lines = [
            f"{self.folder}: {len(self.shards)}{of} shards, {n} clips (train {self.split_total('train')}, "
            f"test {self.split_total('test')}), {len(self.classes)} classes, {t} frames a clip, {_kb(self.shard_bytes)}",
            "frame sizes: " + ", ".join(f"{w}x{h} ({c} clips)" for (w, h), c in self.frame_sizes.most_common()),
        ]
        if n:
            j = self.jpgs_bytes
            per_frame = sum(j) / len(j) / max(max(self.frames_per_clip, default=1), 1)
            lines.append(
                f"bytes per clip: {_kb(self.shard_bytes / n)} on disk; frames {_kb(sum(j) / len(j))} "
                f"(min {_kb(min(j))}, max {_kb(max(j))}), {_kb(per_frame)} a frame"
            )
        lines.append(
            f"padded clips (fewer source frames than {t}, frames repeat): {sum(self.padded.values())} "
            f"(train {self.padded['train']}, test {self.padded['test']})"
        )
        if self.manifest_status is None:
            lines.append(f"no {MANIFEST_NAME} beside the shards: failed clips unknown")
        else:
            s = self.manifest_status
            lines.append(
                f"manifest (whole pack): {sum(s.values()) - s['missing']} videos, {s['packed']} packed, {s['failed']} failed, {s['unused']} unused"
                + (f", {s['missing']} missing (listed, no file)" if s["missing"] else "")
            )
        if self.layout:
            lines.append(f"layout {self.layout}")
        width = max([len("class")] + [len(c) for c in self.classes])
        lines += ["", f"{'class':<{width}}  {'train':>6}  {'test':>6}  {'total':>6}"]
        for c in self.classes:
            k = self.per_class[c]
            lines.append(f"{c:<{width}}  {k['train']:>6}  {k['test']:>6}  {k['train'] + k['test']:>6}")
        lines.append(f"{'all':<{width}}  {self.split_total('train'):>6}  {self.split_total('test'):>6}  {n:>6}")
        if self.failed:
            lines.append("")
            lines += [f"failed: {src}: {reason}" for src, reason in self.failed[:10]]
            if len(self.failed) > 10:
                lines.append(f"... and {len(self.failed) - 10} more failed clips (see {self.folder / MANIFEST_NAME})")
        if self.warnings:
            lines.append("")
            lines += [f"warning: {w}" for w in self.warnings]
        return lines


def _meta_text(meta: dict, field: str) -> str | None:
    value = meta.get(field)
    return value if isinstance(value, str) else None


def _meta_size(meta: dict) -> tuple:
    """(width, height) from a sample's metadata; ('?', '?') for anything but two whole numbers."""
    size = meta.get("frame_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        return tuple(size)
    return ("?", "?")


def _splits(index: dict) -> list[dict]:
    """The train and test entries of an index (parse_index checks only those two; others are not read)."""
    return [index["splits"].get(split, {"samples": 0, "shards": []}) for split in ("train", "test")]


def summarize(paths: list[Path | ObjectPath], samples: list[SampleEntry]) -> Summary:
    folder = paths[0].parent
    index = _index_or_none(folder)
    manifest = _read_manifest(folder)
    warnings = []
    if index is None:
        warnings.append(f"no {INDEX_NAME} beside the shards: sample counts are not cross-checked")
    # Metadata fields are what a shard says: anything but the expected type counts as unknown.
    classes = (
        list(index["classes"]) if index else sorted({_meta_text(s.meta, "class_name") or str(s.label) for s in samples})
    )
    per_class = {c: collections.Counter() for c in classes}
    frame_sizes: collections.Counter = collections.Counter()
    padded: collections.Counter = collections.Counter()
    per_shard = collections.Counter(s.shard.name for s in samples)
    for s in samples:
        name = (
            classes[s.label]
            if index and 0 <= s.label < len(classes)
            else _meta_text(s.meta, "class_name") or str(s.label)
        )
        split = _meta_text(s.meta, "split") or "?"
        per_class.setdefault(name, collections.Counter())[split] += 1
        frame_sizes[_meta_size(s.meta)] += 1
        padded[split] += s.meta.get("padded") is True
    if index:
        listed = {e["name"]: e["samples"] for split in _splits(index) for e in split["shards"]}
        for p in paths:
            if p.name not in listed:
                warnings.append(f"{p.name} is not in {INDEX_NAME}")
            elif listed[p.name] != per_shard[p.name]:
                warnings.append(
                    f"{p.name} holds {per_shard[p.name]} samples, {INDEX_NAME} says {listed[p.name]}: run verify-shards {folder}"
                )
    status = failed = None
    if manifest is not None:
        status = collections.Counter(r["status"] for r in manifest)
        failed = [(r["source"], r["reason"]) for r in manifest if r["status"] == "failed"]
        packed = collections.Counter(r["shard"] for r in manifest if r["status"] == "packed")
        for p in paths:
            if packed[p.name] != per_shard[p.name]:
                warnings.append(f"{p.name} holds {per_shard[p.name]} samples, {MANIFEST_NAME} lists {packed[p.name]}")
    return Summary(
        folder=folder,
        shards=[p.name for p in paths],
        classes=list(per_class),
        frames_per_clip={index["frames_per_clip"]}
        if index
        else {len(s.meta["indices"]) for s in samples if isinstance(s.meta.get("indices"), list)},
        per_class=per_class,
        frame_sizes=frame_sizes,
        padded=padded,
        shard_bytes=sum(p.stat().st_size for p in paths),
        jpgs_bytes=[s.jpgs_size for s in samples],
        index_shards=len(_index_shard_names(index)) if index else None,
        manifest_status=status,
        failed=failed or [],
        warnings=warnings,
        layout=f"{index['layout']}, {index.get('split_source', '?')} split"
        if index and isinstance(index.get("layout"), str)
        else None,
    )


# ---------------------------------------------------------------- contact sheet


@dataclasses.dataclass(frozen=True)
class Sheet:
    image: np.ndarray
    """(H, W, 3) uint8 RGB: N rows of LABEL_STRIP + frame height pixels; T cells of `cell_width`
    pixels with GAP between them."""
    rows: list[SampleEntry]
    cell_width: int
    frame_height: int


def choose_samples(samples: list[SampleEntry], n: int, seed: int) -> list[SampleEntry]:
    """`n` samples drawn without replacement (all when there are fewer), in shard order."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(samples), size=min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(picks)]


def _label(s: SampleEntry) -> str:
    name = s.meta.get("class_name", "?")
    text = f"{name} ({s.label})   {s.key}   {s.shard.name}" + ("   padded" if s.meta.get("padded") else "")
    return text.encode("ascii", "replace").decode()  # cv2's Hershey fonts draw ASCII only


def contact_sheet(rows: list[SampleEntry], frame_height: int = 128) -> Sheet:
    """One row per sample: a label strip, then its T frames left to right.

    Frames are scaled to `frame_height` pixels high, aspect kept (not touched when already that
    high). Every cell is as wide as the widest scaled frame; narrower frames sit centred in their
    cell on the dark background. Sheet size: width T x cell + (T - 1) x GAP, height
    N x (LABEL_STRIP + frame_height).
    """
    import cv2

    clips = []
    for s in rows:
        frames = read_frames(s)
        t, h, w, _ = frames.shape
        if h != frame_height:
            size = (max(1, round(w * frame_height / h)), frame_height)
            interp = cv2.INTER_AREA if frame_height < h else cv2.INTER_LINEAR
            frames = np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])
        clips.append(frames)
    cell = max(c.shape[2] for c in clips)
    t_max = max(c.shape[0] for c in clips)
    row_h = LABEL_STRIP + frame_height
    image = np.empty((len(clips) * row_h, t_max * cell + (t_max - 1) * GAP, 3), np.uint8)
    image[:] = BACKGROUND
    for r, (s, frames) in enumerate(zip(rows, clips)):
        y = r * row_h
        cv2.putText(image, _label(s), (4, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (235, 235, 235), 1, cv2.LINE_AA)
        w = frames.shape[2]
        pad = (cell - w) // 2
        for t, f in enumerate(frames):
            x = t * (cell + GAP) + pad
            image[y + LABEL_STRIP : y + row_h, x : x + w] = f
    return Sheet(image, rows, cell, frame_height)


def write_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 RGB image as PNG (lossless: the pixels read back exactly)."""
    import cv2

    if path.is_dir():
        raise UserError(f"--sheet must name a file, got the folder {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 6])
        if not ok:
            raise UserError(f"could not encode a {image.shape[1]}x{image.shape[0]} PNG")
        write_atomic(path, png.tobytes(), sync=False)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
