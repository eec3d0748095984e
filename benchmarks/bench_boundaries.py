"""Does the loader keep an accelerator fed across epoch boundaries? Short epochs, a simulated GPU.

    python benchmarks/bench_boundaries.py                          # this checkout
    git worktree add /tmp/base <commit>                            # any earlier version, then:
    python benchmarks/bench_boundaries.py --baseline /tmp/base     # A/B, runs alternated

A GPU step leaves the CPU to the loader; `time.sleep(step_ms)` does the same on a machine without
a GPU (bench-stream --step-ms). Generated clips are packed into a small set whose epochs are a
dozen steps long, so that epoch boundaries come often (as they did in the H100 run of
docs/BENCHMARKS.md, where they dragged real / synthetic down to 0.44-0.66). Each run takes a few
warm-up batches, then consumes `--epochs` epochs with one simulated step per batch, in a fresh
process running the chosen checkout's `pipeline.tools.bench.endless_batches`. Reported per (checkout,
workers): clips/s against what the simulated accelerator alone allows (real / synthetic), the
data-wait share, and the wait at the first step of each epoch. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PackConfig  # noqa: E402
from pipeline.pack.job import run_pack  # noqa: E402
from pipeline.tools.sampledata import make_sample_data  # noqa: E402

RUN = r"""
import json, sys, time
from pipeline.tools.bench import endless_batches
from pipeline.config import StreamConfig
try:
    from pipeline.stream.plan import steps_per_epoch
    from pipeline.stream.sources import resolve
except ImportError:  # a --baseline checkout from before pipeline/stream/ was a package
    from pipeline import stream
    steps_per_epoch, resolve = stream.steps_per_epoch, None
pattern, batch, workers, step_ms, epochs, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
cfg = StreamConfig(shards=(pattern,), batch_size=batch, workers=workers)
if resolve is not None:
    ds = resolve(cfg.shards, "train", cfg.index, cfg.allow_pipe)
    counts = [s.samples for s in ds.shards]
else:
    ds = stream.resolve_dataset(cfg)
    counts = [s.samples for s in ds.train]
if getattr(cfg, "epoch_fill", "drop") == "pad":  # the loader's default since --epoch-fill: every clip, last batch topped up
    steps = [steps_per_epoch(counts, batch, 1, cfg.seed, e, cfg.resample, pad=True) for e in range(epochs + 1)]
else:
    steps = [steps_per_epoch(counts, batch, 1, cfg.seed, e, cfg.resample) for e in range(epochs + 1)]
src = endless_batches(ds, cfg, False)
for _ in range(warmup):  # inside epoch 0
    next(src)
    time.sleep(step_ms / 1000)
waits, firsts = [], []
start = time.perf_counter()
for epoch in range(epochs + 1):
    for i in range(warmup if epoch == 0 else 0, steps[epoch]):
        t = time.perf_counter()
        next(src)
        waits.append(time.perf_counter() - t)
        if i == 0:
            firsts.append(waits[-1])
        time.sleep(step_ms / 1000)
seconds = time.perf_counter() - start
src.close()
print(json.dumps({"steps": len(waits), "seconds": seconds, "wait": sum(waits), "first_step_wait_ms": [round(1000 * f, 1) for f in firsts]}))
"""


def run_once(tree: Path, pattern: str, batch: int, workers: int, step_ms: float, epochs: int, warmup: int) -> dict:
    args = [pattern, batch, workers, step_ms, epochs, warmup]
    out = subprocess.run(
        [sys.executable, "-c", RUN, *map(str, args)],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    clips = result["steps"] * batch
    allowed = 1000 * batch / step_ms
    return {
        "clips_per_s": clips / result["seconds"],
        "real_vs_synthetic": clips / result["seconds"] / allowed,
        "data_wait": result["wait"] / result["seconds"],
        "first_step_wait_ms": statistics.median(result["first_step_wait_ms"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout of this project to compare against")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--step-ms", type=float, default=12.0, help="simulated accelerator step per batch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--clips-per-class", type=int, default=20)
    args = parser.parse_args()
    trees = {"this": Path(__file__).resolve().parent.parent}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="clipstream-bounds-") as tmp:
        work = Path(tmp)
        make_sample_data(work / "data", classes=args.classes, clips_per_class=args.clips_per_class, seed=0)
        run_pack(
            PackConfig(data_dir=work / "data", out_dir=work / "shards", shards=8, workers=2),
            quiet=True,
            log=lambda m: None,
        )
        pattern = str(work / "shards" / "<000..007>.tar")
        runs: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.repeats):
            for w in workers:
                for name, tree in trees.items():
                    runs.setdefault((name, w), []).append(
                        run_once(tree, pattern, args.batch, w, args.step_ms, args.epochs, args.warmup)
                    )
    print(
        f"simulated accelerator: {args.step_ms} ms a batch of {args.batch} = {1000 * args.batch / args.step_ms:.0f} clips/s at most; medians of {args.repeats}"
    )
    print(
        f"{'checkout':9} {'workers':>7} {'clips/s':>8} {'real/synth':>10} {'wait':>6} {'1st step of an epoch, ms':>25}"
    )
    for (name, w), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            json.dumps(
                {"bench": "boundaries", "checkout": name, "workers": w, **{k: round(v, 4) for k, v in med.items()}}
            ),
            file=sys.stderr,
        )
        print(
            f"{name:9} {w:>7} {med['clips_per_s']:8.1f} {med['real_vs_synthetic']:10.2f} {med['data_wait']:6.1%} {med['first_step_wait_ms']:25.1f}"
        )


if __name__ == "__main__":
    main()
