"""The benchmark scripts still run end to end (on a handful of clips; their figures are not judged here)."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_pack_runs_every_variant_and_checks_every_pack():
    """bench_pack exits non-zero when a variant fails or a pack lacks a clip, so a clean exit with a
    result per variant means every pack-shards run packed all 8 clips, for both decoders."""
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "bench_pack.py"),
        "--clips",
        "8",
        "--repeats",
        "1",
        "--shards",
        "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {r["variant"]: r for r in lines if r["bench"] == "pack"}
    bases = ("recipe", "floor", "pyav", "decord")
    assert set(results) == {f"{b}-w{w}" for b in bases for w in (1, 2)}
    assert all(r["clips"] == 8 and r["median_s"] > 0 and len(r["runs_s"]) == 1 for r in results.values())
    assert results["recipe-w1"]["vs_recipe"] == 1.0
    scaling = {r["variant"]: r for r in lines if r["bench"] == "pack-scaling"}
    assert set(scaling) == set(bases)
    for base, r in scaling.items():
        expected = results[f"{base}-w1"]["median_s"] / results[f"{base}-w2"]["median_s"]
        assert abs(r["speedup"] - expected) < 0.01 * expected and r["speedup_per_round_median"] > 0
