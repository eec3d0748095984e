"""Stored frames: does a pack of S > T frames per clip cost the loader anything? (issue 13)

    python benchmarks/bench_temporal.py [--repeats 3] [--batches 40] [--workers 1,2]

Generated HMDB-shaped clips are packed three times: S = T (today's format), S = 4T - 3 and S = all
(every frame up to the cap). For each worker count, ClipLoader runs (`--temporal segment`, one
frame drawn per segment, only the T used frames decoded) are alternated over the three packs in the
same process; a warm-up, then `--batches` timed batches. Printed: one JSON line per (pack, workers)
with the median clips/s, its ratio to S = T, and the shard bytes per clip of each pack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import ClipLoader  # noqa: E402
from pipeline.config import PackConfig  # noqa: E402
from pipeline.pack.job import run_pack  # noqa: E402
from pipeline.tools.sampledata import make_sample_data  # noqa: E402

T = 16


def measure(folder: Path, workers: int, batches: int, warmup: int = 3) -> float:
    with ClipLoader(folder, batch_size=8, workers=workers, epochs=None) as loader:
        epoch, source = 0, None

        def next_batch():
            nonlocal epoch, source
            while True:
                if source is None:
                    source = loader.epoch(epoch)
                batch = next(source, None)
                if batch is not None:
                    return batch
                source, epoch = None, epoch + 1

        for _ in range(warmup):
            next_batch()
        start = time.perf_counter()
        clips = sum(len(next_batch()["key"]) for _ in range(batches))
        return clips / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", type=Path, default=None, help="keep the data and packs here [default: a temporary folder]")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        data = root / "data"
        if not data.exists():
            make_sample_data(data, classes=8, clips_per_class=24, seed=0)
        packs = {"S=T": None, "S=4T-3": 4 * T - 3, "S=all": "all"}
        folders, per_clip = {}, {}
        for name, stored in packs.items():
            out = root / name.replace("=", "")
            run_pack(PackConfig(data, out, frames=T, shards=8, stored_frames=stored, workers=2), quiet=True)
            index = json.loads((out / "index.json").read_text())
            shards = index["splits"]["train"]["shards"]
            per_clip[name] = sum(s["bytes"] for s in shards) / sum(s["samples"] for s in shards)
            folders[name] = out
        runs = {(n, w): [] for n in packs for w in workers}
        for _ in range(args.repeats):
            for w in workers:
                for name in packs:  # alternated: every repeat runs each pack once, in turn
                    runs[(name, w)].append(measure(folders[name], w, args.batches))
        for w in workers:
            base = statistics.median(runs[("S=T", w)])
            for name in packs:
                rate = statistics.median(runs[(name, w)])
                print(
                    json.dumps(
                        {
                            "bench": "temporal",
                            "pack": name,
                            "workers": w,
                            "clips_per_s": round(rate, 1),
                            "vs_S_eq_T": round(rate / base, 3),
                            "runs": [round(r, 1) for r in runs[(name, w)]],
                            "bytes_per_clip": round(per_clip[name]),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
