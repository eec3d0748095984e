"""`pack-shards --engine ray`: one Ray task per shard, on the cluster RAY_ADDRESS (or
`ray_address`) names, or on a local one started for the run.

Each task reads its videos itself, from the shared file system or object store the paths name (no
video bytes travel through Ray's object store), decodes them with the local engine's decoder
process and per-clip time-out, and publishes its shard and its resume record through
`write_shard`, exactly as a local pack does: the bytes are the same. The driver only plans,
bounds the tasks in flight, counts, and (run_pack) writes the index and manifest once every shard
is there. A task lost with its node, or killed, is retried by Ray, on another node if need be; a
driver killed and started again packs only the shards without a record.
"""

from __future__ import annotations

import logging
import os

from pipeline.errors import UserError

TASK_RETRIES = 3
"""Ray retries a task this many times (a lost worker or node, or an exception) before giving up."""

FORWARDED = ("CLIPSTREAM_FAILPOINT", "CLIPSTREAM_FAILPOINT_ONCE")
"""Crash tests' variables, passed to the tasks when the driver has them (and nothing else is: the
tasks find credentials where they run, as any process on that node would)."""

_pool = None
"""This Ray worker process's decoder pool, kept for the next shard it is given."""


def _decoder_pool(cfg):
    from pipeline.pack.pool import DecoderPool

    global _pool
    if _pool is None or _pool.timeout != cfg.timeout:
        from pipeline.pack.clip import pack_clip, preload_decoders

        preload_decoders(cfg.decoder)  # once per Ray worker, before the fork: the decoder process inherits it
        _pool = DecoderPool(1, pack_clip, cfg.timeout)
    return _pool


def _pack_one(cfg, plan) -> str:
    """A Ray task: decode the clips of one planned shard (one at a time, in a child process that a
    hung decoder costs one clip), then publish the shard and its record."""
    from pipeline.pack.clip import clip_args
    from pipeline.pack.outdir import open_out_dir
    from pipeline.pack.shard import write_shard

    pool = _decoder_pool(cfg)
    results: dict[int, dict] = {}
    sent = 0
    while len(results) < len(plan.videos):
        while pool.idle() and sent < len(plan.videos):
            pool.submit(sent, clip_args(cfg, plan.videos[sent]))
            sent += 1
        results.update(pool.wait())
    write_shard(open_out_dir(cfg.out_dir), plan, [results[i] for i in range(len(plan.videos))], cfg)
    return plan.name


def _connect(cfg) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("`engine` ray needs Ray: pip install 'clipstream[ray]'") from None
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
    env = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    common = dict(
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={"env_vars": env} if env else None,
    )
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=cfg.workers, include_dashboard=False, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise UserError(f"cannot reach {where}: {' '.join(str(e).split())}") from None


def _check_reachable(address: str) -> None:
    """A head's host:port that nothing answers on is one line now: ray.init would wait minutes."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # auto, ray://...: Ray's own business
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _failure(plan, e) -> UserError:
    import ray

    cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None else e
    text = " ".join(str(cause).split()) if isinstance(cause, UserError) else f"{type(cause).__name__}: {cause}"
    first = text.splitlines()[0] if text else type(cause).__name__
    return UserError(f"shard {plan.name} failed on the Ray cluster ({TASK_RETRIES + 1} tries): {first}")


def pack_on_ray(cfg, out, todo, on_clips, on_shard) -> None:
    """Pack every shard of `todo` as Ray tasks; see pipeline.pack.engines."""
    import ray

    _connect(cfg)
    try:
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=True)(_pack_one)
        # Enough in flight to keep every CPU busy while the driver counts, no more: the plans of a
        # Kinetics-sized pack wait here, not in the cluster's memory.
        limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue, pending = list(reversed(todo)), {}
        while queue or pending:
            while queue and len(pending) < limit:
                plan = queue.pop()
                pending[task.options(name=f"pack {plan.name}").remote(cfg, plan)] = plan
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                plan = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise _failure(plan, e) from None
                on_clips(len(plan.videos))
                on_shard(plan)
    finally:
        ray.shutdown()
