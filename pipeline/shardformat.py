"""The on-disk contract shared by the packer and every reader (see docs/FORMAT.md).

A sample is three tar members with one dot-free key: `KEY.jpgs` (all T frames as one JPEG pack),
`KEY.cls` (class index as ASCII digits) and `KEY.json` (metadata). One member for all frames keeps
tar iteration at three members a sample instead of T + 2.

This module is the only place that spells the member names, the key rule, the metadata fields, the
label, the JPEG pack, the index and the manifest schema: the writer (pipeline.pack) and every reader
(the stream, read_shard, inspect-shards, verify-shards) go through it.

JPEG pack layout (little-endian): magic b"JPGS", uint32 T, T x uint32 byte lengths, then the T
JPEG files back to back.
"""

from __future__ import annotations

import json
import re
import struct

import numpy as np

from pipeline.errors import ShardFormatError

FORMAT_VERSION = 1
READ_VERSIONS = (1, 2)
"""Index versions readers accept: 2 adds stored frames (S >= T per clip, see docs/FORMAT.md)."""
PACK_MAGIC = b"JPGS"
INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.parquet"
MAX_FRAMES_PER_CLIP = 4096
MAX_JPEG_SIDE = 8192
MAX_MEMBER_BYTES = 1 << 30
"""Largest tar member the stream reads (a member is read into memory whole): 1 GiB, far above any
clip's JPEG pack, so a damaged or hostile size field cannot make a worker allocate gigabytes."""
"""Readers reject frames larger than this per side before allocating anything."""

CLS = "cls"
JPGS = "jpgs"
JSON = "json"
MEMBERS = (CLS, JPGS, JSON)
"""The members of every sample, in the order the packer writes them (sorted)."""

_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""webdataset's split of a member name into key and extension, at the first dot of the base name
(kept here so that readers which must not import torch, as webdataset does, group the same way)."""


def pack_jpegs(jpegs: list[bytes]) -> bytes:
    """Concatenate encoded frames into one `.jpgs` member."""
    header = PACK_MAGIC + struct.pack(f"<I{len(jpegs)}I", len(jpegs), *(len(j) for j in jpegs))
    return b"".join([header, *jpegs])  # one copy of the frames, not two


def unpack_jpegs(data: bytes | memoryview) -> list[memoryview]:
    """Split a `.jpgs` member into its T JPEG byte strings (zero-copy views)."""
    view = memoryview(data)
    if len(view) < 8 or bytes(view[:4]) != PACK_MAGIC:
        raise ShardFormatError("not a JPEG pack (bad magic)")
    (count,) = struct.unpack_from("<I", view, 4)
    if not 1 <= count <= MAX_FRAMES_PER_CLIP:
        raise ShardFormatError(f"JPEG pack claims {count} frames")
    start = 8 + 4 * count
    if len(view) < start:
        raise ShardFormatError("JPEG pack truncated in its header")
    lengths = struct.unpack_from(f"<{count}I", view, 8)
    if start + sum(lengths) != len(view):
        raise ShardFormatError(f"JPEG pack lengths add up to {start + sum(lengths)} bytes, member has {len(view)}")
    out = []
    for n in lengths:
        out.append(view[start : start + n])
        start += n
    return out


def jpeg_size(jpeg) -> tuple[int, int]:
    """(height, width) from a JPEG header, checked against MAX_JPEG_SIDE before anything is allocated."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError as e:
        raise ShardFormatError(f"unreadable JPEG frame: {e}") from None
    if not (1 <= height <= MAX_JPEG_SIDE and 1 <= width <= MAX_JPEG_SIDE):
        raise ShardFormatError(f"JPEG frame of {width}x{height} pixels exceeds the {MAX_JPEG_SIDE} px limit")
    return height, width


