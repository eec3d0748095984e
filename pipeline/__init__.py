"""clipstream: action-recognition videos to frame-exact WebDataset shards, streamed into PyTorch.

The library (see docs/API.md): `ClipLoader`, the fast persistent-worker loader; `ClipDataset`, the
same stream as a webdataset DataPipeline for a plain torch DataLoader; `ModelInput`, host-to-device
copy and normalisation; `read_shard`, one shard's samples for notebooks and checks. They are
imported on first use, so `import pipeline` stays cheap for the packer.
"""

__all__ = ["ClipDataset", "ClipLoader", "ModelInput", "read_shard"]
__version__ = "0.1.0"

_WHERE = {
    "ClipDataset": "pipeline.stream.dataset",
    "ClipLoader": "pipeline.stream.loader",
    "ModelInput": "pipeline.device",
    "read_shard": "pipeline.stream.stages",
}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
