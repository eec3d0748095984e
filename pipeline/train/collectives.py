"""The few collectives the loop needs beyond DDP's, each a no-op in one process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.device import DistEnv


def gather(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """(world_size, *t.shape): every rank's `t`, on every rank."""
    if env.world_size == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(env.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def broadcast_text(text: str, env: DistEnv, device: torch.device) -> str:
    """Rank 0's `text` (a path: any length, any bytes the file system allows), on every rank. The
    length goes first, so nothing is cut (a fixed 1024-byte buffer cut a long --log-dir silently and
    the run wrote into its parent), and the bytes are the file system's (os.fsencode), so a
    non-UTF-8 name is no failure without a message."""
    if env.world_size == 1:
        return text
    data = os.fsencode(text) if env.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if env.rank == 0 and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return os.fsdecode(bytes(buf.cpu().tolist()))


def agree_min(value: int, env: DistEnv, device: torch.device) -> int:
    """The smallest of every rank's `value`, on every rank."""
    agreed = torch.tensor([value], device=device)
    if env.world_size > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())
