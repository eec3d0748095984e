"""build_shard writes what webdataset's TarWriter writes for the same samples, byte for byte."""

import io
import json
import tarfile

import pytest
import webdataset as wds

from pipeline.config import PackConfig
from pipeline.pack.layouts import Video
from pipeline.pack.plan import ShardPlan
from pipeline.pack.shard import build_shard
from pipeline.shardformat import pack_jpegs, sample_members


def _result(k: int) -> dict:
    jpegs = [bytes([k, i]) * (300 + 97 * i + k) for i in range(3)]  # sizes off the 512-byte blocks
    return {
        "jpgs": pack_jpegs(jpegs),
        "indices": [0, 5, 9],
        "decoded_frames": 10,
        "container_frames": 10 + k,
        "fps": 29.97,
        "original_size": [320, 240],
        "frame_size": [171, 128],
        "note": None,
    }


@pytest.mark.parametrize("clips", [0, 1, 5, 40])
def test_build_shard_equals_webdataset_tarwriter(clips, tmp_path):
    videos = tuple(Video(f"cls/clip #{k}!.avi", "cls", 2, f"clip_{k}-0123456789", (1, 2, 0)) for k in range(clips + 1))
    results = [_result(k) for k in range(clips)] + [{"error": "no decodable frame"}]  # the failed one: no sample
    plan = ShardPlan("000.tar", "train", videos)
    data, rows = build_shard(plan, results, PackConfig(data_dir=tmp_path, out_dir=tmp_path / "out", frames=3))

    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        metas = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".json")}
    expected = io.BytesIO()
    with wds.TarWriter(expected, user="", group="", mode=0o644, mtime=0, encoder=False) as w:
        for v, r in zip(videos[:clips], results):
            meta = json.loads(metas[f"{v.key}.json"])
            w.write({"__key__": v.key, **sample_members(v.label, r["jpgs"], meta)})
    assert data == expected.getvalue()
    assert [r["status"] for r in rows] == ["packed"] * clips + ["failed"]
