"""Pack throughput (clips/s): pack-shards against the original recipe's frame extraction.

Same generated clips, same machine, alternated runs, medians and ratios. Variants:
  recipe      OpenCV reads every frame of each clip, writes its 16 sampled frames as JPEG files
              into a folder per clip (one process), the way the original 3D-ResNet recipe prepares data
  decord-wN   pack-shards --workers N (decord, the default decoder), for each N of --workers
  pyav-wN     pack-shards --workers N --decoder pyav
Prints a table and one JSON line per variant.

    python benchmarks/bench_pack.py                       # 1 and 2 workers, 128 clips, 5 repeats
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PackConfig  # noqa: E402
from pipeline.pack import run_pack  # noqa: E402
from pipeline.sample import clip_indices, resized_size  # noqa: E402
from pipeline.sampledata import make_sample_data  # noqa: E402


def recipe_extract(data_dir: Path, out: Path, frames: int = 16, short_side: int = 128) -> int:
    import cv2

    cv2.setNumThreads(1)
    n = 0
    for video in sorted((data_dir / "hmdb51_org").glob("*/*.avi")):
        cap = cv2.VideoCapture(str(video))
        all_frames = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            all_frames.append(f)
        cap.release()
        if not all_frames:
            continue
        folder = out / video.parent.name / video.stem
        folder.mkdir(parents=True, exist_ok=True)
        h, w = all_frames[0].shape[:2]
        size = resized_size(w, h, short_side)
        for j, i in enumerate(clip_indices(len(all_frames), frames)):
            img = cv2.resize(all_frames[i], size, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(folder / f"image_{j + 1:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        n += 1
    return n


def ours(data_dir: Path, out: Path, workers: int, decoder: str = "decord") -> int:
    # Every clip in the train split, so all variants handle the same clips.
    cfg = PackConfig(data_dir=data_dir, out_dir=out, workers=workers, decoder=decoder, shards=4, splits_dir=None)
    report = run_pack(cfg, quiet=True, log=lambda m: None)
    return report.packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--clips-per-class", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    data = work / "data"
    make_sample_data(data, classes=args.classes, clips_per_class=args.clips_per_class, seed=0)
    shutil.rmtree(data / "testTrainMulti_7030_splits")  # grouped split: every clip is packed
    n_videos = len(list((data / "hmdb51_org").glob("*/*.avi")))
    variants = {"recipe": lambda out: recipe_extract(data, out)}
    for w in (int(x) for x in args.workers.split(",")):
        for decoder in ("decord", "pyav"):
            variants[f"{decoder}-w{w}"] = lambda out, w=w, decoder=decoder: ours(data, out, w, decoder)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for name, fn in variants.items():  # warm-up: page cache, imports, lazy initialisation
        fn(work / f"warm-{name}")
        shutil.rmtree(work / f"warm-{name}")
    for r in range(args.repeats):
        for name, fn in variants.items():  # alternated, so drift on a shared machine hits all alike
            out = work / f"{name}-{r}"
            t0 = time.perf_counter()
            clips = fn(out)
            times[name].append(time.perf_counter() - t0)
            assert clips == n_videos, (name, clips, n_videos)
            shutil.rmtree(out)
    shutil.rmtree(work)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_videos / v for k, v in med.items()}
    results = []
    for name in variants:
        results.append(
            {
                "bench": "pack",
                "variant": name,
                "clips": n_videos,
                "median_s": round(med[name], 4),
                "clips_per_s": round(rate[name], 2),
                "vs_recipe": round(rate[name] / rate["recipe"], 3),
                "runs_s": [round(t, 4) for t in times[name]],
            }
        )
    print(f"{n_videos} clips, {args.repeats} alternated runs, medians")
    print(f"{'variant':10} {'clips/s':>9} {'x recipe':>9}")
    for r in results:
        print(f"{r['variant']:10} {r['clips_per_s']:9.1f} {r['vs_recipe']:9.2f}")
    for decoder in ("decord", "pyav"):
        counts = sorted(int(k.split("-w")[1]) for k in rate if k.startswith(decoder))
        for w in counts[1:]:
            print(f"{decoder} scaling 1 -> {w} workers: {rate[f'{decoder}-w{w}'] / rate[f'{decoder}-w{counts[0]}']:.2f}x")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
