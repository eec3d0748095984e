"""Engines: what gets the planned shards packed. Each one decodes the clips of the shards it is
given and calls `pipeline.pack.shard.write_shard` once per shard, so every engine writes the same
bytes; run_pack plans before and assembles the index and manifest after, whatever the engine.

- `local`: decoder processes on this machine (the default; also each part of a Slurm job array).
- `ray`: one Ray task per shard on the cluster RAY_ADDRESS names (imports Ray only when chosen).

An engine is `pack(cfg, out, todo, on_clips, on_shard)`: pack every shard of `todo`, calling
`on_clips(n)` as clips are done and `on_shard(plan)` after each shard is published.
"""

ENGINES = ("local", "ray")
