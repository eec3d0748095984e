"""The streaming side: packed shards -> per-epoch, per-rank, per-worker plans -> uint8 batches.

One job a file:
- sources.py  URL schemes, shard patterns and packed folders, THE index reader, opening a shard
- httpio.py   HTTP(S) reads: retries, resumed connections, deadlines (imported for http URLs only)
- tar.py      THE tar reader (every tool uses it)
- samples.py  raw-sample stages: read with fault counting, shuffle, quota, resume skip; read_shard
- plan.py     epoch permutation, rank/worker split, steps per epoch, step schedule (pure)
- clips.py    crop draw, JPEG decode, crop and flip into a batch row
- workers.py  persistent worker processes and their shared-memory batch slots
- loader.py   ClipLoader (state_dict, evaluation passes, pinning)
- dataset.py  ClipDataset, the webdataset DataPipeline

The public names are exported by `pipeline` itself (pipeline.ClipLoader, ...); nothing is imported
here, so that tools needing one module (inspect needs tar.py) do not import torch.
"""
