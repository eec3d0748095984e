"""Frozen configuration of every job; typer options map one to one onto these fields."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.errors import UserError


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """How `pack-shards` turns a folder of videos into shards."""

    data_dir: Path
    """Folder with one sub-folder per class (or the `hmdb51_org/` level above them)."""
    out_dir: Path
    """Where shards, index.json and manifest.parquet go."""
    split: int = 1
    """Official split to pack (1, 2 or 3): its training clips go to the train shards, test clips to the test shards."""
    frames: int = 16
    """T, frames sampled per clip, equally spaced over the clip's decodable length."""
    short_side: int | None = 128
    """Resize so the shorter side is this many pixels (aspect kept); None keeps the original size."""
    quality: int = 90
    """JPEG quality of the stored frames (1-100)."""
    shards: int = 32
    """Number of training shards (000.tar ...)."""
    test_shards: int | None = None
    """Number of test shards (test-000.tar ...); default: as many as training shards, at most one per test clip."""
    splits_dir: Path | None = None
    """Folder with the official split files; default: searched for inside data_dir."""
    seed: int = 0
    """Seed of the shard plan (which clip goes to which shard, in which order) and of the fallback split."""
    decoder: str = "decord"
    """Video decoder: decord (default) or pyav."""
    workers: int = dataclasses.field(default_factory=default_workers)
    """Decoding processes."""
    timeout: float = 120.0
    """Seconds one video may take to decode before it is recorded as failed (a hung decoder costs one clip)."""
    max_failures: float = 0.01
    """Failed videos allowed: a fraction of all videos if < 1, else a count. Above it the run exits non-zero."""
    part: tuple[int, int] = (1, 1)
    """(i, N): pack only part i of N of the shard plan, for several machines sharing OUT_DIR."""
    overwrite: bool = False
    """Replace an OUT_DIR packed with different options."""

    def __post_init__(self):
        if self.split not in (1, 2, 3):
            raise UserError(f"unknown split {self.split}: HMDB51 has splits 1, 2 and 3")
        if self.frames < 1:
            raise UserError(f"--frames must be >= 1, got {self.frames}")
        if self.short_side is not None and self.short_side < 1:
            raise UserError(f"--short-side must be >= 1, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if self.shards < 1:
            raise UserError(f"--shards must be >= 1, got {self.shards}")
        if self.test_shards is not None and self.test_shards < 1:
            raise UserError(f"--test-shards must be >= 1, got {self.test_shards}")
        if self.decoder not in ("decord", "pyav"):
            raise UserError(f"unknown decoder {self.decoder!r}; choose decord or pyav")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.timeout <= 0:
            raise UserError(f"--timeout must be > 0 seconds, got {self.timeout}")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be >= 0, got {self.max_failures}")
        i, n = self.part
        if not (n >= 1 and 1 <= i <= n):
            raise UserError(f"--part must be i/N with 1 <= i <= N, got {i}/{n}")

    def output_options(self) -> dict:
        """The options that decide the bytes written: a changed one means a different pack."""
        return {
            "split": self.split,
            "frames": self.frames,
            "short_side": self.short_side,
            "quality": self.quality,
            "shards": self.shards,
            "test_shards": self.test_shards,
            "seed": self.seed,
            "decoder": self.decoder,
        }
