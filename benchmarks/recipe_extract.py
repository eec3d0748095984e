"""The data preparation clipstream replaces, as its recipe is written, as a script to time as a
process (start-up included).

What the recipe (the video chapter's `get_frames` / `store_frames` of the PyTorch cookbook that
prepares HMDB51 for a 3D-ResNet) does, and so what this does:
- open the clip with `cv2.VideoCapture` and take its frame count from the container's header;
- pick evenly spaced positions over that count (`np.linspace`, here the same 16 as pack-shards);
- read the clip front to back, keeping only the frames at those positions, each converted from
  OpenCV's BGR to RGB as it is kept (a frame that fails to read is passed over);
- write each kept frame full size as a JPEG file (`cv2.imwrite`, converted back to BGR, OpenCV's
  default quality), one folder per clip.

OpenCV runs with its default threads, as a user runs the recipe; `--threads 1` pins OpenCV to one
thread, the way pack-shards' workers run, and is reported beside it. `--workers N` splits the clips
over N processes (a `multiprocessing.Pool`), for the scaling comparison; the recipe itself is one
process.

The baseline before 2026-12-02 kept every decoded frame of a clip in a list and wrote the sampled
ones afterwards, at JPEG quality 90: allocations and page faults the recipe never pays, so the pack
figures measured against it (docs/BENCHMARKS-HISTORY.md) flatter pack-shards.

    python benchmarks/recipe_extract.py DATA_DIR OUT_DIR [--workers N] [--frames 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

THREADS: int | None = None
"""cv2.setNumThreads in each process; None leaves OpenCV's default."""


def extract(job: tuple[str, str, int]) -> int:
    video, folder, frames = job
    if THREADS is not None:
        cv2.setNumThreads(THREADS)
    cap = cv2.VideoCapture(video)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    wanted = set(np.linspace(0, count - 1, frames).astype(int).tolist()) if count > 0 else set()
    kept = []
    for position in range(count):
        ok, frame = cap.read()
        if not ok:
            continue
        if position in wanted:
            kept.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    if not kept:
        return 0
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for j, frame in enumerate(kept):
        cv2.imwrite(str(out / f"frame{j}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    return 1


def _init(threads: int | None) -> None:
    global THREADS
    THREADS = threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path, help="DATA_DIR/hmdb51_org/<class>/*.avi, or DATA_DIR/<class>/*.avi")
    ap.add_argument("out_dir", type=Path, help="where the JPEG folders go (one per clip)")
    ap.add_argument("--workers", type=int, default=1, help="processes (the recipe: 1) [default: 1]")
    ap.add_argument("--frames", type=int, default=16, help="frames kept per clip [default: 16]")
    ap.add_argument("--threads", type=int, help="cv2.setNumThreads per process [default: OpenCV's own]")
    args = ap.parse_args()
    root = args.data_dir / "hmdb51_org" if (args.data_dir / "hmdb51_org").is_dir() else args.data_dir
    jobs = [(str(v), str(args.out_dir / v.parent.name / v.stem), args.frames) for v in sorted(root.glob("*/*.avi"))]
    _init(args.threads)
    if args.workers == 1:
        done = sum(map(extract, jobs))
    else:
        import multiprocessing

        with multiprocessing.Pool(args.workers, initializer=_init, initargs=(args.threads,)) as pool:
            done = sum(pool.imap_unordered(extract, jobs, chunksize=4))
    print(done)
    # A clip with no readable frame (an empty or broken file) is skipped, as the recipe's loop does.
    sys.exit(0 if done else 1)


if __name__ == "__main__":
    main()
