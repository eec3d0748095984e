"""The original recipe's frame extraction, as a script to time as a process (start-up included).

OpenCV reads every frame of each clip into memory (`cv2.VideoCapture`), then writes the 16 sampled
frames, full size, as JPEG files into a folder per clip: the data preparation of the 3D-ResNet
recipe clipstream replaces. One process, one thread, like `pack-shards --workers 1`; with
`--workers N` the clips are split over N processes (a `multiprocessing.Pool`), for the 2-worker
comparison.

    python benchmarks/recipe_extract.py DATA_DIR OUT_DIR [--workers N] [--frames 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2


def clip_indices(n: int, t: int) -> list[int]:
    # The same integer math as pipeline.video.clip_indices, copied so the recipe imports nothing of ours.
    if t == 1:
        return [n // 2]
    return [(2 * i * (n - 1) + (t - 1)) // (2 * (t - 1)) for i in range(t)]


def extract(job: tuple[str, str, int]) -> int:
    video, folder, frames = job
    cv2.setNumThreads(1)
    cap = cv2.VideoCapture(video)
    all_frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        all_frames.append(f)
    cap.release()
    if not all_frames:
        return 0
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(clip_indices(len(all_frames), frames)):
        cv2.imwrite(str(out / f"image_{j + 1:05d}.jpg"), all_frames[i], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    root = args.data_dir / "hmdb51_org" if (args.data_dir / "hmdb51_org").is_dir() else args.data_dir
    jobs = [(str(v), str(args.out_dir / v.parent.name / v.stem), args.frames) for v in sorted(root.glob("*/*.avi"))]
    if args.workers == 1:
        done = sum(map(extract, jobs))
    else:
        import multiprocessing

        with multiprocessing.Pool(args.workers) as pool:
            done = sum(pool.imap_unordered(extract, jobs, chunksize=4))
    print(done)
    sys.exit(0 if done == len(jobs) else 1)


if __name__ == "__main__":
    main()
