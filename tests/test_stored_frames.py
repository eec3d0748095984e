"""pack-shards --stored-frames: S >= T frames per clip at round(j*(n-1)/(S-1)) (or every frame up to
a cap), exactly the source frames, with the T evaluation frames among them; the default pack is
today's format."""

import json

import pytest

from pipeline import ClipDataset, read_shard
from pipeline.cli import pack_app
from pipeline.frames import clip_indices
from pipeline.tools.sampledata import read_code
from tests.conftest import assert_one_line_error, run_cli

T = 4


def _pack(small_tree, tmp_path, *args):
    out = tmp_path / "out"
    result = run_cli(pack_app, small_tree[0], out, "--frames", T, "--shards", 2, "--quiet", *args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("stored, cap", [("7", None), ("13", None), ("all", 10)])
def test_stored_frames_are_the_source_frames_of_the_formula(small_tree, tmp_path, stored, cap):
    root, truth = small_tree
    out = _pack(small_tree, tmp_path, "--stored-frames", stored, *(["--max-stored-frames", cap] if cap else []))
    index = json.loads((out / "index.json").read_text())
    assert (
        index["version"] == 2
        and index["frames_per_clip"] == T
        and index["stored_frames"] == (stored if stored == "all" else int(stored))
    )
    lengths = {c.file_name: c.frames for c in truth}
    checked = set()
    for shard in sorted(out.glob("*.tar")):
        for s in read_shard(shard):
            n = lengths[s["meta"]["source"].rsplit("/", 1)[1]]
            count = int(stored) if stored != "all" else min(n, cap)
            assert s["meta"]["stored_indices"] == clip_indices(n, count)
            assert s["meta"]["indices"] == clip_indices(n, T)  # the evaluation frames, as in a T pack
            assert [read_code(f)[0] for f in s["frames"]] == clip_indices(n, count), s["key"]
            checked.add(n)
    assert min(checked) < T and max(checked) > (cap or 0)  # short (padded) and long clips both met
    # the stream's evaluation frames are exactly the source frames round(i*(n-1)/(T-1))
    length_of = {
        s["key"]: lengths[s["meta"]["source"].rsplit("/", 1)[1]] for p in out.glob("test-*.tar") for s in read_shard(p)
    }
    streamed = {
        s["key"]: [read_code(f.numpy())[0] for f in s["frames"]] for s in ClipDataset(out, split="test", crop=None)
    }
    assert streamed.keys() == length_of.keys()
    assert all(frames == clip_indices(length_of[k], T) for k, frames in streamed.items())


def test_the_default_pack_keeps_version_1_and_its_bytes(small_tree, tmp_path):
    plain = _pack(small_tree, tmp_path / "a")
    index = json.loads((plain / "index.json").read_text())
    assert index["version"] == 1 and "stored_frames" not in index
    first = next(read_shard(plain / "000.tar"))
    assert "stored_indices" not in first["meta"] and len(first["frames"]) == T
    assert "stored_frames" not in index["options"]  # so a re-run over a pack of today's format sees the same options


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stored-frames", "8"], "S - 1 a multiple of T - 1 = 3"),
        (["--stored-frames", "2"], "--stored-frames must be 'all' or a number S in 4..4096"),
        (["--stored-frames", "many"], "--stored-frames must be a number or 'all'"),
        (["--stored-frames", "all", "--max-stored-frames", "9"], "--max-stored-frames must be in 4..4096"),
    ],
)
def test_bad_stored_frames_are_one_line_errors(small_tree, tmp_path, args, message):
    assert_one_line_error(run_cli(pack_app, small_tree[0], tmp_path / "o", "--frames", T, *args), message)
