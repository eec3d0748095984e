"""Engines: what gets the planned shards packed. Each one decodes the clips of the shards it is
given and calls `pipeline.pack.shard.write_shard` once per shard, so every engine writes the same
bytes; run_pack plans before and assembles the index and manifest after, whatever the engine.

- `local.pack_here`: decoder processes on this machine (the default; also each part of a Slurm
  job array, `--part auto`).
- `ray.pack_on_ray`: one Ray task per shard on the cluster RAY_ADDRESS names (imports Ray only
  when chosen).

An engine is a function `(cfg, out, todo, on_clips, on_shard)`: pack every ShardPlan of `todo`
into `out`, calling `on_clips(n)` as clips are done and `on_shard(plan)` after each shard is
published; run_pack (pipeline.pack.job) picks it by `PackConfig.engine`.
"""