def decode_jpegs(data: bytes | memoryview) -> np.ndarray:
    """Decode a `.jpgs` member to (T, H, W, 3) uint8 RGB with libjpeg-turbo."""
    import simplejpeg

    frames = []
    for jpeg in unpack_jpegs(data):
        jpeg_size(jpeg)  # bounded before anything is allocated
        try:
            frames.append(simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))
        except ValueError as e:
            raise ShardFormatError(f"unreadable JPEG frame: {e}") from None
    if len({f.shape for f in frames}) != 1:
        raise ShardFormatError("frames of one clip differ in size")
    return np.stack(frames)


def is_valid_key(key: str) -> bool:
    """The key rule: ASCII letters, digits, '_' and '-' only (dot-free, so webdataset groups by it)."""
    return bool(_KEY_OK.match(key))


def encode_label(label: int) -> bytes:
    """The `.cls` member: the class index as ASCII digits."""
    return str(label).encode()


def parse_label(raw: bytes, num_classes: int | None = None) -> int:
    """THE label reader: a `.cls` member's class index, checked against `num_classes` when given."""
    try:
        label = int(raw)
    except ValueError:
        raise ShardFormatError(f"class {raw[:20]!r} is not a number") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise ShardFormatError(f"class {label} outside 0..{num_classes - 1}")
    return label


def sample_meta(
    *,
    key: str,
    source: str,
    class_name: str,
    label: int,
    split_tags: list[int],
    split: str,
    decoded_frames: int,
    container_frames: int | None,
    fps: float,
    original_size: list[int],
    frame_size: list[int],
    indices: list[int],
    stored_indices: list[int] | None,
    padded: bool,
) -> dict:
    """The `.json` member's fields (docs/FORMAT.md). `stored_indices` only in a pack storing S > T
    frames per clip; `indices` are then the T evaluation frames among them."""
    meta = {
        "key": key,
        "source": source,
        "class_name": class_name,
        "label": label,
        "split_tags": split_tags,
        "split": split,
        "decoded_frames": decoded_frames,
        "container_frames": container_frames,
        "fps": fps,
        "original_size": original_size,
        "frame_size": frame_size,
        "indices": indices,
        "padded": padded,
    }
    if stored_indices is not None:
        meta["stored_indices"] = stored_indices
    return meta


def sample_members(label: int, jpgs: bytes, meta: dict) -> dict[str, bytes]:
    """One sample's members, extension -> bytes, as the packer writes them."""
    return {CLS: encode_label(label), JPGS: jpgs, JSON: json.dumps(meta, sort_keys=True, ensure_ascii=True).encode()}


MAX_SHARDS = 1_000_000
"""Most shards an index may list per split (a full Kinetics-700 pack at 32 clips a shard is 20,000)."""
MAX_SAMPLES_PER_SHARD = 10_000_000
"""Most samples an index may claim for one shard: counts are bounded before any plan is computed."""
MAX_CLASSES = 100_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def build_index(
    *,
    classes: list[str],
    frames_per_clip: int,
    stored_frames,
    max_stored_frames: int | None,
    short_side: int | None,
    options: dict,
    layout: str,
    split_source: str,
    splits: dict,
    counts: dict,
) -> dict:
    """The `index.json` a finished pack writes (what parse_index reads back). `splits`: split ->
    {'samples', 'shards': [{'name', 'samples', 'bytes', 'sha256'}]}; `stored_frames` None for a pack
    of T stored frames."""
    return {
        "format": "clipstream",
        # a pack of T stored frames keeps version 1, byte for byte; more stored frames are version 2
        "version": FORMAT_VERSION if stored_frames is None else 2,
        "classes": classes,
        "frames_per_clip": frames_per_clip,
        **({} if stored_frames is None else {"stored_frames": stored_frames, "max_stored_frames": max_stored_frames}),
        "frame_size": {"short_side": short_side} if short_side else {"original": True},
        "options": options,
        "layout": layout,
        "split_source": split_source,
        "splits": splits,
        "counts": counts,
    }


