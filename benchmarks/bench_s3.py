"""Object storage against local files: the same shards, read by the real training stream.

    python benchmarks/bench_s3.py            # ~2 minutes on 2 cores

Makes the HMDB-shaped sample set, packs it twice with pack-shards' own code: into a local folder
and into a bucket of a real S3-API server (moto's server mode, its own process on 127.0.0.1, so it
does not share this process's GIL), then alternates local and s3:// runs of ClipLoader (the loader
train-stream uses: 2 workers, batch 8, crop 112). Each run starts a fresh loader: its time to the
first batch (worker start, index already read, first shards opened, first batch built) is
measured, then `--warmup` batches, then `--batches` timed ones. Prints one JSON line per run and a
summary line with the medians and the s3 / local ratio of clips/s (of the medians, and the median
of each repeat's ratio: the two runs of a repeat ran back to back under the same load, so theirs is
the steadier figure on a shared machine).

moto keeps objects in memory and answers on the loopback, so this measures what our s3:// reading
costs (the fsspec read-ahead, a HEAD and a ranged GET per shard, the botocore client in every
worker), not a real network; and moto's own CPU (about 8 ms a request here) comes out of the same
cores as the loader's, which a real S3 would not take. Every shard costs two requests whatever its
size, so the ratio depends on clips per shard: the default (8 classes x 40 clips, `--shards 2`)
gives ~112 clips a shard, as an HMDB51 pack's 3570 training clips in 32 shards hold; with
`--clips-per-class 24 --shards 8` shards hold ~17 clips (100 KB), the worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PackConfig, StreamConfig  # noqa: E402
from pipeline.pack.job import run_pack  # noqa: E402
from pipeline.stream.sources import resolve  # noqa: E402
from pipeline.tools.bench import endless_batches, measure  # noqa: E402
from pipeline.tools.sampledata import make_sample_data  # noqa: E402


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


def one_run(where: str, shards: str, workers: int, batch: int, warmup: int, batches: int) -> dict:
    cfg = StreamConfig(shards=(shards,), batch_size=batch, workers=workers, crop=112)
    source = resolve(cfg.shards, "train", None, False)
    batches_iter = endless_batches(source, cfg, pin_memory=False)
    m = measure(batches_iter, warmup, batches, None, None)
    batches_iter.close()
    return {
        "bench": "s3",
        "source": where,
        "workers": workers,
        "batch_size": batch,
        "clips": m["clips"],
        "clips_per_s": round(m["clips"] / m["seconds"], 2),
        "first_batch_s": round(m["first_batch"], 3),
        "data_wait": round(m["wait"] / m["seconds"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=8)
    # 8 x 40 clips, 2 training shards: ~112 clips a shard, as an HMDB51 pack's 3570 clips in 32
    ap.add_argument("--clips-per-class", type=int, default=40)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    proc, endpoint = start_moto()
    # The standard variables, as a user would set them for MinIO or Ceph: read by botocore itself.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench-clips")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_sample_data(work / "data", classes=args.classes, clips_per_class=args.clips_per_class, seed=0)
            local, remote = work / "shards", "s3://bench-clips/hmdb51/"
            for out in (local, remote):
                run_pack(
                    PackConfig(data_dir=work / "data", out_dir=out, shards=args.shards, workers=2),
                    quiet=True,
                    log=lambda m: None,
                )
            runs: list[dict] = []
            for r in range(args.repeats):
                order = (("local", str(local)), ("s3", remote))
                for where, shards in order if r % 2 == 0 else order[::-1]:  # alternate who goes first
                    result = one_run(where, shards, args.workers, args.batch_size, args.warmup, args.batches)
                    print(json.dumps({**result, "repeat": r}), flush=True)
                    runs.append({**result, "repeat": r})
    finally:
        proc.kill()
        proc.wait()
    med = {
        where: {
            k: statistics.median(x[k] for x in runs if x["source"] == where) for k in ("clips_per_s", "first_batch_s")
        }
        for where in ("local", "s3")
    }
    pairs = [{x["source"]: x["clips_per_s"] for x in runs if x["repeat"] == r} for r in range(args.repeats)]
    summary = {
        "bench": "s3-summary",
        "workers": args.workers,
        "repeats": args.repeats,
        "local_clips_per_s": med["local"]["clips_per_s"],
        "s3_clips_per_s": med["s3"]["clips_per_s"],
        "s3_vs_local": round(med["s3"]["clips_per_s"] / med["local"]["clips_per_s"], 3),
        # each repeat's two runs ran back to back, under the same load: their ratio is the steadier figure
        "s3_vs_local_paired": round(statistics.median(pair["s3"] / pair["local"] for pair in pairs), 3),
        "local_first_batch_s": med["local"]["first_batch_s"],
        "s3_first_batch_s": med["s3"]["first_batch_s"],
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
