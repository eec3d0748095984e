"""clipstream: action-recognition videos to frame-exact WebDataset shards, streamed into PyTorch."""

from pipeline.shardformat import read_shard

__all__ = ["read_shard"]
__version__ = "0.1.0"
