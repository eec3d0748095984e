"""Pack throughput on HMDB-shaped clips: pack-shards against the original recipe, as processes.

Every variant runs as its own process and is timed from start to exit (interpreter start-up and
imports included: what a user waits for), alternated with the others in the same run, medians of
the repeats. Clips: `sampledata.make_bench_data` (MPEG-4 AVI, 30 fps, a keyframe every 12 frames,
40-160 frames, HMDB's common sizes), frames that carry their own index. Variants, for each N of
--workers:
  recipe-wN       benchmarks/recipe_extract.py, the recipe as written: OpenCV reads the clip once,
                  keeps only the 16 sampled frames, writes them full size as JPEG files, OpenCV
                  at its default threads (N > 1: a multiprocessing.Pool of N)
  recipe1t-wN     the same with OpenCV pinned to one thread (cv2.setNumThreads(1))
  floor-wN        PyAV decodes every frame of every clip and converts none (N processes, decoder
                  threads as pack-shards): one sequential decode is the least a frame-exact packer does
  DECODER-wN      pack-shards DATA OUT --workers N --decoder DECODER, for each of --decoders
Ratios: `vs_recipe` against the recipe as published (one process, recipe-w1), `vs_recipe_same_workers`
against the recipe given as many processes, `vs_recipe_1_thread` against recipe1t-w1. Prints a table, then one JSON line per result and per
1 -> N scaling.

    python benchmarks/bench_pack.py                         # 153 clips, 1 and 2 workers, 5 repeats
    python benchmarks/bench_pack.py --decoders pyav --repeats 9 --data /tmp/bench-clips

--engine ray: the Ray engine's overhead instead. Variants `local-w2` (pack-shards --workers 2) and
`ray` (pack-shards --engine ray on a 2-node cluster of one CPU each: `ray start --head` and a
second `ray start --address` node, started by the benchmark on 127.0.0.1 with their own temp
folder, or the cluster --ray-address / RAY_ADDRESS names), alternated; one JSON line per variant and
one `pack-engine` line with the ratio. Ray replaces 127.0.0.1 with the machine's address unless only
loopback exists: on a machine that must not listen outside, run it in a network namespace of its own
(`unshare -n sh -c 'ip link set lo up; python benchmarks/bench_pack.py --engine ray'`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def floor_run(data: Path, workers: int) -> None:
    """The decode-only floor, run in its own process (see --floor-run)."""
    files = sorted(str(p) for p in data.glob("hmdb51_org/*/*.avi"))
    if workers == 1:
        frames = sum(map(_decode_all, files))
    else:
        import multiprocessing

        with multiprocessing.Pool(workers) as pool:
            frames = sum(pool.imap_unordered(_decode_all, files, chunksize=4))
    print(frames)


def _decode_all(path: str) -> int:
    import av

    if not os.path.getsize(path):  # the natural set's empty file: nothing to decode
        return 0
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "NONE"  # one decoder thread, as pack-shards decodes
        return sum(1 for _ in c.decode(stream))


def commands(data: Path, out: Path, workers: list[int], decoders: list[str], shards: int) -> dict[str, list[str]]:
    py = sys.executable
    variants = {}
    for w in workers:
        variants[f"recipe-w{w}"] = [
            py,
            str(REPO / "benchmarks" / "recipe_extract.py"),
            str(data),
            str(out),
            "--workers",
            str(w),
        ]
        variants[f"recipe1t-w{w}"] = variants[f"recipe-w{w}"] + ["--threads", "1"]
        variants[f"floor-w{w}"] = [py, str(Path(__file__).resolve()), "--floor-run", str(data), "--workers", str(w)]
        for d in decoders:
            pack = [py, "-c", "from pipeline.cli import pack_app; pack_app()"]
            variants[f"{d}-w{w}"] = pack + [
                str(data),
                str(out),
                "--workers",
                str(w),
                "--decoder",
                d,
                "--shards",
                str(shards),
                "--quiet",
                "--max-failures",
                "1",  # the natural set's empty file (the bench checks every other clip is packed)
            ]
    return variants


# An installed package has its bytecode compiled at install time. A development shell that sets
# PYTHONDONTWRITEBYTECODE (this one does) would have every variant compile our modules from source at
# each start: 50-80 ms of a pack's start-up that no user pays. The variants run without it, and the
# warm-up round writes the .pyc files.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def bench_clips(args, work: Path) -> tuple[Path, int, int]:
    """The clip folder (--data, made if missing, else one in `work`), its clip count, and how many of
    them a pack must hold (all but the natural set's empty file)."""
    from pipeline.tools.sampledata import make_bench_data

    data = args.data or work / "data"
    if not (data / "hmdb51_org").is_dir():
        make_bench_data(data, clips=args.clips, natural=args.set == "natural")
    videos = list(data.glob("hmdb51_org/*/*.avi"))
    return data, len(videos), sum(1 for p in videos if p.stat().st_size)


def run_once(cmd: list[str], out: Path, clips: int, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env or ENV)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmark variant failed: {' '.join(cmd)}\n{proc.stderr.strip()}")
    if (out / "index.json").exists():  # a pack: every clip must be in it
        packed = json.loads((out / "index.json").read_text())["counts"]["packed"]
        if packed != clips:
            sys.exit(f"{' '.join(cmd)} packed {packed} of {clips} clips")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=153)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--decoders", default="pyav,decord", help="comma-separated pack-shards decoders")
    ap.add_argument(
        "--set",
        choices=["plain", "natural"],
        default="plain",
        help="plain: flat synthetic frames; natural: textured panning scenes, B-frames in a third of the clips, "
        "one truncated and one empty file (make_bench_data(natural=True)) [default: plain]",
    )
    ap.add_argument("--data", type=Path, help="clip folder to reuse (made if missing) [default: a temporary one]")
    ap.add_argument(
        "--shards", type=int, default=32, help="pack-shards --shards (its default; fewer for a handful of clips)"
    )
    ap.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="ray: the Ray engine against local --workers 2"
    )
    ap.add_argument(
        "--ray-address", help="--engine ray: an existing cluster [default: RAY_ADDRESS, else one started here]"
    )
    ap.add_argument("--floor-run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workers = [int(x) for x in args.workers.split(",")]
    if args.floor_run:
        return floor_run(args.floor_run, workers[0])
    if args.engine == "ray":
        return engine_main(args)

    work = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        data, clips, packable = bench_clips(args, work)
        out = work / "out"
        variants = commands(data, out, workers, [d for d in args.decoders.split(",") if d], args.shards)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for cmd in variants.values():  # warm-up: page cache, .pyc files
            run_once(cmd, out, packable)
        for _ in range(args.repeats):
            for name, cmd in variants.items():  # alternated: drift on a shared machine hits all alike
                times[name].append(run_once(cmd, out, packable))
    finally:
        shutil.rmtree(work)

    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: clips / v for k, v in med.items()}
    results = []
    for name in variants:
        w = name.rsplit("-w", 1)[1]
        results.append(
            {
                "bench": "pack",
                "variant": name,
                "workers": int(w),
                "clips": clips,
                "set": args.set,
                "median_s": round(med[name], 3),
                "clips_per_s": round(rate[name], 1),
                "vs_recipe": round(rate[name] / rate[f"recipe-w{workers[0]}"], 3),
                "vs_recipe_same_workers": round(rate[name] / rate[f"recipe-w{w}"], 3),
                "vs_recipe_1_thread": round(rate[name] / rate[f"recipe1t-w{workers[0]}"], 3),
                "runs_s": [round(t, 3) for t in times[name]],
            }
        )
    print(f"{clips} HMDB-shaped clips ({args.set} set), {args.repeats} alternated runs, medians, process wall time")
    print(f"{'variant':12} {'s':>7} {'clips/s':>8} {'x recipe':>9} {'x recipe-wN':>12} {'x recipe 1 thread':>18}")
    for r in results:
        print(
            f"{r['variant']:12} {r['median_s']:7.2f} {r['clips_per_s']:8.1f} {r['vs_recipe']:9.2f}"
            f" {r['vs_recipe_same_workers']:12.2f} {r['vs_recipe_1_thread']:18.2f}"
        )
    scaling = []
    for base in sorted({k.rsplit("-w", 1)[0] for k in variants}):
        for w in workers[1:]:
            one, many = times[f"{base}-w{workers[0]}"], times[f"{base}-w{w}"]
            s = statistics.median(one) / statistics.median(many)
            # each round ran both within seconds: its ratio is free of the drift between rounds
            per_round = statistics.median(a / b for a, b in zip(one, many))
            scaling.append(
                {
                    "bench": "pack-scaling",
                    "variant": base,
                    "workers": [workers[0], w],
                    "speedup": round(s, 3),
                    "speedup_per_round_median": round(per_round, 3),
                }
            )
            print(
                f"{base} scaling {workers[0]} -> {w} workers: {s:.2f}x (ratio of medians), {per_round:.2f}x (median of the rounds' ratios)"
            )
    for r in results + scaling:
        print(json.dumps(r))


