"""The default engine: decoder processes on this machine (also what each part of a Slurm job array
runs). One pool serves every shard, so decoding never waits while a shard is written: clips go out
in plan order, and each shard is published as soon as its clips are all back."""

from __future__ import annotations

import itertools

from pipeline.pack.clip import clip_args, pack_clip, preload_decoders
from pipeline.pack.pool import DecoderPool
from pipeline.pack.shard import write_shard


def pack_here(cfg, out, todo, on_clips, on_shard) -> None:
    """Pack every shard of `todo` with `cfg.workers` decoder processes; see pipeline.pack.engines."""
    jobs = [v for p in todo for v in p.videos]  # grouped by shard, in plan order
    shard_ends = list(itertools.accumulate(len(p.videos) for p in todo))
    # Clips scheduled but not yet written: bounds memory; a shard's worth beyond the workers'
    # share lets one slow clip at the head of a shard hold up writing, not decoding.
    window = cfg.workers * 8 + max(len(p.videos) for p in todo)
    preload_decoders(cfg.decoder)
    pool = DecoderPool(cfg.workers, pack_clip, cfg.timeout)
    results: dict[int, dict] = {}
    scheduled = written = shard = 0
    try:
        while written < len(jobs):
            while pool.idle() and scheduled < len(jobs) and scheduled - written < window:
                pool.submit(scheduled, clip_args(cfg, jobs[scheduled]))
                scheduled += 1
            if pool.busy():
                done = pool.wait()
                results.update(done)
                on_clips(len(done))
            # Write every shard at the head whose clips are all back, in plan order.
            while shard < len(todo) and all(i in results for i in range(written, shard_ends[shard])):
                write_shard(out, todo[shard], [results.pop(i) for i in range(written, shard_ends[shard])], cfg)
                written, shard = shard_ends[shard], shard + 1
                on_shard(todo[shard - 1])
    except BaseException:
        pool.stop()
        raise
    pool.close()
