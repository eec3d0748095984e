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
    bases = ("recipe", "recipe1t", "floor", "pyav", "decord")
    assert set(results) == {f"{b}-w{w}" for b in bases for w in (1, 2)}
    assert all(r["clips"] == 8 and r["median_s"] > 0 and len(r["runs_s"]) == 1 for r in results.values())
    assert results["recipe-w1"]["vs_recipe"] == 1.0 and results["recipe1t-w1"]["vs_recipe_1_thread"] == 1.0
    scaling = {r["variant"]: r for r in lines if r["bench"] == "pack-scaling"}
    assert set(scaling) == set(bases)
    for base, r in scaling.items():
        expected = results[f"{base}-w1"]["median_s"] / results[f"{base}-w2"]["median_s"]
        assert abs(r["speedup"] - expected) < 0.01 * expected and r["speedup_per_round_median"] > 0


def test_bench_pack_natural_set_and_the_recipe_as_written(tmp_path):
    """The natural set (textured, B-frames, one truncated and one empty file) runs through every
    variant; the recipe writes 16 full-size JPEG files per readable clip, the frames at evenly
    spaced positions over the header's count, and passes over the empty file."""
    from pipeline.tools.sampledata import make_bench_data, read_code

    data = tmp_path / "data"
    truth = make_bench_data(data, clips=20, natural=True)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_pack.py"), "--set", "natural", "--data", str(data)]
    cmd += ["--repeats", "1", "--shards", "2", "--workers", "1", "--decoders", "pyav"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["variant"] for r in results} == {"recipe-w1", "recipe1t-w1", "floor-w1", "pyav-w1"}
    assert all(r["set"] == "natural" for r in results)

    out = tmp_path / "frames"
    recipe = [sys.executable, str(REPO / "benchmarks" / "recipe_extract.py"), str(data), str(out), "--threads", "1"]
    proc = subprocess.run(recipe, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["19"], proc.stdout + proc.stderr
    import cv2

    plain = next(c for c in truth if c.kind == "plain")
    files = sorted((out / plain.class_name / plain.file_name[:-4]).glob("*.jpg"), key=lambda p: int(p.stem[5:]))
    images = [cv2.imread(str(f)) for f in files]
    assert len(images) == 16 and all(im.shape[:2] == plain.size[::-1] for im in images)
    positions = [round(i * (plain.frames - 1) / 15 - 0.4999) for i in range(16)]  # np.linspace, then int()
    assert [read_code(im[..., ::-1])[0] for im in images] == positions
    assert not (out / truth[-1].class_name / truth[-1].file_name[:-4]).exists()  # the empty file
