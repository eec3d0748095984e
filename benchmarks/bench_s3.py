"""Object storage against local files: the same shards, read by the real training stream.

    python benchmarks/bench_s3.py            # ~10 minutes on 2 cores

Makes the HMDB-shaped sample set (8 classes x 80 clips, each class copied under 3 more names: 32
classes, 1792 training clips) and packs it with pack-shards' own code four times: into a local
folder and into a bucket of a real S3-API server (moto's server mode, its own process on 127.0.0.1,
so it does not share this process's GIL), each as `small` shards (512 shards of 3-4 clips, the
issue-27 worst case) and as `hmdb` shards (16 of 112 clips, as an HMDB51 pack's 3570 training clips
in 32 shards: 8 a worker; the sample clips are smaller than real ones: 5 MB a shard, not 17-30). Then, for each size, it alternates (a rotating order each repeat)
runs of ClipLoader (the loader train-stream uses: 2 workers, batch 8, crop 112) from:

    local        the local folder
    s3           s3://, straight to moto
    s3-serial    s3://, read-ahead across shards off (stages.READ_AHEAD_SHARDS = 0 in the forked workers)
    s3+delay     s3:// through a proxy on 127.0.0.1 that holds every request `--delay-ms` (30 ms:
                 a real store's GET latency, which moto on the loopback does not have)
    s3+delay-serial  the same, read-ahead off
    s3-cached    s3:// with a shard cache (cache_dir) filled by one earlier pass: a training job's
                 epoch 2 and later

Before the runs of each size, `s3-request-cost` says what a shard's request costs in CPU, read whole
one after the other: in the client (this process: s3fs, botocore, our reader) and in moto.

Each run starts a fresh loader: its time to the first batch (workers forked, index already read,
first shards opened, first batch built) is measured, then `--warmup` batches, then `--batches` timed
ones (960 clips: within epoch 1, whose first shards the fresh loader opens). Prints one JSON
line per run and, per size, a summary line with the medians and each variant's ratio to local
clips/s (of the medians, and the median of each repeat's ratio: a repeat's runs ran back to back
under the same load, so theirs is the steadier figure on a shared machine).

moto keeps objects in memory and answers on the loopback; its own CPU (about 8 ms a request here)
comes out of the same cores as the loader's, which a real S3 would not take, and on 3-clip shards
that is a request every few clips: there the s3 ratio says as much about moto as about us.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # s3kit: the tests' delaying proxy

from pipeline.config import PackConfig, StreamConfig  # noqa: E402
from pipeline.pack.job import run_pack  # noqa: E402
from pipeline.stream import stages  # noqa: E402
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


SIZES = {"small": 512, "hmdb": 16}
"""Training shards of the 1792 training clips: 3-4 clips a shard, and 112 (an HMDB51 pack's)."""
VARIANTS = ("local", "s3", "s3-serial", "s3+delay", "s3+delay-serial", "s3-cached")


BASE_CLASSES, COPIES = 8, 4
TRAIN_CLIPS = 1792
"""8 classes of 80 clips made (the slow part: ~50 s), each also copied under 3 other HMDB51 class
names: 32 classes, 1792 training clips, so a run's batches stay within epoch 1 as the issue asks."""


def widen(data: Path, copies: int) -> None:
    """Copy every class of a sample set (its clips and split files) under other HMDB51 class names."""
    import shutil

    from pipeline.tools.sampledata import HMDB51_CLASSES

    videos, splits = data / "hmdb51_org", data / "testTrainMulti_7030_splits"
    made = sorted(p.name for p in videos.iterdir())
    spare = iter(c for c in HMDB51_CLASSES if c not in made)
    for cls in made:
        for _ in range(copies - 1):
            other = next(spare)
            shutil.copytree(videos / cls, videos / other)
            for n in (1, 2, 3):
                shutil.copy(splits / f"{cls}_test_split{n}.txt", splits / f"{other}_test_split{n}.txt")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(where: str, shards: str, args, endpoint: str, cache_dir: str | None, server_pid: int) -> dict:
    import s3fs

    os.environ["AWS_ENDPOINT_URL"] = endpoint  # read by botocore in the workers, forked after this
    s3fs.S3FileSystem.clear_instance_cache()
    stages.READ_AHEAD_SHARDS = 0 if where.endswith("-serial") else SAVED_AHEAD
    cfg = StreamConfig(
        shards=(shards,), batch_size=args.batch_size, workers=args.workers, crop=112, cache_dir=cache_dir
    )
    try:
        source = resolve(cfg.shards, "train", None, False)
        batches_iter = endless_batches(source, cfg, pin_memory=False)
        server_before = cpu_seconds(server_pid)
        m = measure(batches_iter, args.warmup, args.batches, None, None)
        server_cpu = cpu_seconds(server_pid) - server_before
        batches_iter.close()
    finally:
        stages.READ_AHEAD_SHARDS = SAVED_AHEAD
    return {
        "bench": "s3",
        "source": where,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "clips": m["clips"],
        "clips_per_s": round(m["clips"] / m["seconds"], 2),
        "first_batch_s": round(m["first_batch"], 3),
        "data_wait": round(m["wait"] / m["seconds"], 4),
        # moto's CPU over the run, as a share of its seconds: taken from the same 2 cores as the loader's
        "server_cpu_share": round(server_cpu / m["seconds"], 3),
    }


SAVED_AHEAD = stages.READ_AHEAD_SHARDS


def fill_cache(url: str, cache_dir: str, endpoint: str) -> None:
    """One pass over every training shard through the cache: what epoch 1 leaves for epoch 2."""
    import s3fs

    from pipeline.storage.cache import open_cache
    from pipeline.stream.stages import Faults, read_samples

    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    source = resolve([url], "train", None, False)
    faults = Faults()
    for _ in read_samples(source.shards, False, faults, open_cache(cache_dir, None)):
        pass
    assert faults.bad == 0, faults.take()


def request_cost(url: str, endpoint: str, server_pid: int, limit: int = 200) -> dict:
    """CPU a shard's request costs, in this process (the client: s3fs, botocore, our reader) and in
    moto, per shard of `url`, read whole one after the other (up to `limit` of them): what every
    shard costs the 2 cores beside its decoding, latency aside."""
    import s3fs

    from pipeline.stream.sources import open_shard

    os.environ["AWS_ENDPOINT_URL"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    shards = resolve([url], "train", None, False).shards[:limit]
    with open_shard(shards[0].url) as f:  # the client made, the connection opened
        f.read()
    client, server = time.process_time(), cpu_seconds(server_pid)
    for shard in shards:
        with open_shard(shard.url) as f:
            f.read()
    client, server = time.process_time() - client, cpu_seconds(server_pid) - server
    return {
        "bench": "s3-request-cost",
        "url": url,
        "shards": len(shards),
        "client_cpu_ms": round(1000 * client / len(shards), 2),
        "server_cpu_ms": round(1000 * server / len(shards), 2),
    }


def summarize(size: str, runs: list[dict], args) -> dict:
    mine = [x for x in runs if x["size"] == size]
    med = {v: statistics.median(x["clips_per_s"] for x in mine if x["source"] == v) for v in VARIANTS}
    first = {v: statistics.median(x["first_batch_s"] for x in mine if x["source"] == v) for v in VARIANTS}
    pairs = [{x["source"]: x["clips_per_s"] for x in mine if x["repeat"] == r} for r in range(args.repeats)]
    return {
        "bench": "s3-summary",
        "size": size,
        "clips_a_shard": round(TRAIN_CLIPS / SIZES[size], 1),
        "workers": args.workers,
        "repeats": args.repeats,
        "delay_ms": args.delay_ms,
        "clips_per_s": {v: med[v] for v in VARIANTS},
        "vs_local": {v: round(med[v] / med["local"], 3) for v in VARIANTS[1:]},
        # each repeat's runs ran back to back, under the same load: their ratio is the steadier figure
        "vs_local_paired": {v: round(statistics.median(p[v] / p["local"] for p in pairs), 3) for v in VARIANTS[1:]},
        "first_batch_s": first,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="small,hmdb", help="which shard sizes: small, hmdb or both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--delay-ms", type=float, default=30.0, help="what the proxy adds to every request")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    assert all(s in SIZES for s in sizes), f"--sizes takes {', '.join(SIZES)}"

    import s3kit

    proc, endpoint = start_moto()
    proxy = s3kit.CuttingProxy(int(endpoint.rsplit(":", 1)[1]), ".tar", after=0, cuts=0, delay=args.delay_ms / 1000)
    # The standard variables, as a user would set them for MinIO or Ceph: read by botocore itself.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    runs: list[dict] = []
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench-clips")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            make_sample_data(work / "data", classes=BASE_CLASSES, clips_per_class=80, seed=0)
            widen(work / "data", COPIES)
            for size in sizes:
                local, remote = work / f"shards-{size}", f"s3://bench-clips/{size}/"
                for out in (local, remote):
                    run_pack(
                        PackConfig(data_dir=work / "data", out_dir=out, shards=SIZES[size], workers=2),
                        quiet=True,
                        log=lambda m: None,
                    )
                cache_dir = str(work / f"cache-{size}")
                fill_cache(remote, cache_dir, endpoint)
                print(json.dumps(request_cost(remote, endpoint, proc.pid)), flush=True)
                where = {
                    "local": (str(local), endpoint, None),
                    "s3": (remote, endpoint, None),
                    "s3-serial": (remote, endpoint, None),
                    "s3+delay": (remote, proxy.url, None),
                    "s3+delay-serial": (remote, proxy.url, None),
                    "s3-cached": (remote, endpoint, cache_dir),
                }
                for r in range(args.repeats):
                    order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]  # rotate who goes first
                    for variant in order:
                        shards, via, cache = where[variant]
                        result = {**one_run(variant, shards, args, via, cache, proc.pid), "size": size, "repeat": r}
                        print(json.dumps(result), flush=True)
                        runs.append(result)
                print(json.dumps(summarize(size, runs, args)), flush=True)
    finally:
        proxy.close()
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
