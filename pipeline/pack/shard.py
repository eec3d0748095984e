"""One planned shard: its clips' results -> tar bytes, published with its resume record.

`write_shard` is the pack-one-shard step: whatever decodes the clips (the local decoder pool of
run_pack today; a Ray task or a Slurm array part would be another engine), it calls this once a
shard's clips are all back, and the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from pipeline.config import PackConfig
from pipeline.frames import clip_indices
from pipeline.pack.outdir import STATE_DIR, LocalDir, StoreDir, json_bytes, write_file
from pipeline.pack.plan import ShardPlan
from pipeline.shardformat import sample_members, sample_meta


def _sample_blocks(key: str, members: dict[str, bytes]) -> list[bytes]:
    """What webdataset's TarWriter(user="", group="", mode=0o644, mtime=0, encoder=False) writes,
    byte for byte (members in sorted order, PAX headers of Python's tarfile), without importing
    webdataset: it imports torch, 1.5 s of every pack's start-up on this machine. The blocks
    tarfile.addfile would write, made directly: no stream buffers copying every JPEG pack twice."""
    blocks = []
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        blocks += [info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"), data]
        blocks.append(tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
    return blocks


def _tar_end(size: int) -> bytes:
    """tarfile's end of archive: two zero blocks, then zeros to a whole record (RECORDSIZE)."""
    size += 2 * tarfile.BLOCKSIZE
    return tarfile.NUL * (2 * tarfile.BLOCKSIZE + -size % tarfile.RECORDSIZE)


def build_shard(plan: ShardPlan, results: list[dict], cfg: PackConfig) -> tuple[bytes, list[dict]]:
    """Tar bytes of one shard and the manifest rows of its clips. Deterministic: no clocks, no owners.
    `results`: pack_clip's dict for each of `plan.videos`, in order."""
    blocks, rows = [], []
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
            meta = sample_meta(
                key=v.key,
                source=v.source,
                class_name=v.class_name,
                label=v.label,
                split_tags=list(v.tags),
                split=plan.split,
                decoded_frames=r["decoded_frames"],
                container_frames=r["container_frames"],
                fps=r["fps"],
                original_size=r["original_size"],
                frame_size=r["frame_size"],
                indices=r["indices"] if cfg.stored_frames is None else clip_indices(r["decoded_frames"], cfg.frames),
                stored_indices=None if cfg.stored_frames is None else r["indices"],
                padded=r["decoded_frames"] < cfg.frames,
            )
            blocks += _sample_blocks(v.key, sample_members(v.label, r["jpgs"], meta))
            row.update(shard=plan.name, status="packed", reason=r["note"], padded=meta["padded"])
        rows.append(row)
    size = sum(map(len, blocks))
    blocks.append(_tar_end(size))
    return b"".join(blocks), rows


def file_stamp(path: Path) -> list[int] | None:
    """(size, mtime in ns) of an input file, None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def state_name(plan: ShardPlan) -> str:
    """The resume record of a finished shard, inside the output folder."""
    return f"{STATE_DIR}/state/{plan.name}.json"


def write_shard(out: LocalDir | StoreDir, plan: ShardPlan, results: list[dict], cfg: PackConfig) -> dict:
    """Pack one shard: build it from its clips' results (pack_clip's, in plan order), publish it under
    its final name, then its resume record. Returns the record: name, split, samples, bytes, sha256,
    the manifest rows and the failed inputs' stamps. Every engine calls this, once per shard."""
    data, rows = build_shard(plan, results, cfg)
    write_file(out, plan.name, data)
    saved = {
        "name": plan.name,
        "split": plan.split,
        "samples": sum(r["status"] == "packed" for r in rows),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "rows": rows,
        # a failed clip's file as it was: a fixed file makes the shard be packed again
        "failed_inputs": {r["source"]: file_stamp(cfg.data_dir / r["source"]) for r in rows if r["status"] == "failed"},
    }
    # The shard is on disk for good (fsynced, its folder too) before its record is written; a record
    # lost or emptied by a power cut only has the shard packed again (job._shard_done), so it is not
    # fsynced: half the fsyncs of a pack.
    write_file(out, state_name(plan), json_bytes(saved), sync=False)
    return saved