def parse_index(raw: bytes, where: str) -> dict:
    """THE index reader: check an `index.json` read from `where` (a path or URL, for messages) and
    return it. Every field the readers use is checked for type and bounds before anything is sized
    from it, so a damaged or hostile index is one clear UserError, never a traceback or a huge
    allocation."""
    from pipeline.errors import UserError

    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"unreadable index {where}: {_short(e)}") from None
    if not isinstance(index, dict) or index.get("format") != "clipstream" or index.get("version") not in READ_VERSIONS:
        raise UserError(f"{where} is not a clipstream index of version {' or '.join(map(str, READ_VERSIONS))}")

    def bad(what: str) -> UserError:
        return UserError(f"unreadable index {where}: {what}")

    classes = index.get("classes")
    if (
        not isinstance(classes, list)
        or not 1 <= len(classes) <= MAX_CLASSES
        or not all(isinstance(c, str) and c for c in classes)
    ):
        raise bad(f"'classes' must be a list of 1 to {MAX_CLASSES} names")
    frames = index.get("frames_per_clip")
    if not _is_int(frames) or not 1 <= frames <= MAX_FRAMES_PER_CLIP:
        raise bad(f"'frames_per_clip' must be a whole number in 1..{MAX_FRAMES_PER_CLIP}, got {_short(frames)}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not isinstance(splits.get("train", {}), dict):
        raise bad("'splits' must map 'train' and 'test' to their shards")
    for split in ("train", "test"):
        entry = splits.get(split, {"samples": 0, "shards": []})
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("shards"), list)
            or len(entry["shards"]) > MAX_SHARDS
        ):
            raise bad(f"'splits.{split}.shards' must be a list of at most {MAX_SHARDS} shards")
        names = set()
        for shard in entry["shards"]:
            if not isinstance(shard, dict):
                raise bad(f"a shard of split {split} is {_short(shard)}, not an object")
            name, samples = shard.get("name"), shard.get("samples")
            if (
                not isinstance(name, str)
                or not name
                or "/" in name
                or "\\" in name
                or name in (".", "..")
                or len(name) > 255
                or not name.isprintable()
            ):
                raise bad(f"shard name {_short(name)} of split {split} is not a plain file name")
            if name in names:
                raise bad(f"shard {name!r} is listed twice in split {split}")
            names.add(name)
            if not _is_int(samples) or not 0 <= samples <= MAX_SAMPLES_PER_SHARD:
                raise bad(f"shard {name!r} claims {_short(samples)} samples (0..{MAX_SAMPLES_PER_SHARD})")
            if not _is_int(shard.get("bytes")) or shard["bytes"] < 0:
                raise bad(f"shard {name!r} has no valid 'bytes'")
            if not isinstance(shard.get("sha256"), str) or not _SHA256.match(shard["sha256"]):
                raise bad(f"shard {name!r} has no valid 'sha256'")
        if not _is_int(entry.get("samples")) or entry["samples"] < 0:
            raise bad(f"'splits.{split}.samples' must be a whole number >= 0")
    return index


MANIFEST_COLUMNS = (
    ("source", "string"), ("class_name", "string"), ("label", "int32"), ("key", "string"),
    ("split_tags", "list<int8>"), ("split", "string"), ("shard", "string"), ("status", "string"),
    ("reason", "string"), ("decoded_frames", "int32"), ("container_frames", "int32"), ("padded", "bool"),
    ("layout", "string"), ("split_source", "string"),
)  # fmt: skip
"""The manifest's columns and types, one row per source video (status packed, failed, unused or missing)."""


def manifest_schema():
    """MANIFEST_COLUMNS as a pyarrow schema (imported here only: readers of shards need no pyarrow)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int32": pa.int32(), "list<int8>": pa.list_(pa.int8()), "bool": pa.bool_()}
    return pa.schema([(name, types[kind]) for name, kind in MANIFEST_COLUMNS])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """(key, extension) of a tar member name, as webdataset groups members into samples."""
    m = _MEMBER_NAME.match(name)
    return (m.group(1), m.group(2)) if m else (None, None)
