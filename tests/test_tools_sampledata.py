"""pipeline.tools.sampledata's benchmark set: the natural-texture clips are frame-exact for both decoders."""

import json
import tarfile

import pytest

from pipeline import read_shard
from pipeline.cli import pack_app
from pipeline.frames import clip_indices
from pipeline.tools.sampledata import make_bench_data, read_code
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def natural(tmp_path_factory):
    root = tmp_path_factory.mktemp("natural")
    return root, make_bench_data(root, clips=21, natural=True)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_natural_clips_pack_frame_exact_with_b_frames_and_damage(natural, decoder, tmp_path):
    root, truth = natural
    kinds = [c.kind for c in truth]
    assert kinds.count("bframes") == 6 and kinds[-2:] == ["truncated", "empty"]
    truncated = truth[-2]
    assert 0 < truncated.frames < 160  # cut short: fewer frames than were written
    result = run_cli(pack_app, root, tmp_path, "--decoder", decoder, "--shards", "3", "--max-failures", "1", "--quiet")
    assert result.exit_code == 0, result.output
    by_name = {c.file_name: c for c in truth}
    samples = [s for p in sorted(tmp_path.glob("*.tar")) for s in read_shard(p)]
    assert sorted(s["meta"]["source"].rsplit("/", 1)[1] for s in samples) == sorted(c.file_name for c in truth[:-1])
    for s in samples:
        c = by_name[s["meta"]["source"].rsplit("/", 1)[1]]
        assert [read_code(f) for f in s["frames"]] == [(i, c.class_index) for i in clip_indices(c.frames, 16)]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["counts"]["packed"] == 20 and index["counts"]["failed"] == 1


def test_natural_frames_cost_what_footage_costs(natural, tmp_path):
    """About 6 KB a stored frame at 128 px (real footage cut into HMDB-shaped AVIs: about 7 KB); the
    flat synthetic frames of the plain set take a fraction of that."""
    root, _ = natural
    plain = tmp_path / "plain"
    make_bench_data(plain, clips=6)
    sizes = {}
    for name, data in (("natural", root), ("plain", plain)):
        out = tmp_path / f"out-{name}"
        assert run_cli(pack_app, data, out, "--shards", "1", "--max-failures", "1", "--quiet").exit_code == 0
        with tarfile.open(next(out.glob("0*.tar"))) as tar:
            packs = [m.size for m in tar.getmembers() if m.name.endswith(".jpgs")]
        sizes[name] = sum(packs) / len(packs) / 16
    assert 4000 < sizes["natural"] < 12000, sizes
    assert sizes["plain"] < sizes["natural"] / 2, sizes
