"""Writes small packed datasets in the shard format of docs/FORMAT.md, for tests.

Frames come from `pipeline.tools.sampledata.draw_frame`, so their pixels carry the class (colour, moving
square, code band) and the frame index: a model can learn them, and a test can read them back.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import simplejpeg

from pipeline.shardformat import FORMAT_VERSION, pack_jpegs
from pipeline.tools.sampledata import HMDB51_CLASSES, draw_frame

WIDTHS = (40, 48, 56)  # frames vary in width per clip, as after a shorter-side resize


def clip_key(class_name: str, i: int) -> str:
    digest = hashlib.sha1(f"{class_name}/{i}".encode()).hexdigest()[:10]
    return f"{class_name}_clip_{i:03d}-{digest}"


def encode_clip(frames: list[np.ndarray]) -> bytes:
    return pack_jpegs([simplejpeg.encode_jpeg(f, quality=90, colorspace="RGB", colorsubsampling="420") for f in frames])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            _add(tar, f"{s['key']}.jpgs", s["jpgs"])
            _add(tar, f"{s['key']}.cls", str(s["label"]).encode())
            _add(tar, f"{s['key']}.json", json.dumps(s["meta"]).encode())


def make_packed(
    out: Path,
    classes: int = 4,
    train_per_class: int = 12,
    test_per_class: int = 4,
    train_shards: int = 8,
    test_shards: int = 2,
    frames: int = 4,
    height: int = 32,
    seed: int = 0,
    names: list[str] | None = None,
) -> dict:
    """Write OUT/000.tar..., OUT/test-000.tar..., OUT/index.json; return the index. `names`: the
    class names (label = position), default the first `classes` HMDB51 names in sorted order."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else sorted(HMDB51_CLASSES)[:classes]
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class, n_shards, prefix in (
        ("train", train_per_class, train_shards, ""),
        ("test", test_per_class, test_shards, "test-"),
    ):
        samples = []
        for ci, name in enumerate(names):
            for i in range(per_class):
                number = i if split == "train" else 1000 + i
                width = WIDTHS[(ci + i) % len(WIDTHS)]
                start = int(rng.integers(0, 20))
                clip = [draw_frame(start + t, ci, width, height) for t in range(frames)]
                key = clip_key(name, number)
                meta = {"key": key, "class_name": name, "label": ci, "split": split, "frame_size": [width, height]}
                samples.append({"key": key, "label": ci, "jpgs": encode_clip(clip), "meta": meta})
        order = rng.permutation(len(samples))
        entries = []
        for s in range(n_shards):
            shard = [samples[j] for j in order[s::n_shards]]
            name = f"{prefix}{s:03d}.tar"
            write_tar(out / name, shard)
            data = (out / name).read_bytes()
            entries.append(
                {"name": name, "samples": len(shard), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        splits[split] = {"samples": len(samples), "shards": entries}
    index = {
        "format": "clipstream",
        "version": FORMAT_VERSION,
        "classes": names,
        "frames_per_clip": frames,
        "frame_size": {"short_side": height},
        "options": {"frames": frames, "short_side": height, "quality": 90, "shards": train_shards},
        "splits": splits,
        "counts": {
            "videos": 0,
            "packed": sum(v["samples"] for v in splits.values()),
            "padded": 0,
            "failed": 0,
            "unused": 0,
        },
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def shard_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def make_temporal_pack(
    out: Path,
    lengths: list[int],
    frames: int,
    stored: int | None,
    classes: int = 2,
    width: int = 128,
    height: int = 96,
    cap: int = 0,
    names: list[str] | None = None,
) -> dict:
    """A pack whose clips store S frames each, as `pack-shards --stored-frames` writes them: stored
    frame j is source frame round(j*(n-1)/(S-1)) of an n-frame clip (`stored=None`: every frame, at
    most `cap`, longer clips at the formula with S = cap). Frames carry their source index and
    class (sampledata.read_code). One training shard per clip length, two clips each (one per
    class); the same clips again as test shards. Returns the index."""
    from pipeline.frames import clip_indices

    out.mkdir(parents=True, exist_ok=True)
    names = list(names) if names is not None else sorted(HMDB51_CLASSES)[:classes]
    splits = {}
    for split, prefix in (("train", ""), ("test", "test-")):
        entries = []
        for s, n in enumerate(lengths):
            samples = []
            for ci, name in enumerate(names):
                count = stored if stored is not None else (n if n <= cap else cap)
                indices = clip_indices(n, count)
                key = clip_key(name, 100 * s + (1000 if split == "test" else 0))
                clip = [draw_frame(i, ci, width, height) for i in indices]
                meta = {
                    "key": key,
                    "label": ci,
                    "decoded_frames": n,
                    "stored_indices": indices,
                    "indices": clip_indices(n, frames),
                }
                samples.append({"key": key, "label": ci, "jpgs": encode_clip(clip), "meta": meta})
            name = f"{prefix}{s:03d}.tar"
            write_tar(out / name, samples)
            data = (out / name).read_bytes()
            entries.append(
                {"name": name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
        splits[split] = {"samples": sum(e["samples"] for e in entries), "shards": entries}
    index = {
        "format": "clipstream",
        "version": 2,
        "classes": names,
        "frames_per_clip": frames,
        "stored_frames": stored if stored is not None else "all",
        "splits": splits,
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def rewrite_shard(shard, edit):
    """Rewrite a shard member by member: edit(key, ext, data) returns new bytes or None to drop."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            data = edit(*m.name.split(".", 1), data)
            if data is not None:
                m.size = len(data)
                out.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    return list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())