def _ray_cluster(root: Path) -> tuple[str, dict, list[int]]:
    """A head and a second node of one CPU each on 127.0.0.1, with their own HOME and temp folder
    (a ~/.ray/auth_token left by another Ray would turn authentication on and keep the second node
    out): (address, the environment to reach it, the nodes' process groups)."""
    env = {**ENV, "HOME": str(root / "home"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    (root / "home").mkdir(parents=True)
    ray, address, groups = str(Path(sys.executable).with_name("ray")), "127.0.0.1:6379", []
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", str(root / "t")]
    for args in (["--head", "--port", "6379", "--include-dashboard", "false"], ["--address", address]):
        proc = subprocess.Popen(
            [ray, "start", *args, *node, "--disable-usage-stats"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its daemons stay in this process group: stopped by its id
        )
        groups.append(proc.pid)
        if proc.wait(timeout=180) != 0:
            _stop(groups)
            sys.exit(f"ray start {' '.join(args)} failed:\n{proc.stdout.read()}")
    return address, {**env, "RAY_ADDRESS": address}, groups


def _stop(groups: list[int]) -> None:
    import signal

    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass


def engine_main(args) -> None:
    """The Ray engine against local --workers 2 on the same clips, alternated (see the docstring)."""
    work = Path(tempfile.mkdtemp(prefix="bench-pack-", dir="/tmp"))  # short: Ray's socket paths have a limit
    groups: list[int] = []
    try:
        data, clips, packable = bench_clips(args, work)
        out = work / "out"
        address = args.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            env = {**ENV, "RAY_ADDRESS": address}
        else:
            address, env, groups = _ray_cluster(work / "ray")
        pack = [sys.executable, "-c", "from pipeline.cli import pack_app; pack_app()", str(data), str(out)]
        pack += ["--shards", str(args.shards), "--quiet", "--max-failures", "1"]  # the natural set's empty file
        variants = {"local-w2": (pack + ["--workers", "2"], ENV), "ray": (pack + ["--engine", "ray"], env)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for cmd, e in variants.values():  # warm-up: page cache, .pyc files, the cluster's first job
            run_once(cmd, out, packable, e)
        for _ in range(args.repeats):
            for name, (cmd, e) in variants.items():
                times[name].append(run_once(cmd, out, packable, e))
    finally:
        _stop(groups)
        shutil.rmtree(work, ignore_errors=True)
    results = [
        {
            "bench": "pack",
            "variant": name,
            "clips": clips,
            "median_s": round(statistics.median(t), 3),
            "runs_s": [round(x, 3) for x in t],
        }
        for name, t in times.items()
    ]
    ratio = statistics.median(times["ray"]) / statistics.median(times["local-w2"])
    per_round = statistics.median(a / b for a, b in zip(times["ray"], times["local-w2"]))
    summary = {
        "bench": "pack-engine",
        "variant": "ray",
        "against": "local-w2",
        "ray_address": address,
        "overhead": round(ratio, 3),
        "overhead_per_round_median": round(per_round, 3),
    }
    print(f"{clips} HMDB-shaped clips ({args.set} set), {args.repeats} alternated runs, medians, process wall time")
    for r in results:
        print(f"{r['variant']:10} {r['median_s']:7.2f} s")
    print(f"ray / local-w2: {ratio:.2f}x (ratio of medians), {per_round:.2f}x (median of the rounds' ratios)")
    for r in results + [summary]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
