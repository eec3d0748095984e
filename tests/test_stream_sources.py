"""pipeline/stream/sources.py: shards resolved from patterns, folders, URLs and the index."""

import json
import shutil
from pathlib import Path

import httpkit
import pytest
import streamkit
from streamkit import cfg_for, epoch_batches

from pipeline.config import StreamConfig
from pipeline.errors import UserError
from pipeline.storage import urls
from pipeline.stream import sources


def test_expand_shards_checks_existence_pipes_and_duplicates(packed):
    with pytest.raises(UserError, match="no shards match"):
        sources.expand_shards([f"{packed}/<100..103>.tar"], allow_pipe=False)
    with pytest.raises(UserError, match=r"1 of 9 shards .* do not exist, e.g. '.*008.tar'"):
        sources.expand_shards([f"{packed}/<000..008>.tar"], allow_pipe=False)
    with pytest.raises(UserError, match="`allow_pipe`"):
        sources.expand_shards(["pipe:cat 000.tar"], allow_pipe=False)
    assert sources.expand_shards(["pipe:cat 000.tar"], allow_pipe=True) == ["pipe:cat 000.tar"]
    with pytest.raises(UserError, match="listed twice"):
        sources.expand_shards([f"{packed}/000.tar::{packed}/000.tar"], allow_pipe=False)


def test_resolve_dataset_reads_counts_and_test_shards_from_the_index(packed):
    ds = streamkit.resolve(cfg_for(packed))
    index = json.loads((packed / "index.json").read_text())
    assert [s.samples for s in ds.train.shards] == [e["samples"] for e in index["splits"]["train"]["shards"]]
    assert ds.train.samples == 48 and ds.train.frames == 4 and len(ds.train.classes) == 4
    assert [Path(s.url).name for s in ds.test.shards] == ["test-000.tar", "test-001.tar"]
    assert [s.samples for s in ds.test.shards] == [8, 8]
    # given explicitly
    ds = streamkit.resolve(cfg_for(packed, eval_shards=(f"{packed}/test-000.tar",)))
    assert [Path(s.url).name for s in ds.test.shards] == ["test-000.tar"]


def test_index_problems_are_user_errors(tmp_path, packed):
    folder = tmp_path / "p"
    shutil.copytree(packed, folder)
    (folder / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable index"):
        streamkit.resolve(cfg_for(folder))
    (folder / "index.json").unlink()
    with pytest.raises(UserError, match="cannot read index"):
        streamkit.resolve(cfg_for(folder))
    index = json.loads((packed / "index.json").read_text())
    index["splits"]["train"]["shards"] = index["splits"]["train"]["shards"][:7]
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="007.tar' is not a training shard"):
        streamkit.resolve(cfg_for(folder))


def test_streams_over_http(packed):
    with httpkit.serve(packed) as base:
        cfg = StreamConfig(shards=(f"{base}/<000..007>.tar",), batch_size=4, workers=2, crop=24)
        ds = streamkit.resolve(cfg)
        assert ds.test.shards[0].url == f"{base}/test-000.tar"
        remote = [k for b in epoch_batches(ds, cfg, 0, 0, 1) for k in b["key"]]
        local_ds = streamkit.resolve(cfg_for(packed, shuffle_buffer=256))
        local = [k for b in epoch_batches(local_ds, cfg_for(packed, shuffle_buffer=256), 0, 0, 1) for k in b["key"]]
        assert remote == local
        with pytest.raises(UserError, match="cannot read index"):
            streamkit.resolve(StreamConfig(shards=(f"{base}/nothere/000.tar",)))


def test_pre_signed_urls_are_matched_to_the_index_by_their_path(packed):
    """Pre-signed object-store URLs carry their signature in the query string: the shard's name in
    the index is its path's last segment, and index.json is looked for beside the path."""

    class Signed(httpkit.Quiet):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0].endswith(".tar") and "sig=" not in self.path:
                self.send_error(403, "unsigned")
                return
            super().do_GET()

    with httpkit.serve(packed, Signed) as base:
        cfg = StreamConfig(shards=(f"{base}/<000..007>.tar?sig=a%2Fb&X-Expires=60",), batch_size=4, workers=2, crop=24)
        assert urls.index_location(cfg.shards[0]) == f"{base}/index.json"
        ds = streamkit.resolve(cfg)
        assert [s.samples for s in ds.train.shards] == [6] * 8
        signed = epoch_batches(ds, cfg, 0, 0, 1)
        assert not [f for b in signed for f in b["faults"]]
        local_cfg = cfg_for(packed, shuffle_buffer=256)
        local = epoch_batches(streamkit.resolve(local_cfg), local_cfg, 0, 0, 1)
        assert [b["key"] for b in signed] == [b["key"] for b in local]
        assert all(a["frames"].equal(b["frames"]) for a, b in zip(signed, local))
